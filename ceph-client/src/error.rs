//! Errors: every failure names the librados/librbd call, what it acted on,
//! and the errno Ceph returned.

use std::fmt;

/// What a failed call acted on; shown in error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The cluster connection as a whole.
    Cluster,
    /// A pool.
    Pool(String),
    /// A RADOS object.
    Object(String),
    /// An RBD image.
    Image(String),
    /// A snapshot of an RBD image.
    Snapshot {
        /// The image.
        image: String,
        /// The snapshot.
        snap: String,
    },
    /// An RBD namespace.
    Namespace(String),
    /// A monitor command (its JSON text).
    Command(String),
    /// A configuration option of the cluster handle.
    ConfigOption(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Cluster => f.write_str("cluster"),
            Target::Pool(p) => write!(f, "pool {p:?}"),
            Target::Object(o) => write!(f, "object {o:?}"),
            Target::Image(i) => write!(f, "image {i:?}"),
            Target::Snapshot { image, snap } => {
                write!(f, "snapshot {:?}", format!("{image}@{snap}"))
            }
            Target::Namespace(n) => write!(f, "namespace {n:?}"),
            Target::Command(c) => write!(f, "command {c}"),
            Target::ConfigOption(o) => write!(f, "option {o:?}"),
        }
    }
}

/// An error from this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A librados or librbd call returned a negative errno.
    #[error("{op} on {target}: {} (errno {errno})", strerror(*errno))]
    Op {
        /// The C function that failed, e.g. `"rbd_clone3"`.
        op: &'static str,
        /// What it acted on.
        target: Target,
        /// The (positive) errno.
        errno: i32,
    },
    /// A monitor command failed; `status` is the monitor's explanation.
    #[error("{op} {command}: {status} ({}, errno {errno})", strerror(*errno))]
    MonCommand {
        /// The C function that failed (`"rados_mon_command"`).
        op: &'static str,
        /// The JSON command.
        command: String,
        /// The (positive) errno.
        errno: i32,
        /// The monitor's status string (`outs`), possibly empty.
        status: String,
    },
    /// A string argument contains a NUL byte and cannot be passed to C.
    #[error("{op}: {what} contains a NUL byte: {value:?}")]
    Nul {
        /// The C function that would have been called.
        op: &'static str,
        /// Which argument.
        what: &'static str,
        /// The offending value.
        value: String,
    },
    /// An argument is out of the range the C API accepts.
    #[error("{op}: invalid argument: {reason}")]
    InvalidArgument {
        /// The C function that would have been called.
        op: &'static str,
        /// Why the argument was rejected.
        reason: String,
    },
    /// Ceph returned data this crate cannot represent (e.g. a key that is
    /// not UTF-8).
    #[error("{op} on {target}: unexpected data: {reason}")]
    BadData {
        /// The C function whose output was rejected.
        op: &'static str,
        /// What it acted on.
        target: Target,
        /// What was wrong with it.
        reason: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The errno Ceph returned, if this error came from Ceph.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Op { errno, .. } | Error::MonCommand { errno, .. } => Some(*errno),
            Error::Nul { .. } | Error::InvalidArgument { .. } | Error::BadData { .. } => None,
        }
    }

    /// The name of the C function that failed.
    pub fn op(&self) -> &'static str {
        match self {
            Error::Op { op, .. }
            | Error::MonCommand { op, .. }
            | Error::Nul { op, .. }
            | Error::InvalidArgument { op, .. }
            | Error::BadData { op, .. } => op,
        }
    }

    /// `ENOENT`: the object, image, snapshot, key or lock does not exist.
    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(libc::ENOENT)
    }

    /// `EEXIST`: it already exists (exclusive create, image name taken, lock
    /// already held by the same client and cookie).
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    /// `EBUSY`: held by someone else (cls lock, image in use).
    pub fn is_busy(&self) -> bool {
        self.errno() == Some(libc::EBUSY)
    }

    /// `ECANCELED`: a compare in a compound operation failed, nothing was
    /// applied.
    pub fn is_canceled(&self) -> bool {
        self.errno() == Some(libc::ECANCELED)
    }

    /// `ETIMEDOUT`: the cluster did not answer in time.
    pub fn is_timed_out(&self) -> bool {
        self.errno() == Some(libc::ETIMEDOUT)
    }

    /// `ENOSPC` or `EDQUOT`: the pool is full (an OSD, or its quota), as a
    /// write through [`crate::Rados::ioctx_full_try`] learns it.
    pub fn is_pool_full(&self) -> bool {
        matches!(self.errno(), Some(libc::ENOSPC | libc::EDQUOT))
    }

    /// `EBLOCKLISTED` (Ceph's name for `ESHUTDOWN`): the cluster refuses
    /// this client, which was fenced (`osd blocklist add`, or a lock
    /// broken with blocklisting). Only a new connection can go on.
    pub fn is_blocklisted(&self) -> bool {
        self.errno() == Some(libc::ESHUTDOWN)
    }

    pub(crate) fn ceph(op: &'static str, target: Target, ret: i64) -> Error {
        // Ceph returns -errno; accept either sign so a positive code is never
        // reported as "errno -2".
        let errno = i32::try_from(ret.unsigned_abs()).unwrap_or(i32::MAX);
        Error::Op { op, target, errno }
    }
}

/// `Ok(ret)` for a non-negative return value, the error otherwise.
pub(crate) fn check(op: &'static str, target: impl FnOnce() -> Target, ret: i64) -> Result<i64> {
    if ret < 0 {
        Err(Error::ceph(op, target(), ret))
    } else {
        Ok(ret)
    }
}

/// The text of an errno, without std's " (os error N)" suffix.
pub fn strerror(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_op_target_and_errno() {
        let e = Error::ceph("rbd_clone3", Target::Image("x".into()), -2);
        assert_eq!(
            e.to_string(),
            r#"rbd_clone3 on image "x": No such file or directory (errno 2)"#
        );
        assert!(e.is_not_found());
        assert_eq!(e.errno(), Some(2));
        assert_eq!(e.op(), "rbd_clone3");
    }

    #[test]
    fn helpers_match_their_errno() {
        let t = || Target::Object("o".into());
        assert!(Error::ceph("a", t(), -(libc::EEXIST as i64)).is_exists());
        assert!(Error::ceph("a", t(), -(libc::EBUSY as i64)).is_busy());
        assert!(Error::ceph("a", t(), -(libc::ECANCELED as i64)).is_canceled());
        assert!(Error::ceph("a", t(), -(libc::ETIMEDOUT as i64)).is_timed_out());
        assert!(!Error::ceph("a", t(), -(libc::EBUSY as i64)).is_exists());
        let nul = Error::Nul {
            op: "rados_stat",
            what: "object name",
            value: "a\0b".into(),
        };
        assert_eq!(nul.errno(), None);
        assert!(!nul.is_not_found());
        assert!(nul.to_string().contains("NUL"));
    }

    #[test]
    fn snapshot_target_display() {
        let e = Error::ceph(
            "rbd_open",
            Target::Snapshot {
                image: "i".into(),
                snap: "s".into(),
            },
            -2,
        );
        assert_eq!(
            e.to_string(),
            r#"rbd_open on snapshot "i@s": No such file or directory (errno 2)"#
        );
    }

    #[test]
    fn check_passes_non_negative() {
        assert_eq!(check("x", || Target::Cluster, 5).unwrap(), 5);
        assert!(
            check("x", || Target::Cluster, -110)
                .unwrap_err()
                .is_timed_out()
        );
    }
}
