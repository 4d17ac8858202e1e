//! Filesystems on mapped layer devices: format, mount, unmount, freeze,
//! grow, and project quotas.
//!
//! Tools (`mkfs.*`, `e2fsck`, `resize2fs`, `xfs_growfs`) run through the
//! mappers' [`CommandRunner`] choke point; mounts, freezes and quotas are
//! syscalls. Mount options are composed by the pure [`mount_options`] so
//! their rules (read-only `noload`, xfs `nouuid`, SELinux `context=`) are
//! unit-tested.
//!
//! `size=` limits are applied when a layer is created, before it is ever
//! mounted. ext4 layers are resized offline ([`resize_offline`]): grown to
//! a larger image, or shrunk below the base size so that writes past the
//! limit fail with `ENOSPC` on any kernel (no quota support needed, and no
//! `CAP_SYS_RESOURCE`, which online ext4 resizing wants). xfs cannot
//! shrink: it is grown online ([`grow_xfs`]) and limited by a project quota
//! ([`set_project_quota`]), which needs a kernel with XFS quota support.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags};

use crate::config::FsType;
use crate::mapper::runner::{CommandLine, CommandRunner, RunError};

/// Why a filesystem operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A tool could not run.
    #[error(transparent)]
    Run(#[from] RunError),
    /// A tool ran and failed.
    #[error("`{command}` failed (exit {code:?}): {stderr}")]
    Tool {
        /// The command line.
        command: String,
        /// Its exit code.
        code: Option<i32>,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A syscall failed.
    #[error("{op} {path} failed")]
    Sys {
        /// The operation (`mount`, `umount`, `FIFREEZE`, ...).
        op: &'static str,
        /// The path it was applied to.
        path: PathBuf,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// A path could not be handed to the kernel.
    #[error("path {path} contains a NUL byte")]
    Nul {
        /// The path.
        path: PathBuf,
    },
}

impl FsError {
    /// The errno of a failed syscall.
    pub fn errno(&self) -> Option<nix::Error> {
        match self {
            FsError::Sys { source, .. } => Some(*source),
            _ => None,
        }
    }
}

fn sys<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> FsError + 'a {
    move |source| FsError::Sys {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// How a layer is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// The filesystem type.
    pub fs: FsType,
    /// Sealed layers mount read-only.
    pub read_only: bool,
    /// SELinux label from Docker's `MountLabel`; empty for none.
    pub label: String,
    /// The layer has a project quota (xfs `size=` below the base size):
    /// mount with `prjquota` so it is enforced.
    pub project_quota: bool,
}

/// The `mount(2)` data string for `spec`.
///
/// - read-only ext4 adds `noload`: a sealed layer's journal is clean, and a
///   read-only device must not be replayed;
/// - xfs always adds `nouuid` (every clone shares the base's UUID) and
///   read-only xfs adds `norecovery`;
/// - writable ext4 adds `noinit_itable`: RBD reads unwritten blocks as
///   zeros, so zeroing inode tables would only copy-up every clone;
/// - a layer with a project quota adds `prjquota`;
/// - a label becomes `context="<label>"`.
pub fn mount_options(spec: &MountSpec) -> String {
    let mut opts: Vec<String> = Vec::new();
    match (spec.fs, spec.read_only) {
        (FsType::Ext4, true) => opts.push("noload".into()),
        (FsType::Ext4, false) => opts.push("noinit_itable".into()),
        (FsType::Xfs, true) => {
            opts.push("nouuid".into());
            opts.push("norecovery".into());
        }
        (FsType::Xfs, false) => opts.push("nouuid".into()),
    }
    if spec.project_quota {
        opts.push("prjquota".into());
    }
    if !spec.label.is_empty() {
        opts.push(format!("context=\"{}\"", spec.label));
    }
    opts.join(",")
}

/// Formats `device` with `fs`, labelled `docker-rbd`.
///
/// ext4 gets no reserved blocks and lazy table initialisation, since
/// unwritten RBD extents already read as zeros. It deliberately has no
/// `quota` feature: a kernel without quota support refuses to mount such a
/// filesystem writable, and one fleet may mix kernels.
pub fn mkfs(runner: &dyn CommandRunner, device: &Path, fs: FsType) -> Result<(), FsError> {
    let dev = device.display().to_string();
    let cmd = match fs {
        FsType::Ext4 => CommandLine::new("mkfs.ext4").args([
            "-q",
            "-F",
            "-L",
            "docker-rbd",
            "-m",
            "0",
            "-E",
            "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
            &dev,
        ]),
        FsType::Xfs => {
            CommandLine::new("mkfs.xfs").args(["-q", "-f", "-K", "-L", "docker-rbd", &dev])
        }
    };
    run_ok(runner, cmd.timeout(Duration::from_secs(600)))
}

/// Grows the xfs filesystem mounted at `mountpoint` to fill its device.
pub fn grow_xfs(runner: &dyn CommandRunner, mountpoint: &Path) -> Result<(), FsError> {
    let cmd = CommandLine::new("xfs_growfs").arg(mountpoint.display().to_string());
    run_ok(runner, cmd.timeout(Duration::from_secs(600)))
}

/// Resizes the unmounted ext4 filesystem on `device` to `bytes`, or to
/// fill the device when `None`, after the full check `resize2fs` insists
/// on. A shrink fails, changing nothing, when the data does not fit.
pub fn resize_offline(
    runner: &dyn CommandRunner,
    device: &Path,
    bytes: Option<u64>,
) -> Result<(), FsError> {
    let dev = device.display().to_string();
    let check = CommandLine::new("e2fsck")
        .args(["-f", "-p", &dev])
        .timeout(Duration::from_secs(600));
    let out = runner.run(&check)?;
    // 0: clean; 1: errors corrected. Anything else leaves the filesystem
    // in doubt.
    if !matches!(out.code, Some(0 | 1)) {
        return Err(FsError::Tool {
            command: check.to_string(),
            code: out.code,
            stderr: format!("{}{}", out.stdout.trim(), out.stderr.trim()),
        });
    }
    let mut resize = CommandLine::new("resize2fs").arg(dev.as_str());
    if let Some(bytes) = bytes {
        resize = resize.arg(format!("{}K", bytes / 1024));
    }
    run_ok(runner, resize.timeout(Duration::from_secs(600)))
}

fn run_ok(runner: &dyn CommandRunner, cmd: CommandLine) -> Result<(), FsError> {
    let out = runner.run(&cmd)?;
    if out.success() {
        Ok(())
    } else {
        Err(FsError::Tool {
            command: cmd.to_string(),
            code: out.code,
            stderr: out.stderr.trim().to_string(),
        })
    }
}

/// Mounts `device` at `target` (created if missing).
pub fn mount(device: &Path, target: &Path, spec: &MountSpec) -> Result<(), FsError> {
    std::fs::create_dir_all(target).map_err(|e| FsError::Sys {
        op: "mkdir",
        path: target.to_path_buf(),
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    let mut flags = MsFlags::MS_NODEV;
    if spec.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let data = mount_options(spec);
    tracing::debug!(device = %device.display(), target = %target.display(), fs = %spec.fs, %data, "mount");
    nix::mount::mount(
        Some(device),
        target,
        Some(spec.fs.as_str()),
        flags,
        Some(data.as_str()),
    )
    .map_err(sys("mount", target))
}

/// Mounts an overlay at `target`: `lower` read-only beneath, changes in
/// `upper` (with `work`, on the same filesystem as `upper`). A path the
/// overlay's option string cannot carry (`,`, `:`, `=`, `\\`) is refused
/// with `EINVAL` before anything is mounted.
pub fn mount_overlay(
    lower: &Path,
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), FsError> {
    for dir in [lower, upper, work, target] {
        if dir
            .as_os_str()
            .as_bytes()
            .iter()
            .any(|b| matches!(b, b',' | b':' | b'=' | b'\\'))
        {
            return Err(sys("overlay mount", dir)(nix::Error::EINVAL));
        }
    }
    for dir in [upper, work, target] {
        std::fs::create_dir_all(dir).map_err(|e| io_err("mkdir", dir, e))?;
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    tracing::debug!(target = %target.display(), %data, "overlay mount");
    nix::mount::mount(
        Some("docker-rbd-init"),
        target,
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(sys("overlay mount", target))
}

/// Unmounts `target`, retrying briefly while it is busy (a process that just
/// left the directory may still hold it for a moment).
pub fn umount(target: &Path) -> Result<(), FsError> {
    let mut attempt = 0;
    loop {
        match nix::mount::umount2(target, MntFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(nix::Error::EINVAL) if !is_mounted(target) => return Ok(()),
            Err(nix::Error::EBUSY) if attempt < 20 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(50 * attempt));
            }
            Err(e) => return Err(sys("umount", target)(e)),
        }
    }
}

/// Makes `dir` a mount of its own with private propagation, bound onto
/// itself first if it is not a mount point yet, as Docker's own graph
/// drivers do with their home. Mounts made below it afterwards are private
/// too: they do not propagate into other mount namespaces (a systemd
/// service's, another host's in tests), where a copy would keep the
/// device busy after it is unmounted here. Mounts already below keep
/// theirs. Doing it again changes nothing.
pub fn make_private(dir: &Path) -> Result<(), FsError> {
    let private = || {
        nix::mount::mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
    };
    // Tried first rather than looked up in mountinfo, which also lists a
    // mount that a later mount above it hides (dockerd binds its data root
    // onto itself when it starts): EINVAL says `dir` is no mount point.
    match private() {
        Ok(()) => return Ok(()),
        Err(nix::Error::EINVAL) => {}
        Err(e) => return Err(sys("make private", dir)(e)),
    }
    nix::mount::mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(sys("bind mount", dir))?;
    private().map_err(sys("make private", dir))
}

/// Bytes in use on the filesystem holding `path` (its blocks less the
/// free ones).
pub fn used_bytes(path: &Path) -> Result<u64, FsError> {
    let st = nix::sys::statvfs::statvfs(path).map_err(sys("statvfs", path))?;
    Ok((st.blocks() - st.blocks_free()) * st.fragment_size())
}

/// Whether the mount at exactly `target` is private (propagates nothing);
/// `None` when nothing is mounted there.
pub fn is_private_mount(target: &Path) -> Option<bool> {
    crate::mapper::sys::mount_at(target).map(|m| !m.propagates)
}

/// Whether something is mounted exactly at `target`, from
/// `/proc/self/mountinfo`.
pub fn is_mounted(target: &Path) -> bool {
    crate::mapper::sys::mount_at(target).is_some()
}

/// The source device of the topmost mount at `target`.
pub fn mount_source(target: &Path) -> Option<PathBuf> {
    crate::mapper::sys::mount_at(target).map(|m| PathBuf::from(m.source))
}

/// Where `device` is mounted in this mount namespace, topmost first.
pub fn mounts_of(device: &Path) -> Vec<PathBuf> {
    let mut at: Vec<PathBuf> = crate::mapper::sys::mounts()
        .into_iter()
        .filter(|m| Path::new(&m.source) == device)
        .map(|m| m.mountpoint)
        .collect();
    at.reverse();
    at
}

/// Flushes the filesystem mounted at `path` (`syncfs(2)`).
pub fn syncfs(path: &Path) -> Result<(), FsError> {
    let dir = std::fs::File::open(path).map_err(|e| io_err("open", path, e))?;
    // SAFETY: `dir` is an open file descriptor for the whole call.
    let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(sys("syncfs", path)(nix::Error::last()))
    }
}

fn io_err(op: &'static str, path: &Path, e: std::io::Error) -> FsError {
    FsError::Sys {
        op,
        path: path.to_path_buf(),
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// A frozen filesystem: writes block until the guard is dropped (thawed).
/// Used to take a consistent snapshot of a layer still mounted writable.
/// The guard holds a descriptor on the mount, closed when it thaws.
pub struct Frozen {
    dir: Option<std::fs::File>,
    path: PathBuf,
}

/// Freezes the filesystem mounted at `path` (`FIFREEZE`), after a sync.
pub fn freeze(path: &Path) -> Result<Frozen, FsError> {
    syncfs(path)?;
    let dir = std::fs::File::open(path).map_err(|e| io_err("open", path, e))?;
    // SAFETY: FIFREEZE takes an int argument it ignores; `dir` is open.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, 0) };
    if rc != 0 {
        return Err(sys("FIFREEZE", path)(nix::Error::last()));
    }
    Ok(Frozen {
        dir: Some(dir),
        path: path.to_path_buf(),
    })
}

impl Frozen {
    /// Thaws, reporting failure (dropping thaws too, logging failure).
    pub fn thaw(mut self) -> Result<(), FsError> {
        self.thaw_inner()
    }

    /// Thaws once and closes the descriptor.
    fn thaw_inner(&mut self) -> Result<(), FsError> {
        let Some(dir) = self.dir.take() else {
            return Ok(());
        };
        // SAFETY: FITHAW takes an int argument it ignores; `dir` is open.
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW, 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(sys("FITHAW", &self.path)(nix::Error::last()))
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = self.thaw_inner() {
            tracing::error!(path = %self.path.display(), error = %e, "thawing a frozen layer failed");
        }
    }
}

#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801C_581F;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401C_5820;
const FS_XFLAG_PROJINHERIT: u32 = 0x0000_0200;

#[repr(C)]
#[derive(Default)]
struct IfDqblk {
    bhardlimit: u64,
    bsoftlimit: u64,
    curspace: u64,
    ihardlimit: u64,
    isoftlimit: u64,
    curinodes: u64,
    btime: u64,
    itime: u64,
    valid: u32,
}

const PRJQUOTA: i32 = 2;
const Q_SETQUOTA: i32 = 0x0080_0008;
const QIF_BLIMITS: u32 = 1;
const SUBCMDSHIFT: i32 = 8;

/// The project id docker-rbd gives a layer's root directory. Each layer has
/// its own filesystem, so one fixed id per filesystem is enough.
pub const LAYER_PROJECT_ID: u32 = 1;

/// Whether the running kernel is known to lack XFS quota support
/// (`CONFIG_XFS_QUOTA`): XFS is loaded (`/proc/fs/xfs` exists) but has no
/// quota statistics (`/proc/fs/xfs/xqmstat`). Such a kernel refuses a
/// `prjquota` mount with `EINVAL`. `false` when XFS is not loaded yet,
/// since nothing can be told then.
pub fn xfs_quota_missing() -> bool {
    Path::new("/proc/fs/xfs").is_dir() && !Path::new("/proc/fs/xfs/xqmstat").exists()
}

/// Limits the space used under `dir` (on the filesystem of `device`) to
/// `bytes`: tags `dir` with project [`LAYER_PROJECT_ID`], inherited by
/// everything created below it, and sets the project's hard block limit.
/// Writes past it fail with `EDQUOT`.
pub fn set_project_quota(device: &Path, dir: &Path, bytes: u64) -> Result<(), FsError> {
    let handle = std::fs::File::open(dir).map_err(|e| io_err("open", dir, e))?;
    let mut attr = FsXattr::default();
    // SAFETY: FS_IOC_FSGETXATTR fills a `struct fsxattr`, which FsXattr
    // mirrors; `handle` is open.
    if unsafe { libc::ioctl(handle.as_raw_fd(), FS_IOC_FSGETXATTR, &mut attr) } != 0 {
        return Err(sys("FS_IOC_FSGETXATTR", dir)(nix::Error::last()));
    }
    attr.projid = LAYER_PROJECT_ID;
    attr.xflags |= FS_XFLAG_PROJINHERIT;
    // SAFETY: as above, reading a `struct fsxattr`.
    if unsafe { libc::ioctl(handle.as_raw_fd(), FS_IOC_FSSETXATTR, &attr) } != 0 {
        return Err(sys("FS_IOC_FSSETXATTR", dir)(nix::Error::last()));
    }
    let dev = CString::new(device.as_os_str().as_bytes()).map_err(|_| FsError::Nul {
        path: device.to_path_buf(),
    })?;
    let limit = IfDqblk {
        bhardlimit: bytes.div_ceil(1024),
        bsoftlimit: bytes.div_ceil(1024),
        valid: QIF_BLIMITS,
        ..Default::default()
    };
    let cmd = (Q_SETQUOTA << SUBCMDSHIFT) | PRJQUOTA;
    // SAFETY: Q_SETQUOTA reads a `struct if_dqblk`, which IfDqblk mirrors;
    // `dev` is a NUL-terminated path.
    let rc = unsafe {
        libc::quotactl(
            cmd,
            dev.as_ptr(),
            LAYER_PROJECT_ID as i32,
            (&limit as *const IfDqblk).cast_mut().cast(),
        )
    };
    if rc != 0 {
        return Err(sys("quotactl(Q_SETQUOTA, PRJQUOTA)", device)(
            nix::Error::last(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(fs: FsType, read_only: bool, label: &str) -> MountSpec {
        MountSpec {
            fs,
            read_only,
            label: label.into(),
            project_quota: false,
        }
    }

    #[test]
    fn mount_options_follow_the_rules() {
        assert_eq!(mount_options(&spec(FsType::Ext4, true, "")), "noload");
        assert_eq!(
            mount_options(&spec(FsType::Ext4, false, "")),
            "noinit_itable"
        );
        assert_eq!(
            mount_options(&spec(FsType::Xfs, true, "")),
            "nouuid,norecovery"
        );
        assert_eq!(mount_options(&spec(FsType::Xfs, false, "")), "nouuid");
        let quota = MountSpec {
            project_quota: true,
            ..spec(FsType::Xfs, false, "")
        };
        assert_eq!(mount_options(&quota), "nouuid,prjquota");
        assert_eq!(
            mount_options(&spec(
                FsType::Ext4,
                false,
                "system_u:object_r:container_file_t:s0:c1,c2"
            )),
            "noinit_itable,context=\"system_u:object_r:container_file_t:s0:c1,c2\""
        );
    }

    #[test]
    fn mkfs_and_grow_command_lines() {
        use crate::mapper::runner::fake::FakeRunner;
        let runner = FakeRunner::new([]);
        mkfs(&runner, Path::new("/dev/loop3"), FsType::Ext4).unwrap();
        mkfs(&runner, Path::new("/dev/loop3"), FsType::Xfs).unwrap();
        grow_xfs(&runner, Path::new("/m")).unwrap();
        resize_offline(&runner, Path::new("/dev/loop3"), None).unwrap();
        resize_offline(&runner, Path::new("/dev/loop3"), Some(64 << 20)).unwrap();
        assert_eq!(
            runner.rendered(),
            vec![
                "mkfs.ext4 -q -F -L docker-rbd -m 0 -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 /dev/loop3",
                "mkfs.xfs -q -f -K -L docker-rbd /dev/loop3",
                "xfs_growfs /m",
                "e2fsck -f -p /dev/loop3",
                "resize2fs /dev/loop3",
                "e2fsck -f -p /dev/loop3",
                "resize2fs /dev/loop3 65536K",
            ]
        );
    }

    #[test]
    fn tool_failures_carry_stderr() {
        use crate::mapper::runner::CommandOutput;
        use crate::mapper::runner::fake::{Answer, FakeRunner};
        let runner = FakeRunner::new([Answer::Output(CommandOutput::failed(
            1,
            "mkfs.ext4: Device size reported to be zero\n",
        ))]);
        let err = mkfs(&runner, Path::new("/dev/loop9"), FsType::Ext4).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("mkfs.ext4") && text.contains("Device size reported to be zero"),
            "{text}"
        );
    }

    #[test]
    fn a_failed_check_stops_a_shrink() {
        use crate::mapper::runner::CommandOutput;
        use crate::mapper::runner::fake::{Answer, FakeRunner};
        let runner = FakeRunner::new([Answer::Output(CommandOutput::failed(
            4,
            "UNEXPECTED INCONSISTENCY",
        ))]);
        let err = resize_offline(&runner, Path::new("/dev/loop9"), Some(64 << 20)).unwrap_err();
        assert!(
            err.to_string().contains("UNEXPECTED INCONSISTENCY"),
            "{err}"
        );
        assert_eq!(runner.calls().len(), 1, "no resize2fs after a failed check");
    }

    #[test]
    fn mount_lookup() {
        assert!(is_mounted(Path::new("/proc")));
        assert_eq!(
            mount_source(Path::new("/proc")),
            Some(PathBuf::from("proc"))
        );
        assert!(!is_mounted(Path::new("/definitely/not/mounted")));
    }
}
