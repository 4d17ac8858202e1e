//! A container's read-write layer answered before its image is cloned.
//!
//! `CreateReadWrite` of a container's layer over an init layer served by a
//! shared init layer (no size option, no flatten) records the layer
//! `Cloning` and answers at once; the clone of its parent's sealed
//! snapshot runs on a thread of its own while dockerd finishes creating the
//! container, whose create-time `Get` is staged over the shared init
//! layer's files and needs no image ([`super::staged`]). The thread moves
//! the record to `Created` once the clone is made.
//!
//! Whatever needs the image (mapping it at the container's start, removing
//! the layer, making it a parent) first calls [`Engine::ensure_cloned`]
//! with the layer's lock held. It waits for this daemon's clone thread if
//! one runs, and otherwise (the daemon restarted, the thread failed, the
//! layer was recorded by another host) makes the clone itself; a restarted
//! daemon rolls its host's `Cloning` layers forward the same way. An image
//! found already there is kept if it is a clone of the right snapshot and
//! replaced if not (a clone cut short by a crash).
//!
//! The record is written before the answer: a crash between the two
//! leaves a `Cloning` layer dockerd never learned of, which a restart
//! rolls back rather than forward ([`Engine::recover_cloning`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use ceph_client::{IoCtx, rbd};
use metadata::{LayerRecord, LayerState};

use super::layers::remove_layer_image;
use super::{Engine, EngineError, Result, ceph};
use crate::crashpoint::{self, CrashPoint};
use crate::fleet::dockerfs::DockerRoot;
use crate::names::{LayerId, SEALED_SNAP};

/// This daemon's clone threads, by layer.
#[derive(Default)]
pub(crate) struct Clones {
    running: Mutex<HashMap<LayerId, Arc<Running>>>,
}

/// One clone thread: done once it ended, whether or not it made the clone.
#[derive(Default)]
struct Running {
    done: Mutex<bool>,
    ended: Condvar,
}

impl Running {
    fn finish(&self) {
        *self.done.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.ended.notify_all();
    }

    fn wait(&self) {
        let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        while !*done {
            done = self
                .ended
                .wait(done)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// What a clone thread needs: no reference to the engine, which may be
/// dropped (dockerd's Init again) while the thread runs.
struct CloneJob {
    id: LayerId,
    source: String,
    image: String,
    options: rbd::ImageOptions,
    ioctx: Arc<IoCtx>,
    store: metadata::Store,
}

impl CloneJob {
    fn run(&self) -> Result<()> {
        crashpoint::reached(CrashPoint::CloneDeferred);
        clone_once(
            &self.ioctx,
            &self.id,
            &self.source,
            &self.image,
            &self.options,
        )?;
        let moved = self
            .store
            .layers()
            .update(self.id.as_str(), |current| match current {
                Some(r) if r.state == LayerState::Cloning && r.image == self.image => {
                    Ok(Some(LayerRecord {
                        state: LayerState::Created,
                        ..r.clone()
                    }))
                }
                _ => Err(()),
            })?;
        if moved.is_err() {
            tracing::info!(layer = %self.id, "the layer changed while it was cloned; its next user finishes it");
        }
        Ok(())
    }
}

impl Engine {
    /// `create` of read-write layer `id` over `parent` whose image is
    /// cloned in the background: records it `Cloning` (`record`, made by
    /// `create`) and starts the clone of `source`'s sealed snapshot.
    pub(crate) fn create_cloning(
        &self,
        id: &LayerId,
        source: &str,
        mut record: LayerRecord,
        prec: &LayerRecord,
    ) -> Result<()> {
        record.state = LayerState::Cloning;
        record.size = prec.size;
        self.record_new_layer(id, &record)?;
        self.note_fresh(id, &record, Some(prec));
        let job = CloneJob {
            id: id.clone(),
            source: source.to_string(),
            image: record.image.clone(),
            options: self.image_options(),
            ioctx: self.ioctx.clone(),
            store: self.store.clone(),
        };
        let running = Arc::new(Running::default());
        self.clones
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), running.clone());
        let started = std::time::Instant::now();
        let span = tracing::Span::current();
        let spawned = std::thread::Builder::new()
            .name("clone".into())
            .spawn(move || {
                let _span = span.enter();
                match job.run() {
                    Ok(()) => tracing::info!(
                        image = %job.image,
                        source = %job.source,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "layer cloned in the background"
                    ),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "background clone failed; the layer's next user makes it"
                    ),
                }
                running.finish();
            });
        if let Err(e) = spawned {
            // The record says Cloning: the next user makes the clone.
            self.forget_clone(id);
            tracing::warn!(layer = %id, error = %e, "cannot start a clone thread; the layer's next user clones it");
        }
        tracing::info!(image = %record.image, %source, "layer recorded; its clone runs in the background");
        Ok(())
    }

