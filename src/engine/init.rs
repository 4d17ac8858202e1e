//! Container init layers without a snapshot per container.
//!
//! dockerd makes every container in three steps: `CreateReadWrite` of
//! `<id>-init` over the image's top layer, a `Get` in which it writes a
//! handful of placeholders (`/etc/hosts`, `/etc/hostname`,
//! `/etc/resolv.conf`, `/dev/console`, `/.dockerenv`, their directories),
//! a `Put`; then `CreateReadWrite` of `<id>` over `<id>-init`. Made as plain
//! layers, the second step costs an RBD snapshot of the init layer (a
//! monitor round trip, hundreds of milliseconds) and its removal another.
//!
//! Instead, with `rbd.sharedinit` (the default):
//!
//! 1. `create` of an init layer records it [`InitContent::Pending`], with no
//!    image;
//! 2. its `Get` mounts an overlay over its parent's (read-only) mount, so
//!    whatever dockerd writes lands in a local upper directory;
//! 3. its `Put` lists exactly what was written (the upper directory, or a
//!    full comparison with the parent when the upper holds anything but
//!    plain files, directories and symlinks), fingerprints it (paths,
//!    types, modes, owners, contents, link targets, xattrs; not times), and
//!    serves the layer from the shared init layer of that parent and
//!    fingerprint ([`LayerKind::SharedInit`], made on first use: a clone of
//!    the parent with those files written, sealed once). The init layer is
//!    then [`InitContent::Shared`]: a record whose image is the shared one's.
//!
//! A container's read-write layer is a clone of the shared layer's
//! snapshot, so starting a container costs one clone and no snapshot, and
//! removing its init layer costs one record. Containers whose init files
//! differ (another user namespace mapping, another dockerd) get another
//! shared layer, never a wrong one. Where sharing is impossible (no overlay
//! support on the host, another host still building the shared layer) the
//! init layer gets an image of its own with the same files, as before.
//!
//! A shared init layer lives as long as its parent: when the parent is
//! retired, its shared init layers without children go with it.
//!
//! Lock order: a layer, then its parent, then the parent's shared init
//! layer; operations that need more than one take them in that order or at
//! once.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ceph_client::rbd::{self, Image};
use graphdriver_api::ChangeKind;
use graphdriver_api::diff::{IdMappings, LayerChange, apply_layer, changes_dirs, export_changes};
use metadata::{InitContent, LayerKind, LayerRecord, LayerState};
use sha2::{Digest, Sha256};

use super::locks::Held;
use super::mounts::{MOUNTS, MountOn, MountRecord, MountState};
use super::{Engine, EngineError, Result, ceph, io, now};
use crate::crashpoint::{self, CrashPoint};
use crate::error_chain;
use crate::fs;
use crate::names::{LayerId, SEALED_SNAP};

/// How long a `Put` waits for another host to finish the shared init layer
/// it needs before giving the init layer an image of its own.
const SHARED_BUILD_WAIT: Duration = Duration::from_secs(30);

/// What [`Engine::materialize`] writes into a new image.
enum Files<'a> {
    /// `changes`, read from the directory `from` (a mount of another
    /// layer than the one being made).
    Dir {
        changes: &'a [LayerChange],
        from: &'a Path,
    },
    /// A tar file of them.
    Tar(&'a Path),
    /// None: the clone only.
    Nothing,
}

/// What dockerd wrote into a pending init layer (or a staged one).
pub(crate) struct Written {
    pub(crate) changes: Vec<LayerChange>,
    fingerprint: String,
}

fn init_err(layer: &LayerId, what: impl std::fmt::Display) -> EngineError {
    EngineError::Conflict {
        layer: layer.to_string(),
        reason: what.to_string(),
    }
}

impl Engine {
    /// The layer whose mount `id`'s mount uses, if any: a pending init
    /// layer's parent, a shared init layer's user's shared layer.
    pub(crate) fn dependency(&self, id: &LayerId) -> Result<Option<String>> {
        if let Some(m) = self.local.get(&MOUNTS, id.as_str())? {
            return Ok(m.on.map(|on| on.layer().to_string()));
        }
        if !id.is_init() {
            return Ok(None);
        }
        Ok(match self.store.layers().get(id.as_str())? {
            Some(r) => match r.value.init {
                Some(InitContent::Pending) => r.value.parent,
                Some(InitContent::Shared { layer }) => Some(layer),
                None => None,
            },
            None => None,
        })
    }

