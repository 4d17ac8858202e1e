//! Shared helpers of the diff tests: byte-exact tar building (any name, any
//! header), tree snapshots, a directory-backed `LayerFs`, a sandbox with
//! canaries around a layer root.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use graphdriver_api::diff::LayerFs;

/// Whether root-only tests may run (skips, or fails under scripts/test).
pub fn need_root(test: &str) -> bool {
    testkit::require::check(test, testkit::require::root())
}

// ---------------------------------------------------------------- tar bytes

/// One tar member as written by [`TarBuf`].
#[derive(Debug, Clone)]
pub struct Ent {
    pub name: Vec<u8>,
    pub kind: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub link: Vec<u8>,
    pub data: Vec<u8>,
    pub dev: (u32, u32),
    /// Extra pax records (raw key, raw value).
    pub pax: Vec<(Vec<u8>, Vec<u8>)>,
    /// Overrides the size field (hostile headers).
    pub size_field: Option<u64>,
}

impl Ent {
    pub fn new(name: impl AsRef<[u8]>, kind: u8) -> Self {
        Self {
            name: name.as_ref().to_vec(),
            kind,
            mode: if kind == b'5' { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            link: Vec::new(),
            data: Vec::new(),
            dev: (0, 0),
            pax: Vec::new(),
            size_field: None,
        }
    }
    pub fn file(name: impl AsRef<[u8]>, data: impl AsRef<[u8]>) -> Self {
        let mut e = Self::new(name, b'0');
        e.data = data.as_ref().to_vec();
        e
    }
    pub fn dir(name: impl AsRef<[u8]>) -> Self {
        Self::new(name, b'5')
    }
    pub fn symlink(name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        let mut e = Self::new(name, b'2');
        e.mode = 0o777;
        e.link = target.as_ref().to_vec();
        e
    }
    pub fn hardlink(name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        let mut e = Self::new(name, b'1');
        e.link = target.as_ref().to_vec();
        e
    }
    pub fn chardev(name: impl AsRef<[u8]>, major: u32, minor: u32) -> Self {
        let mut e = Self::new(name, b'3');
        e.dev = (major, minor);
        e
    }
    pub fn fifo(name: impl AsRef<[u8]>) -> Self {
        Self::new(name, b'6')
    }
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    pub fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }
    pub fn xattr(mut self, name: &str, value: &[u8]) -> Self {
        self.pax
            .push((format!("SCHILY.xattr.{name}").into_bytes(), value.to_vec()));
        self
    }
    pub fn pax(mut self, key: &[u8], value: &[u8]) -> Self {
        self.pax.push((key.to_vec(), value.to_vec()));
        self
    }
}

/// A tar built block by block, so that any name or header can be written.
#[derive(Debug, Default)]
pub struct TarBuf {
    pub out: Vec<u8>,
}

