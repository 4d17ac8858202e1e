//! Scratch directories, each tagged with the test process that owns it, and
//! the sweep that cleans up after test processes killed before their guards
//! could run (SIGKILL, a `timeout`, Ctrl-C of `cargo test`).
//!
//! Every directory testkit makes lives under [`scratch_root`] and is named
//! `<prefix>.<pid>-<start time>.<random>`: the pid and start time (clock
//! ticks since boot, from `/proc/<pid>/stat`) of the test process name it
//! even across pid reuse. [`sweep_orphans`] treats a directory whose owner is
//! gone as an orphan: it ends the processes recorded as started for it (a
//! dockerd instance's dockerd, containerd, shims and container processes; a
//! [`crate::daemon::Daemon`]'s process), each only after checking it is the
//! very process recorded, unmounts what is left under it, and removes it.

use std::path::{Path, PathBuf};

use crate::{mounts, process};

/// File in a scratch directory naming a process started for it:
/// `"<pid> <start time>"`.
pub(crate) const PROCESS_FILE: &str = "process";

/// The directory under which testkit puts every scratch directory it makes
/// (`<tmp>/docker-rbd-testkit`, mode 0700). A [`crate::host::Host`] detaches
/// its copies of mounts under it, so put a test's mount points there too.
pub fn scratch_root() -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let root = std::env::temp_dir().join("docker-rbd-testkit");
    match std::fs::DirBuilder::new().mode(0o700).create(&root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("mkdir {}: {e}", root.display())),
    }
    root.canonicalize()
        .map_err(|e| format!("{}: {e}", root.display()))
}

/// `"<pid> <start time>"` of a live process: names it across pid reuse.
pub fn process_token(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let start = stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(19)?
        .to_string();
    process::is_live(pid).then(|| format!("{pid} {start}"))
}

/// Whether the process named by `token` (from [`process_token`]) still runs.
pub fn token_is_live(token: &str) -> bool {
    let pid = token.split(' ').next().and_then(|p| p.parse::<i32>().ok());
    pid.and_then(process_token).as_deref() == Some(token.trim())
}

/// A fresh scratch directory under [`scratch_root`], tagged with this test
/// process, removed on drop. `prefix` is for people reading `ps`, logs and
/// `/tmp`; characters other than ASCII letters, digits and `-` become `-`.
pub fn scratch_dir(prefix: &str) -> Result<tempfile::TempDir, String> {
    let root = scratch_root()?;
    let clean: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(24)
        .collect();
    let me =
        process_token(std::process::id() as i32).ok_or("cannot read this process's start time")?;
    tempfile::Builder::new()
        .prefix(&format!("{clean}.{}.", me.replace(' ', "-")))
        .tempdir_in(&root)
        .map_err(|e| format!("scratch dir in {}: {e}", root.display()))
}

/// The owner token encoded in a scratch directory's name, if it has one.
fn owner_of(dir: &Path) -> Option<String> {
    let name = dir.file_name()?.to_str()?;
    let mut parts = name.rsplitn(3, '.');
    let _random = parts.next()?;
    let owner = parts.next()?;
    parts.next()?;
    let (pid, start) = owner.split_once('-')?;
    pid.parse::<i32>().ok()?;
    start.parse::<u64>().ok()?;
    Some(format!("{pid} {start}"))
}

/// Cleans up every scratch directory whose owning test process is gone (see
/// the module doc); returns what could not be cleaned. Called by
/// [`crate::dockerd::Dockerd::start`] and [`crate::daemon::Daemon::start`].
pub fn sweep_orphans() -> Vec<String> {
    let Ok(root) = scratch_root() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut errors = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(owner) = owner_of(&dir) else {
            continue;
        };
        if token_is_live(&owner) {
            continue;
        }
        let mut errs = Vec::new();
        if let Ok(token) = std::fs::read_to_string(dir.join(PROCESS_FILE))
            && token_is_live(&token)
            && let Some(pid) = token.split(' ').next().and_then(|p| p.parse::<i32>().ok())
            && let Err(e) = process::terminate(pid, std::time::Duration::ZERO)
        {
            errs.push(e);
        }
        if crate::dockerd::is_instance_dir(&dir) {
            errs.extend(crate::dockerd::reap_orphan(&dir));
        }
        if crate::ceph::is_cluster_dir(&dir) {
            errs.extend(crate::ceph::stop(&dir));
        }
        if let Err(e) = mounts::unmount_under(None, &dir) {
            errs.push(e);
        }
        if errs.is_empty() {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errs.push(format!("remove: {e}")),
            }
        }
        errors.extend(
            errs.into_iter()
                .map(|e| format!("orphan {}: {e}", dir.display())),
        );
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_dirs_carry_a_live_owner() {
        let d = scratch_dir("unit.test x").unwrap();
        let owner = owner_of(d.path()).unwrap();
        assert!(token_is_live(&owner), "{owner}");
        let name = d.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("unit-test-x."), "{name}");
        assert!(!token_is_live("1 0"));
        assert!(!token_is_live("garbage"));
        assert_eq!(owner_of(Path::new("/x/plain-dir")), None);
    }

    #[test]
    fn sweep_removes_directories_of_dead_owners_only() {
        let root = scratch_root().unwrap();
        // An owner that cannot be live: pid 1 with an impossible start time.
        let dead = tempfile::Builder::new()
            .prefix("unit-dead.1-99999999999.")
            .tempdir_in(&root)
            .unwrap()
            .keep();
        std::fs::write(dead.join("file"), "x").unwrap();
        let live = scratch_dir("unit-live").unwrap();
        assert_eq!(sweep_orphans(), Vec::<String>::new());
        assert!(!dead.exists());
        assert!(live.path().exists());
    }
}
