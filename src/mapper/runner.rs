//! The one place where the mappers run external programs (`rbd`, `rbd-nbd`,
//! `modprobe`).
//!
//! Every command goes through a [`CommandRunner`]: [`SystemRunner`] runs it
//! for real, with a timeout; tests substitute a recording fake with scripted
//! outputs. Errors from Ceph tools carry the errno they print on stderr
//! (`rbd: map failed: (16) Device or resource busy`), recovered by
//! [`errno_from_stderr`], so callers can match on `EBUSY` and friends.

use std::fmt;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A program and its arguments, as run by a [`CommandRunner`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    /// Program name (looked up in `PATH`) or path.
    pub program: String,
    /// Arguments, not including the program.
    pub args: Vec<String>,
    /// Kill the program when it runs longer than this.
    pub timeout: Option<Duration>,
}

impl CommandLine {
    /// A command line without arguments or timeout.
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            timeout: None,
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

impl fmt::Display for CommandLine {
    /// Shell-like rendering for logs and error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.program)?;
        for arg in &self.args {
            if arg.is_empty()
                || arg
                    .chars()
                    .any(|c| c.is_whitespace() || c == '\'' || c == '"')
            {
                write!(f, " '{}'", arg.replace('\'', "'\\''"))?;
            } else {
                write!(f, " {arg}")?;
            }
        }
        Ok(())
    }
}

/// What a finished program left behind.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandOutput {
    /// Exit code, `None` when killed by a signal.
    pub code: Option<i32>,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

impl CommandOutput {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The errno the program reported: the last `(N)` in stderr, else the
    /// exit code when it looks like an errno (the `rbd` tool exits with it).
    pub fn errno(&self) -> Option<i32> {
        errno_from_stderr(&self.stderr).or(match self.code {
            Some(code) if code > 1 && code < 134 => Some(code),
            _ => None,
        })
    }

    /// A successful output with the given stdout (for fakes).
    pub fn ok(stdout: impl Into<String>) -> Self {
        Self {
            code: Some(0),
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    /// A failed output with the given exit code and stderr (for fakes).
    pub fn failed(code: i32, stderr: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }
}

/// Why a program could not be run to completion.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The program could not be started (not installed, not executable).
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The spawn error.
        #[source]
        source: std::io::Error,
    },
    /// The program ran past its timeout and was killed.
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    Timeout {
        /// The command line.
        command: String,
        /// The timeout that ran out.
        timeout: Duration,
        /// What it had written to stderr by then.
        stderr: String,
    },
}

/// Runs external programs. The choke point for every command the mappers
/// issue.
pub trait CommandRunner: Send + Sync + fmt::Debug {
    /// Runs `cmd` to completion. A non-zero exit is an `Ok` output; only
    /// failing to start or running out of time is an error.
    fn run(&self, cmd: &CommandLine) -> Result<CommandOutput, RunError>;
}

/// Runs programs for real with [`std::process::Command`].
#[derive(Debug, Clone, Default)]
pub struct SystemRunner;

impl CommandRunner for SystemRunner {
    fn run(&self, cmd: &CommandLine) -> Result<CommandOutput, RunError> {
        let started = Instant::now();
        tracing::debug!(command = %cmd, "running");
        let spawn_err = |source| RunError::Spawn {
            command: cmd.to_string(),
            source,
        };
        let mut child = Command::new(&cmd.program)
            .args(&cmd.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        let out_reader = child.stdout.take().map(spawn_reader);
        let err_reader = child.stderr.take().map(spawn_reader);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Ok(status),
                Ok(None) => {}
                Err(e) => break Err(spawn_err(e)),
            }
            if let Some(timeout) = cmd.timeout
                && started.elapsed() > timeout
            {
                // The child may exit between try_wait and kill; both results are fine.
                let _ = child.kill();
                let _ = child.wait();
                let stderr = err_reader.map(join_reader).unwrap_or_default();
                let _ = out_reader.map(join_reader);
                tracing::warn!(command = %cmd, ?timeout, "command timed out");
                return Err(RunError::Timeout {
                    command: cmd.to_string(),
                    timeout,
                    stderr,
                });
            }
            std::thread::sleep(poll_interval(started.elapsed()));
        };
        let stdout = out_reader.map(join_reader).unwrap_or_default();
        let stderr = err_reader.map(join_reader).unwrap_or_default();
        let status = status?;
        let output = CommandOutput {
            code: status.code(),
            stdout,
            stderr,
        };
        tracing::debug!(
            command = %cmd,
            code = ?output.code,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "finished"
        );
        Ok(output)
    }
}

fn poll_interval(elapsed: Duration) -> Duration {
    if elapsed < Duration::from_millis(50) {
        Duration::from_millis(2)
    } else {
        Duration::from_millis(20)
    }
}

/// Captures a pipe in a thread. A daemonising child (`rbd-nbd map`) may
/// leave a grandchild holding the pipe, so collecting never waits for EOF
/// longer than [`READER_GRACE`] after the child exited.
struct Reader {
    buf: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    handle: std::thread::JoinHandle<()>,
}

const READER_GRACE: Duration = Duration::from_secs(2);

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> Reader {
    let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let shared = buf.clone();
    let handle = std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    if let Ok(mut b) = shared.lock() {
                        b.extend_from_slice(&chunk[..n]);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A read error truncates the captured text; the exit status still tells.
                Err(_) => break,
            }
        }
    });
    Reader { buf, handle }
}