pub fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = 3 + key.len() + value.len();
    let mut digits = 1;
    while rest + digits >= 10usize.pow(digits as u32) {
        digits += 1;
    }
    out.extend_from_slice((rest + digits).to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn put_field(field: &mut [u8], bytes: &[u8]) {
    field.fill(0);
    let n = bytes.len().min(field.len());
    field[..n].copy_from_slice(&bytes[..n]);
}

impl TarBuf {
    pub fn new() -> Self {
        Self::default()
    }

    fn pad(&mut self) {
        let rem = self.out.len() % 512;
        if rem != 0 {
            self.out.resize(self.out.len() + 512 - rem, 0);
        }
    }

    /// A raw header block plus data (typeflag and all fields as given).
    pub fn raw(&mut self, name: &[u8], kind: u8, size: u64, data: &[u8]) {
        let mut h = tar::Header::new_ustar();
        put_field(&mut h.as_old_mut().name, name);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_cksum();
        self.out.extend_from_slice(h.as_bytes());
        self.out.extend_from_slice(data);
        self.pad();
    }

    pub fn add(&mut self, e: &Ent) -> &mut Self {
        let mut records = Vec::new();
        if e.name.len() > 100 {
            pax_record(&mut records, b"path", &e.name);
        }
        if e.link.len() > 100 {
            pax_record(&mut records, b"linkpath", &e.link);
        }
        for (k, v) in &e.pax {
            pax_record(&mut records, k, v);
        }
        if !records.is_empty() {
            let size = records.len() as u64;
            let data = records.clone();
            self.raw(b"././@PaxHeader", b'x', size, &data);
        }
        let mut h = tar::Header::new_ustar();
        put_field(&mut h.as_old_mut().name, &e.name);
        put_field(&mut h.as_old_mut().linkname, &e.link);
        h.set_entry_type(tar::EntryType::new(e.kind));
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        h.set_size(e.size_field.unwrap_or(e.data.len() as u64));
        let _ = h.set_device_major(e.dev.0);
        let _ = h.set_device_minor(e.dev.1);
        h.set_cksum();
        self.out.extend_from_slice(h.as_bytes());
        self.out.extend_from_slice(&e.data);
        self.pad();
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(&[0u8; 1024]);
        self.out
    }
}

/// Builds a tar of the given members.
pub fn tar_of(entries: &[Ent]) -> Vec<u8> {
    let mut t = TarBuf::new();
    for e in entries {
        t.add(e);
    }
    t.finish()
}

/// Members of a tar as (type flag, name, link) using the `tar` crate's own
/// reader (an independent check on what the export wrote).
pub fn list_tar(bytes: &[u8]) -> Vec<(u8, Vec<u8>, Vec<u8>)> {
    let mut ar = tar::Archive::new(bytes);
    let mut out = Vec::new();
    for e in ar.entries().expect("entries") {
        let e = e.expect("entry");
        let kind = e.header().entry_type().as_byte();
        let name = e.path_bytes().into_owned();
        let link = e
            .link_name_bytes()
            .map(|l| l.into_owned())
            .unwrap_or_default();
        out.push((kind, name, link));
    }
    out
}

// ---------------------------------------------------------------- snapshots

/// Everything observable about one tree entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snap {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
    pub content: Option<Vec<u8>>,
    pub link: Option<Vec<u8>>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub nlink: u64,
    pub ino: u64,
}

