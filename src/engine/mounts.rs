//! `get`/`put`: layers mapped, mounted and reference-counted on this host.
//!
//! A layer is mounted at `<mount dir>/<id>` (outside the Home:
//! [`crate::config::Settings::mount_dir`]) and Docker gets
//! `<mount dir>/<id>/rootfs`, the same path on every call. Each step is
//! recorded in the local state before it is taken (`Mapping`, then
//! `Mounting` with the device, then `Mounted` with the count), so after a
//! crash `Engine::recover_mounts` knows exactly what may exist: a
//! `Mounted` layer whose mount and device are still there is adopted with
//! its count (a running container keeps running, and its later `Put`s
//! balance); anything else is unmounted and unmapped.
//!
//! A read-only layer's last `Put` leaves it mounted for `rbd.mountlinger`
//! (count zero, `idle_until` set): dockerd mounts an image's top layer
//! for every container it creates over it, and mapping it again is most of
//! a container's start. The next `Get` takes the idle mount as it is;
//! [`Engine::release_idle_mounts`] (the plugin's reaper thread, dockerd's
//! shutdown) unmounts the ones whose time is up. A layer being removed is
//! unmounted whatever its state.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use metadata::{InitContent, LayerState};
use serde::{Deserialize, Serialize};

use super::base::base_lock_key;
use super::{Engine, EngineError, Result, fs_err, mapper_err, now};
use crate::crashpoint::{self, CrashPoint};
use crate::fs::{self, MountSpec};
use crate::localstate::Table;
use crate::mapper::{self, MapRequest, MappedDevice};
use crate::names::LayerId;

/// Where a layer's mount is in its life on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountState {
    /// The device is being mapped.
    Mapping,
    /// The device is mapped and being mounted.
    Mounting,
    /// Mounted and handed out `refcount` times (zero: idle, see
    /// [`MountRecord::idle_until`]).
    Mounted,
}

/// One layer's mount on this host (local state table `mounts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// Schema version.
    pub v: u32,
    /// Progress.
    pub state: MountState,
    /// Outstanding `get`s.
    pub refcount: u32,
    /// The RBD image.
    pub image: String,
    /// Mapped and mounted read-only.
    pub read_only: bool,
    /// The mapping, once made.
    pub device: Option<MappedDevice>,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// For an init layer without an image of its own: the layer whose
    /// mount serves it. `None`: the layer's own image is mapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<MountOn>,
    /// A mounted layer no one uses: unmounted after this time (Unix
    /// seconds) unless a `Get` takes it first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_until: Option<u64>,
}

impl MountRecord {
    /// Mounted with no `Get` outstanding.
    pub fn is_idle(&self) -> bool {
        self.state == MountState::Mounted && self.refcount == 0
    }
}

/// How a layer is mounted when not from its own image: an init layer
/// without an image of its own, or a container's layer at create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountOn {
    /// Served read-only by the mount of shared init layer `layer`.
    Layer {
        /// The shared init layer.
        layer: String,
    },
    /// A pending init layer being written: an overlay over the mount of
    /// its parent `lower`, dockerd's writes going to `upper`.
    Overlay {
        /// The parent layer.
        lower: String,
        /// The overlay's upper directory (beside its work directory).
        upper: PathBuf,
    },
    /// A container's read-write layer at dockerd's create-time `Get`
    /// (see `engine::staged`): an overlay over the mount of shared init
    /// layer `lower`, whose files its image holds.
    Staged {
        /// The shared init layer.
        lower: String,
        /// The overlay's upper directory (beside its work directory).
        upper: PathBuf,
    },
}

impl MountOn {
    /// The layer whose mount this one uses.
    pub fn layer(&self) -> &str {
        match self {
            MountOn::Layer { layer } => layer,
            MountOn::Overlay { lower, .. } | MountOn::Staged { lower, .. } => lower,
        }
    }
}

/// How long an unmap waits for a device that is still busy.
const UNMAP_BUSY_WAIT: Duration = Duration::from_secs(15);

/// The local state table of mounts, keyed by layer id.
pub const MOUNTS: Table<MountRecord> = Table::new("mounts");

