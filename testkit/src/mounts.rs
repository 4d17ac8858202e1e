//! Mount tables (`/proc/<pid>/mountinfo`) and lazy unmounting of everything
//! under a directory, in this mount namespace or in a [`Host`]'s.

use std::path::{Path, PathBuf};

use crate::host::Host;

/// One line of a mountinfo table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted.
    pub target: PathBuf,
    /// Filesystem type (`tmpfs`, `ext4`, `fuse.x`, ...).
    pub fstype: String,
    /// Mount source (device, or the fs name).
    pub source: String,
}

/// Decodes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
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

/// Parses a mountinfo table.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let target = fields.get(4)?;
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(Mount {
                target: PathBuf::from(unescape(target)),
                fstype: fields.get(sep + 1)?.to_string(),
                source: unescape(fields.get(sep + 2)?),
            })
        })
        .collect()
}

/// The mount table of the namespace `pid` lives in (`None`: ours).
pub fn mounts_of(pid: Option<i32>) -> Result<Vec<Mount>, String> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/mountinfo"),
        None => "/proc/self/mountinfo".to_string(),
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
    Ok(parse_mountinfo(&text))
}

/// Mount points at or below `dir`, in mount order (parents before the
/// mounts stacked on or below them).
pub fn mounts_under(pid: Option<i32>, dir: &Path) -> Result<Vec<PathBuf>, String> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    Ok(mounts_of(pid)?
        .into_iter()
        .map(|m| m.target)
        .filter(|t| t.starts_with(&dir))
        .collect())
}

/// Lazily unmounts everything at or below `dir`, newest first, in `host`'s
/// mount namespace (or ours). Each mount point is unmounted until it is no
/// longer one (mounts may be stacked). Errors name what stayed mounted.
pub fn unmount_under(host: Option<&Host>, dir: &Path) -> Result<(), String> {
    let pid = host.map(Host::pid);
    for _round in 0..8 {
        let mut targets = mounts_under(pid, dir)?;
        if targets.is_empty() {
            return Ok(());
        }
        targets.reverse();
        for target in targets {
            match host {
                None => {
                    // Gone meanwhile (EINVAL/ENOENT) is fine; the next round
                    // re-reads the table.
                    let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
                }
                Some(host) => {
                    let mut cmd = host.command("umount");
                    cmd.arg("-l").arg(&target);
                    let _ = crate::process::run_with_timeout(
                        cmd,
                        None,
                        std::time::Duration::from_secs(30),
                    );
                }
            }
        }
    }
    let left = mounts_under(pid, dir)?;
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("still mounted under {}: {left:?}", dir.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    40 22 0:5 / /tmp/a\\040b rw - tmpfs tmpfs rw\n\
                    41 22 0:6 /x /tmp/c rw master:2 - fuse.rbd rbd\\134x rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].target, PathBuf::from("/"));
        assert_eq!(m[0].fstype, "ext4");
        assert_eq!(m[1].target, PathBuf::from("/tmp/a b"));
        assert_eq!(m[2].fstype, "fuse.rbd");
        assert_eq!(m[2].source, "rbd\\x");
    }
}
