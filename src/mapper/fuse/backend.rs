//! What a FUSE image file reads from and writes to.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A block store of fixed size: an RBD image, or a sparse file in tests.
///
/// Implementations must be usable from several threads at once (the FUSE
/// server is multithreaded) and must make `discard`ed ranges read back as
/// zeros, because the loop driver turns both discards and write-zeroes
/// requests into hole punches.
pub trait BlockBackend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads at `off`; returns the bytes read (short only at the end).
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes at `off`; returns the bytes written.
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<usize>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Deallocates a range; it reads back as zeros afterwards.
    fn discard(&self, off: u64, len: u64) -> io::Result<()>;
}

/// A regular (sparse) file as a block store; for tests and benchmarks.
#[derive(Debug)]
pub struct SparseFileBackend {
    file: File,
    size: u64,
}

impl SparseFileBackend {
    /// Opens an existing file; its current length is the store's size.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self { file, size })
    }

    /// Creates (or truncates) a sparse file of `size` bytes.
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(size)?;
        Ok(Self { file, size })
    }
}

impl BlockBackend for SparseFileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<usize> {
        self.file.write_all_at(buf, off)?;
        Ok(buf.len())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on a descriptor we own, with plain integer
        // arguments; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// The stores a FUSE server can serve: a closed set.
#[derive(Debug)]
pub enum AnyBackend {
    /// A sparse file.
    File(SparseFileBackend),
    /// An RBD image through librbd.
    Rbd(super::rbd::RbdBackend),
}

impl BlockBackend for AnyBackend {
    fn size(&self) -> u64 {
        match self {
            AnyBackend::File(b) => b.size(),
            AnyBackend::Rbd(b) => b.size(),
        }
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            AnyBackend::File(b) => b.read_at(off, buf),
            AnyBackend::Rbd(b) => b.read_at(off, buf),
        }
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<usize> {
        match self {
            AnyBackend::File(b) => b.write_at(off, buf),
            AnyBackend::Rbd(b) => b.write_at(off, buf),
        }
    }

    fn flush(&self) -> io::Result<()> {
        match self {
            AnyBackend::File(b) => b.flush(),
            AnyBackend::Rbd(b) => b.flush(),
        }
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        match self {
            AnyBackend::File(b) => b.discard(off, len),
            AnyBackend::Rbd(b) => b.discard(off, len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_file_round_trip_and_discard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let b = SparseFileBackend::create(&path, 1 << 20).unwrap();
        assert_eq!(b.size(), 1 << 20);
        assert_eq!(b.write_at(4096, &[7u8; 8192]).unwrap(), 8192);
        let mut buf = vec![0u8; 8192];
        assert_eq!(b.read_at(4096, &mut buf).unwrap(), 8192);
        assert!(buf.iter().all(|&x| x == 7));
        b.discard(4096, 4096).unwrap();
        b.read_at(4096, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 0));
        assert!(buf[4096..].iter().all(|&x| x == 7));
        b.flush().unwrap();
        // reads at the end are short
        assert_eq!(b.read_at((1 << 20) - 100, &mut buf).unwrap(), 100);
        let ro = SparseFileBackend::open(&path, true).unwrap();
        assert_eq!(ro.size(), 1 << 20);
        assert!(ro.write_at(0, b"x").is_err());
    }
}