impl Engine {
    fn mountpoint(&self, id: &LayerId) -> PathBuf {
        self.mount_dir.join(id.file_name())
    }

    /// Mounts the layer (or counts one more user) and returns its root.
    #[tracing::instrument(skip(self))]
    /// A writable layer not yet mounted is refused at once while the pool
    /// is full ([`EngineError::PoolFull`]); read-only ones still mount.
    pub fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf> {
        let id = Self::parse(id)?;
        let _held = self.lock_layer(&id)?;
        self.get_locked(&id, mount_label, false)
            .map_err(|e| self.explain_full(e))
    }

    /// Releases one `get`; the last one unmounts and unmaps. Releasing a
    /// layer that is not mounted succeeds.
    #[tracing::instrument(skip(self))]
    pub fn put(&self, id: &str) -> Result<()> {
        let id = Self::parse(id)?;
        let _held = self.lock_layer(&id)?;
        let Some(m) = self.local.get(&MOUNTS, id.as_str())? else {
            tracing::warn!("put of a layer that is not mounted");
            return Ok(());
        };
        if m.state == MountState::Mounted
            && m.refcount == 1
            && let Some(MountOn::Overlay { lower, upper }) = &m.on
        {
            // dockerd has written the init layer's files.
            return self.finish_pending_init(&id, &m, lower, upper);
        }
        if m.state == MountState::Mounted
            && m.refcount == 1
            && let Some(MountOn::Staged { lower, upper }) = &m.on
        {
            return self.finish_staged(&id, &m, lower, upper);
        }
        self.put_record(&id, m)
    }

    /// One `Put` of mount `m` of layer `id`, its lock held: one user
    /// fewer; the last one leaves a read-only mount idle for
    /// `rbd.mountlinger` and releases any other.
    fn put_record(&self, id: &LayerId, mut m: MountRecord) -> Result<()> {
        if m.is_idle() {
            tracing::warn!(layer = %id, "put of a layer no one has mounted");
            return Ok(());
        }
        if m.state == MountState::Mounted && m.refcount > 1 {
            m.refcount -= 1;
            self.local.put(&MOUNTS, id.as_str(), &m)?;
            return Ok(());
        }
        let linger = self.settings.mount_linger.as_secs();
        if m.state == MountState::Mounted && m.read_only && m.on.is_none() && linger > 0 {
            m.refcount = 0;
            m.idle_until = Some(now() + linger);
            self.local.put(&MOUNTS, id.as_str(), &m)?;
            tracing::debug!(layer = %id, linger_s = linger, "layer idle; stays mounted a while");
            return Ok(());
        }
        self.release(id, &m)
    }

