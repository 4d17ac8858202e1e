//! The FUSE file system: one directory holding one regular file, `image`,
//! whose bytes are the backend's.

use std::ffi::OsStr;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};

use super::backend::BlockBackend;

/// Name of the image file inside the mount.
pub const IMAGE_FILE: &str = "image";

const ROOT_INO: INodeNo = INodeNo(1);
const IMAGE_INO: INodeNo = INodeNo(2);
/// Attributes never change behind the kernel's back (only this server
/// writes, through the kernel), so they may be cached for long.
const TTL: Duration = Duration::from_secs(3600);

thread_local! {
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `EBLOCKLISTED` as librbd returns it (Ceph maps it to `ESHUTDOWN`): the
/// cluster refuses this client because another host fenced it.
const EBLOCKLISTED: i32 = libc::ESHUTDOWN;

/// Whether this server's RADOS client was fenced. Once it has been, the
/// image is no longer served: every request fails at once with `EIO`
/// instead of waiting on a cluster that will refuse it, and the reason is
/// logged once. Only a new client (a new mapping, after docker-rbd starts
/// again) can write the image.
#[derive(Debug, Default)]
struct Fence {
    fenced: AtomicBool,
}

impl Fence {
    /// Notes a backend error; true if it is the one that fences.
    fn note(&self, err: &io::Error) -> bool {
        if err.raw_os_error() != Some(EBLOCKLISTED) {
            return false;
        }
        if !self.fenced.swap(true, Ordering::SeqCst) {
            tracing::error!(
                "this client is blocklisted: another docker-rbd host fenced it when it took \
                 the container over; the image is no longer served here, every request now \
                 fails (restart docker-rbd to reconnect with a new client)"
            );
        }
        true
    }

    /// `Some(EIO)` once fenced.
    fn refuse(&self) -> Option<Errno> {
        self.fenced.load(Ordering::SeqCst).then_some(Errno::EIO)
    }
}

/// Tuning of the FUSE connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsOptions {
    /// Refuse writes (`EROFS`).
    pub read_only: bool,
    /// Largest single read/write request, bytes (the kernel caps it at
    /// `max_pages`, 1 MiB by default).
    pub max_write: u32,
    /// Reply `FOPEN_DIRECT_IO` on open: no page cache for the image file.
    pub direct_io: bool,
    /// Pending background (async) requests the kernel may queue.
    pub max_background: u16,
}

impl Default for FsOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            max_write: 1 << 20,
            direct_io: false,
            max_background: 64,
        }
    }
}

/// Counters, logged when the server stops.
#[derive(Debug, Default)]
pub struct FsStats {
    /// Read requests.
    pub reads: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Write requests.
    pub writes: AtomicU64,
    /// Bytes written.
    pub written_bytes: AtomicU64,
    /// Flushes (flush + fsync).
    pub flushes: AtomicU64,
    /// Discards (hole punches).
    pub discards: AtomicU64,
    /// Requests that failed in the backend.
    pub errors: AtomicU64,
}

/// Serves one [`BlockBackend`] as the file `image`.
#[derive(Debug)]
pub struct ImageFs<B: BlockBackend> {
    backend: B,
    options: FsOptions,
    created: SystemTime,
    uid: u32,
    gid: u32,
    stats: std::sync::Arc<FsStats>,
    fence: Fence,
}

impl<B: BlockBackend> ImageFs<B> {
    /// A file system serving `backend`.
    pub fn new(backend: B, options: FsOptions) -> Self {
        Self {
            backend,
            options,
            created: SystemTime::now(),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            stats: Default::default(),
            fence: Fence::default(),
        }
    }

    /// Shared counters, readable while the file system runs.
    pub fn stats(&self) -> std::sync::Arc<FsStats> {
        self.stats.clone()
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT_INO => (FileType::Directory, 0o700, 0, 2),
            IMAGE_INO => {
                let perm = if self.options.read_only { 0o400 } else { 0o600 };
                (FileType::RegularFile, perm, self.backend.size(), 1)
            }
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn fail(&self, op: &'static str, off: u64, len: u64, err: &io::Error) -> Errno {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if self.fence.note(err) {
            return Errno::EIO;
        }
        tracing::error!(op, off, len, error = %err, "backend I/O failed");
        Errno::from_i32(err.raw_os_error().unwrap_or(libc::EIO))
    }

    /// `Some(errno)` when the request must fail before reaching the
    /// backend (the client is fenced).
    fn refused(&self) -> Option<Errno> {
        let refused = self.fence.refuse();
        if refused.is_some() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        refused
    }

    fn do_flush(&self, reply: ReplyEmpty) {
        if let Some(e) = self.refused() {
            return reply.error(e);
        }
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        match self.backend.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail("flush", 0, 0, &e)),
        }
    }
}