fn kind_of(ft: fs::FileType) -> char {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_file() {
        'f'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else if ft.is_socket() {
        's'
    } else {
        '?'
    }
}

pub fn snap_one(path: &Path) -> Snap {
    let md = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    let kind = kind_of(md.file_type());
    let mut xattrs = BTreeMap::new();
    if let Ok(names) = xattr::list(path) {
        for n in names {
            if n.as_bytes() == b"security.selinux" {
                continue;
            }
            if let Ok(Some(v)) = xattr::get(path, &n) {
                xattrs.insert(n.as_bytes().to_vec(), v);
            }
        }
    }
    Snap {
        kind,
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        rdev: md.rdev(),
        size: md.size(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec(),
        content: (kind == 'f').then(|| fs::read(path).expect("read")),
        link: (kind == 'l').then(|| {
            fs::read_link(path)
                .expect("readlink")
                .into_os_string()
                .into_vec()
        }),
        xattrs,
        nlink: md.nlink(),
        ino: md.ino(),
    }
}

use std::os::unix::ffi::OsStringExt;

/// Snapshot of every entry under `root` (relative path bytes; the root
/// itself as ""), skipping the subtrees in `skip` (relative paths).
pub fn snapshot_skip(root: &Path, skip: &[&[u8]]) -> BTreeMap<Vec<u8>, Snap> {
    let mut out = BTreeMap::new();
    let mut stack = vec![Vec::<u8>::new()];
    while let Some(rel) = stack.pop() {
        if skip.contains(&rel.as_slice()) {
            continue;
        }
        let path = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(OsStr::from_bytes(&rel))
        };
        let snap = snap_one(&path);
        if snap.kind == 'd' {
            for entry in fs::read_dir(&path).expect("read_dir") {
                let entry = entry.expect("dir entry");
                let mut child = rel.clone();
                if !child.is_empty() {
                    child.push(b'/');
                }
                child.extend_from_slice(entry.file_name().as_bytes());
                stack.push(child);
            }
        }
        out.insert(rel, snap);
    }
    out
}

pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Snap> {
    snapshot_skip(root, &[])
}

/// Compares two trees as a layer round trip must preserve them: type, mode,
/// owner, device, size, content, symlink target, xattrs, mtime seconds
/// (tars carry seconds), and which names share an inode. The roots' own
/// metadata is not compared (a diff does not carry the root).
pub fn assert_same_tree(a: &Path, b: &Path) {
    let sa = snapshot(a);
    let sb = snapshot(b);
    let names_a: Vec<_> = sa
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    let names_b: Vec<_> = sb
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(names_a, names_b, "trees list different names");
    for (name, x) in &sa {
        if name.is_empty() {
            continue;
        }
        let y = &sb[name];
        let shown = String::from_utf8_lossy(name);
        assert_eq!(x.kind, y.kind, "{shown}: type");
        if x.kind != 'l' {
            assert_eq!(x.mode, y.mode, "{shown}: mode {:o} vs {:o}", x.mode, y.mode);
        }
        assert_eq!((x.uid, x.gid), (y.uid, y.gid), "{shown}: owner");
        assert_eq!(x.rdev, y.rdev, "{shown}: rdev");
        if x.kind != 'd' {
            assert_eq!(x.size, y.size, "{shown}: size");
        }
        assert_eq!(x.content, y.content, "{shown}: content");
        assert_eq!(x.link, y.link, "{shown}: link target");
        assert_eq!(x.xattrs, y.xattrs, "{shown}: xattrs");
        assert_eq!(x.mtime, y.mtime, "{shown}: mtime");
        assert_eq!(x.nlink, y.nlink, "{shown}: link count");
    }
    assert_eq!(
        inode_groups(&sa),
        inode_groups(&sb),
        "hardlink groups differ"
    );
}

/// Sets of names sharing an inode (only those with more than one name).
pub fn inode_groups(s: &BTreeMap<Vec<u8>, Snap>) -> Vec<Vec<Vec<u8>>> {
    let mut by_ino: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
    for (name, snap) in s {
        if snap.kind != 'd' {
            by_ino.entry(snap.ino).or_default().push(name.clone());
        }
    }
    let mut groups: Vec<Vec<Vec<u8>>> = by_ino.into_values().filter(|g| g.len() > 1).collect();
    for g in &mut groups {
        g.sort();
    }
    groups.sort();
    groups
}

// ---------------------------------------------------------------- fs helpers

pub fn write(path: &Path, data: &[u8]) {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).expect("mkdir -p");
    }
    fs::write(path, data).expect("write");
}

pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

pub fn lchown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).expect("lchown");
}

