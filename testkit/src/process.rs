//! Processes by pid: liveness (a zombie counts as dead), pidfiles, signals,
//! bounded waits, and running a command with a deadline.
//!
//! Killed daemons can linger as zombies on these machines (PID 1 reaps
//! slowly), so "is it running" must read the process state, not just
//! `kill(pid, 0)`, which succeeds for a zombie.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Running, sleeping, stopped: anything but dead.
    Live,
    /// Exited, not yet reaped.
    Zombie,
    /// No such process.
    Gone,
}

/// The state of `pid`.
pub fn state(pid: i32) -> State {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return State::Gone;
    };
    // "pid (comm) S ...": comm may hold spaces and parentheses; the state
    // follows the last ')'.
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some("Z") | Some("X") | Some("x") => State::Zombie,
        Some(_) => State::Live,
        None => State::Gone,
    }
}

/// How a zombie `pid` ended, read without reaping it (the `exit_code`
/// field of `/proc/<pid>/stat`, in `waitpid` form); `None` while it runs or
/// once it is gone.
pub fn zombie_exit_status(pid: i32) -> Option<ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // Field 3 is the state; field 52 the exit code (fields counted from 1,
    // the first two being pid and comm).
    if !matches!(fields.first(), Some(&"Z") | Some(&"X") | Some(&"x")) {
        return None;
    }
    let raw: i32 = fields.get(52 - 3)?.parse().ok()?;
    Some(ExitStatus::from_raw(raw))
}

/// Whether `pid` is a live (non-zombie) process.
pub fn is_live(pid: i32) -> bool {
    state(pid) == State::Live
}

/// The command line of `pid`, arguments joined by spaces (empty for kernel
/// threads and zombies), or `None` when it is gone.
pub fn cmdline(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(args.join(" "))
}

/// Live processes whose command line contains `needle`.
pub fn live_pids_with_cmdline(needle: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    let mut pids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| cmdline(pid).is_some_and(|c| c.contains(needle)) && is_live(pid))
        .collect();
    pids.sort_unstable();
    pids
}

/// Sends `sig` to `pid`. A process that is already gone is not an error.
pub fn signal(pid: i32, sig: Signal) -> Result<(), String> {
    match nix::sys::signal::kill(Pid::from_raw(pid), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(format!("kill -{sig} {pid}: {e}")),
    }
}