impl<B: BlockBackend + 'static> Filesystem for ImageFs<B> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_write(self.options.max_write) {
            // Capped by fuser's buffer; take the largest that fits.
            let _ = config.set_max_write(max);
        }
        if let Err(max) = config.set_max_readahead(self.options.max_write) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(self.options.max_background);
        let _ = config.set_congestion_threshold(self.options.max_background / 4 * 3);
        // Let the loop driver's direct I/O keep several requests in flight.
        let wanted = InitFlags::FUSE_ASYNC_DIO | InitFlags::FUSE_MAX_PAGES;
        let supported = config.capabilities() & wanted;
        if config.add_capabilities(supported).is_err() {
            tracing::warn!("kernel refused FUSE capabilities it announced");
        }
        tracing::info!(
            max_write = self.options.max_write,
            async_dio = supported.contains(InitFlags::FUSE_ASYNC_DIO),
            max_pages = supported.contains(InitFlags::FUSE_MAX_PAGES),
            "FUSE connection initialised"
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent, self.attr(IMAGE_INO)) {
            (ROOT_INO, Some(attr)) if name == IMAGE_FILE => reply.entry(&TTL, &attr, Generation(0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match size {
            // The image's size is the image's: resizing goes through rbd.
            Some(s) if s != attr.size => reply.error(Errno::EPERM),
            // Mode, owner and times are fixed; accept and ignore.
            _ => reply.attr(&TTL, &attr),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != IMAGE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.options.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let fopen = if self.options.direct_io {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            // Only this server changes the file, and only through the
            // kernel, so cached pages stay valid across opens.
            FopenFlags::FOPEN_KEEP_CACHE
        };
        reply.opened(FileHandle(0), fopen);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != IMAGE_INO {
            return reply.error(Errno::EISDIR);
        }
        if let Some(e) = self.refused() {
            return reply.error(e);
        }
        let end = self.backend.size();
        if offset >= end {
            return reply.data(&[]);
        }
        let len = u64::from(size).min(end - offset) as usize;
        // One buffer per FUSE worker thread: no allocation and no zeroing
        // per request.
        READ_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let mut done = 0;
            while done < len {
                match self
                    .backend
                    .read_at(offset + done as u64, &mut buf[done..len])
                {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return reply.error(self.fail("read", offset, len as u64, &e)),
                }
            }
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            self.stats
                .read_bytes
                .fetch_add(done as u64, Ordering::Relaxed);
            reply.data(&buf[..done]);
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != IMAGE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.options.read_only {
            return reply.error(Errno::EROFS);
        }
        if let Some(e) = self.refused() {
            return reply.error(e);
        }
        let end = self.backend.size();
        let Some(last) = offset.checked_add(data.len() as u64) else {
            return reply.error(Errno::EFBIG);
        };
        if last > end {
            return reply.error(Errno::ENOSPC);
        }
        let mut done = 0;
        while done < data.len() {
            match self.backend.write_at(offset + done as u64, &data[done..]) {
                Ok(0) => {
                    let e = io::Error::from(io::ErrorKind::WriteZero);
                    return reply.error(self.fail("write", offset, data.len() as u64, &e));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(self.fail("write", offset, data.len() as u64, &e)),
            }
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .written_bytes
            .fetch_add(done as u64, Ordering::Relaxed);
        reply.written(done as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        if ino != IMAGE_INO || self.options.read_only {
            return reply.ok();
        }
        self.do_flush(reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino != IMAGE_INO || self.options.read_only {
            return reply.ok();
        }
        self.do_flush(reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != IMAGE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.options.read_only {
            return reply.error(Errno::EROFS);
        }
        let end = self.backend.size();
        let Some(last) = offset.checked_add(length) else {
            return reply.error(Errno::EFBIG);
        };
        let zeroing = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        if !zeroing {
            // Plain preallocation: every byte below the size already exists.
            return if last <= end || mode & libc::FALLOC_FL_KEEP_SIZE != 0 {
                reply.ok()
            } else {
                reply.error(Errno::EFBIG)
            };
        }
        let last = last.min(end);
        if offset >= last {
            return reply.ok();
        }
        if let Some(e) = self.refused() {
            return reply.error(e);
        }
        self.stats.discards.fetch_add(1, Ordering::Relaxed);
        match self.backend.discard(offset, last - offset) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail("discard", offset, last - offset, &e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino == ROOT_INO {
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::ENOTDIR);
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (IMAGE_INO, FileType::RegularFile, IMAGE_FILE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.backend.size().div_ceil(4096);
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if self.attr(ino).is_some() {
            reply.ok()
        } else {
            reply.error(Errno::ENOENT)
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: ReplyLseek,
    ) {
        // SEEK_DATA/SEEK_HOLE: the kernel falls back to "all data".
        reply.error(Errno::ENOSYS);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // ENOSYS makes the kernel stop asking (no xattrs here).
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocklisted_client_is_fenced_for_good() {
        let fence = Fence::default();
        assert_eq!(fence.refuse(), None);
        assert!(!fence.note(&io::Error::from_raw_os_error(libc::EIO)));
        assert_eq!(fence.refuse(), None, "other errors do not fence");
        assert!(fence.note(&io::Error::from_raw_os_error(libc::ESHUTDOWN)));
        assert_eq!(fence.refuse(), Some(Errno::EIO));
        assert!(fence.note(&io::Error::from_raw_os_error(libc::ESHUTDOWN)));
        assert_eq!(fence.refuse(), Some(Errno::EIO), "and stays fenced");
    }
}
