//! A container's read-write layer at the `Get` dockerd makes when it
//! creates the container, without mapping its image.
//!
//! dockerd mounts a new container's layer once at create (to make the
//! working directory and volume mountpoints, most often writing nothing)
//! and unmounts it, then mounts it again to start the container. Mapping
//! the image for the first of these is most of a container's start-up
//! cost on docker-rbd. The layer was just cloned from the sealed snapshot
//! of its init layer's shared init layer, so it holds exactly that layer's
//! files; so:
//!
//! 1. `create` of a read-write layer over an init layer served by a
//!    shared init layer (no size option) notes it *fresh*, in memory;
//! 2. its first `Get` (within [`FRESH_FOR`], in the same run) mounts an
//!    overlay over the shared init layer's read-only mount
//!    ([`MountOn::Staged`]), so that what dockerd writes lands in a local
//!    upper directory;
//! 3. its last `Put` lists what was written: nothing (the usual case), and
//!    the overlay goes, the image never mapped; something, and it is
//!    spooled to a tar file, the spool recorded ([`STAGED`]), the overlay
//!    dropped, the image mapped and the tar applied to it, then the
//!    record removed. A spool still recorded (a crash, a failed apply) is
//!    applied by the next `Get` of the layer before anything else, and at
//!    startup.
//!
//! The next `Get` (the container's start) maps the image as usual. A
//! daemon killed while the overlay is mounted drops it at restart, as it
//! drops a pending init layer's.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use graphdriver_api::diff::{IdMappings, apply_layer, export_changes};
use metadata::{InitContent, LayerKind, LayerRecord};
use serde::{Deserialize, Serialize};

use super::mounts::{MountOn, MountRecord};
use super::{Engine, EngineError, Result, io};
use crate::crashpoint::{self, CrashPoint};
use crate::error_chain;
use crate::localstate::Table;
use crate::names::LayerId;

/// How long after its `create` a read-write layer's first `Get` is taken
/// for dockerd's create-time one (it follows at once).
pub const FRESH_FOR: Duration = Duration::from_secs(60);

/// A spool of what dockerd wrote at create, to apply to the layer's image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedApply {
    /// The tar file.
    pub spool: PathBuf,
}

/// Spools recorded and not yet applied, by layer id.
pub const STAGED: Table<StagedApply> = Table::new("staged");

/// Read-write layers created in this run and not mounted since: the
/// shared init layer each holds the files of, and when it was made.
#[derive(Default)]
pub(crate) struct FreshLayers {
    layers: std::sync::Mutex<std::collections::HashMap<LayerId, (LayerId, Instant)>>,
}

impl FreshLayers {
    fn note(&self, id: &LayerId, shared: LayerId) {
        self.layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), (shared, Instant::now()));
    }

    /// The shared init layer `id` holds the files of, if `id` is fresh;
    /// it is not fresh any more.
    fn take(&self, id: &LayerId) -> Option<LayerId> {
        let mut layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        layers.retain(|_, (_, at)| at.elapsed() < FRESH_FOR);
        layers.remove(id).map(|(shared, _)| shared)
    }
}

impl Engine {
    /// After a successful `create` of layer `id`: notes it fresh when its
    /// first `Get` can be staged.
    pub(crate) fn note_fresh(&self, id: &LayerId, rec: &LayerRecord, prec: Option<&LayerRecord>) {
        if rec.kind != LayerKind::ReadWrite || rec.quota.is_some() {
            return;
        }
        if let Some(InitContent::Shared { layer }) = prec.and_then(|p| p.init.as_ref())
            && let Ok(shared) = LayerId::parse(layer)
            && prec.is_some_and(|p| p.size == rec.size)
        {
            self.fresh.note(id, shared);
        }
    }

    /// `Get` of a read-write layer with its lock held: its create-time one
    /// staged when it is fresh (`None` otherwise, or when staging failed:
    /// then it is mapped as usual).
    pub(crate) fn get_staged(
        &self,
        id: &LayerId,
        rec: &LayerRecord,
        mount_label: &str,
    ) -> Result<Option<PathBuf>> {
        let Some(shared) = self.fresh.take(id) else {
            return Ok(None);
        };
        // Lock order: the layer (held), then the shared init layer. Once
        // the mount record names it, `lock_layer` of this layer takes it too.
        let _shared_held = self.locks.lock(&[shared.as_str()]);
        let lower = self.get_locked(&shared, mount_label, false)?;
        let dir = self.stage_dir(id);
        let on = |upper| MountOn::Staged {
            lower: shared.to_string(),
            upper,
        };
        match self.mount_overlay_layer(id, &rec.image, &lower, &dir, on)? {
            Ok(target) => {
                tracing::info!(layer = %id, shared_init = %shared, "container layer staged as an overlay for dockerd's create");
                Ok(Some(target))
            }
            Err(e) => {
                tracing::warn!(layer = %id, error = %e, "cannot stage the container layer as an overlay; mapping it");
                Ok(None)
            }
        }
    }

