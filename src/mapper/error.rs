//! The mappers' error type.

use std::path::PathBuf;
use std::time::Duration;

use super::MapperKind;

/// Everything that can go wrong mapping, unmapping, listing or adopting a
/// block device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A mapper name that is not one of `auto|krbd|nbd|fuse`.
    #[error("unknown mapper {value:?}: expected one of auto, krbd, nbd, fuse")]
    UnknownKind {
        /// What was given.
        value: String,
    },
    /// The configured mapper cannot work on this host.
    #[error("the {kind} mapper is not available on this host: {reason}")]
    Unavailable {
        /// The mapper asked for.
        kind: MapperKind,
        /// What is missing.
        reason: String,
    },
    /// `auto` found no mapper that works here.
    #[error("no block-device mapper is available on this host ({})", .reasons.join("; "))]
    NoneAvailable {
        /// One line per mapper tried, saying what it lacks.
        reasons: Vec<String>,
    },
    /// A request field that cannot name an RBD image.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidRequest {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An external program could not be started.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The spawn error.
        #[source]
        source: std::io::Error,
    },
    /// An external program ran past its timeout.
    #[error("`{command}` did not finish within {timeout:?}: {stderr}")]
    CommandTimeout {
        /// The command line.
        command: String,
        /// The timeout.
        timeout: Duration,
        /// Its stderr so far.
        stderr: String,
    },
    /// An external program failed.
    #[error("`{command}` failed (exit {code:?}, errno {errno:?}): {}", .stderr.trim())]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit code (`None` when killed by a signal).
        code: Option<i32>,
        /// The errno recovered from its stderr or exit code.
        errno: Option<i32>,
        /// Its stderr.
        stderr: String,
    },
    /// The device is in use (mounted, open) and cannot be unmapped.
    #[error("{device} is busy{}", .detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Busy {
        /// The device.
        device: PathBuf,
        /// What was found holding it, when known.
        detail: Option<String>,
    },
    /// A program's output could not be understood.
    #[error("cannot parse the output of `{command}`: {reason} (output: {output:?})")]
    Parse {
        /// The command line (or file) whose output this is.
        command: String,
        /// What did not fit.
        reason: String,
        /// The offending output (truncated).
        output: String,
    },
    /// The image is already mapped by this mapper.
    #[error("{spec} is already mapped at {device}")]
    AlreadyMapped {
        /// The image (`pool/ns/image@snap`).
        spec: String,
        /// Where.
        device: PathBuf,
    },
    /// A recorded mapping no longer matches what the host has.
    #[error("the mapping of {spec} on {device} is gone: {reason}")]
    Stale {
        /// The image (`pool/ns/image@snap`).
        spec: String,
        /// The recorded device.
        device: PathBuf,
        /// What no longer matches.
        reason: String,
    },
    /// A record made by another mapper was handed to this one.
    #[error("a {found} mapping was handed to the {expected} mapper")]
    WrongMapper {
        /// The mapper that got it.
        expected: MapperKind,
        /// The mapper that made it.
        found: MapperKind,
    },
    /// A file-system or device operation failed.
    #[error("{op} {}: {source}", .path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The FUSE server process for an image could not be started or did not
    /// come up.
    #[error("the FUSE server for {spec} did not start: {message}{}", log_tail(.log))]
    HelperStart {
        /// The image.
        spec: String,
        /// The errno it reported, when it reported one.
        errno: Option<i32>,
        /// Its message.
        message: String,
        /// The end of its log.
        log: String,
    },
    /// The FUSE server process did not stop after its file system was
    /// unmounted.
    #[error("the FUSE server (pid {pid}) for {spec} did not exit within {waited:?}")]
    HelperStuck {
        /// The image.
        spec: String,
        /// Its pid.
        pid: i32,
        /// How long it was given.
        waited: Duration,
    },
    /// A Ceph call failed.
    #[error("{op} {spec}: {message} (errno {errno:?})")]
    Ceph {
        /// What was being done.
        op: &'static str,
        /// The image.
        spec: String,
        /// The error text.
        message: String,
        /// Its errno.
        errno: Option<i32>,
    },
}

fn log_tail(log: &str) -> String {
    let log = log.trim();
    if log.is_empty() {
        String::new()
    } else {
        format!("; its log ends with: {log}")
    }
}

impl Error {
    /// The errno behind this error, when there is one (`EBUSY` for
    /// [`Error::Busy`], the tool's errno for failed commands).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Busy { .. } => Some(libc::EBUSY),
            Error::CommandFailed { errno, .. }
            | Error::HelperStart { errno, .. }
            | Error::Ceph { errno, .. } => *errno,
            Error::Io { source, .. } | Error::Spawn { source, .. } => source.raw_os_error(),
            Error::CommandTimeout { .. } | Error::HelperStuck { .. } => Some(libc::ETIMEDOUT),
            Error::AlreadyMapped { .. } => Some(libc::EEXIST),
            Error::InvalidRequest { .. } | Error::UnknownKind { .. } => Some(libc::EINVAL),
            Error::Unavailable { .. } | Error::NoneAvailable { .. } => Some(libc::ENODEV),
            Error::Stale { .. } => Some(libc::ENOENT),
            Error::Parse { .. } | Error::WrongMapper { .. } => None,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Shorthand for the mappers' results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
