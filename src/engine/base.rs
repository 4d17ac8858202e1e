//! The base image: one formatted, empty filesystem per pool, namespace,
//! filesystem type and size, which every parentless layer is cloned from.
//!
//! It is made once, under a RADOS exclusive lock, so two daemons starting
//! together make exactly one. It is ready when it has its `sealed`
//! snapshot; an image without one is the leftover of an interrupted making
//! and is remade.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use ceph_client::LockFlags;
use ceph_client::rbd::{self, Image};

use super::{Engine, Result, ceph, fs_err, io, mapper_err};
use crate::crashpoint::{self, CrashPoint};
use crate::fs::{self, MountSpec};
use crate::mapper::MapRequest;
use crate::names::SEALED_SNAP;

/// cls lock name on the base lock object.
const LOCK_NAME: &str = "docker-rbd.base";
/// How long a lock holder may take before others may assume it died.
const LOCK_DURATION: Duration = Duration::from_secs(300);

/// The key of the in-process layer lock held while base image
/// `image` is made. A layer id never contains `/`, so it names no layer.
pub(crate) fn base_lock_key(image: &str) -> String {
    format!("base/{image}")
}

impl Engine {
    /// The base image's name, making the image first if needed.
    pub(crate) fn ensure_base(&self) -> Result<String> {
        let name = self
            .settings
            .naming
            .base_image(self.settings.fs.as_str(), self.settings.base_size);
        if self.base_ready(&name)? {
            return Ok(name);
        }
        // Within this daemon: the mapping made below has no mount record,
        // and recovery leaves it alone while this is held.
        let _held = self.locks.lock(&[&base_lock_key(&name)]);
        let object = self.settings.naming.base_lock_object();
        let cookie = format!("{}.{}", self.host_id, std::process::id());
        let started = Instant::now();
        loop {
            match self.ioctx.lock_exclusive(
                &object,
                LOCK_NAME,
                &cookie,
                "making the base image",
                Some(LOCK_DURATION),
                LockFlags::default(),
            ) {
                Ok(()) => break,
                Err(e) if e.is_busy() || e.is_exists() => {
                    if self.base_ready(&name)? {
                        return Ok(name);
                    }
                    if self.break_own_stale_base_lock(&object)? {
                        continue;
                    }
                    if started.elapsed() > LOCK_DURATION + Duration::from_secs(30) {
                        return Err(ceph("lock for making the base image", &name)(e));
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(ceph("lock for making the base image", &name)(e)),
            }
        }
        crashpoint::reached(CrashPoint::BaseLocked);
        let result = if self.base_ready(&name)? {
            Ok(())
        } else {
            self.make_base(&name)
        };
        if let Err(e) = self.ioctx.unlock(&object, LOCK_NAME, &cookie) {
            tracing::warn!(error = %e, "releasing the base image lock failed; it expires by itself");
        }
        result.map(|()| name)
    }

    /// Breaks the base lock if a previous daemon of this host holds it (it
    /// died making the base image; one daemon per host id runs at a time,
    /// so its lock can only be stale). Returns whether it broke one.
    fn break_own_stale_base_lock(&self, object: &str) -> Result<bool> {
        let mine = format!("{}.", self.host_id);
        let current = format!("{mine}{}", std::process::id());
        let lockers = self
            .ioctx
            .list_lockers(object, LOCK_NAME)
            .map_err(ceph("list lockers of", object))?;
        let mut broke = false;
        for l in lockers.lockers {
            if l.cookie.starts_with(&mine) && l.cookie != current {
                tracing::warn!(client = %l.client, cookie = %l.cookie, "breaking the base image lock a previous daemon of this host left");
                match self
                    .ioctx
                    .break_lock(object, LOCK_NAME, &l.client, &l.cookie)
                {
                    Ok(()) => broke = true,
                    Err(e) if e.is_not_found() => broke = true,
                    Err(e) => return Err(ceph("break the base image lock on", object)(e)),
                }
            }
        }
        Ok(broke)
    }

    fn base_ready(&self, name: &str) -> Result<bool> {
        match Image::open_read_only(&self.ioctx, name, None) {
            Ok(img) => img
                .snap_exists(SEALED_SNAP)
                .map_err(ceph("snapshot lookup", name)),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(ceph("open base image", name)(e)),
        }
    }

    /// Maps image `name`, makes the filesystem of `rbd.fs` on it with an
    /// empty `rootfs` directory (mode 0755) at its top, and unmaps it.
    /// `mapped_at` is the crash point right after the map.
    pub(crate) fn format_image(&self, name: &str, mapped_at: CrashPoint) -> Result<()> {
        let request = MapRequest::new(
            self.settings.pool.clone(),
            self.namespace(),
            name.to_string(),
        );
        let mapped = self.mapper.map(&request).map_err(mapper_err("map", name))?;
        crashpoint::reached(mapped_at);
        // Two creates may format at once (small ext4 layers): one
        // directory each.
        static FORMATS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = FORMATS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mountpoint = self
            .mount_dir
            .join(format!(".format-{}-{n}", std::process::id()));
        let formatted = (|| {
            fs::mkfs(self.runner.as_ref(), &mapped.device, self.settings.fs)
                .map_err(fs_err("mkfs", name))?;
            let spec = MountSpec {
                fs: self.settings.fs,
                read_only: false,
                label: String::new(),
                project_quota: false,
            };
            fs::mount(&mapped.device, &mountpoint, &spec).map_err(fs_err("mount", name))?;
            let rootfs = mountpoint.join("rootfs");
            let made = std::fs::create_dir(&rootfs)
                .and_then(|()| {
                    std::fs::set_permissions(&rootfs, std::fs::Permissions::from_mode(0o755))
                })
                .map_err(io("create", &rootfs));
            let unmounted = fs::umount(&mountpoint).map_err(fs_err("umount", name));
            made.and(unmounted)
        })();
        let unmapped = self.unmap_when_free(name, &mapped);
        // The mountpoint is empty once unmounted; a failure to remove it is harmless.
        let _ = std::fs::remove_dir(&mountpoint);
        formatted?;
        unmapped
    }

    fn make_base(&self, name: &str) -> Result<()> {
        let started = Instant::now();
        match rbd::remove(&self.ioctx, name) {
            Ok(()) => tracing::warn!(image = name, "removed an unfinished base image"),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(ceph("remove unfinished base image", name)(e)),
        }
        rbd::create(
            &self.ioctx,
            name,
            self.settings.base_size,
            &self.image_options(),
        )
        .map_err(ceph("create base image", name))?;
        self.format_image(name, CrashPoint::BaseMapped)?;
        crashpoint::reached(CrashPoint::BaseFormatted);
        Image::open(&self.ioctx, name, None)
            .and_then(|img| img.snap_create(SEALED_SNAP))
            .map_err(ceph("snapshot base image", name))?;
        tracing::info!(
            image = name,
            fs = %self.settings.fs,
            size = self.settings.base_size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "base image made"
        );
        Ok(())
    }

    pub(crate) fn namespace(&self) -> Option<String> {
        (!self.settings.namespace.is_empty()).then(|| self.settings.namespace.clone())
    }
}