    /// The last `Put` of a staged layer: drops the overlay, first putting
    /// what dockerd wrote (if anything) into the layer's image.
    pub(crate) fn finish_staged(
        &self,
        id: &LayerId,
        m: &MountRecord,
        lower: &str,
        upper: &Path,
    ) -> Result<()> {
        let started = Instant::now();
        let shared = LayerId::parse(lower)?;
        let written = self.written(id, &m.mountpoint, &self.rootfs_path(&shared), upper);
        let changes = match written {
            Ok(w) => w.changes,
            Err(e) => {
                let _ = self.drop_overlay(id, m, lower, upper);
                return Err(e);
            }
        };
        if changes.is_empty() {
            self.drop_overlay(id, m, lower, upper)?;
            tracing::info!(layer = %id, "nothing written at create; the image was not mapped");
            return Ok(());
        }
        // Intent first: the spool and its record, then the overlay goes.
        let spool = self
            .home
            .join("stage")
            .join(format!("{}.tar", id.file_name()));
        let spooled = (|| -> Result<()> {
            self.spool_changes(id, &m.mountpoint, &changes, &spool)?;
            self.local.put(
                &STAGED,
                id.as_str(),
                &StagedApply {
                    spool: spool.clone(),
                },
            )?;
            Ok(())
        })();
        if spooled.is_ok() {
            crashpoint::reached(CrashPoint::StagedSpooled);
        }
        let dropped = self.drop_overlay(id, m, lower, upper);
        spooled?;
        dropped?;
        self.apply_staged(id)?;
        tracing::info!(
            layer = %id,
            changes = changes.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "what dockerd wrote at create is in the layer's image"
        );
        Ok(())
    }

    /// Writes `changes` of layer `id`, read from `merged`, as a tar file at
    /// `spool` (synced).
    pub(crate) fn spool_changes(
        &self,
        id: &LayerId,
        merged: &Path,
        changes: &[graphdriver_api::diff::LayerChange],
        spool: &Path,
    ) -> Result<()> {
        if let Some(dir) = spool.parent() {
            std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        }
        let identity = IdMappings::identity();
        let mut tar = export_changes(merged, changes, &identity)
            .map_err(|e| staged_err(id, error_chain(&e)))?;
        let mut file = File::create(spool).map_err(io("create", spool))?;
        std::io::copy(&mut tar, &mut file).map_err(io("write", spool))?;
        file.flush()
            .and_then(|()| file.sync_all())
            .map_err(io("write", spool))
    }

    /// Applies a recorded spool of layer `id` to its image (lock held),
    /// then forgets it. Nothing to do without one.
    pub(crate) fn apply_staged(&self, id: &LayerId) -> Result<()> {
        let Some(staged) = self.local.get(&STAGED, id.as_str())? else {
            return Ok(());
        };
        // `creating`: an internal mount, not staged again.
        let root = self.get_locked(id, "", true)?;
        let applied = File::open(&staged.spool)
            .map_err(io("open", &staged.spool))
            .and_then(|mut tar| {
                let identity = IdMappings::identity();
                apply_layer(&root, &mut tar as &mut dyn std::io::Read, &identity)
                    .map_err(|e| staged_err(id, error_chain(&e)))
            });
        let put = self.put_locked(id);
        applied?;
        put?;
        self.forget_staged(id)
    }

    /// Drops layer `id`'s spool, applied or not wanted (the layer goes).
    pub(crate) fn forget_staged(&self, id: &LayerId) -> Result<()> {
        if let Some(staged) = self.local.get(&STAGED, id.as_str())? {
            match std::fs::remove_file(&staged.spool) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &staged.spool)(e)),
            }
            self.local.remove(&STAGED, id.as_str())?;
        }
        Ok(())
    }

    /// Startup: applies the spools a previous run left.
    pub(crate) fn recover_staged(&self) {
        let rows = match self.local.list(&STAGED) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the staged spools");
                return;
            }
        };
        for (key, _) in rows {
            let Ok(id) = LayerId::parse(&key) else {
                let _ = self.local.remove(&STAGED, &key);
                continue;
            };
            let done = self
                .lock_layer(&id)
                .and_then(|_held| self.apply_staged(&id));
            match done {
                Ok(()) => {
                    tracing::info!(layer = %id, "applied what dockerd wrote at create before the previous run stopped")
                }
                Err(e) => {
                    tracing::error!(layer = %id, error = %e, "cannot apply what dockerd wrote at create; the layer's next Get tries again")
                }
            }
        }
    }

    fn stage_dir(&self, id: &LayerId) -> PathBuf {
        self.home.join("stage").join(id.file_name())
    }
}

fn staged_err(id: &LayerId, what: impl std::fmt::Display) -> EngineError {
    EngineError::Conflict {
        layer: id.to_string(),
        reason: format!("what dockerd wrote at create cannot be put into its image: {what}"),
    }
}