fn join_reader(r: Reader) -> String {
    let deadline = Instant::now() + READER_GRACE;
    while !r.handle.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let bytes = r.buf.lock().map(|b| b.clone()).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Finds the errno in a Ceph tool's stderr: the last `(N) ` that follows a
/// colon, as in `rbd: map failed: (6) No such device or address`.
pub fn errno_from_stderr(stderr: &str) -> Option<i32> {
    let mut found = None;
    let bytes = stderr.as_bytes();
    let mut i = 0;
    while let Some(pos) = stderr[i..].find(": (") {
        let start = i + pos + 3;
        let digits: String = stderr[start..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let end = start + digits.len();
        if !digits.is_empty()
            && bytes.get(end) == Some(&b')')
            && let Ok(n) = digits.parse::<i32>()
            && n > 0
            && n < 4096
        {
            found = Some(n);
        }
        i = start;
    }
    found
}

/// A recording [`CommandRunner`] that answers with scripted outputs, for
/// tests of the command-line mappers.
#[cfg(test)]
pub mod fake {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;

    /// One scripted answer.
    #[derive(Debug, Clone)]
    pub enum Answer {
        /// The program ran and produced this.
        Output(CommandOutput),
        /// The program could not be started.
        NotFound,
        /// The program timed out.
        Timeout,
    }

    /// Records every command line and pops answers in order; when the
    /// script is exhausted it answers with `default`.
    #[derive(Debug)]
    pub struct FakeRunner {
        calls: Mutex<Vec<CommandLine>>,
        script: Mutex<VecDeque<Answer>>,
        default: Answer,
    }

    impl FakeRunner {
        /// A fake answering `answers` in order, then success with no output.
        pub fn new(answers: impl IntoIterator<Item = Answer>) -> Self {
            Self {
                calls: Mutex::new(Vec::new()),
                script: Mutex::new(answers.into_iter().collect()),
                default: Answer::Output(CommandOutput::ok("")),
            }
        }

        /// Every command run so far.
        pub fn calls(&self) -> Vec<CommandLine> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }

        /// Every command run so far, rendered as shell-like strings.
        pub fn rendered(&self) -> Vec<String> {
            self.calls().iter().map(ToString::to_string).collect()
        }
    }

    impl CommandRunner for FakeRunner {
        fn run(&self, cmd: &CommandLine) -> Result<CommandOutput, RunError> {
            if let Ok(mut calls) = self.calls.lock() {
                calls.push(cmd.clone());
            }
            let answer = self
                .script
                .lock()
                .ok()
                .and_then(|mut s| s.pop_front())
                .unwrap_or_else(|| self.default.clone());
            match answer {
                Answer::Output(out) => Ok(out),
                Answer::NotFound => Err(RunError::Spawn {
                    command: cmd.to_string(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                }),
                Answer::Timeout => Err(RunError::Timeout {
                    command: cmd.to_string(),
                    timeout: cmd.timeout.unwrap_or_default(),
                    stderr: String::new(),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_the_last_parenthesised_number_after_a_colon() {
        let stderr = "rbd: sysfs write failed\nIn some cases useful info is found in syslog - try \"dmesg | tail\".\nrbd: map failed: (6) No such device or address\n";
        assert_eq!(errno_from_stderr(stderr), Some(6));
        assert_eq!(
            errno_from_stderr("rbd: unmap failed: (16) Device or resource busy"),
            Some(16)
        );
        assert_eq!(
            errno_from_stderr(
                "2026-11-23 -1 auth: unable to find a keyring: (2) No such file or directory\nrbd: couldn't connect to the cluster!\nrbd: map failed: (110) Connection timed out"
            ),
            Some(110)
        );
        assert_eq!(errno_from_stderr("rbd: sysfs write failed"), None);
        assert_eq!(errno_from_stderr("odd: (x) text: ("), None);
        assert_eq!(errno_from_stderr(""), None);
    }

    #[test]
    fn errno_falls_back_to_the_exit_code() {
        let out = CommandOutput::failed(16, "rbd: sysfs write failed");
        assert_eq!(out.errno(), Some(16));
        let out = CommandOutput::failed(1, "boom");
        assert_eq!(out.errno(), None);
        let out = CommandOutput::failed(22, "rbd: x failed: (2) No such file or directory");
        assert_eq!(out.errno(), Some(2));
    }

    #[test]
    fn command_line_renders_quoted() {
        let cmd = CommandLine::new("rbd").args(["device", "map", "a b", ""]);
        assert_eq!(cmd.to_string(), "rbd device map 'a b' ''");
    }

    #[test]
    fn system_runner_captures_output_and_status() {
        let out = SystemRunner
            .run(&CommandLine::new("sh").args(["-c", "echo out; echo 'x: (16) busy' >&2; exit 16"]))
            .unwrap();
        assert_eq!(out.code, Some(16));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.errno(), Some(16));
        assert!(!out.success());
    }

    #[test]
    fn system_runner_reports_missing_programs_and_timeouts() {
        let err = SystemRunner
            .run(&CommandLine::new("/nonexistent/rbd"))
            .unwrap_err();
        assert!(matches!(err, RunError::Spawn { .. }), "{err}");
        let started = Instant::now();
        let err = SystemRunner
            .run(
                &CommandLine::new("sleep")
                    .arg("10")
                    .timeout(Duration::from_millis(200)),
            )
            .unwrap_err();
        assert!(matches!(err, RunError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
