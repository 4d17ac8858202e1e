//! Small host helpers: processes, mounts.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Whether process `pid` exists and its command line contains `needle`
/// (guards against pid reuse).
pub(crate) fn process_matches(pid: i32, needle: &str) -> bool {
    if pid <= 0 {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(raw) => {
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            // A zombie has an empty command line: it is gone for our purposes.
            !cmdline.is_empty() && cmdline.contains(needle)
        }
        Err(_) => false,
    }
}

/// When `pid` started (clock ticks after boot, field 22 of
/// `/proc/<pid>/stat`); with the pid it names one process for good. `None`
/// when it is gone or a zombie.
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    // Field 3, the state, then 22, the start time.
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Whether `pid` is still the live process that started at `start`
/// ([`start_time`]).
pub(crate) fn process_is(pid: i32, start: u64) -> bool {
    start_time(pid) == Some(start)
}

/// Waits until process `pid` has exited, up to `timeout`. Returns whether
/// it exited. Works for processes that are not our children (pidfd).
pub(crate) fn wait_exit(pid: i32, timeout: Duration) -> bool {
    if pid <= 0 {
        return true;
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        // ESRCH: already gone (and reaped).
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
            || poll_gone(pid, timeout);
    }
    // SAFETY: the syscall just returned this descriptor to us and nothing
    // else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let started = Instant::now();
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            return true;
        }
        if rc == 0 || started.elapsed() >= timeout {
            return false;
        }
        // EINTR: poll again with what is left.
    }
}

fn poll_gone(pid: i32, timeout: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// One line of `/proc/self/mountinfo`, the fields we need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountEntry {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// File system type (`fuse.docker-rbd`, `ext4`, ...).
    pub fstype: String,
    /// Mount source.
    pub source: String,
    /// Whether it propagates mount events: it is `shared:N` (peers) or
    /// `master:N` (a slave) in mountinfo's optional fields; a private
    /// mount is neither.
    pub propagates: bool,
}

/// Parses mountinfo text (octal escapes like `\040` decoded).
pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mountpoint = left.split(' ').nth(4)?;
            let propagates = left
                .split(' ')
                .skip(6)
                .any(|tag| tag.starts_with("shared:") || tag.starts_with("master:"));
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let source = right.next().unwrap_or("");
            Some(MountEntry {
                mountpoint: PathBuf::from(unescape(mountpoint)),
                fstype: fstype.to_string(),
                source: unescape(source),
                propagates,
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts of this process's mount namespace.
pub(crate) fn mounts() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

/// The mount at exactly `path`, the last (topmost) one.
pub(crate) fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mountpoint == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "36 35 98:0 / /mnt1 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    99 36 0:52 / /run/docker-rbd/fuse/rbd%2Fa/mnt rw,nosuid,nodev shared:5 - fuse.docker-rbd docker-rbd:rbd/a rw,user_id=0\n\
                    100 36 0:53 / /with\\040space rw - tmpfs tmp rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].fstype, "fuse.docker-rbd");
        assert_eq!(m[1].source, "docker-rbd:rbd/a");
        assert_eq!(m[2].mountpoint, PathBuf::from("/with space"));
        assert_eq!(
            m.iter().map(|m| m.propagates).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert!(parse_mountinfo("garbage\n").is_empty());
    }

    #[test]
    fn own_process_matches_and_dead_ones_do_not() {
        let me = std::process::id() as i32;
        assert!(process_matches(me, ""));
        assert!(!process_matches(me, "certainly-not-in-my-cmdline-\u{1}"));
        let start = start_time(me).expect("my own start time");
        assert!(process_is(me, start));
        assert!(!process_is(me, start + 1));
        assert_eq!(start_time(0), None);
        assert!(!process_matches(0, ""));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(wait_exit(pid, Duration::from_millis(100)));
        let mut sleeper = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(!wait_exit(sleeper.id() as i32, Duration::from_millis(100)));
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
    }
}
