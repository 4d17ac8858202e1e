//! Confinement primitives: everything the diff layer does to a layer tree goes
//! through a directory file descriptor and `*at` system calls, never through a
//! host path built from a name found in a tar or a tree.
//!
//! - Names are cleaned lexically into [`RelPath`]: no `.`, `..`, empty or
//!   slash-containing components, no NUL bytes. A relative name whose `..`
//!   climbs above the layer root is refused; an absolute name is taken
//!   relative to the layer root (Docker's rule), so `/../x` is `x`.
//! - Parent directories of tar entries are resolved with
//!   `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`:
//!   symlinks inside the layer are followed as if the layer root were `/`
//!   (what Docker's chrooted unpacker sees), so an absolute or `../..` symlink
//!   can never lead out of the layer.
//! - The final component is always handled relative to its parent's fd with
//!   `AT_SYMLINK_NOFOLLOW` / `O_NOFOLLOW` semantics: a symlink in the tree is
//!   data, never followed.
//! - Reading a tree (changes, export) uses `RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS`, so a tree that changes under us (a running
//!   container) cannot redirect a read outside the layer.
//! - Metadata calls that have no `*at` form for an `O_PATH` descriptor (xattrs,
//!   chmod of a device node) go through `/proc/self/fd/<fd>`, which names the
//!   object the descriptor holds (a symlink itself, for a symlink).

use std::ffi::{CStr, CString, OsStr};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// Name of the opaque-directory marker (`pkg/archive/whiteouts.go`).
pub(crate) const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";
/// Prefix of a whiteout: `.wh.<name>` removes `<name>`.
pub(crate) const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Prefix of AUFS metadata entries, which are not files of the layer.
pub(crate) const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
/// AUFS directory of hardlink targets (`.wh..wh.plnk/<name>`).
pub(crate) const WHITEOUT_LINK_DIR: &[u8] = b".wh..wh.plnk";

/// `/proc/self/fd/<fd>`: the object an fd refers to, for calls that take a
/// path only. Following this "magic link" lands on the object itself, even
/// when that object is a symlink held by an `O_PATH` fd.
pub(crate) fn proc_fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// A path inside a layer, cleaned into components that are safe to hand to
/// `*at` calls one at a time: non-empty, not `.` or `..`, no `/`, no NUL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub(crate) struct RelPath {
    comps: Vec<Vec<u8>>,
}

/// Why a raw name could not be cleaned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CleanError {
    /// A relative name whose `..` components climb above the root.
    Escapes,
    /// The name contains a NUL byte (possible through PAX records).
    Nul,
}

impl RelPath {
    /// Cleans a raw tar or link name.
    pub(crate) fn clean(raw: &[u8]) -> Result<Self, CleanError> {
        if raw.contains(&0) {
            return Err(CleanError::Nul);
        }
        let rooted = raw.first() == Some(&b'/');
        let mut comps: Vec<Vec<u8>> = Vec::new();
        for comp in raw.split(|b| *b == b'/') {
            match comp {
                b"" | b"." => {}
                b".." => {
                    if comps.pop().is_none() && !rooted {
                        return Err(CleanError::Escapes);
                    }
                }
                other => comps.push(other.to_vec()),
            }
        }
        Ok(Self { comps })
    }

    /// From components already known to be clean (names read from a
    /// directory).
    pub(crate) fn from_components(comps: Vec<Vec<u8>>) -> Self {
        Self { comps }
    }

    /// The components.
    pub(crate) fn components(&self) -> &[Vec<u8>] {
        &self.comps
    }

    /// Parent components and final name; `None` for the root.
    pub(crate) fn split_last(&self) -> Option<(&[Vec<u8>], &[u8])> {
        self.comps
            .split_last()
            .map(|(last, parent)| (parent, last.as_slice()))
    }

    /// `a/b/c` (no leading slash); empty for the root.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        join(&self.comps)
    }

    /// Whether the first component is `first`.
    pub(crate) fn starts_with(&self, first: &[u8]) -> bool {
        self.comps.first().is_some_and(|c| c == first)
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.to_bytes()))
    }
}

