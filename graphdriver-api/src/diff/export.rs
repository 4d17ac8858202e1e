//! `Diff`: write a Docker layer tar for a list of changes (moby's
//! `ExportChanges` and, for a parentless layer, `Tar`).
//!
//! - Changes are written in path order; a deleted path becomes an empty
//!   regular file `.wh.<name>` in its directory.
//! - Added and modified paths are written with their metadata: mode
//!   (permission, setuid/setgid/sticky bits), owner and group mapped back to
//!   container IDs, mtime in whole seconds, xattrs as pax `SCHILY.xattr.*`
//!   (all but `security.selinux`; a v3 `security.capability` is written as
//!   v2, as moby does, since its root ID means nothing outside the user
//!   namespace), symlink targets, device numbers. Directory names end in `/`.
//! - A non-directory whose inode was already written under another name in
//!   this tar is written as a hardlink to that name.
//! - Sockets are skipped (tar has no type for them). A path that vanished
//!   since the changes were computed is skipped with a warning (the container
//!   may still be running); a file that shrank is padded with zeros, one that
//!   grew is cut at its size when it was stat'ed, so the tar stays valid.
//! - Names that do not fit the ustar fields go in pax `path`/`linkpath`
//!   records, so long and non-UTF-8 names survive.
//!
//! The tree is read beneath the layer root without following any symlink
//! (see [`super::confine`]), so a tree changing under the export cannot make
//! it read a file outside the layer.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{OFlag, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, major, minor};
use tracing::{debug, warn};

use super::changes::LayerChange;
use super::confine::{Root, WHITEOUT_PREFIX, file_type, proc_fd_path, read_xattrs};
use super::idmap::{IdMapError, IdMappings};
use super::tarfmt::{BLOCK, padding_for, pax_header, pax_record, set_link_bytes, set_name_bytes};
use crate::types::ChangeKind;

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The layer root could not be opened.
    #[error("cannot open the layer {}", path.display())]
    OpenRoot {
        /// The layer root.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// Reading a path of the layer failed.
    #[error("reading {path:?} from the layer")]
    Read {
        /// The path, absolute inside the layer.
        path: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// A file's owner or group has no container ID under the ID maps.
    #[error("{path:?}: ownership cannot be mapped to the container")]
    IdMap {
        /// The path, absolute inside the layer.
        path: String,
        /// Which ID, and why.
        #[source]
        source: IdMapError,
    },
    /// Writing the tar to its destination failed.
    #[error("writing the layer tar")]
    Write {
        /// The failure.
        #[source]
        source: io::Error,
    },
}

/// Starts a tar stream of `changes` read from `layer`; the tar is produced
/// as the reader is read.
pub fn export_changes(
    layer: &Path,
    changes: &[LayerChange],
    maps: &IdMappings,
) -> Result<ExportReader, ExportError> {
    let root = Root::open(layer).map_err(|e| ExportError::OpenRoot {
        path: layer.to_path_buf(),
        source: e.into(),
    })?;
    let mut changes = changes.to_vec();
    changes.sort_by(|a, b| {
        a.path
            .as_os_str()
            .as_bytes()
            .cmp(b.path.as_os_str().as_bytes())
    });
    debug!(layer = %layer.display(), changes = changes.len(), "exporting changes");
    Ok(ExportReader {
        root,
        changes,
        next: 0,
        maps: maps.clone(),
        links: HashMap::new(),
        pending: Vec::new(),
        pending_pos: 0,
        body: None,
        state: State::Entries,
        entries: 0,
    })
}

/// Writes the tar of `changes` read from `layer` into `out`; returns the
/// bytes written.
pub fn write_changes(
    layer: &Path,
    changes: &[LayerChange],
    maps: &IdMappings,
    out: &mut dyn Write,
) -> Result<u64, ExportError> {
    let mut reader = export_changes(layer, changes, maps)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = reader.read_inner(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        out.write_all(&buf[..n])
            .map_err(|source| ExportError::Write { source })?;
        total += n as u64;
    }
}

#[derive(Debug)]
enum State {
    Entries,
    /// The end-of-archive blocks are queued; then end of stream.
    Trailer,
    Done,
    Failed(String),
}

struct Body {
    file: File,
    remaining: u64,
    padding: usize,
    path: String,
}

/// A Docker layer tar, produced lazily from a layer tree. `Send`, so it can
/// be handed to a blocking thread to stream.
pub struct ExportReader {
    root: Root,
    changes: Vec<LayerChange>,
    next: usize,
    maps: IdMappings,
    /// First name written for each (device, inode) with several links.
    links: HashMap<(u64, u64), Vec<u8>>,
    pending: Vec<u8>,
    pending_pos: usize,
    body: Option<Body>,
    state: State,
    entries: u64,
}

impl std::fmt::Debug for ExportReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportReader")
            .field("changes", &self.changes.len())
            .field("next", &self.next)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Read for ExportReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_inner(buf).map_err(io::Error::other)
    }
}

