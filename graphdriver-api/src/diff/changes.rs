//! `Changes` and `DiffSize`: compare a layer's tree with its parent's, as
//! moby's `ChangesDirs` and `ChangesSize` (`pkg/archive/changes.go`,
//! `changes_linux.go`, `changes_unix.go`).
//!
//! Rules, per path present in either tree (the root itself never reported):
//!
//! - only in the layer: `Add`; only in the parent: `Delete` (the children of
//!   a deleted or replaced directory are not listed);
//! - in both, `Modify` when the entries differ: mode (type and permission
//!   bits), owner, group or device number; for non-directories also the
//!   size or the mtime (seconds equal and nanoseconds equal or either zero,
//!   since tars carry whole seconds); directories' size and mtime are not a
//!   measure of change (moby#9874). Beyond moby, which compares only
//!   `security.capability`, all xattrs but `security.selinux` are compared,
//!   and symlink targets too (a retargeted symlink of equal length within
//!   the same second would otherwise be missed);
//! - a directory that is not itself added or modified but holds a change is
//!   reported as `Modify` (moby#13590: its metadata must travel with the
//!   diff);
//! - an entry with the same inode on the same device in both trees is the
//!   same file and is skipped with its whole subtree.
//!
//! The list is sorted by path bytes. Paths are kept as bytes
//! ([`LayerChange`]); the wire type [`Change`] holds a `String`, so a
//! non-UTF-8 name is only lossy on the wire, never in a diff.

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};
use tracing::{debug, warn};

use super::confine::{
    Root, Xattrs, file_type, is_dir, lstat_at, open_subdir, read_names, read_xattrs,
};
use crate::types::{Change, ChangeKind};

/// One change, with the path as raw bytes: absolute inside the layer
/// (`/etc/hosts`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerChange {
    /// Absolute path inside the layer.
    pub path: PathBuf,
    /// What happened to it.
    pub kind: ChangeKind,
}

impl LayerChange {
    /// A change of `path` (absolute inside the layer).
    pub fn new(path: impl Into<PathBuf>, kind: ChangeKind) -> Self {
        Self {
            path: path.into(),
            kind,
        }
    }

    /// The wire form (a non-UTF-8 name is converted lossily).
    pub fn to_wire(&self) -> Change {
        Change {
            path: self.path.to_string_lossy().into_owned(),
            kind: self.kind,
        }
    }

    /// The path without its leading `/`, as bytes.
    pub(crate) fn rel_bytes(&self) -> &[u8] {
        let b = self.path.as_os_str().as_bytes();
        let mut start = 0;
        while start < b.len() && b[start] == b'/' {
            start += 1;
        }
        &b[start..]
    }
}

impl From<&Change> for LayerChange {
    /// From the wire form (for callers that hold `Change`s).
    fn from(c: &Change) -> Self {
        Self::new(&c.path, c.kind)
    }
}

