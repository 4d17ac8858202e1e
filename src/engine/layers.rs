//! Layer lifecycle: create (clone), seal (snapshot), remove, recover.

use std::collections::BTreeSet;

use ceph_client::IoCtx;
use ceph_client::rbd::{self, Image, ImageOptions};
use metadata::{InitContent, LayerKind, LayerRecord, LayerState};

use super::locks::Held;
use super::{Engine, EngineError, Result, ceph, fs_err, now};
use crate::config::FsType;
use crate::crashpoint::{self, CrashPoint};
use crate::fs;
use crate::names::{LayerId, SEALED_SNAP};
use graphdriver_api::diff::{IdMappings, apply_layer, changes_dirs, export_changes};

/// RBD features of every image docker-rbd makes: layering for clones,
/// exclusive-lock so one writer at a time. Both are supported by every krbd
/// since 4.9; object-map and fast-diff are left out for older kernels.
pub const IMAGE_FEATURES: u64 =
    ceph_client::rbd::RBD_FEATURE_LAYERING | ceph_client::rbd::RBD_FEATURE_EXCLUSIVE_LOCK;

/// How a layer is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// What the layer is for.
    pub kind: LayerKind,
    /// `size=` storage option: the layer's capacity in bytes.
    pub size: Option<u64>,
    /// SELinux label for the mounts made while creating.
    pub mount_label: String,
}

/// What `GetMetadata`, `Status` and the CLI show of a layer.
/// A removal whose intent is recorded (the layer is `Removing`) and whose
/// slow part, [`Engine::purge`], is still to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purge {
    /// The layer.
    pub id: LayerId,
    /// Its record as marked.
    pub record: LayerRecord,
    /// Its parent, to collect if it was kept only for this layer.
    pub parent: Option<LayerId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// The layer id.
    pub id: String,
    /// Its record.
    pub record: LayerRecord,
}

/// Smallest `size=` accepted: below this a filesystem is of no use.
pub const MIN_LAYER_SIZE: u64 = 16 << 20;