    /// With layer `id`'s lock held: its record, once its image exists. A
    /// `Cloning` layer's clone thread is waited for; without one, or if it
    /// failed, the clone is made here and the record moved to `Created`.
    pub(crate) fn ensure_cloned(&self, id: &LayerId) -> Result<LayerRecord> {
        let layers = self.store.layers();
        let read = || {
            layers
                .get(id.as_str())?
                .ok_or_else(|| EngineError::NotFound {
                    layer: id.to_string(),
                })
        };
        let mut current = read()?;
        if current.value.state != LayerState::Cloning {
            return Ok(current.value);
        }
        let running = self
            .clones
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned();
        if let Some(running) = running {
            let waited = std::time::Instant::now();
            running.wait();
            self.forget_clone(id);
            tracing::debug!(
                layer = %id,
                waited_ms = waited.elapsed().as_millis() as u64,
                "waited for the layer's background clone"
            );
            current = read()?;
            if current.value.state != LayerState::Cloning {
                return Ok(current.value);
            }
        }
        let parent = LayerId::parse(current.value.parent.as_deref().unwrap_or_default())?;
        let source = self.record(&parent)?.image;
        tracing::info!(layer = %id, image = %current.value.image, %source, "making the clone of a layer recorded as cloning");
        clone_once(
            &self.ioctx,
            id,
            &source,
            &current.value.image,
            &self.image_options(),
        )?;
        let done = LayerRecord {
            state: LayerState::Created,
            ..current.value.clone()
        };
        layers.replace(id.as_str(), &current, &done)?;
        Ok(done)
    }

    /// Startup, with layer `id`'s lock held: a layer this host left
    /// `Cloning`. dockerd learns of a layer from the answer to its
    /// `CreateReadWrite` and names it in its layer database
    /// (`layerdb/mounts/<container>/mount-id`) right after; a layer that
    /// database does not name was cut short before the answer, and is
    /// rolled back like a `Creating` one. Any other (named, or with no
    /// database to ask) is cloned.
    pub(crate) fn recover_cloning(&self, id: &LayerId) -> Result<()> {
        let rec = self.record(id)?;
        if rec.state != LayerState::Cloning {
            return Ok(());
        }
        if dockerd_knows(&self.home, id) == Some(false) {
            tracing::warn!(layer = %id, "rolling back a container layer dockerd never learned of (its create was cut short)");
            return self.roll_back_create(id, &rec);
        }
        tracing::info!(layer = %id, "finishing a clone cut short by a crash or shutdown");
        self.ensure_cloned(id).map(drop)
    }

    fn forget_clone(&self, id: &LayerId) {
        self.clones
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }
}

/// Whether the layer database of the dockerd whose driver Home is `home`
/// names layer `id` as a container's; `None` when there is no database to
/// ask (no dockerd, as in tests of the engine alone). A container's layer
/// is made over an image's, so a dockerd that made one has image layers in
/// its database, and its first container's layer makes the `mounts`
/// directory.
fn dockerd_knows(home: &Path, id: &LayerId) -> Option<bool> {
    let root = DockerRoot::of_home(home)?;
    if !root.layers_dir().is_dir() {
        return None;
    }
    match root.container_of_mount(id.as_str()) {
        Ok(container) => Some(container.is_some()),
        Err(e) => {
            tracing::warn!(layer = %id, error = %e, "cannot read dockerd's layer database; keeping the layer");
            None
        }
    }
}

/// Clones `source@sealed` to `image`, unless `image` is that clone already
/// (a clone made before a crash or by another thread); an image of that
/// name that is not (cut short by a crash) is removed first.
fn clone_once(
    ioctx: &IoCtx,
    id: &LayerId,
    source: &str,
    image: &str,
    options: &rbd::ImageOptions,
) -> Result<()> {
    match rbd::clone(ioctx, source, SEALED_SNAP, ioctx, image, options) {
        Ok(()) => return Ok(()),
        Err(e) if e.errno() == Some(libc::EEXIST) => {}
        Err(e) => return Err(ceph("clone", id)(e)),
    }
    let parent = rbd::Image::open_read_only(ioctx, image, None)
        .and_then(|img| img.parent())
        .map_err(ceph("open", id))?;
    if parent.is_some_and(|p| p.image_name == source && p.snap_name == SEALED_SNAP) {
        return Ok(());
    }
    tracing::warn!(layer = %id, %image, "replacing an image that is not the layer's clone (a clone cut short)");
    remove_layer_image(ioctx, id.as_str(), image)?;
    rbd::clone(ioctx, source, SEALED_SNAP, ioctx, image, options).map_err(ceph("clone", id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerds_layer_database_says_whether_it_knows_a_container_layer() {
        let root = tempfile::tempdir().unwrap();
        let home = root.path().join("rbd");
        let known = LayerId::parse(&"a".repeat(64)).unwrap();
        let unknown = LayerId::parse(&"b".repeat(64)).unwrap();
        // No database: cannot tell.
        assert_eq!(dockerd_knows(&home, &known), None);
        // Image layers, no container yet: no container layer is known.
        let layerdb = root.path().join("image/rbd/layerdb");
        std::fs::create_dir_all(layerdb.join("sha256")).unwrap();
        assert_eq!(dockerd_knows(&home, &known), Some(false));
        let mounts = layerdb.join("mounts").join("c".repeat(64));
        std::fs::create_dir_all(&mounts).unwrap();
        std::fs::write(mounts.join("mount-id"), known.as_str()).unwrap();
        assert_eq!(dockerd_knows(&home, &known), Some(true));
        assert_eq!(dockerd_knows(&home, &unknown), Some(false));
    }
}