/// Why two trees could not be compared.
#[derive(Debug, thiserror::Error)]
pub enum ChangesError {
    /// A tree's root could not be opened.
    #[error("cannot open the {which} tree {}", path.display())]
    OpenRoot {
        /// `layer` or `parent`.
        which: &'static str,
        /// Its root.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// Reading an entry of a tree failed.
    #[error("reading {path:?} in the {which} tree")]
    Walk {
        /// `layer` or `parent`.
        which: &'static str,
        /// The entry, absolute inside the tree.
        path: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The layer's tree is deeper than [`MAX_TREE_DEPTH`](super::MAX_TREE_DEPTH).
    #[error("{path:?} in the layer tree is more than {limit} directories deep")]
    TooDeep {
        /// The directory at the limit.
        path: String,
        /// The limit.
        limit: usize,
    },
}

/// Compares `layer` with `parent` (an empty tree when `None`) and lists the
/// changes, sorted by path.
pub fn changes_dirs(layer: &Path, parent: Option<&Path>) -> Result<Vec<LayerChange>, ChangesError> {
    let span = tracing::debug_span!("changes_dirs", layer = %layer.display(), parent = ?parent.map(Path::display));
    let _enter = span.enter();
    let open = |which, path: &Path| {
        Root::open(path)
            .and_then(|root| {
                Dir::openat(
                    root.fd(),
                    c".",
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
            })
            .map_err(|e| ChangesError::OpenRoot {
                which,
                path: path.to_path_buf(),
                source: e.into(),
            })
    };
    let new_root = open("layer", layer)?;
    let old_root = match parent {
        Some(p) => Some(open("parent", p)?),
        None => None,
    };
    let mut walker = Walker { out: Vec::new() };
    walker.walk(Level::open(Vec::new(), new_root, old_root, 0, true)?)?;
    let mut out = walker.out;
    out.sort_by(|a, b| {
        a.path
            .as_os_str()
            .as_bytes()
            .cmp(b.path.as_os_str().as_bytes())
    });
    debug!(changes = out.len(), "trees compared");
    Ok(out)
}

/// Sum of the sizes of the added and modified non-directories, each inode
/// counted once (moby's `ChangesSize`). Entries that cannot be read are
/// logged and skipped, as moby does.
pub fn changes_size(layer: &Path, changes: &[LayerChange]) -> u64 {
    let root = match Root::open(layer) {
        Ok(root) => root,
        Err(e) => {
            warn!(layer = %layer.display(), error = %e, "cannot open layer to size its changes");
            return 0;
        }
    };
    let mut seen = HashSet::new();
    let mut size = 0u64;
    for change in changes {
        if change.kind == ChangeKind::Delete {
            continue;
        }
        let st = root
            .open_beneath_nofollow(change.rel_bytes(), OFlag::O_PATH)
            .and_then(|fd| fstat(fd.as_fd()));
        let st = match st {
            Ok(st) => st,
            Err(e) => {
                debug!(path = %change.path.display(), error = %e, "cannot stat a changed path, not counted");
                continue;
            }
        };
        if is_dir(&st) {
            continue;
        }
        let bytes = u64::try_from(st.st_size).unwrap_or(0);
        if st.st_nlink > 1 {
            if seen.insert((st.st_dev, st.st_ino)) {
                size += bytes;
            }
        } else {
            size += bytes;
        }
    }
    size
}

struct Walker {
    out: Vec<LayerChange>,
}

/// One directory being compared, in both trees: its entries and how far the
/// merge of the two sorted listings got. The walk keeps a stack of these
/// instead of recursing, so a deep tree costs heap, not stack.
struct Level {
    path: Vec<u8>,
    new_dir: Dir,
    old_dir: Option<Dir>,
    new_names: Vec<(CString, u64)>,
    old_names: Vec<(CString, u64)>,
    /// Both trees on one device: equal inode numbers mean the same file.
    same_device: bool,
    i: usize,
    j: usize,
    /// Where this directory's own entry goes in the output if something
    /// below it changed and it was not reported itself.
    at_entry: usize,
    reported: bool,
}

impl Level {
    fn open(
        path: Vec<u8>,
        mut new_dir: Dir,
        mut old_dir: Option<Dir>,
        at_entry: usize,
        reported: bool,
    ) -> Result<Self, ChangesError> {
        let new_names = read_names(&mut new_dir).map_err(|e| walk_err("layer", &path, e))?;
        let new_dev = fstat(new_dir.as_fd())
            .map_err(|e| walk_err("layer", &path, e))?
            .st_dev;
        let (old_names, same_device) = match old_dir.as_mut() {
            Some(old) => {
                let names = read_names(old).map_err(|e| walk_err("parent", &path, e))?;
                let dev = fstat(old.as_fd())
                    .map_err(|e| walk_err("parent", &path, e))?
                    .st_dev;
                (names, dev == new_dev)
            }
            None => (Vec::new(), false),
        };
        Ok(Self {
            path,
            new_dir,
            old_dir,
            new_names,
            old_names,
            same_device,
            i: 0,
            j: 0,
            at_entry,
            reported,
        })
    }
}

/// What one step of a directory's merge asks of the walk.
enum Step {
    /// Go on with this directory.
    Next,
    /// Compare this subdirectory first.
    Descend(Level),
    /// Every entry of this directory is compared.
    Done,
}

fn child_path(parent: &[u8], name: &CStr) -> Vec<u8> {
    let mut p = parent.to_vec();
    p.push(b'/');
    p.extend_from_slice(name.to_bytes());
    p
}

fn walk_err(which: &'static str, path: &[u8], e: Errno) -> ChangesError {
    ChangesError::Walk {
        which,
        path: if path.is_empty() {
            "/".to_string()
        } else {
            String::from_utf8_lossy(path).into_owned()
        },
        source: e.into(),
    }
}

/// `lstat` that treats a vanished entry as absent (the tree may change
/// while a container runs).
fn stat_child(
    dir: BorrowedFd<'_>,
    name: &CStr,
    which: &'static str,
    path: &[u8],
) -> Result<Option<FileStat>, ChangesError> {
    lstat_at(dir, name).map_err(|e| walk_err(which, path, e))
}

impl Walker {
    fn push(&mut self, path: Vec<u8>, kind: ChangeKind) {
        self.out.push(LayerChange {
            path: PathBuf::from(OsStr::from_bytes(&path)),
            kind,
        });
    }

    /// Compares the trees under `root`, depth first, up to
    /// [`MAX_TREE_DEPTH`](super::MAX_TREE_DEPTH) directories deep.
    fn walk(&mut self, root: Level) -> Result<(), ChangesError> {
        let mut stack = vec![root];
        while let Some(top) = stack.last_mut() {
            match self.step(top)? {
                Step::Next => {}
                Step::Descend(level) => {
                    if stack.len() >= super::MAX_TREE_DEPTH {
                        return Err(ChangesError::TooDeep {
                            path: String::from_utf8_lossy(&level.path).into_owned(),
                            limit: super::MAX_TREE_DEPTH,
                        });
                    }
                    stack.push(level);
                }
                Step::Done => {
                    let done = stack.pop().expect("the top level exists");
                    if self.out.len() > done.at_entry && !done.reported {
                        self.out.insert(
                            done.at_entry,
                            LayerChange {
                                path: PathBuf::from(OsStr::from_bytes(&done.path)),
                                kind: ChangeKind::Modify,
                            },
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Compares the next name of `level` in either tree.
    fn step(&mut self, level: &mut Level) -> Result<Step, ChangesError> {
        let order = match (level.new_names.get(level.i), level.old_names.get(level.j)) {
            (Some(n), Some(o)) => n.0.as_bytes().cmp(o.0.as_bytes()),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => return Ok(Step::Done),
        };
        let new_fd = level.new_dir.as_fd();
        let old_fd = level.old_dir.as_ref().map(|d| d.as_fd());
        let descend = match order {
            std::cmp::Ordering::Less => {
                let name = &level.new_names[level.i].0;
                level.i += 1;
                let cpath = child_path(&level.path, name);
                match stat_child(new_fd, name, "layer", &cpath)? {
                    Some(nst) => self.visit(cpath, new_fd, name, nst, None)?,
                    None => None,
                }
            }
            std::cmp::Ordering::Greater => {
                let name = &level.old_names[level.j].0;
                level.j += 1;
                let cpath = child_path(&level.path, name);
                if let Some(old) = old_fd
                    && stat_child(old, name, "parent", &cpath)?.is_some()
                {
                    self.push(cpath, ChangeKind::Delete);
                }
                None
            }
            std::cmp::Ordering::Equal => {
                let (name, new_ino) = &level.new_names[level.i];
                let old_ino = level.old_names[level.j].1;
                level.i += 1;
                level.j += 1;
                let Some(old) = old_fd else {
                    return Ok(Step::Next);
                };
                if level.same_device && *new_ino == old_ino {
                    return Ok(Step::Next);
                }
                let cpath = child_path(&level.path, name);
                let nst = stat_child(new_fd, name, "layer", &cpath)?;
                let ost = stat_child(old, name, "parent", &cpath)?;
                match (nst, ost) {
                    (Some(nst), Some(ost)) => {
                        self.visit(cpath, new_fd, name, nst, Some((old, ost)))?
                    }
                    (Some(nst), None) => self.visit(cpath, new_fd, name, nst, None)?,
                    (None, Some(_)) => {
                        self.push(cpath, ChangeKind::Delete);
                        None
                    }
                    (None, None) => None,
                }
            }
        };
        Ok(descend.map_or(Step::Next, Step::Descend))
    }

    /// One entry present in the layer (moby's `addChanges`): reports it if
    /// added or modified; a directory is returned to be compared next.
    fn visit(
        &mut self,
        path: Vec<u8>,
        new_parent: BorrowedFd<'_>,
        name: &CStr,
        nst: FileStat,
        old: Option<(BorrowedFd<'_>, FileStat)>,
    ) -> Result<Option<Level>, ChangesError> {
        let at_entry = self.out.len();
        let reported = match &old {
            None => {
                self.push(path.clone(), ChangeKind::Add);
                true
            }
            Some((old_parent, ost)) => {
                if differs(new_parent, *old_parent, name, &nst, ost, &path)? {
                    self.push(path.clone(), ChangeKind::Modify);
                    true
                } else {
                    false
                }
            }
        };
        if !is_dir(&nst) {
            return Ok(None);
        }
        let new_sub = match open_subdir(new_parent, name) {
            Ok(d) => d,
            // Replaced or removed while we looked: nothing to descend into.
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) | Err(Errno::ELOOP) => return Ok(None),
            Err(e) => return Err(walk_err("layer", &path, e)),
        };
        let old_sub = match &old {
            Some((old_parent, ost)) if is_dir(ost) => match open_subdir(*old_parent, name) {
                Ok(d) => Some(d),
                Err(Errno::ENOENT) | Err(Errno::ENOTDIR) | Err(Errno::ELOOP) => None,
                Err(e) => return Err(walk_err("parent", &path, e)),
            },
            _ => None,
        };
        Level::open(path, new_sub, old_sub, at_entry, reported).map(Some)
    }
}

/// Tars carry whole seconds: equal when the seconds match and the
/// nanoseconds match or either side has none (moby's `sameFsTime`).
fn same_fs_time(a_sec: i64, a_nsec: i64, b_sec: i64, b_nsec: i64) -> bool {
    a_sec == b_sec && (a_nsec == b_nsec || a_nsec == 0 || b_nsec == 0)
}

fn differs(
    new_parent: BorrowedFd<'_>,
    old_parent: BorrowedFd<'_>,
    name: &CStr,
    nst: &FileStat,
    ost: &FileStat,
    path: &[u8],
) -> Result<bool, ChangesError> {
    if ost.st_mode != nst.st_mode
        || ost.st_uid != nst.st_uid
        || ost.st_gid != nst.st_gid
        || ost.st_rdev != nst.st_rdev
    {
        return Ok(true);
    }
    if !is_dir(ost)
        && (!same_fs_time(
            ost.st_mtime,
            ost.st_mtime_nsec,
            nst.st_mtime,
            nst.st_mtime_nsec,
        ) || ost.st_size != nst.st_size)
    {
        return Ok(true);
    }
    // An entry that vanishes while we look (a running container) counts as
    // changed; the export then skips it if it is really gone.
    let gone = |e: &Errno| matches!(e, Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP);
    if file_type(nst) == SFlag::S_IFLNK {
        let targets = readlinkat(new_parent, name)
            .map_err(|e| ("layer", e))
            .and_then(|n| {
                readlinkat(old_parent, name)
                    .map(|o| (n, o))
                    .map_err(|e| ("parent", e))
            });
        match targets {
            Ok((n, o)) if n != o => return Ok(true),
            Ok(_) => {}
            Err((_, e)) if gone(&e) => return Ok(true),
            Err((which, e)) => return Err(walk_err(which, path, e)),
        }
    }
    let xattrs =
        |dir: BorrowedFd<'_>, which: &'static str| -> Result<Option<Xattrs>, ChangesError> {
            let fd = match openat(
                dir,
                name,
                OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(e) if gone(&e) => return Ok(None),
                Err(e) => return Err(walk_err(which, path, e)),
            };
            read_xattrs(fd.as_fd())
                .map(Some)
                .map_err(|e| ChangesError::Walk {
                    which,
                    path: String::from_utf8_lossy(path).into_owned(),
                    source: e,
                })
        };
    match (xattrs(new_parent, "layer")?, xattrs(old_parent, "parent")?) {
        (Some(n), Some(o)) => Ok(n != o),
        _ => Ok(true),
    }
}
