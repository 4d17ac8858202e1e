//! `ApplyDiff`: unpack a Docker layer tar onto a layer's root directory.
//!
//! The rules are moby's `UnpackLayer` (`pkg/archive/diff.go`) as run by
//! dockerd inside a chroot at the layer root:
//!
//! - An entry replaces whatever is at its path, except that a directory
//!   entry over an existing directory merges (only the metadata changes).
//! - `.wh.<name>` removes `<name>`; `.wh..wh..opq` makes its directory opaque:
//!   everything in it that this tar does not itself add is removed, whatever
//!   the order of the marker and the added entries.
//! - Other AUFS metadata at the top (`.wh..wh.*`) is skipped, except that
//!   regular files under `.wh..wh.plnk/` serve as hardlink targets.
//! - Directories the tar implies but does not contain are created 0755,
//!   owned by the container's root.
//! - Ownership is set with `lchown` semantics (symlinks included), then
//!   xattrs (`security.capability` must come after the chown, which clears
//!   it), then the mode (after the chown, which clears setuid/setgid), then
//!   times; directory times last of all, once nothing more is written into
//!   them.
//! - The applied size is the number of bytes written to regular files.
//!
//! Confinement: every name is cleaned ([`RelPath`]); a name climbing above
//! the root is refused; parents are resolved with `RESOLVE_IN_ROOT` (a symlink
//! planted by the tar, absolute or `../..`, resolves inside the layer as it
//! would in Docker's chroot); the final component is created, replaced or
//! removed relative to its parent's fd without following it. Nothing outside
//! the root is ever created, changed or removed.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstat, futimens,
    makedev, mkdirat, mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};
use tracing::{debug, trace, warn};
use xattr::FileExt;

use super::confine::{
    RelPath, Root, WHITEOUT_LINK_DIR, WHITEOUT_META_PREFIX, WHITEOUT_OPAQUE, WHITEOUT_PREFIX,
    cname, file_type, is_dir, lstat_at, open_dir_fd, open_subdir, proc_fd_path, read_names,
    remove_all_at,
};
use super::idmap::{IdMapError, IdMappings};
use super::tarfmt::{Member, TarFormatError, TarReader, kind};