/// How long a removal waits for a layer's last users to Put it.
pub const REMOVE_IN_USE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Engine {
    /// Features and object size of every image the engine makes.
    pub(crate) fn image_options(&self) -> ImageOptions {
        let map = if self.settings.object_map {
            rbd::RBD_FEATURE_OBJECT_MAP | rbd::RBD_FEATURE_FAST_DIFF
        } else {
            0
        };
        ImageOptions {
            features: Some(IMAGE_FEATURES | map),
            order: Some(self.settings.object_order),
        }
    }

    /// Creates layer `id` on `parent` (empty: on the base image).
    /// Creating a layer that already exists with the same parent succeeds
    /// (Docker retries after errors).
    /// Refused at once, before anything is recorded, while the pool is
    /// full ([`EngineError::PoolFull`]).
    #[tracing::instrument(skip(self, opts), fields(kind = ?opts.kind, size = ?opts.size))]
    pub fn create(&self, id: &str, parent: &str, opts: &CreateOptions) -> Result<()> {
        self.create_layer(id, parent, opts)
            .map_err(|e| self.explain_full(e))
    }

    fn create_layer(&self, id: &str, parent: &str, opts: &CreateOptions) -> Result<()> {
        let id = Self::parse(id)?;
        let parent = LayerId::parse_parent(parent)?;
        if let Some(size) = opts.size
            && size < MIN_LAYER_SIZE
        {
            return Err(EngineError::StorageOpt {
                key: "size".into(),
                value: crate::units::format_size(size),
                reason: format!("below the {} MiB minimum", MIN_LAYER_SIZE >> 20),
            });
        }
        self.ensure_room()?;
        let _held = self
            .locks
            .lock(&[id.as_str(), parent.as_ref().map_or("", LayerId::as_str)]);
        let layers = self.store.layers();
        let parent_str = parent.as_ref().map(|p| p.to_string());

        if let Some(existing) = layers.get(id.as_str())? {
            let rec = &existing.value;
            match rec.state {
                LayerState::Created | LayerState::Cloning if rec.parent == parent_str => {
                    self.add_holder(&id)?;
                    tracing::info!("layer exists already with the same parent");
                    return Ok(());
                }
                LayerState::Creating if rec.created_by == self.host_id => {
                    tracing::warn!("rolling back an interrupted earlier create");
                    self.roll_back_create(&id, rec)?;
                }
                LayerState::Removing => {
                    // Removed, its purge still queued: finish it first.
                    self.finish_removal(&id, rec)?;
                }
                state => {
                    return Err(EngineError::Conflict {
                        layer: id.to_string(),
                        reason: format!(
                            "already exists (state {state:?}, parent {:?}, created by {})",
                            rec.parent, rec.created_by
                        ),
                    });
                }
            }
        }

        let mut parent_rec = None;
        let (source, depth, source_size) = match &parent {
            None => (self.ensure_base()?, 0, self.settings.base_size),
            Some(p) => {
                // A container layer as a parent (not dockerd's way, but
                // allowed): its image first.
                let prec = self.ensure_cloned(p)?;
                if prec.state != LayerState::Created {
                    return Err(EngineError::Conflict {
                        layer: p.to_string(),
                        reason: format!("cannot be a parent in state {:?}", prec.state),
                    });
                }
                if prec.init == Some(InitContent::Pending) {
                    return Err(EngineError::Conflict {
                        layer: p.to_string(),
                        reason: "cannot be a parent before its init files are written (Get, Put)"
                            .into(),
                    });
                }
                self.seal(p, &prec)?;
                let made = (prec.image.clone(), prec.depth + 1, prec.size);
                parent_rec = Some(prec);
                made
            }
        };
        let flatten = depth > self.settings.flatten_depth;
        // xfs cannot shrink: a limit below the parent's size is a quota.
        let quota = opts
            .size
            .filter(|&want| self.settings.fs == FsType::Xfs && want < source_size);
        if let Some(want) = quota
            && crate::fs::xfs_quota_missing()
        {
            return Err(EngineError::StorageOpt {
                key: "size".into(),
                value: crate::units::format_size(want),
                reason: format!(
                    "below the {} of the layer beneath, an xfs layer is limited by a project \
                     quota, and this kernel has no XFS quota support (CONFIG_XFS_QUOTA)",
                    crate::units::format_size(source_size)
                ),
            });
        }
        // After the size checks: dockerd passes the container's storage
        // options to its init layer too, and does not remove the init layer
        // when the container's own layer is then refused.
        if opts.kind == LayerKind::Init
            && self.settings.shared_init
            && let Some(p) = &parent
        {
            return self.create_pending_init(&id, p, &self.record(p)?);
        }
        let image = self.settings.naming.layer_image(&id);
        let record = LayerRecord {
            parent: parent_str,
            image: image.clone(),
            kind: opts.kind,
            state: LayerState::Creating,
            depth: if flatten { 0 } else { depth },
            size: 0,
            quota,
            sealed: false,
            holders: BTreeSet::from([self.host_id.clone()]),
            created_by: self.host_id.clone(),
            created_at: now(),
            init: None,
        };
        if let Some(prec) = parent_rec
            .as_ref()
            .filter(|prec| defers_clone(opts, flatten, prec))
        {
            return self.create_cloning(&id, &source, record, prec);
        }
        let created = self.record_new_layer(&id, &record)?;

        crashpoint::reached(CrashPoint::CreateRecorded);
        match self.clone_layer(&id, parent.as_ref(), &source, &image, flatten, opts) {
            Ok(Made { size, copied }) => {
                let mut done = record;
                done.state = LayerState::Created;
                done.size = size;
                if copied {
                    // No RBD parent: a chain of its own from here.
                    done.depth = 0;
                }
                layers.replace(id.as_str(), &created, &done)?;
                if opts.size.is_none() {
                    self.note_fresh(&id, &done, parent_rec.as_ref());
                }
                tracing::info!(%image, %source, depth = done.depth, flatten, size, "layer created");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "create failed; rolling back");
                if let Err(undo) = self.roll_back_create(&id, &record) {
                    tracing::error!(error = %undo, "rolling back a failed create failed; fsck will report it");
                }
                Err(e)
            }
        }
    }

    /// Records new layer `id`; a record there already (another host's
    /// create of the same id, between our check and our write) is a
    /// conflict.
    pub(crate) fn record_new_layer(
        &self,
        id: &LayerId,
        record: &LayerRecord,
    ) -> Result<metadata::Versioned<LayerRecord>> {
        self.store
            .layers()
            .create(id.as_str(), record)
            .map_err(|e| match e {
                metadata::Error::Exists { .. } => EngineError::Conflict {
                    layer: id.to_string(),
                    reason: "is being created concurrently by another host".into(),
                },
                e => e.into(),
            })
    }

    /// Clones `source@sealed` (the image of `parent`, or the base) to
    /// `image`, flattens it if asked, and applies the size option: grows
    /// the image and its filesystem, shrinks an ext4 filesystem and then
    /// the image (or, below the smallest size the clone's filesystem can
    /// shrink to, makes a filesystem of that size and copies the parent's
    /// files in), or sets an xfs project quota.
    fn clone_layer(
        &self,
        id: &LayerId,
        parent: Option<&LayerId>,
        source: &str,
        image: &str,
        flatten: bool,
        opts: &CreateOptions,
    ) -> Result<Made> {
        rbd::clone(
            &self.ioctx,
            source,
            SEALED_SNAP,
            &self.ioctx,
            image,
            &self.image_options(),
        )
        .map_err(ceph("clone", id))?;
        crashpoint::reached(CrashPoint::CreateCloned);
        let img = Image::open(&self.ioctx, image, None).map_err(ceph("open", id))?;
        if flatten {
            let started = std::time::Instant::now();
            img.flatten(|_, _| {}).map_err(ceph("flatten", id))?;
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "flattened to bound the clone chain"
            );
        }
        let current = img.size().map_err(ceph("size", id))?;
        let cloned = |size| Made {
            size,
            copied: false,
        };
        let Some(want) = opts.size else {
            return Ok(cloned(current));
        };
        if want == current {
            return Ok(cloned(current));
        }
        match self.settings.fs {
            FsType::Ext4 if want > current => {
                img.resize(want).map_err(ceph("resize", id))?;
                self.resize_ext4_layer(id, image, None)?;
                Ok(cloned(want))
            }
            FsType::Ext4 => match self.resize_ext4_layer(id, image, Some(want)) {
                Ok(()) => {
                    img.resize(want).map_err(ceph("resize", id))?;
                    Ok(cloned(want))
                }
                Err(e) if below_shrink_minimum(&e) => {
                    drop(img);
                    tracing::info!(
                        size = want,
                        "below what the clone's ext4 can shrink to; making a filesystem of that size"
                    );
                    self.make_small_ext4(id, parent, image, want, &opts.mount_label)?;
                    Ok(Made {
                        size: want,
                        copied: true,
                    })
                }
                Err(e) => Err(e),
            },
            FsType::Xfs if want > current => {
                img.resize(want).map_err(ceph("resize", id))?;
                drop(img);
                self.grow_xfs_layer(id, &opts.mount_label)?;
                Ok(cloned(want))
            }
            FsType::Xfs => {
                drop(img);
                self.quota_layer(id, want, &opts.mount_label)?;
                Ok(cloned(current))
            }
        }
    }

    /// Replaces the clone `image` of layer `id` (being created) by an
    /// image of `bytes` with a filesystem of its own, and copies the files
    /// of `parent` (none: the base, which has none) into it. A clone's
    /// ext4 keeps the inode tables of the filesystem it was cloned from and
    /// cannot shrink below them (about 120 MiB for 10 GiB); this one is
    /// made for its size. Costs a copy of the parent's files, once.
    fn make_small_ext4(
        &self,
        id: &LayerId,
        parent: Option<&LayerId>,
        image: &str,
        bytes: u64,
        mount_label: &str,
    ) -> Result<()> {
        remove_layer_image(&self.ioctx, id.as_str(), image)?;
        rbd::create(&self.ioctx, image, bytes, &self.image_options())
            .map_err(ceph("create", id))?;
        self.format_image(image, CrashPoint::ResizeMapped)?;
        let Some(parent) = parent else {
            return Ok(());
        };
        // Create holds the layer's and the parent's locks; the parent's
        // mount may use a third layer's (a shared init layer).
        let dependency = self.dependency(parent)?;
        let _dependency = dependency
            .as_deref()
            .filter(|d| ![id.as_str(), parent.as_str()].contains(d))
            .map(|d| self.locks.lock(&[d]));
        let from = self.get_locked(parent, mount_label, false)?;
        let copied = (|| {
            let used = fs::used_bytes(&from).map_err(fs_err("statfs", parent))?;
            if used >= bytes {
                return Err(EngineError::StorageOpt {
                    key: "size".into(),
                    value: crate::units::format_size(bytes),
                    reason: format!(
                        "the layers beneath already hold {}",
                        crate::units::format_size(used)
                    ),
                });
            }
            let to = self.get_locked(id, mount_label, true)?;
            let identity = IdMappings::identity();
            let applied = changes_dirs(&from, None)
                .map_err(|e| copy_err(id, &e))
                .and_then(|changes| {
                    export_changes(&from, &changes, &identity).map_err(|e| copy_err(id, &e))
                })
                .and_then(|mut tar| {
                    apply_layer(&to, &mut tar as &mut dyn std::io::Read, &identity)
                        .map_err(|e| copy_err(id, &e))
                });
            let put = self.put_locked(id);
            applied?;
            put
        })();
        let put = self.put_locked(parent);
        copied.and(put)
    }

    /// Seals a layer: takes its `sealed` snapshot, which its children are
    /// cloned from. A layer still mounted writable here (BuildKit writes
    /// through `Get` on layers made with `Create`) is synced and frozen
    /// around the snapshot so the snapshot is consistent.
    fn seal(&self, id: &LayerId, rec: &LayerRecord) -> Result<()> {
        if rec.sealed {
            return Ok(());
        }
        let img = Image::open(&self.ioctx, &rec.image, None).map_err(ceph("open", id))?;
        if !img
            .snap_exists(SEALED_SNAP)
            .map_err(ceph("snapshot lookup", id))?
        {
            let frozen = self.freeze_if_mounted_writable(id)?;
            let result = img.snap_create(SEALED_SNAP);
            if let Some(frozen) = frozen {
                frozen.thaw().map_err(fs_err("thaw", id))?;
            }
            match result {
                Ok(()) => {
                    crashpoint::reached(CrashPoint::SealSnapshotted);
                    tracing::info!(layer = %id, "sealed");
                }
                Err(e) if e.is_exists() => {}
                Err(e) => return Err(ceph("snapshot", id)(e)),
            }
        }
        self.store
            .layers()
            .modify(id.as_str(), |r| r.sealed = true)?;
        Ok(())
    }

    fn add_holder(&self, id: &LayerId) -> Result<()> {
        if self.hold(id.as_str())? {
            Ok(())
        } else {
            Err(EngineError::Conflict {
                layer: id.to_string(),
                reason: "is being removed concurrently".into(),
            })
        }
    }

    /// Records this host as a holder of layer `id` (its dockerd references
    /// it, e.g. after loading another host's image or container), so that
    /// another host's removal keeps it. Returns `false`, changing nothing,
    /// when the layer does not exist or is no longer `Created` (it is on its
    /// way out). The state is checked inside the compare-and-set, so a
    /// concurrent removal and this either see each other or one loses.
    pub fn hold(&self, id: &str) -> Result<bool> {
        let id = Self::parse(id)?;
        let host = self.host_id.clone();
        let written = self
            .store
            .layers()
            .update(id.as_str(), |current| match current {
                Some(r) if matches!(r.state, LayerState::Created | LayerState::Cloning) => {
                    let mut next = r.clone();
                    next.holders.insert(host.clone());
                    Ok(Some(next))
                }
                _ => Err(()),
            })?;
        Ok(written.is_ok())
    }

    /// Whether layer `rec`'s snapshot has clones.
    pub(crate) fn has_children(&self, id: &LayerId, rec: &LayerRecord) -> Result<bool> {
        // A shared init layer's users have no image of their own: their
        // read-write layers are children of the shared one.
        if !rec.sealed || !rec.owns_image() {
            return Ok(false);
        }
        image_has_clones(&self.ioctx, id.as_str(), &rec.image)
    }

    /// Removes layer `id` for this host, at once: [`Engine::retire`] then
    /// [`Engine::purge`]. Unknown ids succeed.
    pub fn remove(&self, id: &str) -> Result<()> {
        if let Some(purge) = self.retire(id)? {
            self.purge(&purge).map_err(|e| self.explain_full(e))?;
        }
        Ok(())
    }

    /// The quick half of a removal, for this host: drops this host as a
    /// holder of layer `id`; when it was the last and no clone depends on
    /// the layer, marks it `Removing` (the intent, in RADOS) and returns
    /// what [`Engine::purge`] is then to remove. Until clones go, the layer
    /// is `Retired`. Unknown ids succeed.
    #[tracing::instrument(skip(self))]
    pub fn retire(&self, id: &str) -> Result<Option<Purge>> {
        self.retire_layer(id).map_err(|e| self.explain_full(e))
    }

    fn retire_layer(&self, id: &str) -> Result<Option<Purge>> {
        let id = Self::parse(id)?;
        let layers = self.store.layers();
        let Some(current) = layers.get(id.as_str())? else {
            let _held = self.lock_layer(&id)?;
            self.release_local(&id, true)?;
            self.remove_stray_image(&id)?;
            return Ok(None);
        };
        let parent = current
            .value
            .parent
            .as_deref()
            .map(LayerId::parse)
            .transpose()?;
        let _held = self.lock_unused(&id)?;
        // A layer whose clone runs: removed once it is made. (A layer
        // read as any other state never becomes `Cloning`.)
        if current.value.state == LayerState::Cloning {
            self.ensure_cloned(&id)?;
        }
        self.release_local(&id, false)?;
        // Dropping the last holder and leaving `Created` are one
        // compare-and-set: a host adding itself as holder meanwhile
        // either lands first (and the layer stays) or sees it retired.
        let host = self.host_id.clone();
        let Some(rec) = layers.modify(id.as_str(), |r| {
            r.holders.remove(&host);
            if r.holders.is_empty() && r.state == LayerState::Created {
                r.state = LayerState::Retired;
            }
        })?
        else {
            return Ok(None);
        };
        if !rec.holders.is_empty() {
            tracing::info!(holders = ?rec.holders, "other hosts still hold the layer; keeping it");
            return Ok(None);
        }
        Ok(self
            .mark_removing(&id, rec)?
            .map(|record| Purge { id, record, parent }))
    }

    /// Locks layer `id` for its removal once nothing has it mounted.
    /// dockerd Puts a layer before it removes it, but may remove one whose
    /// request it gave up on while that request still runs here (its
    /// client gone, it is about to fail and Put): such users are waited
    /// for, up to [`REMOVE_IN_USE_WAIT`]. A layer still in use after that
    /// (a running container's root) is refused, its mount left alone.
    fn lock_unused(&self, id: &LayerId) -> Result<Held<'_>> {
        let started = std::time::Instant::now();
        loop {
            let held = self.lock_layer(id)?;
            let users = self.mount_record(id.as_str())?.map_or(0, |m| m.refcount);
            if users == 0 {
                return Ok(held);
            }
            if started.elapsed() >= REMOVE_IN_USE_WAIT {
                return Err(EngineError::Conflict {
                    layer: id.to_string(),
                    reason: format!(
                        "is in use: mounted with {users} Get(s) not yet Put; Put it before removing it"
                    ),
                });
            }
            drop(held);
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The slow half of a removal (snapshot, image, record; then parents
    /// kept only for this layer), for a layer [`Engine::retire`] marked.
    /// Does nothing if the layer is no longer `Removing` (a `Create` of
    /// the same id finished the removal and made it anew). Safe to run
    /// again after a crash, and so is startup recovery's.
    pub fn purge(&self, purge: &Purge) -> Result<()> {
        crashpoint::reached(CrashPoint::RemoveRecorded);
        let id = &purge.id;
        {
            let _held = self.locks.lock(&[id.as_str()]);
            match self.store.layers().get(id.as_str())? {
                Some(r)
                    if r.value.state == LayerState::Removing
                        && r.value.image == purge.record.image =>
                {
                    self.finish_removal(id, &r.value)?;
                }
                _ => return Ok(()),
            }
        }
        // The parent may have been kept only for this child.
        let layers = self.store.layers();
        let mut next = purge.parent.clone();
        while let Some(p) = next.take() {
            let _held = self.locks.lock(&[p.as_str()]);
            let Some(prec) = layers.get(p.as_str())? else {
                break;
            };
            if prec.value.state != LayerState::Retired {
                break;
            }
            let grandparent = prec
                .value
                .parent
                .as_deref()
                .map(LayerId::parse)
                .transpose()?;
            if self.retire_or_remove(&p, prec.value)? {
                next = grandparent;
            }
        }
        Ok(())
    }

    /// Removes a holder-less layer unless clones depend on it, in which case
    /// it stays `Retired` until the last one goes. Returns whether it was
    /// removed.
    fn retire_or_remove(&self, id: &LayerId, rec: LayerRecord) -> Result<bool> {
        let Some(marked) = self.mark_removing(id, rec)? else {
            return Ok(false);
        };
        self.finish_removal(id, &marked)?;
        Ok(true)
    }

    /// Marks a holder-less `Retired` layer `Removing` (compare-and-set),
    /// unless clones depend on it. Returns the marked record.
    fn mark_removing(&self, id: &LayerId, rec: LayerRecord) -> Result<Option<LayerRecord>> {
        // Shared init layers over this layer live as long as it does.
        if self.has_children(id, &rec)? && rec.kind == LayerKind::Image {
            self.collect_shared_inits(id)?;
        }
        if self.has_children(id, &rec)? {
            tracing::info!(layer = %id, "clones still depend on the layer; retired until they go");
            return Ok(None);
        }
        // Only a layer still retired and held by nobody goes.
        let marked = self
            .store
            .layers()
            .update(id.as_str(), |current| match current {
                Some(r) if r.state == LayerState::Retired && r.holders.is_empty() => {
                    Ok(Some(LayerRecord {
                        state: LayerState::Removing,
                        ..r.clone()
                    }))
                }
                _ => Err(()),
            })?;
        Ok(match marked {
            Ok(Some(marked)) => Some(marked),
            _ => None,
        })
    }

    /// Removes a layer whose create did not finish. Create itself mounts
    /// the layer it makes (an xfs grow, a project quota) and nobody else
    /// can, so a mount of it here, left by a crash or a failed unmount, is
    /// torn down first whatever its count.
    pub(crate) fn roll_back_create(&self, id: &LayerId, rec: &LayerRecord) -> Result<()> {
        self.release_local(id, false)?;
        self.finish_removal(id, rec)
    }

    /// Removes the layer's snapshot and image (each absent is fine) and
    /// then its record.
    pub(crate) fn finish_removal(&self, id: &LayerId, rec: &LayerRecord) -> Result<()> {
        // A layer that does not own its image (a shared init layer's user)
        // is only a record.
        if rec.owns_image() {
            remove_layer_image(&self.ioctx, id.as_str(), &rec.image)?;
            crashpoint::reached(CrashPoint::RemoveImageGone);
        }
        let layers = self.store.layers();
        if let Some(current) = layers.get(id.as_str())? {
            layers.delete(id.as_str(), &current)?;
        }
        tracing::info!(layer = %id, image = %rec.image, "layer removed");
        Ok(())
    }

    /// An image named as our layer but without a record: left by a crash
    /// between the clone and the record's removal. Remove it if nothing
    /// depends on it.
    fn remove_stray_image(&self, id: &LayerId) -> Result<()> {
        let image = self.settings.naming.layer_image(id);
        match Image::open_read_only(&self.ioctx, &image, None) {
            Ok(_) => {
                let stray = LayerRecord {
                    parent: None,
                    image,
                    kind: LayerKind::Image,
                    state: LayerState::Removing,
                    depth: 0,
                    size: 0,
                    quota: None,
                    sealed: true,
                    holders: BTreeSet::new(),
                    created_by: String::new(),
                    created_at: 0,
                    init: None,
                };
                if self.has_children(id, &stray)? {
                    tracing::warn!(layer = %id, "unrecorded image has clones; leaving it for fsck");
                    return Ok(());
                }
                tracing::warn!(layer = %id, "removing an unrecorded image left by an interrupted operation");
                self.finish_removal(id, &stray)
            }
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(ceph("open", id)(e)),
        }
    }

    /// Whether the layer exists and is usable.
    pub fn exists(&self, id: &str) -> Result<bool> {
        let id = Self::parse(id)?;
        Ok(self
            .store
            .layers()
            .get(id.as_str())?
            .is_some_and(|r| r.value.state == LayerState::Created))
    }

    /// The layer's record.
    pub fn info(&self, id: &str) -> Result<LayerInfo> {
        let id = Self::parse(id)?;
        Ok(LayerInfo {
            record: self.record(&id)?,
            id: id.to_string(),
        })
    }

    /// The record of an existing layer.
    pub(crate) fn record(&self, id: &LayerId) -> Result<LayerRecord> {
        Ok(self
            .store
            .layers()
            .get(id.as_str())?
            .ok_or_else(|| EngineError::NotFound {
                layer: id.to_string(),
            })?
            .value)
    }

    /// Every layer record of the namespace (undecodable ones are logged and
    /// skipped).
    pub fn list(&self) -> Result<Vec<LayerInfo>> {
        let mut out = Vec::new();
        for (id, rec) in self.store.layers().list()? {
            match rec {
                Ok(rec) => out.push(LayerInfo {
                    id,
                    record: rec.value,
                }),
                Err(e) => {
                    tracing::warn!(layer = %id, error = %e, "skipping an unreadable layer record")
                }
            }
        }
        Ok(out)
    }

    /// Startup, or dockerd's Init again: roll back creates this host left
    /// half done, finish removals anyone left half done, and collect
    /// retired layers whose clones are gone. Each is decided under the
    /// layer's lock on its record as it is then.
    pub(crate) fn recover_layers(&self) {
        let records = match self.list() {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(error = %e, "cannot list layers for recovery");
                return;
            }
        };
        for LayerInfo { id, record } in records {
            let Ok(layer) = LayerId::parse(&id) else {
                tracing::warn!(%id, "layer record with an invalid id; leaving it for fsck");
                continue;
            };
            let result = match record.state {
                LayerState::Creating if record.created_by == self.host_id => {
                    // A create still running (dockerd's Init again while
                    // the plugin serves) holds the lock to its end.
                    self.lock_layer(&layer).and_then(|_held| {
                        match self.store.layers().get(layer.as_str())? {
                            Some(current)
                                if current.value.state == LayerState::Creating
                                    && current.value.image == record.image =>
                            {
                                tracing::warn!(layer = %layer, "rolling back a create interrupted by a crash");
                                self.roll_back_create(&layer, &current.value)
                            }
                            _ => Ok(()),
                        }
                    })
                }
                LayerState::Cloning if record.created_by == self.host_id => self
                    .lock_layer(&layer)
                    .and_then(|_held| self.recover_cloning(&layer)),
                LayerState::Removing => {
                    tracing::warn!(layer = %layer, "finishing a removal interrupted by a crash or shutdown");
                    let parent = record
                        .parent
                        .as_deref()
                        .and_then(|p| LayerId::parse(p).ok());
                    self.purge(&Purge {
                        id: layer.clone(),
                        record,
                        parent,
                    })
                }
                LayerState::Retired => {
                    // Its last clone may have gone while nobody removed it.
                    let _held = self.locks.lock(&[layer.as_str()]);
                    self.retire_or_remove(&layer, record).map(|removed| {
                        if removed {
                            tracing::info!(layer = %layer, "collected a retired layer whose clones are gone");
                        }
                    })
                }
                _ => Ok(()),
            };
            if let Err(e) = result {
                tracing::error!(layer = %layer, error = %e, "recovery of the layer failed; fsck will report it");
            }
        }
        self.remove_abandoned_inits();
    }

    /// Startup: removes this host's container init layers, `<id>-init`,
    /// whose container layer `<id>` does not exist, that no layer is made
    /// from and that nothing has mounted. dockerd makes a container's two layers in one call
    /// (CreateReadWrite, Get and Put of `<id>-init`, then CreateReadWrite
    /// of `<id>`) and records the container's mount only once both exist;
    /// when that call fails halfway, a crash of this daemon among the
    /// causes, it forgets the init layer and never removes it. At startup
    /// no such call is in flight any more (dockerd's retry of a request
    /// cut by the crash arrives without its body and fails), so such an
    /// init layer is claimed by nothing.
    fn remove_abandoned_inits(&self) {
        let records = match self.list() {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(error = %e, "cannot list layers to find abandoned init layers");
                return;
            }
        };
        let ids: std::collections::HashSet<&str> = records.iter().map(|i| i.id.as_str()).collect();
        let parents: std::collections::HashSet<&str> = records
            .iter()
            .filter_map(|i| i.record.parent.as_deref())
            .collect();
        for LayerInfo { id, record } in &records {
            let Some(container) = id.strip_suffix("-init") else {
                continue;
            };
            if record.kind != LayerKind::Init
                || ids.contains(container)
                || parents.contains(id.as_str())
                || !record.holders.contains(&self.host_id)
            {
                continue;
            }
            let mounted =
                matches!(self.local.get(&super::mounts::MOUNTS, id), Ok(Some(m)) if m.refcount > 0);
            if mounted {
                continue;
            }
            tracing::warn!(layer = %id, "removing an init layer whose container layer was never made (its create was cut short)");
            if let Err(e) = self.remove(id) {
                tracing::error!(layer = %id, error = %e, "removing an abandoned init layer failed; fsck will report it");
            }
        }
    }
}

