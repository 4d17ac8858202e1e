//! Cleaning up after the RBD driver: what a `docker-rbd serve` left on this
//! machine under its Home (layer mounts, loop devices on its FUSE files,
//! the FUSE mounts and their `docker-rbd-fuse` servers), and everything a
//! test's fleet left in its RADOS namespace.
//!
//! A test calls [`cleanup_home`] after it stopped dockerd and the plugin,
//! and [`remove_namespace`] last. Both only touch what lies under the
//! given Home or in the given namespace, so tests running alongside are
//! safe.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ceph_client::IoCtx;
use ceph_client::rbd::{self, Image};

use crate::host::Host;
use crate::process;

/// Pids of the FUSE server processes of the driver whose Home is `home`
/// (as its processes see it): those started for an image (`--mountpoint`
/// under the Home) and standbys (`--standby-in` under it), waiting or
/// since assigned an image.
pub fn fuse_servers_under(home: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = ["--mountpoint", "--standby-in"]
        .iter()
        .flat_map(|flag| process::live_pids_with_cmdline(&format!("{flag} {}/", home.display())))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// What `docker-rbd-fuse` calls itself while it stands by for an image
/// (docker-rbd's `mapper::fuse::serve::STANDBY_NAME`).
pub const FUSE_STANDBY_NAME: &str = "docker-rbd-idle";

/// [`fuse_servers_under`] but standbys still waiting for an image: the
/// servers that serve something.
pub fn serving_fuse_servers_under(home: &Path) -> Vec<i32> {
    fuse_servers_under(home)
        .into_iter()
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() != FUSE_STANDBY_NAME)
                .unwrap_or(false)
        })
        .collect()
}

/// Pids of the live FUSE servers mapping the RBD image `image` (its name,
/// in any pool or namespace) for the fuse mapper whose run directory is
/// `run_dir` (a path the test can read: `<Home>/fuse`), from the
/// mappings' `state.json`.
pub fn fuse_servers_of_image(run_dir: &Path, image: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    let suffix = format!("%2F{image}");
    let mut pids: Vec<i32> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(&suffix)))
        .filter_map(|e| std::fs::read(e.path().join("state.json")).ok())
        .filter_map(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok())
        .filter_map(|state| state.get("server_pid")?.as_i64())
        .filter_map(|pid| i32::try_from(pid).ok())
        .filter(|&pid| process::is_live(pid))
        .collect();
    pids.sort_unstable();
    pids
}

/// Attached loop devices whose backing file lies under `dir`.
pub fn loops_under(dir: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut found: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("loop")?.parse().ok())
        .filter_map(|n: u32| Some((n, loop_backing_file(n)?)))
        .filter(|(_, file)| file.starts_with(dir))
        .collect();
    found.sort();
    found
}

/// Detaches the loop devices of `loops` (from [`loops_under`]) still
/// attached to their file, or to a file of that name whose mount is gone
/// (the kernel then names it from the lost mount's root: `/image`).
pub fn clear_loops(test: &str, loops: &[(u32, PathBuf)]) {
    for (n, file) in loops {
        let Some(now) = loop_backing_file(*n) else {
            continue;
        };
        let orphaned = file
            .file_name()
            .is_some_and(|name| now == Path::new("/").join(name));
        if now == *file || orphaned {
            eprintln!("[{test}] cleanup: detaching loop{n} ({})", now.display());
            if let Err(e) = loop_clear(*n) {
                eprintln!("[{test}] cleanup: LOOP_CLR_FD loop{n}: {e}");
            }
        }
    }
}

/// The backing file of `/dev/loop<n>`, if it is attached.
pub fn loop_backing_file(n: u32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/sys/block/loop{n}/loop/backing_file")).ok()?;
    let text = text.trim_end_matches('\n');
    (!text.is_empty()).then(|| PathBuf::from(text))
}