/// Why a layer tar could not be applied. Every variant naming an entry
/// quotes it as it appears in the tar (lossily, if not UTF-8).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The layer root could not be opened.
    #[error("cannot open the layer root {}", root.display())]
    OpenRoot {
        /// The root given by the caller.
        root: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The stream ended or failed inside an entry's data.
    #[error("reading the data of tar entry {entry:?}")]
    ReadData {
        /// The entry.
        entry: String,
        /// The failure.
        #[source]
        source: TarFormatError,
    },
    /// The tar stream is malformed or truncated, or reading it failed.
    #[error("reading the layer tar{}", match after { Some(e) => format!(" after entry {e:?}"), None => String::new() })]
    Read {
        /// The last entry read completely, if any.
        after: Option<String>,
        /// The failure.
        #[source]
        source: TarFormatError,
    },
    /// A name whose `..` components climb above the layer root.
    #[error("tar entry {entry:?} escapes the layer")]
    Escapes {
        /// The entry.
        entry: String,
    },
    /// A hardlink whose target climbs above the layer root.
    #[error("tar entry {entry:?} is a hardlink to {target:?}, which escapes the layer")]
    LinkEscapes {
        /// The entry.
        entry: String,
        /// Its link target.
        target: String,
    },
    /// A name that cannot be applied (NUL byte, the root as a non-directory,
    /// an empty whiteout, ...).
    #[error("tar entry {entry:?} is invalid: {reason}")]
    Invalid {
        /// The entry.
        entry: String,
        /// Why.
        reason: &'static str,
    },
    /// A type flag this unpacker does not handle.
    #[error("tar entry {entry:?} has unsupported type {}", type_flag.escape_ascii())]
    UnsupportedType {
        /// The entry.
        entry: String,
        /// Its type flag byte.
        type_flag: u8,
    },
    /// The entry's owner or group has no host ID under the ID maps.
    #[error("tar entry {entry:?}: ownership cannot be mapped to the host")]
    IdMap {
        /// The entry.
        entry: String,
        /// Which ID, and why.
        #[source]
        source: IdMapError,
    },
    /// Removing what an entry replaces or whites out meant descending a
    /// tree deeper than [`MAX_TREE_DEPTH`](super::MAX_TREE_DEPTH).
    #[error("tar entry {entry:?}: {step}: the tree there is more than {limit} directories deep")]
    TooDeep {
        /// The entry.
        entry: String,
        /// What was being done.
        step: String,
        /// The limit.
        limit: usize,
    },
    /// A system call failed while applying an entry.
    #[error("tar entry {entry:?}: {step}")]
    Entry {
        /// The entry.
        entry: String,
        /// What was being done.
        step: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

/// Applies a Docker layer tar to `root` and returns the applied size (bytes
/// written to regular files, as moby's `UnpackLayer`).
///
/// After the end-of-archive marker the rest of `tar` is read and discarded,
/// so that an HTTP body is fully consumed. On error the tree is left partly
/// applied but removable.
pub fn apply_layer(root: &Path, tar: &mut dyn Read, maps: &IdMappings) -> Result<u64, ApplyError> {
    let span = tracing::debug_span!("apply_layer", root = %root.display());
    let _enter = span.enter();
    let started = Instant::now();
    let root_dir = Root::open(root).map_err(|e| ApplyError::OpenRoot {
        root: root.to_path_buf(),
        source: e.into(),
    })?;
    let mut applier = Applier {
        root: root_dir,
        maps,
        root_ids: maps.root_pair(),
        added: HashSet::new(),
        dir_times: Vec::new(),
        plnk: HashMap::new(),
        size: 0,
        entries: 0,
    };
    let mut reader = TarReader::new(tar);
    let mut last: Option<String> = None;
    loop {
        let member = match reader.next_member() {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(source) => {
                return Err(ApplyError::Read {
                    after: last,
                    source,
                });
            }
        };
        let display = lossy(&member.name);
        applier.apply_member(&member, &display, &mut reader)?;
        applier.entries += 1;
        last = Some(display);
    }
    applier.finish_dir_times()?;
    // Consume whatever follows the end marker (dockerd's tar-split stream
    // pads the body); an error here does not undo a complete archive.
    let read_at = reader.offset();
    if let Err(e) = io::copy(&mut reader.into_inner(), &mut io::sink()) {
        debug!(offset = read_at, error = %e, "reading past the end of the layer tar failed");
    }
    debug!(
        entries = applier.entries,
        size = applier.size,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "layer tar applied"
    );
    Ok(applier.size)
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Metadata of one entry, IDs already mapped to the host.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    atime: TimeSpec,
    mtime: TimeSpec,
}

struct DirTime {
    path: RelPath,
    dev: u64,
    ino: u64,
    atime: TimeSpec,
    mtime: TimeSpec,
}

struct Applier<'m> {
    root: Root,
    maps: &'m IdMappings,
    root_ids: (u32, u32),
    /// What this tar created or merged: (dev, parent inode, name).
    added: HashSet<(u64, u64, Vec<u8>)>,
    dir_times: Vec<DirTime>,
    /// AUFS hardlink targets, kept as unnamed files until linked.
    plnk: HashMap<Vec<u8>, OwnedFd>,
    size: u64,
    entries: u64,
}

enum Action<'a> {
    Opaque(&'a [Vec<u8>]),
    Whiteout(&'a [Vec<u8>], &'a [u8]),
    Create(&'a [Vec<u8>], &'a [u8]),
    Root,
}

impl Applier<'_> {
    fn apply_member<R: Read>(
        &mut self,
        m: &Member,
        entry: &str,
        reader: &mut TarReader<R>,
    ) -> Result<(), ApplyError> {
        trace!(entry, type_flag = %m.kind.escape_ascii(), size = m.size, "tar entry");
        if m.kind == kind::GNU_VOLUME {
            return Ok(());
        }
        let path = RelPath::clean(&m.name).map_err(|e| match e {
            super::confine::CleanError::Escapes => ApplyError::Escapes {
                entry: entry.to_string(),
            },
            super::confine::CleanError::Nul => ApplyError::Invalid {
                entry: entry.to_string(),
                reason: "the name contains a NUL byte",
            },
        })?;

        // AUFS metadata at the top of the layer.
        if let Some(first) = path.components().first()
            && first.starts_with(WHITEOUT_META_PREFIX)
            && !(path.components().len() == 1 && first == WHITEOUT_OPAQUE)
        {
            if first == WHITEOUT_LINK_DIR
                && path.components().len() == 2
                && matches!(m.kind, kind::REG | kind::CONTIGUOUS)
            {
                return self.store_plnk(m, entry, &path.components()[1], reader);
            }
            debug!(entry, "skipping AUFS metadata entry");
            return Ok(());
        }

        let action = match path.split_last() {
            None => Action::Root,
            Some((parent, base)) if base == WHITEOUT_OPAQUE => Action::Opaque(parent),
            Some((parent, base)) if base.starts_with(WHITEOUT_PREFIX) => {
                Action::Whiteout(parent, &base[WHITEOUT_PREFIX.len()..])
            }
            Some((parent, base)) => Action::Create(parent, base),
        };
        match action {
            Action::Root => {
                if m.kind != kind::DIR {
                    return Err(ApplyError::Invalid {
                        entry: entry.to_string(),
                        reason: "it names the layer root but is not a directory",
                    });
                }
                let meta = self.meta(m, entry)?;
                let fd = openat(
                    self.root.fd(),
                    c".",
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| step_err(entry, "opening the layer root", e))?;
                let file = File::from(fd);
                self.set_fd_meta(&file, &meta, &m.xattrs, entry)?;
                self.dir_times.push(DirTime {
                    path: RelPath::default(),
                    dev: self.root.dev(),
                    ino: fstat(file.as_fd())
                        .map_err(|e| step_err(entry, "stat of the layer root", e))?
                        .st_ino,
                    atime: meta.atime,
                    mtime: meta.mtime,
                });
                Ok(())
            }
            Action::Opaque(parent) => self.opaque(parent, entry),
            Action::Whiteout(parent, name) => self.whiteout(parent, name, entry),
            Action::Create(parent, name) => self.create(m, entry, parent, name, reader),
        }
    }

    fn meta(&self, m: &Member, entry: &str) -> Result<Meta, ApplyError> {
        let map_err = |source| ApplyError::IdMap {
            entry: entry.to_string(),
            source,
        };
        let uid = self.maps.uid_to_host(m.uid).map_err(map_err)?;
        let gid = self.maps.gid_to_host(m.gid).map_err(map_err)?;
        let mtime = TimeSpec::new(m.mtime.0, i64::from(m.mtime.1));
        let atime = match m.atime {
            // Last access never before last modification (moby).
            Some(a) if a > m.mtime => TimeSpec::new(a.0, i64::from(a.1)),
            _ => mtime,
        };
        Ok(Meta {
            mode: m.mode & 0o7777,
            uid,
            gid,
            atime,
            mtime,
        })
    }

    /// Opens the parent directory `comps`, creating the missing ones.
    fn ensure_parent(&mut self, comps: &[Vec<u8>], entry: &str) -> Result<OwnedFd, ApplyError> {
        match self.root.open_dir_in_root(comps) {
            Ok(fd) => return Ok(fd),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(parent_err(entry, comps, e)),
        }
        let mut fd = self
            .root
            .open_dir_in_root(&[])
            .map_err(|e| parent_err(entry, &[], e))?;
        for i in 0..comps.len() {
            match self.root.open_dir_in_root(&comps[..=i]) {
                Ok(next) => {
                    fd = next;
                    continue;
                }
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(parent_err(entry, &comps[..=i], e)),
            }
            let name = cname(&comps[i]).map_err(|e| parent_err(entry, &comps[..=i], e))?;
            match mkdirat(fd.as_fd(), name.as_c_str(), Mode::from_bits_truncate(0o700)) {
                Ok(()) => {}
                // Something is there that does not resolve to a directory:
                // a dangling symlink (whose target would be created outside
                // its own directory) or a racing change. Refuse.
                Err(Errno::EEXIST) => {
                    return Err(ApplyError::Entry {
                        entry: entry.to_string(),
                        step: format!(
                            "parent directory {:?} is a dangling symbolic link",
                            lossy(&super::confine::join(&comps[..=i]))
                        ),
                        source: Errno::ENOENT.into(),
                    });
                }
                Err(e) => return Err(parent_err(entry, &comps[..=i], e)),
            }
            let created =
                open_subdir(fd.as_fd(), &name).map_err(|e| parent_err(entry, &comps[..=i], e))?;
            let (uid, gid) = self.root_ids;
            fchown(
                created.as_fd(),
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
            )
            .and_then(|()| fchmod(created.as_fd(), Mode::from_bits_truncate(0o755)))
            .map_err(|e| parent_err(entry, &comps[..=i], e))?;
            self.mark_added(fd.as_fd(), &comps[i], entry)?;
            trace!(entry, dir = %lossy(&super::confine::join(&comps[..=i])), "created implied parent directory");
            fd = self
                .root
                .open_dir_in_root(&comps[..=i])
                .map_err(|e| parent_err(entry, &comps[..=i], e))?;
        }
        Ok(fd)
    }

    fn mark_added(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &[u8],
        entry: &str,
    ) -> Result<(), ApplyError> {
        let st = fstat(parent).map_err(|e| step_err(entry, "stat of the parent directory", e))?;
        self.added.insert((st.st_dev, st.st_ino, name.to_vec()));
        Ok(())
    }

    fn whiteout(&mut self, parent: &[Vec<u8>], name: &[u8], entry: &str) -> Result<(), ApplyError> {
        if name.is_empty() || name == b"." || name == b".." {
            return Err(ApplyError::Invalid {
                entry: entry.to_string(),
                reason: "whiteout of an empty, '.' or '..' name",
            });
        }
        let dir = match self.root.open_dir_in_root(parent) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => {
                trace!(entry, "whiteout in a missing directory: nothing to remove");
                return Ok(());
            }
            Err(e) => return Err(parent_err(entry, parent, e)),
        };
        let cname = cname(name).map_err(|e| step_err(entry, "whiteout name", e))?;
        remove_all_at(dir.as_fd(), &cname, self.root.dev())
            .map_err(|e| removal_err(entry, format!("removing {:?}", lossy(name)), e))?;
        trace!(entry, "whiteout applied");
        Ok(())
    }

    fn opaque(&mut self, parent: &[Vec<u8>], entry: &str) -> Result<(), ApplyError> {
        let dir_fd = self.ensure_parent(parent, entry)?;
        let dir = Dir::openat(
            dir_fd.as_fd(),
            c".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| step_err(entry, "opening the opaque directory", e))?;
        let mut dir = dir;
        self.purge(&mut dir, 0)
            .map_err(|e| removal_err(entry, "emptying the opaque directory", e))?;
        trace!(entry, "opaque directory applied");
        Ok(())
    }

    /// Removes everything under `dir` that this tar did not add; keeps
    /// directories that (transitively) hold something it added. Returns
    /// whether anything was kept. `depth` levels below the opaque
    /// directory; `ENAMETOOLONG` past [`MAX_TREE_DEPTH`](super::MAX_TREE_DEPTH).
    fn purge(&self, dir: &mut Dir, depth: usize) -> Result<bool, Errno> {
        if depth >= super::MAX_TREE_DEPTH {
            return Err(Errno::ENAMETOOLONG);
        }
        let st = fstat(dir.as_fd())?;
        if st.st_dev != self.root.dev() {
            return Err(Errno::EXDEV);
        }
        let mut kept = false;
        for (name, _) in read_names(dir)? {
            let Some(child) = lstat_at(dir.as_fd(), &name)? else {
                continue;
            };
            let added = self
                .added
                .contains(&(st.st_dev, st.st_ino, name.as_bytes().to_vec()));
            if is_dir(&child) {
                let mut sub = open_subdir(dir.as_fd(), &name)?;
                let kept_inside = self.purge(&mut sub, depth + 1)?;
                if added || kept_inside {
                    kept = true;
                } else {
                    unlinkat(dir.as_fd(), name.as_c_str(), UnlinkatFlags::RemoveDir)?;
                }
            } else if added {
                kept = true;
            } else {
                remove_all_at(dir.as_fd(), &name, self.root.dev())?;
            }
        }
        Ok(kept)
    }

    fn create<R: Read>(
        &mut self,
        m: &Member,
        entry: &str,
        parent: &[Vec<u8>],
        name: &[u8],
        reader: &mut TarReader<R>,
    ) -> Result<(), ApplyError> {
        let is_dir_entry = m.kind == kind::DIR || m.kind == kind::GNU_DUMPDIR;
        let creatable = matches!(
            m.kind,
            kind::REG
                | kind::CONTIGUOUS
                | kind::LINK
                | kind::SYMLINK
                | kind::CHAR
                | kind::BLOCK
                | kind::FIFO
        );
        if !is_dir_entry && !creatable {
            return Err(ApplyError::UnsupportedType {
                entry: entry.to_string(),
                type_flag: m.kind,
            });
        }
        let meta = self.meta(m, entry)?;
        let cname = cname(name).map_err(|e| step_err(entry, "entry name", e))?;
        let dir = self.ensure_parent(parent, entry)?;
        let dir = dir.as_fd();

        let existing =
            lstat_at(dir, &cname).map_err(|e| step_err(entry, "stat of the existing path", e))?;
        let merge = existing.as_ref().is_some_and(is_dir) && is_dir_entry;
        if existing.is_some() && !merge {
            remove_all_at(dir, &cname, self.root.dev())
                .map_err(|e| removal_err(entry, "removing the existing path", e))?;
        }

        match m.kind {
            kind::DIR | kind::GNU_DUMPDIR => {
                if !merge {
                    mkdirat(dir, cname.as_c_str(), Mode::from_bits_truncate(0o700))
                        .map_err(|e| step_err(entry, "mkdirat", e))?;
                }
                let fd = open_dir_fd(dir, &cname)
                    .map_err(|e| step_err(entry, "opening the directory", e))?;
                let file = File::from(fd);
                self.set_fd_meta(&file, &meta, &m.xattrs, entry)?;
                let st =
                    fstat(file.as_fd()).map_err(|e| step_err(entry, "stat of the directory", e))?;
                let mut comps = parent.to_vec();
                comps.push(name.to_vec());
                self.dir_times.push(DirTime {
                    path: RelPath::from_components(comps),
                    dev: st.st_dev,
                    ino: st.st_ino,
                    atime: meta.atime,
                    mtime: meta.mtime,
                });
            }
            kind::REG | kind::CONTIGUOUS => {
                let fd = openat(
                    dir,
                    cname.as_c_str(),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| step_err(entry, "creating the file", e))?;
                let mut file = File::from(fd);
                let written = copy_data(reader, &mut file, entry)?;
                self.size += written;
                self.set_fd_meta(&file, &meta, &m.xattrs, entry)?;
                futimens(file.as_fd(), &meta.atime, &meta.mtime)
                    .map_err(|e| step_err(entry, "futimens", e))?;
            }
            kind::SYMLINK => {
                if m.link.is_empty() || m.link.contains(&0) {
                    return Err(ApplyError::Invalid {
                        entry: entry.to_string(),
                        reason: "symlink with an empty target or a NUL byte in it",
                    });
                }
                symlinkat(OsStr::from_bytes(&m.link), dir, cname.as_c_str())
                    .map_err(|e| step_err(entry, "symlinkat", e))?;
                self.set_path_meta(dir, &cname, SFlag::S_IFLNK, &meta, &m.xattrs, entry, true)?;
            }
            kind::CHAR | kind::BLOCK | kind::FIFO => {
                let (sflag, dev) = match m.kind {
                    kind::CHAR => (
                        SFlag::S_IFCHR,
                        makedev(u64::from(m.dev_major), u64::from(m.dev_minor)),
                    ),
                    kind::BLOCK => (
                        SFlag::S_IFBLK,
                        makedev(u64::from(m.dev_major), u64::from(m.dev_minor)),
                    ),
                    _ => (SFlag::S_IFIFO, 0),
                };
                mknodat(
                    dir,
                    cname.as_c_str(),
                    sflag,
                    Mode::from_bits_truncate(0o600),
                    dev,
                )
                .map_err(|e| step_err(entry, "mknodat", e))?;
                self.set_path_meta(dir, &cname, sflag, &meta, &m.xattrs, entry, true)?;
            }
            kind::LINK => self.hardlink(m, entry, dir, &cname, &meta)?,
            _ => {
                return Err(ApplyError::UnsupportedType {
                    entry: entry.to_string(),
                    type_flag: m.kind,
                });
            }
        }
        self.mark_added(dir, name, entry)?;
        Ok(())
    }

    fn hardlink(
        &mut self,
        m: &Member,
        entry: &str,
        dir: BorrowedFd<'_>,
        cname: &CStr,
        meta: &Meta,
    ) -> Result<(), ApplyError> {
        let target_display = lossy(&m.link);
        let target = RelPath::clean(&m.link).map_err(|e| match e {
            super::confine::CleanError::Escapes => ApplyError::LinkEscapes {
                entry: entry.to_string(),
                target: target_display.clone(),
            },
            super::confine::CleanError::Nul => ApplyError::Invalid {
                entry: entry.to_string(),
                reason: "hardlink target contains a NUL byte",
            },
        })?;
        if target.starts_with(WHITEOUT_LINK_DIR) && target.components().len() == 2 {
            let Some(fd) = self.plnk.get(&target.components()[1]) else {
                return Err(ApplyError::Invalid {
                    entry: entry.to_string(),
                    reason: "hardlink to an AUFS link target the tar does not hold",
                });
            };
            linkat(
                AT_FDCWD,
                &proc_fd_path(fd.as_fd()),
                dir,
                cname,
                AtFlags::AT_SYMLINK_FOLLOW,
            )
            .map_err(|e| step_err(entry, format!("linking to {target_display:?}"), e))?;
        } else {
            let Some((tparent, tname)) = target.split_last() else {
                return Err(ApplyError::Invalid {
                    entry: entry.to_string(),
                    reason: "hardlink to the layer root",
                });
            };
            let tdir = self.root.open_dir_in_root(tparent).map_err(|e| {
                step_err(
                    entry,
                    format!("resolving the directory of link target {target_display:?}"),
                    e,
                )
            })?;
            let tname = cname_of(tname, entry)?;
            // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
            linkat(tdir.as_fd(), tname.as_c_str(), dir, cname, AtFlags::empty())
                .map_err(|e| step_err(entry, format!("linking to {target_display:?}"), e))?;
        }
        // moby applies the link header's metadata to the (shared) inode.
        let st = lstat_at(dir, cname)
            .map_err(|e| step_err(entry, "stat of the new link", e))?
            .ok_or_else(|| step_err(entry, "stat of the new link", Errno::ENOENT))?;
        let ft = file_type(&st);
        self.set_path_meta(dir, cname, ft, meta, &m.xattrs, entry, ft != SFlag::S_IFLNK)?;
        Ok(())
    }

    fn store_plnk<R: Read>(
        &mut self,
        m: &Member,
        entry: &str,
        base: &[u8],
        reader: &mut TarReader<R>,
    ) -> Result<(), ApplyError> {
        let meta = self.meta(m, entry)?;
        let fd = openat(
            self.root.fd(),
            c".",
            OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| step_err(entry, "creating an unnamed file for an AUFS link target", e))?;
        let mut file = File::from(fd);
        self.size += copy_data(reader, &mut file, entry)?;
        self.set_fd_meta(&file, &meta, &m.xattrs, entry)?;
        futimens(file.as_fd(), &meta.atime, &meta.mtime)
            .map_err(|e| step_err(entry, "futimens", e))?;
        self.plnk.insert(base.to_vec(), file.into());
        Ok(())
    }

    /// chown, xattrs, chmod on an open regular file or directory.
    fn set_fd_meta(
        &self,
        file: &File,
        meta: &Meta,
        xattrs: &[(Vec<u8>, Vec<u8>)],
        entry: &str,
    ) -> Result<(), ApplyError> {
        fchown(
            file.as_fd(),
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .map_err(|e| step_err(entry, format!("chown to {}:{}", meta.uid, meta.gid), e))?;
        for (name, value) in xattrs {
            let result = file.set_xattr(OsStr::from_bytes(name), value);
            xattr_result(result, name, entry)?;
        }
        fchmod(file.as_fd(), Mode::from_bits_truncate(meta.mode))
            .map_err(|e| step_err(entry, format!("chmod {:o}", meta.mode), e))?;
        Ok(())
    }

    /// chown, xattrs, chmod (unless a symlink), times, for an entry that
    /// cannot be opened for I/O (symlink, device node, fifo, hardlink).
    #[allow(clippy::too_many_arguments)]
    fn set_path_meta(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        expect: SFlag,
        meta: &Meta,
        xattrs: &[(Vec<u8>, Vec<u8>)],
        entry: &str,
        set_times: bool,
    ) -> Result<(), ApplyError> {
        let fd = openat(
            dir,
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| step_err(entry, "opening the new entry", e))?;
        let st: FileStat =
            fstat(fd.as_fd()).map_err(|e| step_err(entry, "stat of the new entry", e))?;
        if file_type(&st) != expect {
            return Err(step_err(
                entry,
                "the new entry changed type under us",
                Errno::ESTALE,
            ));
        }
        fchownat(
            fd.as_fd(),
            c"",
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::AT_EMPTY_PATH,
        )
        .map_err(|e| step_err(entry, format!("lchown to {}:{}", meta.uid, meta.gid), e))?;
        let proc_path = proc_fd_path(fd.as_fd());
        for (xname, value) in xattrs {
            let result = xattr::set_deref(&proc_path, OsStr::from_bytes(xname), value);
            xattr_result(result, xname, entry)?;
        }
        if expect != SFlag::S_IFLNK {
            fchmodat(
                AT_FDCWD,
                &proc_path,
                Mode::from_bits_truncate(meta.mode),
                FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| step_err(entry, format!("chmod {:o}", meta.mode), e))?;
        }
        if set_times {
            utimensat(
                dir,
                name,
                &meta.atime,
                &meta.mtime,
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(|e| step_err(entry, "utimensat", e))?;
        }
        Ok(())
    }

    /// Sets directory times last, so that entries written into a directory
    /// after its own entry do not leave it with the time of that write.
    fn finish_dir_times(&mut self) -> Result<(), ApplyError> {
        for t in std::mem::take(&mut self.dir_times) {
            let entry = t.path.to_string();
            let (dir, name): (OwnedFd, CString) = match t.path.split_last() {
                None => (
                    self.root
                        .open_dir_in_root(&[])
                        .map_err(|e| step_err(&entry, "opening the layer root", e))?,
                    CString::from(c"."),
                ),
                Some((parent, name)) => match self.root.open_dir_in_root(parent) {
                    Ok(fd) => (fd, cname_of(name, &entry)?),
                    Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => continue,
                    Err(e) => {
                        return Err(step_err(
                            &entry,
                            "reopening the parent to set directory times",
                            e,
                        ));
                    }
                },
            };
            // Only the directory this tar made, not whatever replaced it.
            match lstat_at(dir.as_fd(), &name) {
                Ok(Some(st)) if is_dir(&st) && st.st_dev == t.dev && st.st_ino == t.ino => {}
                Ok(_) => continue,
                Err(e) => return Err(step_err(&entry, "stat to set directory times", e)),
            }
            utimensat(
                dir.as_fd(),
                name.as_c_str(),
                &t.atime,
                &t.mtime,
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(|e| step_err(&entry, "setting directory times", e))?;
        }
        Ok(())
    }
}

fn copy_data<R: Read>(
    reader: &mut TarReader<R>,
    file: &mut File,
    entry: &str,
) -> Result<u64, ApplyError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        let n = match reader.read_data(&mut buf) {
            Ok(0) => return Ok(written),
            Ok(n) => n,
            Err(source) => {
                return Err(ApplyError::ReadData {
                    entry: entry.to_string(),
                    source,
                });
            }
        };
        file.write_all(&buf[..n]).map_err(|e| ApplyError::Entry {
            entry: entry.to_string(),
            step: "writing the file data".to_string(),
            source: e,
        })?;
        written += n as u64;
    }
}

fn cname_of(name: &[u8], entry: &str) -> Result<CString, ApplyError> {
    cname(name).map_err(|e| step_err(entry, "name", e))
}

/// [`step_err`] for the recursive removals, whose `ENAMETOOLONG` means the
/// tree was too deep (see [`remove_all_at`]).
fn removal_err(entry: &str, step: impl Into<String>, e: Errno) -> ApplyError {
    if e == Errno::ENAMETOOLONG {
        return ApplyError::TooDeep {
            entry: entry.to_string(),
            step: step.into(),
            limit: super::MAX_TREE_DEPTH,
        };
    }
    step_err(entry, step, e)
}

fn step_err(entry: &str, step: impl Into<String>, e: Errno) -> ApplyError {
    ApplyError::Entry {
        entry: entry.to_string(),
        step: step.into(),
        source: e.into(),
    }
}

fn parent_err(entry: &str, comps: &[Vec<u8>], e: Errno) -> ApplyError {
    let dir = lossy(&super::confine::join(comps));
    let step = match e {
        Errno::ENOTDIR => format!("parent {dir:?} is not a directory"),
        Errno::ELOOP => format!("parent {dir:?} resolves through too many symbolic links"),
        Errno::EXDEV => format!("parent {dir:?} crosses a mount point"),
        _ => format!("resolving parent directory {dir:?}"),
    };
    ApplyError::Entry {
        entry: entry.to_string(),
        step,
        source: e.into(),
    }
}

/// moby: EPERM from setting an xattr (a user.* xattr on a symlink, a
/// restricted namespace) is logged and ignored; anything else fails.
fn xattr_result(result: io::Result<()>, name: &[u8], entry: &str) -> Result<(), ApplyError> {
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            warn!(entry, xattr = %lossy(name), error = %e, "xattr not permitted here, ignored");
            Ok(())
        }
        Err(e) => Err(ApplyError::Entry {
            entry: entry.to_string(),
            step: format!("setting xattr {:?}", lossy(name)),
            source: e,
        }),
    }
}