/// Joins components with `/`.
pub(crate) fn join(comps: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, c) in comps.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(c);
    }
    out
}

/// A component as a C string (a NUL byte gives `EINVAL`).
pub(crate) fn cname(name: &[u8]) -> Result<CString, Errno> {
    CString::new(name).map_err(|_| Errno::EINVAL)
}

/// The layer root, held as an `O_PATH` directory fd.
#[derive(Debug)]
pub(crate) struct Root {
    fd: OwnedFd,
    dev: u64,
}

impl Root {
    /// Opens `path` (the one host path the caller gave us) as the root.
    pub(crate) fn open(path: &Path) -> Result<Self, Errno> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let st = fstat(&fd)?;
        Ok(Self { fd, dev: st.st_dev })
    }

    /// The root's fd.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Device of the root's filesystem; recursive removal never leaves it.
    pub(crate) fn dev(&self) -> u64 {
        self.dev
    }

    /// Opens the directory `comps` as an `O_PATH` fd, resolving symlinks as
    /// if the root were `/`.
    pub(crate) fn open_dir_in_root(&self, comps: &[Vec<u8>]) -> Result<OwnedFd, Errno> {
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        if comps.is_empty() {
            return openat(self.fd(), c".", flags, Mode::empty());
        }
        let path = join(comps);
        openat2_retry(
            self.fd(),
            OsStr::from_bytes(&path),
            OpenHow::new().flags(flags).resolve(
                ResolveFlag::RESOLVE_IN_ROOT
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS
                    | ResolveFlag::RESOLVE_NO_XDEV,
            ),
        )
    }

    /// Opens `rel` beneath the root following no symlink at all, the final
    /// component included (with `O_PATH`, a final symlink gives an fd for
    /// the symlink itself). For reading a tree.
    pub(crate) fn open_beneath_nofollow(&self, rel: &[u8], flags: OFlag) -> Result<OwnedFd, Errno> {
        let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        if rel.is_empty() {
            return openat(self.fd(), c".", flags, Mode::empty());
        }
        openat2_retry(
            self.fd(),
            OsStr::from_bytes(rel),
            OpenHow::new().flags(flags).resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS
                    | ResolveFlag::RESOLVE_NO_XDEV,
            ),
        )
    }
}