    /// Locks layer `id` and the layer its mount uses, if any.
    pub(crate) fn lock_layer(&self, id: &LayerId) -> Result<Held<'_>> {
        loop {
            let dependency = self.dependency(id)?;
            let held = self
                .locks
                .lock(&[id.as_str(), dependency.as_deref().unwrap_or("")]);
            if self.dependency(id)? == dependency {
                return Ok(held);
            }
        }
    }

    /// `create` of a container's init layer over `parent`: a record, no
    /// image (its files come with its first `Put`).
    pub(crate) fn create_pending_init(
        &self,
        id: &LayerId,
        parent: &LayerId,
        prec: &LayerRecord,
    ) -> Result<()> {
        let record = LayerRecord {
            parent: Some(parent.to_string()),
            image: self.settings.naming.layer_image(id),
            kind: LayerKind::Init,
            state: LayerState::Created,
            depth: prec.depth + 1,
            size: prec.size,
            quota: None,
            sealed: false,
            holders: BTreeSet::from([self.host_id.clone()]),
            created_by: self.host_id.clone(),
            created_at: now(),
            init: Some(InitContent::Pending),
        };
        self.record_new_layer(id, &record)?;
        tracing::info!(layer = %id, %parent, "init layer recorded; its files come with its first Put");
        Ok(())
    }

    fn init_dir(&self, id: &LayerId) -> PathBuf {
        self.home.join("init").join(id.file_name())
    }

    /// `Get` of a pending init layer: an overlay over its parent's mount.
    /// Where the host cannot mount one, the layer gets an image of its own
    /// and is mounted as any layer.
    pub(crate) fn get_pending_init(
        &self,
        id: &LayerId,
        rec: &LayerRecord,
        mount_label: &str,
    ) -> Result<PathBuf> {
        let parent = LayerId::parse(rec.parent.as_deref().unwrap_or_default())?;
        let lower = self.get_locked(&parent, mount_label, false)?;
        let dir = self.init_dir(id);
        let on = |upper| MountOn::Overlay {
            lower: parent.to_string(),
            upper,
        };
        match self.mount_overlay_layer(id, &rec.image, &lower, &dir, on)? {
            Ok(target) => {
                tracing::info!(layer = %id, %parent, "init layer mounted as an overlay over its parent");
                Ok(target)
            }
            Err(e) => {
                tracing::warn!(layer = %id, error = %e, "cannot mount an overlay for the init layer; it gets an image of its own");
                self.make_own_init(id, None)?;
                self.get_locked(id, mount_label, false)
            }
        }
    }

    /// Mounts layer `id` (its image `image`, not mapped) as an overlay over
    /// `lower`, the root of the mount that `on(<dir>/upper)` names, writes
    /// going to `<dir>/upper`; `dir` (upper and work directories) starts
    /// out empty. Recorded `Mounting` first, `Mounted` once up. When the
    /// overlay cannot be mounted, its record and its use of the lower
    /// mount are released and the mount's error is returned inside `Ok`,
    /// for the caller's fallback.
    pub(crate) fn mount_overlay_layer(
        &self,
        id: &LayerId,
        image: &str,
        lower: &Path,
        dir: &Path,
        on: impl FnOnce(PathBuf) -> MountOn,
    ) -> Result<std::result::Result<PathBuf, fs::FsError>> {
        let upper = dir.join("upper");
        let target = self.rootfs_path(id);
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io("remove", dir))?;
        }
        let mut m = MountRecord {
            v: 1,
            state: MountState::Mounting,
            refcount: 0,
            image: image.to_string(),
            read_only: false,
            device: None,
            mountpoint: target.clone(),
            on: Some(on(upper.clone())),
            idle_until: None,
        };
        self.local.put(&MOUNTS, id.as_str(), &m)?;
        match fs::mount_overlay(lower, &upper, &dir.join("work"), &target) {
            Ok(()) => {
                m.state = MountState::Mounted;
                m.refcount = 1;
                self.local.put(&MOUNTS, id.as_str(), &m)?;
                Ok(Ok(target))
            }
            Err(e) => {
                self.release(id, &m)?;
                Ok(Err(e))
            }
        }
    }

    /// `Get` of an init layer served by shared init layer `shared`: that
    /// layer's (read-only) mount.
    pub(crate) fn get_shared_init_user(
        &self,
        id: &LayerId,
        rec: &LayerRecord,
        shared: &str,
        mount_label: &str,
    ) -> Result<PathBuf> {
        let shared = LayerId::parse(shared)?;
        let root = self.get_locked(&shared, mount_label, false)?;
        let m = MountRecord {
            v: 1,
            state: MountState::Mounted,
            refcount: 1,
            image: rec.image.clone(),
            read_only: true,
            device: None,
            mountpoint: self.rootfs_path(id),
            on: Some(MountOn::Layer {
                layer: shared.to_string(),
            }),
            idle_until: None,
        };
        if let Err(e) = self.local.put(&MOUNTS, id.as_str(), &m) {
            self.put_locked(&shared)?;
            return Err(e.into());
        }
        Ok(root)
    }

    /// Unmounts a pending init layer's overlay, forgets what was written
    /// and releases its parent's mount.
    pub(crate) fn drop_overlay(
        &self,
        id: &LayerId,
        m: &MountRecord,
        lower: &str,
        upper: &Path,
    ) -> Result<()> {
        if fs::is_mounted(&m.mountpoint) {
            fs::umount(&m.mountpoint).map_err(super::fs_err("umount", id))?;
        }
        let dir = upper.parent().unwrap_or(upper);
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io("remove", dir))?;
        }
        let _ = std::fs::remove_dir(&m.mountpoint);
        let _ = std::fs::remove_dir(self.mountpoint_dir(id));
        self.local.remove(&MOUNTS, id.as_str())?;
        self.put_locked(&LayerId::parse(lower)?)
    }

    /// The last `Put` of a pending init layer: serve it from the shared
    /// init layer holding the same files (made now if there is none), or
    /// give it an image of its own; then drop the overlay. For an image of
    /// its own, the files are spooled first and written once the overlay
    /// is gone: while the overlay's mount record stands, a mount of the
    /// layer is the overlay itself.
    pub(crate) fn finish_pending_init(
        &self,
        id: &LayerId,
        m: &MountRecord,
        lower: &str,
        upper: &Path,
    ) -> Result<()> {
        let started = Instant::now();
        let result = (|| {
            let parent = LayerId::parse(lower)?;
            let written = self.written(id, &m.mountpoint, &self.rootfs_path(&parent), upper)?;
            let shared = LayerId::shared_init(&parent, &written.fingerprint);
            let _held = self.locks.lock(&[shared.as_str()]);
            let prec = self.record(&parent)?;
            match self.ensure_shared_init(&shared, &parent, &prec, &m.mountpoint, &written)? {
                Some(srec) => {
                    self.serve_from_shared(id, &shared, &srec)?;
                    tracing::info!(
                        layer = %id,
                        shared_init = %shared,
                        changes = written.changes.len(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "init layer served by a shared init layer"
                    );
                    Ok(None)
                }
                None => {
                    let spool = self.init_dir(id).with_extension("tar");
                    self.spool_changes(id, &m.mountpoint, &written.changes, &spool)?;
                    Ok(Some(spool))
                }
            }
        })();
        let dropped = self.drop_overlay(id, m, lower, upper);
        let spool = match (result, dropped) {
            (Ok(spool), Ok(())) => spool,
            (Err(e), _) | (Ok(_), Err(e)) => return Err(e),
        };
        if let Some(spool) = spool {
            let made = self.make_own_init(id, Some(&spool));
            let _ = std::fs::remove_file(&spool);
            made?;
            tracing::info!(layer = %id, "init layer got an image of its own");
        }
        Ok(())
    }

    /// What dockerd wrote into a pending init layer mounted at `merged`
    /// over `lower`, its overlay changes in `upper`.
    pub(crate) fn written(
        &self,
        id: &LayerId,
        merged: &Path,
        lower: &Path,
        upper: &Path,
    ) -> Result<Written> {
        let changes = match scan_upper(upper, lower).map_err(io("read", upper))? {
            Some(changes) => changes,
            None => {
                tracing::info!(layer = %id, "init layer holds more than files, directories and links; comparing it with its parent in full");
                changes_dirs(merged, Some(lower)).map_err(|e| init_err(id, error_chain(&e)))?
            }
        };
        let fingerprint = fingerprint(merged, &changes).map_err(io("read", merged))?;
        Ok(Written {
            changes,
            fingerprint,
        })
    }

    /// The shared init layer `shared` over `parent` with `written`'s
    /// files: the existing one, or one made now. `None` when it cannot be
    /// had (another host is still making it, or it is being removed).
    fn ensure_shared_init(
        &self,
        shared: &LayerId,
        parent: &LayerId,
        prec: &LayerRecord,
        merged: &Path,
        written: &Written,
    ) -> Result<Option<LayerRecord>> {
        let layers = self.store.layers();
        let waited = Instant::now();
        loop {
            let current = layers.get(shared.as_str())?;
            match current.as_ref().map(|c| &c.value) {
                Some(r) if r.state == LayerState::Created && r.sealed => {
                    return Ok(Some(r.clone()));
                }
                Some(r) if r.state == LayerState::Creating && r.created_by == self.host_id => {
                    // Left by a crash of this host (its lock is ours now).
                    tracing::warn!(layer = %shared, "rolling back an interrupted shared init layer");
                    self.finish_removal(shared, r)?;
                    continue;
                }
                Some(r)
                    if r.state == LayerState::Creating && waited.elapsed() < SHARED_BUILD_WAIT =>
                {
                    tracing::debug!(layer = %shared, host = %r.created_by, "waiting for another host's shared init layer");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                Some(r) => {
                    tracing::info!(layer = %shared, state = ?r.state, host = %r.created_by, "the shared init layer cannot be used now");
                    return Ok(None);
                }
                None => {}
            }
            let mut record = LayerRecord {
                parent: Some(parent.to_string()),
                image: self.settings.naming.layer_image(shared),
                kind: LayerKind::SharedInit,
                state: LayerState::Creating,
                depth: prec.depth + 1,
                size: 0,
                quota: None,
                sealed: false,
                holders: BTreeSet::new(),
                created_by: self.host_id.clone(),
                created_at: now(),
                init: None,
            };
            let created = match layers.create(shared.as_str(), &record) {
                Ok(created) => created,
                Err(metadata::Error::Exists { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            let files = Files::Dir {
                changes: &written.changes,
                from: merged,
            };
            let made = self
                .materialize(shared, &prec.image, &record.image, files)
                .and_then(|size| {
                    let img = Image::open(&self.ioctx, &record.image, None)
                        .map_err(ceph("open", shared))?;
                    img.snap_create(SEALED_SNAP)
                        .map_err(ceph("snapshot", shared))?;
                    Ok(size)
                });
            match made {
                Ok(size) => {
                    record.state = LayerState::Created;
                    record.sealed = true;
                    record.size = size;
                    layers.replace(shared.as_str(), &created, &record)?;
                    tracing::info!(layer = %shared, %parent, changes = written.changes.len(), "shared init layer made");
                    return Ok(Some(record));
                }
                Err(e) => {
                    tracing::warn!(layer = %shared, error = %e, "making the shared init layer failed; rolling back");
                    if let Err(undo) = self.finish_removal(shared, &record) {
                        tracing::error!(layer = %shared, error = %undo, "rolling back the shared init layer failed; fsck will report it");
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Points pending init layer `id` at shared init layer `shared`.
    fn serve_from_shared(&self, id: &LayerId, shared: &LayerId, srec: &LayerRecord) -> Result<()> {
        let written = self
            .store
            .layers()
            .update(id.as_str(), |current| match current {
                Some(r) if r.init == Some(InitContent::Pending) => Ok(Some(LayerRecord {
                    image: srec.image.clone(),
                    sealed: true,
                    size: srec.size,
                    depth: srec.depth,
                    init: Some(InitContent::Shared {
                        layer: shared.to_string(),
                    }),
                    ..r.clone()
                })),
                _ => Err(()),
            })?;
        written.map(|_| ()).map_err(|()| {
            init_err(
                id,
                "was removed or changed while its init files were being written",
            )
        })
    }

    /// Gives pending init layer `id` an image of its own: its parent's
    /// clone with the changes in tar file `spool` written. Recorded
    /// `Creating` first, so a crash is rolled back like any create.
    fn make_own_init(&self, id: &LayerId, spool: Option<&Path>) -> Result<()> {
        let layers = self.store.layers();
        let marked = layers.update(id.as_str(), |current| match current {
            Some(r) if r.init == Some(InitContent::Pending) => Ok(Some(LayerRecord {
                state: LayerState::Creating,
                init: None,
                ..r.clone()
            })),
            _ => Err(()),
        })?;
        let Ok(Some(mut record)) = marked else {
            return Err(init_err(
                id,
                "was removed or changed while its init files were being written",
            ));
        };
        let parent = LayerId::parse(record.parent.as_deref().unwrap_or_default())?;
        let prec = self.record(&parent)?;
        let files = spool.map_or(Files::Nothing, Files::Tar);
        let made = self.materialize(id, &prec.image, &record.image, files);
        let current = layers
            .get(id.as_str())?
            .ok_or_else(|| init_err(id, "its record vanished while it was being made"))?;
        match made {
            Ok(size) => {
                record.state = LayerState::Created;
                record.size = size;
                layers.replace(id.as_str(), &current, &record)?;
                Ok(())
            }
            Err(e) => {
                if let Err(undo) = self.remove_layer_image_of(id, &record) {
                    tracing::error!(layer = %id, error = %undo, "rolling back the init layer's image failed; fsck will report it");
                }
                // Back to pending: dockerd's next Get retries.
                record.state = LayerState::Created;
                record.init = Some(InitContent::Pending);
                layers.replace(id.as_str(), &current, &record)?;
                Err(e)
            }
        }
    }

    /// Clones `source@sealed` to `image` for layer `id` and writes `files`
    /// into it. Returns the image size.
    fn materialize(
        &self,
        id: &LayerId,
        source: &str,
        image: &str,
        files: Files<'_>,
    ) -> Result<u64> {
        rbd::clone(
            &self.ioctx,
            source,
            SEALED_SNAP,
            &self.ioctx,
            image,
            &self.image_options(),
        )
        .map_err(ceph("clone", id))?;
        crashpoint::reached(CrashPoint::InitCloned);
        let identity = IdMappings::identity();
        let tar: Option<Result<Box<dyn Read>>> = match files {
            Files::Nothing => None,
            Files::Dir { changes: [], .. } => None,
            Files::Dir { changes, from } => Some(
                export_changes(from, changes, &identity)
                    .map(|t| Box::new(t) as Box<dyn Read>)
                    .map_err(|e| init_err(id, error_chain(&e))),
            ),
            Files::Tar(path) => Some(
                std::fs::File::open(path)
                    .map(|f| Box::new(f) as Box<dyn Read>)
                    .map_err(io("open", path)),
            ),
        };
        if let Some(tar) = tar {
            let root = self.get_locked(id, "", true)?;
            let applied = tar.and_then(|mut tar| {
                apply_layer(&root, &mut tar, &identity).map_err(|e| init_err(id, error_chain(&e)))
            });
            let put = self.put_locked(id);
            applied?;
            put?;
        }
        let img = Image::open(&self.ioctx, image, None).map_err(ceph("open", id))?;
        img.size().map_err(ceph("size", id))
    }

    fn remove_layer_image_of(&self, id: &LayerId, rec: &LayerRecord) -> Result<()> {
        self.release_local(id, false)?;
        super::layers::remove_layer_image(&self.ioctx, id.as_str(), &rec.image)
    }

    /// Removes the shared init layers over retired layer `parent` that no
    /// container's layer is cloned from any more.
    pub(crate) fn collect_shared_inits(&self, parent: &LayerId) -> Result<()> {
        for info in self.list()? {
            let rec = info.record;
            if rec.kind != LayerKind::SharedInit || rec.parent.as_deref() != Some(parent.as_str()) {
                continue;
            }
            let shared = LayerId::parse(&info.id)?;
            let _held = self.locks.lock(&[shared.as_str()]);
            if self.has_children(&shared, &rec)? {
                continue;
            }
            let marked = self
                .store
                .layers()
                .update(shared.as_str(), |current| match current {
                    Some(r)
                        if r.kind == LayerKind::SharedInit && r.state == LayerState::Created =>
                    {
                        Ok(Some(LayerRecord {
                            state: LayerState::Removing,
                            ..r.clone()
                        }))
                    }
                    _ => Err(()),
                })?;
            if let Ok(Some(marked)) = marked {
                self.release_local(&shared, false)?;
                self.finish_removal(&shared, &marked)?;
                tracing::info!(layer = %shared, %parent, "shared init layer removed with its parent");
            }
        }
        Ok(())
    }

    fn mountpoint_dir(&self, id: &LayerId) -> PathBuf {
        self.mount_dir.join(id.file_name())
    }
}

/// The changes an overlay's upper directory holds, if it holds only
/// directories, regular files (not hard-linked) and symlinks without
/// overlay attributes; `None` when it holds anything else (whiteouts,
/// opaque or redirected directories, devices, hard links), for which only
/// a full comparison is exact. `lower` tells additions from modifications.
fn scan_upper(upper: &Path, lower: &Path) -> std::io::Result<Option<Vec<LayerChange>>> {
    let mut out = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        for entry in std::fs::read_dir(upper.join(&rel))? {
            let entry = entry?;
            let rel = rel.join(entry.file_name());
            let path = upper.join(&rel);
            let meta = std::fs::symlink_metadata(&path)?;
            let kind = meta.file_type();
            let plain = if kind.is_dir() {
                pending.push(rel.clone());
                true
            } else {
                (kind.is_file() && meta.nlink() == 1) || kind.is_symlink()
            };
            if !plain || has_overlay_xattr(&path)? {
                return Ok(None);
            }
            let change = match std::fs::symlink_metadata(lower.join(&rel)) {
                Ok(_) => ChangeKind::Modify,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => ChangeKind::Add,
                Err(e) => return Err(e),
            };
            out.push(LayerChange::new(Path::new("/").join(&rel), change));
        }
    }
    out.sort();
    Ok(Some(out))
}

/// Whether `path` in an overlay's upper directory carries an attribute
/// that changes what the merged view shows beyond the entry itself: an
/// opaque directory (hides the lower one), a redirect (a renamed
/// directory) or a metadata-only copy-up. Bookkeeping ones (`origin`,
/// `impure`) change nothing visible.
fn has_overlay_xattr(path: &Path) -> std::io::Result<bool> {
    Ok(xattr::list(path)?.any(|name| {
        matches!(
            name.as_bytes(),
            b"trusted.overlay.opaque" | b"trusted.overlay.redirect" | b"trusted.overlay.metacopy"
        )
    }))
}

/// A digest of what `changes` hold in `root`: for each path, the kind of
/// change and, unless deleted, the file type, mode, owner, device number,
/// size, content, link target, hard-link group and extended attributes.
/// Times are left out: two init layers with the same files written at
/// different times are the same.
fn fingerprint(root: &Path, changes: &[LayerChange]) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut links: std::collections::HashMap<(u64, u64), Vec<u8>> = Default::default();
    let mut changes = changes.to_vec();
    changes.sort();
    for change in &changes {
        let rel = change.path.strip_prefix("/").unwrap_or(&change.path);
        let path_bytes = change.path.as_os_str().as_bytes();
        h.update((path_bytes.len() as u64).to_le_bytes());
        h.update(path_bytes);
        h.update([change.kind as u8]);
        if change.kind == ChangeKind::Delete {
            continue;
        }
        let path = root.join(rel);
        let meta = std::fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        let type_tag: u8 = if ft.is_dir() {
            b'd'
        } else if ft.is_file() {
            b'f'
        } else if ft.is_symlink() {
            b'l'
        } else if ft.is_char_device() {
            b'c'
        } else if ft.is_block_device() {
            b'b'
        } else if ft.is_fifo() {
            b'p'
        } else {
            b's'
        };
        h.update([type_tag]);
        for n in [
            meta.mode() as u64,
            meta.uid() as u64,
            meta.gid() as u64,
            meta.rdev(),
        ] {
            h.update(n.to_le_bytes());
        }
        if ft.is_file() {
            if meta.nlink() > 1 {
                let first = links
                    .entry((meta.dev(), meta.ino()))
                    .or_insert_with(|| path_bytes.to_vec());
                h.update(b"link");
                h.update((first.len() as u64).to_le_bytes());
                h.update(&*first);
            }
            h.update(meta.len().to_le_bytes());
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path)?;
            let bytes = target.as_os_str().as_bytes();
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        let mut names: Vec<_> = xattr::list(&path)?
            .filter(|n| !n.as_bytes().starts_with(b"trusted.overlay."))
            .collect();
        names.sort();
        for name in names {
            let value = xattr::get(&path, &name)?.unwrap_or_default();
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((value.len() as u64).to_le_bytes());
            h.update(&value);
        }
    }
    Ok(format!("{:x}", h.finalize()))
}