    /// Unmounts the idle mounts whose linger is over, or with `all` every
    /// idle mount. Returns how many went; failures are logged and the
    /// mount is tried again next time.
    pub fn release_idle_mounts(&self, all: bool) -> usize {
        let idle: Vec<String> = match self.mounts() {
            Ok(rows) => rows
                .into_iter()
                .filter(|(_, m)| m.is_idle() && (all || m.idle_until.is_none_or(|t| t <= now())))
                .map(|(id, _)| id)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the local mount state");
                return 0;
            }
        };
        let mut released = 0;
        for key in idle {
            let Ok(id) = LayerId::parse(&key) else {
                continue;
            };
            let outcome = self.lock_layer(&id).and_then(|_held| {
                // A Get may have taken it meanwhile.
                match self.local.get(&MOUNTS, id.as_str())? {
                    Some(m) if m.is_idle() => self.release(&id, &m).map(|()| true),
                    _ => Ok(false),
                }
            });
            match outcome {
                Ok(true) => released += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(layer = %id, error = %e, "unmounting an idle layer failed")
                }
            }
        }
        released
    }

    /// The local mount record of a layer.
    pub fn mount_record(&self, id: &str) -> Result<Option<MountRecord>> {
        let id = Self::parse(id)?;
        Ok(self.local.get(&MOUNTS, id.as_str())?)
    }

    /// `get` with the layer's lock held. `creating` allows a layer still
    /// being created (for the size step of `create`) and marks an internal
    /// mount: a container layer's create-time staging is skipped.
    pub(crate) fn get_locked(
        &self,
        id: &LayerId,
        mount_label: &str,
        creating: bool,
    ) -> Result<PathBuf> {
        let mountpoint = self.mountpoint(id);
        let rootfs = mountpoint.join("rootfs");
        if let Some(mut m) = self.local.get(&MOUNTS, id.as_str())? {
            if m.state == MountState::Mounted {
                if m.is_idle() {
                    tracing::debug!(layer = %id, "taking an idle mount");
                }
                m.refcount += 1;
                m.idle_until = None;
                self.local.put(&MOUNTS, id.as_str(), &m)?;
                return Ok(match &m.on {
                    Some(MountOn::Layer { layer }) => self.rootfs_path(&LayerId::parse(layer)?),
                    _ => rootfs,
                });
            }
            tracing::warn!(state = ?m.state, "clearing a half-made mount");
            self.release(id, &m)?;
        }
        let rec = self.record(id)?;
        let usable = matches!(rec.state, LayerState::Created | LayerState::Cloning)
            || (creating && rec.state == LayerState::Creating);
        if !usable {
            return Err(EngineError::Conflict {
                layer: id.to_string(),
                reason: format!("cannot be mounted in state {:?}", rec.state),
            });
        }
        match &rec.init {
            Some(InitContent::Pending) => return self.get_pending_init(id, &rec, mount_label),
            Some(InitContent::Shared { layer }) => {
                return self.get_shared_init_user(id, &rec, layer, mount_label);
            }
            None => {}
        }
        if rec.kind == metadata::LayerKind::ReadWrite && !creating {
            // What dockerd wrote at create, if it is not in the image yet.
            self.apply_staged(id)?;
            if let Some(staged) = self.get_staged(id, &rec, mount_label)? {
                return Ok(staged);
            }
        }
        // Past staging, the image is needed.
        let rec = if rec.state == LayerState::Cloning {
            self.ensure_cloned(id)?
        } else {
            rec
        };
        if !rec.sealed {
            // A writable mapping writes at once (the image's header, the
            // journal replay of the mount).
            self.ensure_room()?;
        }
        let mut m = MountRecord {
            v: 1,
            state: MountState::Mapping,
            refcount: 0,
            image: rec.image.clone(),
            read_only: rec.sealed,
            device: None,
            mountpoint: mountpoint.clone(),
            on: None,
            idle_until: None,
        };
        self.local.put(&MOUNTS, id.as_str(), &m)?;
        crashpoint::reached(CrashPoint::MapRecorded);
        let mut request = MapRequest::new(
            self.settings.pool.clone(),
            self.namespace(),
            rec.image.clone(),
        );
        request.read_only = rec.sealed;
        // A container's writable layer has one writer in the fleet: its
        // mapping holds the image's exclusive lock, without the automatic
        // hand-over librbd would otherwise grant another writer.
        request.exclusive = !rec.sealed && rec.kind == metadata::LayerKind::ReadWrite;
        let mapped = match self.mapper.map(&request) {
            Ok(mapped) => mapped,
            Err(source) => {
                self.local.remove(&MOUNTS, id.as_str())?;
                return Err(mapper_err("map", id)(source));
            }
        };
        crashpoint::reached(CrashPoint::Mapped);
        m.state = MountState::Mounting;
        m.device = Some(mapped.clone());
        self.local.put(&MOUNTS, id.as_str(), &m)?;
        let spec = MountSpec {
            fs: self.settings.fs,
            read_only: rec.sealed,
            label: mount_label.to_string(),
            project_quota: rec.quota.is_some(),
        };
        let mounted = fs::mount(&mapped.device, &mountpoint, &spec)
            .map_err(fs_err("mount", id))
            .and_then(|()| {
                if rootfs.is_dir() {
                    Ok(())
                } else {
                    Err(EngineError::Conflict {
                        layer: id.to_string(),
                        reason: "its filesystem has no rootfs directory (not made by docker-rbd?)"
                            .into(),
                    })
                }
            });
        if let Err(e) = mounted {
            if let Err(undo) = self.release(id, &m) {
                tracing::error!(error = %undo, "undoing a failed mount failed");
            }
            return Err(e);
        }
        crashpoint::reached(CrashPoint::Mounted);
        m.state = MountState::Mounted;
        m.refcount = 1;
        self.local.put(&MOUNTS, id.as_str(), &m)?;
        tracing::info!(device = %mapped.device.display(), read_only = rec.sealed, "layer mounted");
        Ok(rootfs)
    }

    /// Unmounts and unmaps whatever `m` says exists, then forgets it.
    pub(crate) fn release(&self, id: &LayerId, m: &MountRecord) -> Result<()> {
        match &m.on {
            Some(MountOn::Layer { layer }) => {
                self.local.remove(&MOUNTS, id.as_str())?;
                return self.put_locked(&LayerId::parse(layer)?);
            }
            // `lock_layer` of `id` holds `lower` too: the record names it.
            Some(MountOn::Overlay { lower, upper } | MountOn::Staged { lower, upper }) => {
                return self.drop_overlay(id, m, lower, upper);
            }
            None => {}
        }
        if fs::is_mounted(&m.mountpoint) {
            fs::umount(&m.mountpoint).map_err(fs_err("umount", id))?;
            crashpoint::reached(CrashPoint::Unmounted);
        }
        if let Some(device) = &m.device {
            self.unmap_when_free(id.as_str(), device)?;
        }
        self.local.remove(&MOUNTS, id.as_str())?;
        // Empty once unmounted; leaving the directory behind is harmless.
        let _ = std::fs::remove_dir(&m.mountpoint);
        tracing::info!(layer = %id, "layer unmounted");
        Ok(())
    }

    /// Unmaps `device` of layer or image `layer`, waiting a little while
    /// it is busy: right after an unmount the device can still be claimed
    /// for a moment (a container that just died, its mount namespace; the
    /// kernel releasing a file system's last superblock reference).
    pub(crate) fn unmap_when_free(&self, layer: &str, device: &MappedDevice) -> Result<()> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            match self.mapper.unmap(device) {
                Ok(()) => return Ok(()),
                Err(mapper::Error::Busy { .. }) if started.elapsed() < UNMAP_BUSY_WAIT => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(mapper_err("unmap", layer)(e)),
            }
        }
    }

    /// Drops this host's mount of a layer whatever its count (the layer is
    /// being removed). `warn` logs when something was still mounted.
    pub(crate) fn release_local(&self, id: &LayerId, warn: bool) -> Result<()> {
        if let Some(m) = self.local.get(&MOUNTS, id.as_str())? {
            if warn && m.refcount > 0 {
                tracing::warn!(layer = %id, refcount = m.refcount, "removing a layer that is still mounted");
            }
            self.release(id, &m)?;
        }
        self.forget_staged(id)
    }

    /// Whether a layer is mounted writable here, and if so freezes it.
    pub(crate) fn freeze_if_mounted_writable(&self, id: &LayerId) -> Result<Option<fs::Frozen>> {
        match self.local.get(&MOUNTS, id.as_str())? {
            Some(m) if matches!(m.on, Some(MountOn::Staged { .. })) => Err(EngineError::Conflict {
                layer: id.to_string(),
                reason: "is mounted for dockerd's create (its writes are not in its image yet): \
                         put it first"
                    .into(),
            }),
            Some(m) if m.state == MountState::Mounted && !m.read_only => {
                tracing::info!(layer = %id, "freezing a writable mount for a consistent snapshot");
                fs::freeze(&m.mountpoint)
                    .map(Some)
                    .map_err(fs_err("freeze", id))
            }
            _ => Ok(None),
        }
    }

    /// Grows an xfs layer being created to its (already grown) image.
    pub(crate) fn grow_xfs_layer(&self, id: &LayerId, mount_label: &str) -> Result<()> {
        self.while_mounted(id, mount_label, |_, mountpoint, _| {
            fs::grow_xfs(self.runner.as_ref(), mountpoint)
        })
    }

    /// Limits a layer being created to `bytes` with a project quota on its
    /// root.
    pub(crate) fn quota_layer(&self, id: &LayerId, bytes: u64, mount_label: &str) -> Result<()> {
        self.while_mounted(id, mount_label, |device, _, rootfs| {
            fs::set_project_quota(device, rootfs, bytes)
        })
    }

    /// Resizes the ext4 filesystem of a layer being created (never mounted
    /// yet) to `bytes`, or to fill its image; a caller shrinking the layer
    /// shrinks the image afterwards, one growing it before.
    pub(crate) fn resize_ext4_layer(
        &self,
        id: &LayerId,
        image: &str,
        bytes: Option<u64>,
    ) -> Result<()> {
        let request = MapRequest::new(
            self.settings.pool.clone(),
            self.namespace(),
            image.to_string(),
        );
        let mapped = self.mapper.map(&request).map_err(mapper_err("map", id))?;
        crashpoint::reached(CrashPoint::ResizeMapped);
        let shrunk = fs::resize_offline(self.runner.as_ref(), &mapped.device, bytes)
            .map_err(fs_err("resize", id));
        let unmapped = self.mapper.unmap(&mapped).map_err(mapper_err("unmap", id));
        shrunk.and(unmapped)
    }

    /// Mounts a layer being created, runs `f(device, mountpoint, rootfs)`,
    /// and unmounts it again.
    fn while_mounted(
        &self,
        id: &LayerId,
        mount_label: &str,
        f: impl FnOnce(&std::path::Path, &std::path::Path, &std::path::Path) -> Result<(), fs::FsError>,
    ) -> Result<()> {
        let rootfs = self.get_locked(id, mount_label, true)?;
        crashpoint::reached(CrashPoint::CreateMounted);
        let result = (|| {
            let m = self
                .local
                .get(&MOUNTS, id.as_str())?
                .ok_or_else(|| EngineError::NotFound {
                    layer: id.to_string(),
                })?;
            let device = m.device.as_ref().map(|d| d.device.clone()).ok_or_else(|| {
                EngineError::NotFound {
                    layer: id.to_string(),
                }
            })?;
            f(&device, &m.mountpoint, &rootfs).map_err(fs_err("resize", id))
        })();
        let put = self.put_locked(id);
        result.and(put)
    }

    pub(crate) fn put_locked(&self, id: &LayerId) -> Result<()> {
        match self.local.get(&MOUNTS, id.as_str())? {
            Some(m) => self.put_record(id, m),
            None => Ok(()),
        }
    }

    /// Startup, or dockerd's Init again: adopt mounts that survived, clear
    /// the rest. Each layer is looked at under its lock, its record read
    /// again there: a `Get` or `Put` still running (the plugin keeps
    /// serving while dockerd restarts) is waited for, never taken for a
    /// crash's leftover.
    pub(crate) fn recover_mounts(&self) {
        let rows = match self.local.list(&MOUNTS) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "cannot read local mount state");
                return;
            }
        };
        // Layers served by another layer's mount come last, once it is
        // known whether that mount was adopted.
        let (own, served): (Vec<_>, Vec<_>) = rows
            .into_iter()
            .partition(|(_, row)| row.as_ref().map_or(true, |m| m.on.is_none()));
        for (key, row) in own.into_iter().chain(served) {
            let Ok(id) = LayerId::parse(&key) else {
                tracing::warn!(%key, "dropping a mount record with an invalid id");
                let _ = self.local.remove(&MOUNTS, &key);
                continue;
            };
            if let Err(e) = row {
                tracing::warn!(layer = %id, error = %e, "dropping an unreadable mount record");
                let _ = self.local.remove(&MOUNTS, &key);
                continue;
            }
            let locked = self
                .lock_layer(&id)
                .and_then(|held| Ok((held, self.local.get(&MOUNTS, id.as_str())?)));
            let (_held, m) = match locked {
                Ok((held, Some(m))) => (held, m),
                // Put away meanwhile.
                Ok((_, None)) => continue,
                Err(e) => {
                    tracing::error!(layer = %id, error = %e, "cannot lock and read the mount record; leaving it");
                    continue;
                }
            };
            if let Some(MountOn::Layer { layer }) = &m.on
                && m.state == MountState::Mounted
                && self
                    .local
                    .get(&MOUNTS, layer)
                    .ok()
                    .flatten()
                    .is_some_and(|served| served.state == MountState::Mounted)
            {
                tracing::info!(layer = %id, shared_init = %layer, refcount = m.refcount, "adopted a use of a shared init layer's mount");
                continue;
            }
            if m.on.is_none() && m.state == MountState::Mounted && self.still_mounted(&m) {
                tracing::info!(layer = %id, refcount = m.refcount, "adopted a mount left by the previous daemon");
                continue;
            }
            tracing::warn!(layer = %id, state = ?m.state, "clearing a stale mount");
            if let Err(e) = self.release(&id, &m) {
                tracing::error!(layer = %id, error = %e, "clearing a stale mount failed");
            }
        }
        self.unmap_orphans();
    }

    /// Startup, after the mount records are settled: unmaps what the
    /// mapper has mapped of this driver's images (its pool, namespace and
    /// names) that no mount record claims, a crash having come between the
    /// map and its record, or inside a map that has no record (the base
    /// image's formatting, an offline resize). Mounts of such a device
    /// under this driver's home go first; one mounted elsewhere is left
    /// alone, and said.
    fn unmap_orphans(&self) {
        let mapped = match self.mapper.list() {
            Ok(mapped) => mapped,
            Err(e) => {
                tracing::error!(error = %e, "cannot list mappings to find orphans");
                return;
            }
        };
        let naming = &self.settings.naming;
        for device in mapped {
            let spec = &device.spec;
            if spec.pool != self.settings.pool || spec.namespace != self.namespace() {
                continue;
            }
            // Whoever maps the image holds this lock while it does, until
            // a mount record names the device (or it is unmapped again).
            let key = match naming.layer_of_image(&spec.image) {
                Some(layer) => layer.to_string(),
                None if naming.is_base_image(&spec.image) => base_lock_key(&spec.image),
                None => continue,
            };
            let _held = self.locks.lock(&[&key]);
            let claimed = match self.local.list(&MOUNTS) {
                Ok(rows) => rows
                    .into_iter()
                    .filter_map(|(_, row)| row.ok()?.device)
                    .any(|c| c.device == device.device),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read local mount state to find orphans");
                    return;
                }
            };
            if claimed {
                continue;
            }
            let image = spec.image.clone();
            let mounted = fs::mounts_of(&device.device);
            if let Some(elsewhere) = mounted.iter().find(|at| !at.starts_with(&self.home)) {
                tracing::warn!(%image, device = %device.device.display(), at = %elsewhere.display(), "an unrecorded mapping is mounted outside the driver's home; leaving it");
                continue;
            }
            let cleared = mounted
                .iter()
                .try_for_each(|at| fs::umount(at).map_err(|e| e.to_string()))
                .and_then(|()| self.mapper.unmap(&device).map_err(|e| e.to_string()));
            match cleared {
                Ok(()) => {
                    for at in &mounted {
                        let _ = std::fs::remove_dir(at);
                    }
                    tracing::warn!(%image, device = %device.device.display(), "unmapped a mapping no mount record claims (left by a crash)");
                }
                Err(e) => {
                    tracing::error!(%image, device = %device.device.display(), error = %e, "unmapping an unrecorded mapping failed")
                }
            }
        }
    }

    fn still_mounted(&self, m: &MountRecord) -> bool {
        let Some(device) = &m.device else {
            return false;
        };
        if !fs::is_mounted(&m.mountpoint) {
            return false;
        }
        if fs::mount_source(&m.mountpoint).as_deref() != Some(device.device.as_path()) {
            return false;
        }
        match self.mapper.adopt(device) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(device = %device.device.display(), error = %e, "mapping did not survive");
                false
            }
        }
    }

    /// Every mount record on this host.
    pub fn mounts(&self) -> Result<Vec<(String, MountRecord)>> {
        Ok(self
            .local
            .list(&MOUNTS)?
            .into_iter()
            .filter_map(|(k, r)| r.ok().map(|r| (k, r)))
            .collect())
    }

    /// The rootfs path of a layer (whether or not mounted).
    pub fn rootfs_path(&self, id: &LayerId) -> PathBuf {
        self.mountpoint(id).join("rootfs")
    }
}
