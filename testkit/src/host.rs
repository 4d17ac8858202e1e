//! A "host": a private mount namespace with its own tmpfs on `/run` and on
//! `/etc/docker`, so that one test can run several dockerds and plugin
//! daemons side by side as if on different machines.
//!
//! What a host separates: `/run/docker/plugins/<name>.sock` (graphdriver
//! plugins are looked up only there and in `/etc/docker/plugins`),
//! `/var/run/docker.sock` (`/var/run` is `/run`), lock files under `/run`,
//! `/etc/docker/key.json`, and every mount made inside it (propagation is
//! private both ways). Everything else (the root filesystem, `/tmp`, cgroups,
//! the network, pids) is shared with the test.
//!
//! The namespace is kept alive by a holder process (`unshare --mount
//! --propagation private sh -c ...`) that this crate starts and ends by its
//! pid; the holder also exits by itself within a second when the test
//! process is gone, so a killed test run leaves no namespace behind. Commands
//! run inside with [`Host::command`], which `setns`es the child into the
//! namespace before `exec` (the child's pid is the program's own).
//!
//! When the namespace is made it receives copies of all the mounts of the
//! test's namespace. Copies of mounts under `/run`, `/etc/docker` and
//! [`crate::scratch_root`] (other tests' data roots and plugin mounts) are
//! detached at once, so that this host never pins a filesystem another test
//! is unmounting.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::mounts::{self, Mount};
use crate::process;

const HOLDER_SCRIPT: &str = r#"
watch="$1"; scratch="$2"
awk '{print $5}' /proc/self/mountinfo | grep -E "^(/run/|/run$|/etc/docker/|/etc/docker$|$scratch/|$scratch$)" | sort -r |
while read -r m; do umount -l "$m" 2>/dev/null; done
mount -t tmpfs -o mode=0755 testkit-run /run || exit 1
mkdir -p /run/docker/plugins /run/lock || exit 1
mount -t tmpfs -o mode=0755 testkit-etc-docker /etc/docker || exit 1
mkdir -p /etc/docker/plugins || exit 1
echo ready
s=
trap 'if [ -n "$s" ]; then kill "$s" 2>/dev/null; fi; exit 0' TERM INT
while [ -d "/proc/$watch" ]; do sleep 1 & s=$!; wait "$s"; s=; done
"#;

struct Inner {
    name: String,
    pid: i32,
    holder: Mutex<Child>,
    /// `/proc/<holder>/ns/mnt`, open for `setns` in children.
    ns: File,
    ns_inode: u64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut holder) = self.holder.lock()
            && let Err(e) = process::terminate_child(&mut holder, Duration::from_secs(5))
        {
            eprintln!(
                "testkit host {}: stopping namespace holder {}: {e}",
                self.name, self.pid
            );
        }
    }
}

/// A private mount namespace standing for one machine. Cheap to clone (all
/// clones share one namespace); the namespace ends when the last clone is
/// dropped. Stop what runs inside (dockerd, plugin daemons) before that:
/// a process left inside keeps the namespace and its mounts alive.
#[derive(Clone)]
pub struct Host {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("name", &self.inner.name)
            .field("pid", &self.inner.pid)
            .finish()
    }
}