/// Waits until `pid` is a zombie or gone; `false` on timeout.
pub fn wait_dead(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_live(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL and wait up to 10 s. For
/// processes that are not our children (we cannot reap them): returns once
/// the process is a zombie or gone. `Err` if it survives SIGKILL.
pub fn terminate(pid: i32, grace: Duration) -> Result<(), String> {
    if !is_live(pid) {
        return Ok(());
    }
    signal(pid, Signal::SIGTERM)?;
    if wait_dead(pid, grace) {
        return Ok(());
    }
    signal(pid, Signal::SIGKILL)?;
    if wait_dead(pid, Duration::from_secs(10)) {
        Ok(())
    } else {
        Err(format!(
            "pid {pid} ({}) survived SIGKILL",
            cmdline(pid).unwrap_or_default()
        ))
    }
}

/// Stops our own child: SIGTERM, wait up to `grace`, SIGKILL; reaps it.
pub fn terminate_child(child: &mut Child, grace: Duration) -> Result<ExitStatus, String> {
    if let Some(status) = child
        .try_wait()
        .map_err(|e| format!("wait {}: {e}", child.id()))?
    {
        return Ok(status);
    }
    signal(child.id() as i32, Signal::SIGTERM)?;
    if let Some(status) = wait_child(child, grace)? {
        return Ok(status);
    }
    kill_child(child)
}

/// SIGKILLs our own child and reaps it.
pub fn kill_child(child: &mut Child) -> Result<ExitStatus, String> {
    if let Some(status) = child
        .try_wait()
        .map_err(|e| format!("wait {}: {e}", child.id()))?
    {
        return Ok(status);
    }
    signal(child.id() as i32, Signal::SIGKILL)?;
    child
        .wait()
        .map_err(|e| format!("wait {}: {e}", child.id()))
}

/// Waits up to `timeout` for our child to exit; `None` on timeout.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| format!("wait {}: {e}", child.id()))?
        {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pid in a pidfile, if it holds one.
pub fn read_pidfile(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Removes `path` when the pid it names is a zombie, gone, or unreadable, so
/// that a daemon restarting on it does not take a dead process for a
/// running one. `Ok(true)` when removed, `Ok(false)` when there was nothing
/// to remove, `Err` when the process is alive.
pub fn remove_stale_pidfile(path: &Path) -> Result<bool, String> {
    if !path.exists() {
        return Ok(false);
    }
    if let Some(pid) = read_pidfile(path)
        && is_live(pid)
    {
        return Err(format!(
            "{} names live process {pid} ({})",
            path.display(),
            cmdline(pid).unwrap_or_default()
        ));
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("remove {}: {e}", path.display())),
    }
}

/// Runs `cmd` to completion with `stdin` fed to it, killing it (SIGKILL, by
/// its pid) when it is not done within `timeout`. Output is captured.
/// `Err` only when it could not be started or timed out; a non-zero exit is
/// in the returned status.
pub fn run_with_timeout(
    mut cmd: Command,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Output, String> {
    let shown = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("spawn {shown}: {e}"))?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => Some(std::thread::spawn(move || {
            // A command that stops reading early gets EPIPE here; its
            // status tells what happened.
            let _ = pipe.write_all(&data);
        })),
        _ => None,
    };
    let read_all = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = read_all(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = read_all(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = match wait_child(&mut child, timeout)? {
        Some(status) => status,
        None => {
            let _ = kill_child(&mut child);
            // The pipes may be held open by grandchildren; do not join.
            return Err(format!("{shown} did not finish within {timeout:?}; killed"));
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// A readable account of a finished command for error messages.
pub fn describe_output(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_of_self_and_nonexistent() {
        assert_eq!(state(std::process::id() as i32), State::Live);
        assert_eq!(state(i32::MAX), State::Gone);
    }

    #[test]
    fn zombie_is_not_live_and_stale_pidfile_goes() {
        let mut child = Command::new("/bin/true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not reaped yet: a zombie once it exits.
        let deadline = Instant::now() + Duration::from_secs(10);
        while state(pid) != State::Zombie && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(state(pid), State::Zombie);
        assert!(!is_live(pid));
        assert_eq!(zombie_exit_status(pid).and_then(|s| s.code()), Some(0));
        assert_eq!(zombie_exit_status(std::process::id() as i32), None);
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("x.pid");
        std::fs::write(&pidfile, format!("{pid}\n")).unwrap();
        assert_eq!(remove_stale_pidfile(&pidfile), Ok(true));
        assert!(!pidfile.exists());
        child.wait().unwrap();

        std::fs::write(&pidfile, format!("{}\n", std::process::id())).unwrap();
        assert!(remove_stale_pidfile(&pidfile).is_err());
        assert!(pidfile.exists());
    }

    #[test]
    fn a_zombies_exit_status_is_read_without_reaping_it() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = Command::new("/bin/sh")
            .args(["-c", "kill -ABRT $$"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        while state(pid) != State::Zombie && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = zombie_exit_status(pid).expect("a zombie's status");
        assert_eq!(status.signal(), Some(Signal::SIGABRT as i32));
        // Still there for the real wait.
        assert_eq!(child.wait().unwrap().signal(), Some(Signal::SIGABRT as i32));
        assert_eq!(zombie_exit_status(pid), None);
    }

    #[test]
    fn run_with_timeout_captures_and_kills() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "cat; echo err >&2; exit 3"]);
        let out = run_with_timeout(cmd, Some(b"in".to_vec()), Duration::from_secs(10)).unwrap();
        assert_eq!(out.stdout, b"in");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(3));

        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("30");
        let start = Instant::now();
        assert!(run_with_timeout(cmd, None, Duration::from_millis(200)).is_err());
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
