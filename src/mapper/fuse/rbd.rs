//! [`BlockBackend`] over a librbd image.

use std::io;
use std::time::Duration;

use ceph_client::rbd::Image;
use ceph_client::{ConnectConfig, Rados};

use super::backend::BlockBackend;
use crate::mapper::{CephConnection, ImageSpec};

/// An open RBD image; keeps its cluster connection alive.
#[derive(Debug)]
pub struct RbdBackend {
    image: Image,
    size: u64,
}

/// Client options the FUSE server needs from librbd:
/// - partial discards must zero (the loop driver turns write-zeroes into
///   hole punches, and ext4 relies on zeroed ranges reading back as zeros);
/// - data I/O must wait for the cluster rather than fail after a timeout,
///   as a kernel block device would.
pub const CLIENT_OPTIONS: &[(&str, &str)] = &[
    ("rbd_skip_partial_discard", "false"),
    ("rados_osd_op_timeout", "0"),
];

/// Why [`RbdBackend::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A cluster call failed.
    #[error(transparent)]
    Ceph(#[from] ceph_client::Error),
    /// Another client holds the image's exclusive lock and keeps it.
    #[error(
        "the exclusive lock of image {image} is held by another client ({}), which does not \
         release it: another host, an `rbd` tool or a leftover mapping has the image open for \
         writing; it is not taken from it",
        if .owners.is_empty() { "unknown".to_string() } else { .owners.join(", ") }
    )]
    Locked {
        /// The image.
        image: String,
        /// The lock holders' addresses, as librbd lists them.
        owners: Vec<String>,
        /// What `rbd_lock_acquire` said.
        #[source]
        source: Box<ceph_client::Error>,
    },
}

impl OpenError {
    /// The errno to report.
    pub fn errno(&self) -> Option<i32> {
        match self {
            OpenError::Ceph(e) => e.errno(),
            OpenError::Locked { .. } => Some(libc::EBUSY),
        }
    }
}

impl RbdBackend {
    /// Connects and opens `spec`: read-only when asked or at a snapshot;
    /// with `exclusive`, takes the exclusive lock and keeps it (other
    /// clients' writes then fail with `EROFS`).
    pub fn open(
        conn: &CephConnection,
        spec: &ImageSpec,
        read_only: bool,
        exclusive: bool,
        connect_timeout: Duration,
    ) -> Result<Self, OpenError> {
        let rados = Self::connect(conn, connect_timeout)?;
        Self::open_on(&rados, spec, read_only, exclusive)
    }

    /// A cluster connection with the options a server needs
    /// ([`CLIENT_OPTIONS`]), for [`RbdBackend::open_on`].
    pub fn connect(conn: &CephConnection, timeout: Duration) -> Result<Rados, OpenError> {
        let config = ConnectConfig {
            conf: conn.conf.clone(),
            id: conn.id.clone(),
            keyring: conn.keyring.clone(),
            cluster: conn.cluster.clone(),
            options: CLIENT_OPTIONS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            timeout,
        };
        Ok(Rados::connect(&config)?)
    }

    /// Opens `spec` on a connection made by [`RbdBackend::connect`]; see
    /// [`RbdBackend::open`].
    pub fn open_on(
        rados: &Rados,
        spec: &ImageSpec,
        read_only: bool,
        exclusive: bool,
    ) -> Result<Self, OpenError> {
        let ioctx = rados.ioctx(&spec.pool, spec.namespace.as_deref())?;
        let read_only = read_only || spec.snap.is_some();
        let image = if read_only {
            Image::open_read_only(&ioctx, &spec.image, spec.snap.as_deref())?
        } else {
            Image::open(&ioctx, &spec.image, spec.snap.as_deref())?
        };
        if exclusive && !read_only {
            // A peer that keeps its lock answers EROFS (librbd's refusal).
            match image.lock_acquire_exclusive() {
                Ok(()) => {}
                Err(e) if matches!(e.errno(), Some(libc::EROFS | libc::EBUSY)) => {
                    return Err(OpenError::Locked {
                        image: spec.image.clone(),
                        owners: image.lock_owners().unwrap_or_default(),
                        source: Box::new(e),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        let size = image.size()?;
        tracing::info!(%spec, size, read_only, exclusive, "RBD image open");
        Ok(Self { image, size })
    }

    /// The open image.
    pub fn image(&self) -> &Image {
        &self.image
    }
}

fn to_io(e: ceph_client::Error) -> io::Error {
    match e.errno() {
        Some(errno) if errno > 0 => io::Error::from_raw_os_error(errno),
        _ => io::Error::other(e.to_string()),
    }
}

impl BlockBackend for RbdBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        if off >= self.size {
            return Ok(0);
        }
        let len = buf.len().min((self.size - off) as usize);
        self.image.read_at(off, &mut buf[..len]).map_err(to_io)
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<usize> {
        self.image.write_at(off, buf).map_err(to_io)
    }

    fn flush(&self) -> io::Result<()> {
        self.image.flush().map_err(to_io)
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.image.discard(off, len).map_err(to_io)
    }
}