/// `LOOP_CLR_FD`: detaches an unused loop device at once, and marks one
/// still in use to detach on its last close.
pub fn loop_clear(n: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
    let dev = std::fs::File::open(format!("/dev/loop{n}"))?;
    // SAFETY: LOOP_CLR_FD takes no argument; `dev` is an open descriptor
    // for the duration of the call.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        // ENXIO: detached meanwhile.
        if e.raw_os_error() != Some(libc::ENXIO) {
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts `target` in `host`'s mount namespace (or the test's), lazily
/// when a plain unmount fails.
fn unmount(host: Option<&Host>, target: &Path) {
    match host {
        Some(h) => {
            let t = target.display().to_string();
            let plain = h.run("umount", &[&t], Duration::from_secs(30));
            if !plain.is_ok_and(|o| o.status.success()) {
                let _ = h.run("umount", &["-l", &t], Duration::from_secs(30));
            }
        }
        None => {
            if nix::mount::umount(target).is_err() {
                let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// Where the driver whose Home is `home` mounts its layers with the default
/// `rbd.mountroot` (docker-rbd's `Settings::mount_dir`): `/run/docker-rbd/`
/// and the first 16 hex digits of the SHA-256 of the Home's path.
pub fn mount_dir(home: &Path) -> PathBuf {
    let digest = crate::sha256::hex_digest(home.as_os_str().as_encoded_bytes());
    Path::new("/run/docker-rbd").join(&digest[..16])
}

/// Starts ending what a stopped (or killed) plugin left under `home`
/// and its mount directory ([`mount_dir`]),
/// whose mounts live in `host`'s namespace (or the test's): unmounts the
/// layers and detaches the loop devices on its FUSE files (a device that a
/// container of a dead dockerd still holds detaches on its last close).
/// Stop the containers (drop the `Dockerd`), then call
/// [`Leftovers::finish`].
pub fn cleanup_home(test: &str, home: &Path, host: Option<&Host>) -> Leftovers {
    let pid = host.map(Host::pid);
    let mut layer_mounts = crate::mounts::mounts_under(pid, &mount_dir(home)).unwrap_or_default();
    layer_mounts.reverse();
    for m in &layer_mounts {
        eprintln!("[{test}] cleanup: unmounting {}", m.display());
        unmount(host, m);
    }
    let servers = fuse_servers_under(home);
    for (n, file) in loops_under(home) {
        eprintln!("[{test}] cleanup: detaching loop{n} ({})", file.display());
        if let Err(e) = loop_clear(n) {
            eprintln!("[{test}] cleanup: LOOP_CLR_FD loop{n}: {e}");
        }
    }
    Leftovers {
        test: test.to_string(),
        home: home.to_path_buf(),
        host: host.cloned(),
        servers,
    }
}

/// What [`cleanup_home`] could not end before the containers were gone.
#[must_use = "call finish() once the containers are stopped"]
pub struct Leftovers {
    test: String,
    home: PathBuf,
    host: Option<Host>,
    servers: Vec<i32>,
}

impl Leftovers {
    /// Waits for the loop devices to let go, unmounts the FUSE files and
    /// ends their servers. Returns what is still there.
    pub fn finish(self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !loops_under(&self.home).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut problems: Vec<String> = loops_under(&self.home)
            .into_iter()
            .map(|(n, f)| format!("loop{n} still attached to {}", f.display()))
            .collect();
        let pid = self.host.as_ref().map(Host::pid);
        let mut fuse_mounts =
            crate::mounts::mounts_under(pid, &self.home.join("fuse")).unwrap_or_default();
        fuse_mounts.reverse();
        for m in &fuse_mounts {
            unmount(self.host.as_ref(), m);
        }
        for server in self
            .servers
            .iter()
            .copied()
            .chain(fuse_servers_under(&self.home))
        {
            // A server exits once its mount is gone.
            if !process::wait_dead(server, Duration::from_secs(10))
                && let Err(e) = process::terminate(server, Duration::from_secs(5))
            {
                problems.push(format!("FUSE server {server}: {e}"));
            }
        }
        // The plugin's Init made the mount directory a private mount of
        // its own; a host's /run goes with the host.
        if self.host.is_none() {
            let dir = mount_dir(&self.home);
            if let Err(e) = crate::mounts::unmount_under(None, &dir) {
                problems.push(format!("{}: {e}", dir.display()));
            }
            let _ = std::fs::remove_dir(&dir);
        }
        for p in &problems {
            eprintln!("[{}] cleanup: {p}", self.test);
        }
        problems
    }
}

/// Removes every RBD image of `ioctx`'s namespace (snapshots first, clones
/// before parents, retrying while a dead client's watch lingers), every
/// RADOS object left in it, and the RBD namespace itself (through
/// `pool`, the same pool without a namespace).
pub fn remove_namespace(test: &str, ioctx: &IoCtx, pool: &IoCtx, namespace: &str) {
    // An image whose last user died uncleanly keeps a watch for up to 30 s.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let images: Vec<String> = match rbd::list(ioctx) {
            Ok(list) => list.into_iter().map(|i| i.name).collect(),
            Err(e) => {
                eprintln!("[{test}] cleanup: list images: {e}");
                break;
            }
        };
        if images.is_empty() {
            break;
        }
        for name in &images {
            if let Ok(img) = Image::open(ioctx, name, None) {
                for snap in img.snap_list().unwrap_or_default() {
                    let _ = img.snap_remove(&snap.name);
                }
            }
            let _ = rbd::remove(ioctx, name);
        }
        if Instant::now() >= deadline {
            eprintln!("[{test}] cleanup: RBD images left: {images:?}");
            break;
        }
        if rbd::list(ioctx).is_ok_and(|l| !l.is_empty()) {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    if let Ok(objects) = ioctx.list_objects() {
        for object in objects.iter().filter(|o| !o.starts_with("rbd_")) {
            let _ = ioctx.remove(object);
        }
    }
    if let Err(e) = rbd::namespace_remove(pool, namespace)
        && !e.is_not_found()
    {
        eprintln!("[{test}] cleanup: remove namespace {namespace}: {e}");
    }
}