/// `openat2` retried on `EAGAIN`, which the kernel returns when a rename or
/// mount raced with a scoped resolution.
fn openat2_retry(dirfd: BorrowedFd<'_>, path: &OsStr, how: OpenHow) -> Result<OwnedFd, Errno> {
    let mut tries = 0;
    loop {
        match openat2(dirfd, path, how) {
            Err(Errno::EAGAIN) if tries < 16 => tries += 1,
            other => return other,
        }
    }
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`, `None` when absent.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<Option<FileStat>, Errno> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The file type bits of a stat.
pub(crate) fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Whether a stat is a directory.
pub(crate) fn is_dir(st: &FileStat) -> bool {
    file_type(st) == SFlag::S_IFDIR
}

/// Opens the subdirectory `name` of `dir` for reading, never through a
/// symlink.
pub(crate) fn open_subdir(dir: BorrowedFd<'_>, name: &CStr) -> Result<Dir, Errno> {
    Dir::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Opens the subdirectory `name` of `dir` for reading (metadata calls),
/// never through a symlink.
pub(crate) fn open_dir_fd(dir: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd, Errno> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Names in a directory, without `.` and `..`, in byte order.
pub(crate) fn read_names(dir: &mut Dir) -> Result<Vec<(CString, u64)>, Errno> {
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry?;
        let name = entry.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        names.push((name.to_owned(), entry.ino()));
    }
    names.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(names)
}

/// Removes `name` in `dir` and everything below it, like `rm -rf`, without
/// following symlinks and without leaving the filesystem `dev`. Absent is
/// success. `ENAMETOOLONG` (which removing names read from a directory
/// cannot otherwise give) when the tree is deeper than
/// [`MAX_TREE_DEPTH`](super::MAX_TREE_DEPTH) below `dir`.
pub(crate) fn remove_all_at(dir: BorrowedFd<'_>, name: &CStr, dev: u64) -> Result<(), Errno> {
    remove_all_below(dir, name, dev, 0)
}

fn remove_all_below(dir: BorrowedFd<'_>, name: &CStr, dev: u64, depth: usize) -> Result<(), Errno> {
    if depth >= super::MAX_TREE_DEPTH {
        return Err(Errno::ENAMETOOLONG);
    }
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) | Err(Errno::EPERM) => {}
        Err(e) => return Err(e),
    }
    let mut sub = match open_subdir(dir, name) {
        Ok(sub) => sub,
        Err(Errno::ENOENT) => return Ok(()),
        // EPERM from unlink on something that is not a directory (an
        // immutable file, a sticky directory): report that, not ENOTDIR.
        Err(Errno::ENOTDIR) | Err(Errno::ELOOP) => return Err(Errno::EPERM),
        Err(e) => return Err(e),
    };
    let st = fstat(sub.as_fd())?;
    if st.st_dev != dev {
        // A mount point inside the layer: never remove another filesystem.
        return Err(Errno::EXDEV);
    }
    for (child, _) in read_names(&mut sub)? {
        remove_all_below(sub.as_fd(), &child, dev, depth + 1)?;
    }
    match unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Xattrs as (name, value) pairs, sorted by name.
pub(crate) type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Lists the xattrs of the object `fd` refers to (any type, `O_PATH` fds
/// included), skipping `security.selinux`: that label comes from the mount
/// (`context=`), not from the layer.
pub(crate) fn read_xattrs(fd: BorrowedFd<'_>) -> io::Result<Xattrs> {
    let path = proc_fd_path(fd);
    let names = match xattr::list_deref(&path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names {
        if name.as_bytes() == b"security.selinux" {
            continue;
        }
        if let Some(value) = xattr::get_deref(&path, &name)? {
            out.push((name.as_bytes().to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Components joined with `|` (so a stray `/` would show).
    fn clean(raw: &[u8]) -> Result<String, CleanError> {
        RelPath::clean(raw).map(|p| {
            p.components()
                .iter()
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect::<Vec<_>>()
                .join("|")
        })
    }

    #[test]
    fn names_are_cleaned_lexically() {
        assert_eq!(clean(b"a/b/c"), Ok("a|b|c".to_string()));
        assert_eq!(clean(b"./a//b/./"), Ok("a|b".to_string()));
        assert_eq!(clean(b"a/../b"), Ok("b".to_string()));
        assert_eq!(clean(b"/etc/passwd"), Ok("etc|passwd".to_string()));
        assert_eq!(
            clean(b"/../x"),
            Ok("x".to_string()),
            "rooted names clamp at the root"
        );
        assert_eq!(clean(b"///"), Ok("".to_string()));
        assert_eq!(clean(b"."), Ok("".to_string()));
        assert_eq!(clean(b"..."), Ok("...".to_string()));
        assert_eq!(clean(b".wh..wh..opq"), Ok(".wh..wh..opq".to_string()));
    }

    #[test]
    fn relative_escapes_and_nuls_are_refused() {
        for raw in [
            &b".."[..],
            b"../",
            b"../x",
            b"a/../../x",
            b"./../x",
            b"a/b/../../..",
        ] {
            assert_eq!(
                clean(raw),
                Err(CleanError::Escapes),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        assert_eq!(clean(b"a\0b"), Err(CleanError::Nul));
    }

    #[test]
    fn split_and_join() {
        let p = RelPath::clean(b"/a/b/c").expect("clean");
        let (parent, name) = p.split_last().expect("not root");
        assert_eq!(join(parent), b"a/b");
        assert_eq!(name, b"c");
        assert_eq!(p.to_bytes(), b"a/b/c");
        assert!(RelPath::clean(b"/").expect("root").split_last().is_none());
    }
}