impl Host {
    /// Makes a new host. `name` is for messages only. Needs root.
    pub fn new(name: &str) -> Result<Host, String> {
        std::fs::create_dir_all("/etc/docker").map_err(|e| format!("mkdir /etc/docker: {e}"))?;
        let scratch = crate::scratch_root()?;
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            HOLDER_SCRIPT,
            "testkit-host",
        ])
        .arg(std::process::id().to_string())
        .arg(&scratch)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("host {name}: spawn unshare: {e}"))?;
        let pid = child.id() as i32;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let ready = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        if ready.trim() != "ready" {
            let _ = process::kill_child(&mut child);
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return Err(format!(
                "host {name}: namespace holder did not come up: {}",
                err.trim()
            ));
        }
        let ns_path = format!("/proc/{pid}/ns/mnt");
        let ns = File::open(&ns_path).map_err(|e| format!("host {name}: open {ns_path}: {e}"));
        let ns = match ns {
            Ok(ns) => ns,
            Err(e) => {
                let _ = process::kill_child(&mut child);
                return Err(e);
            }
        };
        let ns_inode = ns.metadata().map(|m| m.ino()).unwrap_or(0);
        Ok(Host {
            inner: Arc::new(Inner {
                name: name.to_string(),
                pid,
                holder: Mutex::new(child),
                ns,
                ns_inode,
            }),
        })
    }

    /// The name given at creation.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Pid of the namespace holder; `/proc/<pid>/root` is the host's view of
    /// the filesystem, `/proc/<pid>/mountinfo` its mount table.
    pub fn pid(&self) -> i32 {
        self.inner.pid
    }

    /// A command that runs inside the host, with `/` as working directory.
    /// Configure it as any `Command` except `current_dir` (joining the
    /// namespace resets it; use [`Host::command_in`]).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.command_at(program, None)
    }

    /// Like [`Host::command`], with working directory `cwd` as seen inside.
    pub fn command_in(&self, program: impl AsRef<std::ffi::OsStr>, cwd: &Path) -> Command {
        self.command_at(program, Some(cwd))
    }

    fn command_at(&self, program: impl AsRef<std::ffi::OsStr>, cwd: Option<&Path>) -> Command {
        let mut cmd = Command::new(program);
        let fd: RawFd = self.inner.ns.as_raw_fd();
        // Keep the namespace fd (and the host) alive until the spawn: the
        // closure owns a clone of the Arc.
        let keep = Arc::clone(&self.inner);
        let cwd: Option<std::ffi::CString> =
            cwd.map(|c| std::ffi::CString::new(c.as_os_str().as_bytes()).expect("cwd without NUL"));
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe system calls (setns, chdir) on memory
        // prepared before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                let _ = &keep;
                if libc::setns(fd, libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(cwd) = &cwd
                    && libc::chdir(cwd.as_ptr()) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `program args` inside the host to completion (bounded by
    /// `timeout`) and returns its output.
    pub fn run(&self, program: &str, args: &[&str], timeout: Duration) -> Result<Output, String> {
        let mut cmd = self.command(program);
        cmd.args(args);
        process::run_with_timeout(cmd, None, timeout)
    }

    /// Like [`Host::run`], failing unless it exits 0; returns stdout.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let out = self.run(program, args, Duration::from_secs(120))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(process::describe_output(
                &format!("host {}: {program} {args:?}", self.name()),
                &out,
            ))
        }
    }

    /// The path through which the test sees `inside` (an absolute path as
    /// seen inside the host): `/proc/<holder>/root/<inside>`.
    pub fn path(&self, inside: impl AsRef<Path>) -> PathBuf {
        let inside = inside.as_ref();
        let rel = inside.strip_prefix("/").unwrap_or(inside);
        PathBuf::from(format!("/proc/{}/root", self.inner.pid)).join(rel)
    }

    /// Where a graphdriver plugin named `name` must listen, as seen inside
    /// the host: `/run/docker/plugins/<name>.sock`.
    pub fn plugin_socket(&self, name: &str) -> PathBuf {
        crate::dockerd::plugin_socket_path(name)
    }

    /// The host's mount table.
    pub fn mounts(&self) -> Result<Vec<Mount>, String> {
        mounts::mounts_of(Some(self.inner.pid))
    }

    /// Live processes inside the host other than its holder and the
    /// holder's own timer children.
    pub fn processes(&self) -> Vec<i32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut pids: Vec<i32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid != self.inner.pid)
            .filter(|&pid| {
                std::fs::metadata(format!("/proc/{pid}/ns/mnt"))
                    .is_ok_and(|m| m.ino() == self.inner.ns_inode)
            })
            .filter(|&pid| process::is_live(pid) && parent_of(pid) != Some(self.inner.pid))
            .collect();
        pids.sort_unstable();
        pids
    }
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}