/// Sets atime and mtime (seconds, no nanoseconds) without following a
/// symlink.
pub fn set_mtime(path: &Path, secs: i64) {
    let ts = nix::sys::time::TimeSpec::new(secs, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .expect("utimensat");
}

pub fn mknod(path: &Path, kind: nix::sys::stat::SFlag, major: u64, minor: u64) {
    nix::sys::stat::mknod(
        path,
        kind,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
        nix::sys::stat::makedev(major, minor),
    )
    .expect("mknod");
}

pub fn symlink(target: impl AsRef<Path>, path: &Path) {
    std::os::unix::fs::symlink(target, path).expect("symlink");
}

/// A v2 `security.capability` value granting `caps` (bit numbers) as
/// permitted and effective.
pub fn capability_v2(caps: &[u32]) -> Vec<u8> {
    let mut permitted = [0u32; 2];
    for c in caps {
        permitted[(*c / 32) as usize] |= 1 << (c % 32);
    }
    // magic_etc: VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
    let mut v = 0x0200_0001u32.to_le_bytes().to_vec();
    for p in permitted {
        v.extend_from_slice(&p.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes()); // inheritable
    }
    v
}

/// Sets a file capability with `setcap` when installed (a real blob from
/// libcap), else writes the v2 xattr by hand. Returns the stored value.
pub fn set_capability(path: &Path) -> Vec<u8> {
    let setcap = std::process::Command::new("setcap")
        .arg("cap_net_raw,cap_dac_override,cap_fowner+ep")
        .arg(path)
        .status();
    if !matches!(setcap, Ok(s) if s.success()) {
        // cap_dac_override (1) and cap_fowner (3) make byte 0x0a: a newline
        // inside a pax value.
        xattr::set(path, "security.capability", &capability_v2(&[1, 3, 13]))
            .expect("set capability");
    }
    xattr::get(path, "security.capability")
        .expect("get capability")
        .expect("capability set")
}

// ---------------------------------------------------------------- LayerFs

/// Layers as plain directories `<base>/<id>`, with Get/Put counting.
pub struct DirLayers {
    pub base: PathBuf,
    pub refs: Mutex<HashMap<String, i64>>,
}

#[derive(Debug, thiserror::Error)]
#[error("no layer {0}")]
pub struct NoLayer(pub String);

impl DirLayers {
    pub fn new(base: &Path) -> Self {
        Self {
            base: base.to_path_buf(),
            refs: Mutex::new(HashMap::new()),
        }
    }
    pub fn create(&self, id: &str) -> PathBuf {
        let p = self.base.join(id);
        fs::create_dir_all(&p).expect("create layer");
        p
    }
    pub fn path(&self, id: &str) -> PathBuf {
        self.base.join(id)
    }
    /// Outstanding gets per layer (all zero when balanced).
    pub fn outstanding(&self) -> HashMap<String, i64> {
        self.refs
            .lock()
            .expect("refs")
            .iter()
            .filter(|(_, v)| **v != 0)
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

impl LayerFs for DirLayers {
    type Error = NoLayer;
    fn get(&self, id: &str, _mount_label: &str) -> Result<PathBuf, NoLayer> {
        let p = self.base.join(id);
        if !p.is_dir() {
            return Err(NoLayer(id.to_string()));
        }
        *self
            .refs
            .lock()
            .expect("refs")
            .entry(id.to_string())
            .or_default() += 1;
        Ok(p)
    }
    fn put(&self, id: &str) -> Result<(), NoLayer> {
        *self
            .refs
            .lock()
            .expect("refs")
            .entry(id.to_string())
            .or_default() -= 1;
        Ok(())
    }
}

// ---------------------------------------------------------------- sandbox

/// A temp dir holding a layer `root` and canaries beside it:
/// `canary.txt`, `canary_dir/inner.txt`, `etc/passwd`, `x`, plus lower
/// content inside the root (`lowerfile`, `etc/`, `dir/sub/f`).
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("diff-sandbox")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        write(&d.join("canary.txt"), b"canary: never change me\n");
        write(&d.join("canary_dir/inner.txt"), b"inner canary\n");
        write(&d.join("etc/passwd"), b"root:x:0:0:outside:/root:/bin/sh\n");
        write(&d.join("x"), b"x outside\n");
        chmod(&d.join("canary.txt"), 0o640);
        let root = d.join("root");
        fs::create_dir(&root).expect("root");
        write(&root.join("lowerfile"), b"lower\n");
        fs::create_dir_all(root.join("etc")).expect("root/etc");
        write(&root.join("dir/sub/f"), b"lower f\n");
        for p in [
            "canary.txt",
            "canary_dir/inner.txt",
            "canary_dir",
            "etc/passwd",
            "etc",
            "x",
        ] {
            set_mtime(&d.join(p), 1_500_000_000);
        }
        Self { dir, root }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Everything outside the root, including the sandbox directory itself.
    pub fn outside(&self) -> BTreeMap<Vec<u8>, Snap> {
        snapshot_skip(self.dir.path(), &[b"root"])
    }
}

/// An error and its sources, `: `-joined, as the driver reports them.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