/// What [`Engine::clone_layer`] made.
struct Made {
    /// The image size.
    size: u64,
    /// A filesystem of its own with the parent's files copied in, not a
    /// clone.
    copied: bool,
}

/// Whether `e` is resize2fs refusing a shrink below its minimum.
fn below_shrink_minimum(e: &EngineError) -> bool {
    matches!(e, EngineError::Fs { source, .. }
        if matches!(source.as_ref(), fs::FsError::Tool { stderr, .. }
            if stderr.contains("smaller than minimum")))
}

/// A failure to copy a parent's files into a layer made for a small size.
fn copy_err(id: &LayerId, e: &dyn std::error::Error) -> EngineError {
    EngineError::Conflict {
        layer: id.to_string(),
        reason: format!(
            "copying the parent's files into its own filesystem failed: {}",
            crate::error_chain(e)
        ),
    }
}

/// Whether the `sealed` snapshot of layer `id`'s image `image` has clones
/// (no snapshot or no image: none).
pub fn image_has_clones(ioctx: &IoCtx, id: &str, image: &str) -> Result<bool> {
    let snap = match Image::open_read_only(ioctx, image, Some(SEALED_SNAP)) {
        Ok(snap) => snap,
        Err(e) if e.is_not_found() => return Ok(false),
        Err(e) => return Err(ceph("open snapshot", id)(e)),
    };
    Ok(!snap
        .children()
        .map_err(ceph("list children", id))?
        .is_empty())
}