/// A resolved entry ready to be written.
struct Header {
    name: Vec<u8>,
    link: Vec<u8>,
    kind: tar::EntryType,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    size: u64,
    dev: (u32, u32),
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl ExportReader {
    fn read_inner(&mut self, buf: &mut [u8]) -> Result<usize, ExportError> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pending_pos < self.pending.len() {
                let n = buf.len().min(self.pending.len() - self.pending_pos);
                buf[..n].copy_from_slice(&self.pending[self.pending_pos..self.pending_pos + n]);
                self.pending_pos += n;
                return Ok(n);
            }
            if let Some(body) = &mut self.body {
                if body.remaining > 0 {
                    let want = usize::try_from(body.remaining)
                        .unwrap_or(usize::MAX)
                        .min(buf.len());
                    let n = match body.file.read(&mut buf[..want]) {
                        Ok(0) => {
                            warn!(path = %body.path, missing = body.remaining, "file shrank while exported, padding with zeros");
                            buf[..want].fill(0);
                            want
                        }
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(source) => {
                            let err = ExportError::Read {
                                path: body.path.clone(),
                                source,
                            };
                            self.state = State::Failed(err.to_string());
                            self.body = None;
                            return Err(err);
                        }
                    };
                    body.remaining -= n as u64;
                    return Ok(n);
                }
                let padding = body.padding;
                self.queue(vec![0u8; padding]);
                self.body = None;
                continue;
            }
            match &self.state {
                State::Entries => {}
                State::Trailer => {
                    self.state = State::Done;
                    debug!(entries = self.entries, "layer tar written");
                    return Ok(0);
                }
                State::Done => return Ok(0),
                State::Failed(msg) => {
                    return Err(ExportError::Write {
                        source: io::Error::other(format!("the export failed earlier: {msg}")),
                    });
                }
            }
            if self.next >= self.changes.len() {
                self.queue(vec![0u8; 2 * BLOCK]);
                self.state = State::Trailer;
                continue;
            }
            let index = self.next;
            self.next += 1;
            if let Err(err) = self.emit(index) {
                self.state = State::Failed(err.to_string());
                return Err(err);
            }
        }
    }

    fn queue(&mut self, bytes: Vec<u8>) {
        self.pending = bytes;
        self.pending_pos = 0;
    }

    /// Queues the header(s) of change `index` and opens its data.
    fn emit(&mut self, index: usize) -> Result<(), ExportError> {
        let change = self.changes[index].clone();
        let rel = change.rel_bytes().to_vec();
        let shown = change.path.to_string_lossy().into_owned();
        if rel.is_empty() {
            return Ok(());
        }
        if change.kind == ChangeKind::Delete {
            let (dir, base) = match rel.iter().rposition(|b| *b == b'/') {
                Some(i) => (&rel[..=i], &rel[i + 1..]),
                None => (&rel[..0], &rel[..]),
            };
            let mut name = dir.to_vec();
            name.extend_from_slice(WHITEOUT_PREFIX);
            name.extend_from_slice(base);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
                .unwrap_or(0);
            let header = Header {
                name,
                link: Vec::new(),
                kind: tar::EntryType::Regular,
                mode: 0,
                uid: 0,
                gid: 0,
                mtime: now,
                size: 0,
                dev: (0, 0),
                xattrs: Vec::new(),
            };
            self.queue(encode(&header));
            self.entries += 1;
            return Ok(());
        }

        let read_err = |e: Errno| ExportError::Read {
            path: shown.clone(),
            source: e.into(),
        };
        let fd = match self.root.open_beneath_nofollow(&rel, OFlag::O_PATH) {
            Ok(fd) => fd,
            // Gone, or a symlink now sits in its path: the tree changed
            // since the changes were listed.
            Err(e @ (Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP | Errno::EXDEV)) => {
                warn!(path = %shown, error = %e, "changed path no longer readable, skipped");
                return Ok(());
            }
            Err(e) => return Err(read_err(e)),
        };
        let st = fstat(fd.as_fd()).map_err(read_err)?;
        let ft = file_type(&st);
        if ft == SFlag::S_IFSOCK {
            debug!(path = %shown, "socket skipped: tar cannot hold it");
            return Ok(());
        }
        let map_err = |source| ExportError::IdMap {
            path: shown.clone(),
            source,
        };
        let uid = self.maps.uid_to_container(st.st_uid).map_err(map_err)?;
        let gid = self.maps.gid_to_container(st.st_gid).map_err(map_err)?;
        let mut xattrs = read_xattrs(fd.as_fd()).map_err(|source| ExportError::Read {
            path: shown.clone(),
            source,
        })?;
        for (name, value) in &mut xattrs {
            if name.as_slice() == b"security.capability" {
                capability_v3_to_v2(value);
            }
        }
        let mut header = Header {
            name: rel.clone(),
            link: Vec::new(),
            kind: tar::EntryType::Regular,
            mode: st.st_mode & 0o7777,
            uid,
            gid,
            mtime: st.st_mtime,
            size: 0,
            dev: (0, 0),
            xattrs,
        };
        if ft != SFlag::S_IFDIR && st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key) {
                header.kind = tar::EntryType::Link;
                header.link = first.clone();
                self.queue(encode(&header));
                self.entries += 1;
                return Ok(());
            }
            self.links.insert(key, rel.clone());
        }
        let mut body = None;
        match ft {
            SFlag::S_IFDIR => {
                header.kind = tar::EntryType::Directory;
                header.name.push(b'/');
            }
            SFlag::S_IFREG => {
                header.size = u64::try_from(st.st_size).unwrap_or(0);
                body = Some(self.open_body(&fd, &st, &shown)?);
            }
            SFlag::S_IFLNK => {
                header.kind = tar::EntryType::Symlink;
                header.link = readlinkat(fd.as_fd(), c"")
                    .map_err(read_err)?
                    .as_bytes()
                    .to_vec();
            }
            SFlag::S_IFCHR | SFlag::S_IFBLK => {
                header.kind = if ft == SFlag::S_IFCHR {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                };
                header.dev = (
                    u32::try_from(major(st.st_rdev)).unwrap_or(u32::MAX),
                    u32::try_from(minor(st.st_rdev)).unwrap_or(u32::MAX),
                );
            }
            SFlag::S_IFIFO => header.kind = tar::EntryType::Fifo,
            _ => {
                debug!(path = %shown, mode = st.st_mode, "unknown file type skipped");
                return Ok(());
            }
        }
        self.queue(encode(&header));
        self.entries += 1;
        if let Some(file) = body {
            self.body = Some(Body {
                file,
                remaining: header.size,
                padding: padding_for(header.size),
                path: shown,
            });
        }
        Ok(())
    }

    /// Reopens a regular file for reading through its `O_PATH` fd: the same
    /// inode that was stat'ed, whatever happened to the name since.
    fn open_body(&self, fd: &OwnedFd, st: &FileStat, shown: &str) -> Result<File, ExportError> {
        let read_err = |e: Errno| ExportError::Read {
            path: shown.to_string(),
            source: e.into(),
        };
        let data = nix::fcntl::open(
            &proc_fd_path(fd.as_fd()),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            Mode::empty(),
        )
        .map_err(read_err)?;
        let again = fstat(data.as_fd()).map_err(read_err)?;
        if again.st_ino != st.st_ino || again.st_dev != st.st_dev {
            return Err(read_err(Errno::ESTALE));
        }
        Ok(File::from(data))
    }
}

