//! Loop devices by hand-written ioctls (no libclang needed at build time).
//!
//! A device is attached with `LOOP_CTL_GET_FREE` + `LOOP_CONFIGURE`
//! (Linux 5.8+), without autoclear: it must outlive every descriptor this
//! process holds, because the driver mounts it later and a restarted daemon
//! adopts it. Detaching opens the device with `O_EXCL` first, so a mounted
//! device is reported busy instead of being left to autoclear behind the
//! caller's back, then issues `LOOP_CLR_FD` and waits until the kernel has
//! really let go of the backing file (that happens only when the last
//! descriptor closes, ours included).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LOOP_CLR_FD: u16 = 0x4C01;
const LOOP_GET_STATUS64: u16 = 0x4C05;
const LOOP_CONFIGURE: u16 = 0x4C0A;
const LOOP_CTL_GET_FREE: u16 = 0x4C82;

/// `LO_FLAGS_READ_ONLY`.
pub const LO_FLAGS_READ_ONLY: u32 = 1;
/// `LO_FLAGS_AUTOCLEAR`.
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// `LO_FLAGS_PARTSCAN`.
pub const LO_FLAGS_PARTSCAN: u32 = 8;
/// `LO_FLAGS_DIRECT_IO`.
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

impl Default for LoopInfo64 {
    fn default() -> Self {
        Self {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }
}

/// `struct loop_config` from `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

nix::ioctl_none_bad!(ioctl_ctl_get_free, LOOP_CTL_GET_FREE);
nix::ioctl_write_ptr_bad!(ioctl_configure, LOOP_CONFIGURE, LoopConfig);
nix::ioctl_none_bad!(ioctl_clr_fd, LOOP_CLR_FD);
nix::ioctl_read_bad!(ioctl_get_status64, LOOP_GET_STATUS64, LoopInfo64);

/// Why a loop operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// A system call failed.
    #[error("{op} {}: {source}", .path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which device or file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The device is mounted or held open exclusively.
    #[error("{} is in use (mounted or held open)", .path.display())]
    Busy {
        /// The device.
        path: PathBuf,
    },
    /// The kernel still holds the backing file after the wait.
    #[error("{} still has a backing file after {waited:?} (someone holds it open)", .path.display())]
    DetachTimeout {
        /// The device.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// No free loop device after repeated attempts.
    #[error("no free loop device after {attempts} attempts")]
    NoneFree {
        /// Attempts made.
        attempts: u32,
    },
}

impl LoopError {
    /// The errno behind the failure.
    pub fn errno(&self) -> Option<i32> {
        match self {
            LoopError::Io { source, .. } => source.raw_os_error(),
            LoopError::Busy { .. } | LoopError::DetachTimeout { .. } => Some(libc::EBUSY),
            LoopError::NoneFree { .. } => Some(libc::ENOSPC),
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LoopError + 'a {
    move |source| LoopError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn nix_err(op: &'static str, path: &Path, e: nix::Error) -> LoopError {
    LoopError::Io {
        op,
        path: path.to_path_buf(),
        source: io::Error::from_raw_os_error(e as i32),
    }
}

/// `/dev/loopN`.
pub fn device_path(number: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{number}"))
}

/// `loopN` → `N`, `/dev/loopN` → `N`.
pub fn parse_number(device: &Path) -> Option<u32> {
    device
        .file_name()?
        .to_str()?
        .strip_prefix("loop")?
        .parse()
        .ok()
}

/// An attached loop device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// N of `/dev/loopN`.
    pub number: u32,
    /// `/dev/loopN`.
    pub device: PathBuf,
    /// Whether the kernel accepted direct I/O on the backing file.
    pub direct_io: bool,
}

/// Attaches `backing` to a free loop device (logical block size 512, the
/// same as krbd's, so a file system made through one mapper mounts through
/// another). With `direct_io`, the loop driver bypasses the backing file's
/// page cache when the backing file supports it; it falls back to buffered
/// I/O otherwise.
pub fn attach(backing: &Path, read_only: bool, direct_io: bool) -> Result<Attached, LoopError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(backing)
        .map_err(io_err("open", backing))?;
    let control_path = Path::new("/dev/loop-control");
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(control_path)
        .map_err(io_err("open", control_path))?;
    const ATTEMPTS: u32 = 16;
    for _ in 0..ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument; the descriptor is
        // /dev/loop-control, open for the duration of the call.
        let number = unsafe { ioctl_ctl_get_free(control.as_raw_fd()) }
            .map_err(|e| nix_err("LOOP_CTL_GET_FREE", control_path, e))?;
        let Ok(number) = u32::try_from(number) else {
            continue;
        };
        let device = device_path(number);
        let dev = match open_device(&device, read_only, false) {
            Ok(dev) => dev,
            // udev/devtmpfs may not have made the node yet; try again.
            Err(LoopError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut flags = 0;
        if read_only {
            flags |= LO_FLAGS_READ_ONLY;
        }
        let mut result = configure(
            &dev,
            &file,
            flags | if direct_io { LO_FLAGS_DIRECT_IO } else { 0 },
        );
        if direct_io && matches!(result, Err(nix::errno::Errno::EINVAL)) {
            tracing::info!(device = %device.display(), "loop direct I/O refused; using buffered I/O");
            result = configure(&dev, &file, flags);
        }
        match result {
            Ok(()) => {
                let direct_io = read_sysfs(number, "loop/dio").is_some_and(|s| s == "1");
                tracing::info!(device = %device.display(), backing = %backing.display(), read_only, direct_io, "loop device attached");
                return Ok(Attached {
                    number,
                    device,
                    direct_io,
                });
            }
            // Someone else took this device between GET_FREE and CONFIGURE.
            Err(nix::errno::Errno::EBUSY) => continue,
            Err(e) => return Err(nix_err("LOOP_CONFIGURE", &device, e)),
        }
    }
    Err(LoopError::NoneFree { attempts: ATTEMPTS })
}

fn configure(dev: &File, backing: &File, flags: u32) -> nix::Result<()> {
    let mut config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        ..Default::default()
    };
    config.info.lo_flags = flags;
    // SAFETY: `config` is a fully initialised `struct loop_config` that
    // lives across the call; the kernel only reads it.
    unsafe { ioctl_configure(dev.as_raw_fd(), &config) }.map(|_| ())
}

fn open_device(device: &Path, read_only: bool, exclusive: bool) -> Result<File, LoopError> {
    let mut flags = libc::O_CLOEXEC;
    if exclusive {
        flags |= libc::O_EXCL;
    }
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(flags)
        .open(device)
        .map_err(|source| {
            if exclusive && source.raw_os_error() == Some(libc::EBUSY) {
                LoopError::Busy {
                    path: device.to_path_buf(),
                }
            } else {
                LoopError::Io {
                    op: "open",
                    path: device.to_path_buf(),
                    source,
                }
            }
        })
}

/// Detaches loop device `number` and waits (up to `wait`) until the kernel
/// has released its backing file. [`LoopError::Busy`] when it is mounted.
/// A device that is not attached is fine.
pub fn detach(number: u32, wait: Duration) -> Result<(), LoopError> {
    let device = device_path(number);
    if backing_file(number).is_none() {
        return Ok(());
    }
    {
        let dev = match open_device(&device, true, true) {
            Ok(dev) => dev,
            Err(LoopError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        // SAFETY: LOOP_CLR_FD takes no argument; `dev` is open.
        match unsafe { ioctl_clr_fd(dev.as_raw_fd()) } {
            Ok(_) | Err(nix::errno::Errno::ENXIO) => {}
            Err(e) => return Err(nix_err("LOOP_CLR_FD", &device, e)),
        }
        // `dev` closes here; the kernel finishes the detach on last close.
    }
    let started = Instant::now();
    while backing_file(number).is_some() {
        if started.elapsed() >= wait {
            return Err(LoopError::DetachTimeout {
                path: device,
                waited: wait,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::info!(device = %device.display(), "loop device detached");
    Ok(())
}

/// The status the kernel reports for loop device `number`
/// (`LOOP_GET_STATUS64`); `None` when it is not attached.
pub fn status(number: u32) -> Result<Option<LoopInfo64>, LoopError> {
    let device = device_path(number);
    let dev = match open_device(&device, true, false) {
        Ok(dev) => dev,
        Err(LoopError::Io { source, .. })
            if matches!(
                source.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ENXIO)
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let mut info = LoopInfo64::default();
    // SAFETY: `info` is a writable `struct loop_info64` that outlives the call.
    match unsafe { ioctl_get_status64(dev.as_raw_fd(), &mut info) } {
        Ok(_) => Ok(Some(info)),
        Err(nix::errno::Errno::ENXIO) => Ok(None),
        Err(e) => Err(nix_err("LOOP_GET_STATUS64", &device, e)),
    }
}

impl LoopInfo64 {
    /// `lo_flags`.
    pub fn flags(&self) -> u32 {
        self.lo_flags
    }

    /// `lo_file_name` (the kernel truncates it to 63 bytes).
    pub fn file_name(&self) -> String {
        let end = self
            .lo_file_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(LO_NAME_SIZE);
        String::from_utf8_lossy(&self.lo_file_name[..end]).into_owned()
    }
}

fn read_sysfs(number: u32, attr: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/loop{number}/{attr}"))
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

/// The full path of loop device `number`'s backing file, `None` when it is
/// not attached.
pub fn backing_file(number: u32) -> Option<PathBuf> {
    read_sysfs(number, "loop/backing_file")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
}

/// Whether loop device `number` is read-only.
pub fn read_only(number: u32) -> bool {
    read_sysfs(number, "ro").is_some_and(|s| s == "1")
}

/// Every attached loop device whose backing file lies under `dir`.
pub fn backed_under(dir: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut found: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("loop")?
                .parse::<u32>()
                .ok()
        })
        .filter_map(|n| Some((n, backing_file(n)?)))
        .filter(|(_, backing)| backing.starts_with(dir))
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(device_path(7), PathBuf::from("/dev/loop7"));
        assert_eq!(parse_number(Path::new("/dev/loop12")), Some(12));
        assert_eq!(parse_number(Path::new("loop0")), Some(0));
        assert_eq!(parse_number(Path::new("/dev/loop-control")), None);
        assert_eq!(parse_number(Path::new("/dev/rbd0")), None);
    }

    #[test]
    fn file_name_stops_at_nul() {
        let mut info = LoopInfo64::default();
        info.lo_file_name[..5].copy_from_slice(b"/a/b\0");
        assert_eq!(info.file_name(), "/a/b");
        info.lo_file_name = [b'x'; LO_NAME_SIZE];
        assert_eq!(info.file_name().len(), LO_NAME_SIZE);
    }
}