/// Removes layer `id`'s image `image` and its `sealed` snapshot (each
/// absent is fine); `Conflict` while the image is mapped or open.
pub fn remove_layer_image(ioctx: &IoCtx, id: &str, image: &str) -> Result<()> {
    let img = match Image::open(ioctx, image, None) {
        Ok(img) => img,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(ceph("open", id)(e)),
    };
    match img.snap_remove(SEALED_SNAP) {
        Ok(()) => {}
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(ceph("remove snapshot", id)(e)),
    }
    drop(img);
    match rbd::remove(ioctx, image) {
        Ok(()) => Ok(()),
        // librbd 16 answers ENOENT too when its move of the image to the
        // trash failed (a full pool): gone only if it no longer opens.
        Err(e) if e.is_not_found() => match Image::open_read_only(ioctx, image, None) {
            Err(again) if again.is_not_found() => Ok(()),
            Ok(_) => Err(ceph("remove image", id)(e)),
            Err(again) => Err(ceph("remove image", id)(again)),
        },
        Err(e) if e.is_busy() => Err(EngineError::Conflict {
            layer: id.to_string(),
            reason: "its image is still in use (mapped or open on a host)".into(),
        }),
        Err(e) => Err(ceph("remove image", id)(e)),
    }
}

/// Whether a layer made with `opts` on `prec` is answered before its
/// clone is made (see [`super::deferred`]): a container's read-write layer
/// over an init layer served by a shared init layer, with nothing to do to
/// the clone (no size option, no flatten).
fn defers_clone(opts: &CreateOptions, flatten: bool, prec: &LayerRecord) -> bool {
    opts.kind == LayerKind::ReadWrite
        && opts.size.is_none()
        && !flatten
        && prec.shared_init().is_some()
}