/// moby: a v3 capability (with a namespace root ID) is exported as v2.
fn capability_v3_to_v2(value: &mut Vec<u8>) {
    const VERSION_OFFSET: usize = 3;
    const REVISION_2: u8 = 2;
    const REVISION_3: u8 = 3;
    const SIZE_2: usize = 20;
    if value.len() > VERSION_OFFSET && value[VERSION_OFFSET] == REVISION_3 && value.len() >= SIZE_2
    {
        value[VERSION_OFFSET] = REVISION_2;
        value.truncate(SIZE_2);
    }
}

const USTAR_ID_MAX: u32 = 0o7777777;
const USTAR_SIZE_MAX: u64 = 0o77777777777;

/// The pax header (if needed) and the ustar header of one entry.
fn encode(h: &Header) -> Vec<u8> {
    let mut records = Vec::new();
    let mut th = tar::Header::new_ustar();
    th.set_entry_type(h.kind);
    th.set_mode(h.mode);
    if h.name.len() <= 100 {
        set_name_bytes(&mut th, &h.name);
    } else {
        pax_record(&mut records, b"path", &h.name);
        set_name_bytes(&mut th, &h.name[..100]);
    }
    if h.link.len() <= 100 {
        set_link_bytes(&mut th, &h.link);
    } else {
        pax_record(&mut records, b"linkpath", &h.link);
        set_link_bytes(&mut th, &h.link[..100]);
    }
    if h.uid > USTAR_ID_MAX {
        pax_record(&mut records, b"uid", h.uid.to_string().as_bytes());
        th.set_uid(0);
    } else {
        th.set_uid(u64::from(h.uid));
    }
    if h.gid > USTAR_ID_MAX {
        pax_record(&mut records, b"gid", h.gid.to_string().as_bytes());
        th.set_gid(0);
    } else {
        th.set_gid(u64::from(h.gid));
    }
    if h.size > USTAR_SIZE_MAX {
        pax_record(&mut records, b"size", h.size.to_string().as_bytes());
        th.set_size(0);
    } else {
        th.set_size(h.size);
    }
    match u64::try_from(h.mtime) {
        Ok(t) if t <= USTAR_SIZE_MAX => th.set_mtime(t),
        _ => {
            pax_record(&mut records, b"mtime", h.mtime.to_string().as_bytes());
            th.set_mtime(0);
        }
    }
    // Header::set_device_* only fails on old (v7) headers; this is ustar.
    let _ = th.set_device_major(h.dev.0);
    let _ = th.set_device_minor(h.dev.1);
    for (name, value) in &h.xattrs {
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(name);
        pax_record(&mut records, &key, value);
    }
    th.set_cksum();
    let mut out = if records.is_empty() {
        Vec::with_capacity(BLOCK)
    } else {
        pax_header(&records)
    };
    out.extend_from_slice(th.as_bytes());
    out
}
