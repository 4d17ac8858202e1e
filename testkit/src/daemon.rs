//! A background daemon started by a test (e.g. the plugin daemon
//! `docker-rbd serve`), ready once its unix socket accepts connections,
//! stopped by its pid when dropped.
//!
//! Run it inside a [`crate::host::Host`] by building the command with
//! [`crate::host::Host::command`] and passing the socket path as the test
//! sees it ([`crate::host::Host::path`]).

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::process;

/// A running daemon and its log.
pub struct Daemon {
    name: String,
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    _scratch: tempfile::TempDir,
    stop_timeout: Duration,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("name", &self.name)
            .field("pid", &self.pid())
            .field("socket", &self.socket)
            .finish()
    }
}

impl Daemon {
    /// Spawns `cmd` with stdout and stderr appended to a log file and waits
    /// (up to `timeout`) until `socket` (a path as the test sees it) accepts
    /// a connection. Fails with the log if the daemon exits first or the
    /// socket never answers; the daemon is then stopped.
    pub fn start(
        name: &str,
        mut cmd: Command,
        socket: &Path,
        timeout: Duration,
    ) -> Result<Daemon, String> {
        for e in crate::sweep_orphans() {
            eprintln!("testkit daemon: {e}");
        }
        let scratch = crate::scratch_dir(&format!("daemon-{name}"))?;
        let log = scratch.path().join("daemon.log");
        let out = File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let shown = format!("{cmd:?}");
        let child = cmd.spawn().map_err(|e| format!("spawn {shown}: {e}"))?;
        // For the sweep, should this test process die without dropping us.
        if let Some(token) = crate::scratch::process_token(child.id() as i32) {
            let _ = std::fs::write(scratch.path().join(crate::scratch::PROCESS_FILE), token);
        }
        let mut d = Daemon {
            name: name.to_string(),
            child: Some(child),
            socket: socket.to_path_buf(),
            log,
            _scratch: scratch,
            stop_timeout: Duration::from_secs(30),
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = d.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                d.child = None;
                return Err(format!(
                    "{name} ({shown}) exited during start-up: {status}\n{}",
                    d.log_excerpt()
                ));
            }
            if UnixStream::connect(&d.socket).is_ok() {
                return Ok(d);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{name} ({shown}): {} did not accept connections within {timeout:?}\n{}",
                    d.socket.display(),
                    d.log_excerpt()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How long [`Daemon::stop`] waits after SIGTERM before SIGKILL
    /// (default 30 s).
    pub fn set_stop_timeout(&mut self, timeout: Duration) {
        self.stop_timeout = timeout;
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Whether its process still runs (false once it exited, even before
    /// it is reaped). For failure messages: a test that saw a request fail
    /// can say whether the daemon had died.
    pub fn is_running(&self) -> bool {
        self.pid().is_some_and(process::is_live)
    }

    /// How it ended, if it exited on its own (read without reaping it, so
    /// that [`Daemon::stop`] and the drop still see it): for failure
    /// messages, "killed by SIGABRT" tells an abort from a clean exit.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.pid().and_then(process::zombie_exit_status)
    }

    /// The socket it was waited on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn log_excerpt(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "--- {} log, last 60 lines ---\n{}",
            self.name,
            lines[lines.len().saturating_sub(60)..].join("\n")
        )
    }

    /// Whether it still runs (`Err` with its exit status and log if not).
    pub fn check_running(&mut self) -> Result<(), String> {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(status))) => Err(format!(
                "{} exited: {status}\n{}",
                self.name,
                self.log_excerpt()
            )),
            Some(Err(e)) => Err(format!("{}: wait: {e}", self.name)),
            None => Err(format!("{} was stopped", self.name)),
        }
    }

    /// SIGTERM, wait, SIGKILL if needed; returns the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus, String> {
        match self.child.take() {
            Some(mut child) => process::terminate_child(&mut child, self.stop_timeout),
            None => Err(format!("{} is not running", self.name)),
        }
    }

    /// SIGKILL (a crash); returns the exit status.
    pub fn kill(&mut self) -> Result<ExitStatus, String> {
        match self.child.take() {
            Some(mut child) => process::kill_child(&mut child),
            None => Err(format!("{} is not running", self.name)),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && let Err(e) = process::terminate_child(&mut child, self.stop_timeout)
        {
            eprintln!("testkit daemon {}: {e}", self.name);
        }
    }
}
