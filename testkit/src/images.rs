//! Image tarballs made without a registry.
//!
//! - [`busybox_rootfs_tar`]: a root filesystem tar holding the static
//!   `/bin/busybox` (from `busybox-static`) and symlinks for its common
//!   applets, for `docker import`.
//! - [`Layer`] and [`Image`]: layer tars written entry by entry (directories,
//!   files, symlinks, hardlinks, device nodes, fifos, whiteouts `.wh.x`,
//!   opaque directories `.wh..wh..opq`, owners, modes including setuid,
//!   xattrs as PAX `SCHILY.xattr.*` records), and a `docker save`-format
//!   tarball of them (`manifest.json`, `<config digest>.json` with
//!   `rootfs.diff_ids`, `<layer>/layer.tar`, `repositories`) for
//!   `docker load`.
//! - [`special_image`] (three layers using every special entry, with
//!   [`SPECIAL_CHECK_SCRIPT`]/[`SPECIAL_CHECK_EXPECTED`] to verify it from
//!   inside a container and [`check_special_export`] for `docker export`)
//!   and [`chain_image`] (N layers, for chain-depth tests).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde_json::json;
use tar::{EntryType, Header};

use crate::sha256;

/// The static busybox put into images.
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets linked in `/bin` of the busybox rootfs.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "[",
    "basename",
    "cat",
    "chmod",
    "chown",
    "cmp",
    "cp",
    "cut",
    "date",
    "dd",
    "df",
    "diff",
    "dirname",
    "du",
    "echo",
    "env",
    "expr",
    "false",
    "find",
    "grep",
    "head",
    "hexdump",
    "hostname",
    "id",
    "kill",
    "ln",
    "ls",
    "md5sum",
    "mkdir",
    "mkfifo",
    "mknod",
    "mount",
    "mv",
    "od",
    "printf",
    "ps",
    "pwd",
    "readlink",
    "realpath",
    "rm",
    "rmdir",
    "sed",
    "seq",
    "setsid",
    "sh",
    "sha256sum",
    "sleep",
    "sort",
    "stat",
    "sync",
    "tail",
    "tar",
    "tee",
    "test",
    "touch",
    "tr",
    "true",
    "truncate",
    "umount",
    "uname",
    "uniq",
    "wc",
    "which",
    "xargs",
    "yes",
];

/// Default mtime of entries (2023-11-14), so tars are reproducible.
pub const DEFAULT_MTIME: u64 = 1_700_000_000;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file with these contents.
    File(Vec<u8>),
    /// A symbolic link to this target.
    Symlink(String),
    /// A hard link to this earlier path of the same layer (no leading `/`).
    Hardlink(String),
    /// A character device.
    CharDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
}

/// One tar entry of a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the root, without leading `/` (a leading `/` is
    /// stripped).
    pub path: String,
    /// What it is.
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (`0o4755`).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time, seconds.
    pub mtime: u64,
    /// Extended attributes (`security.capability`, `user.x`, ...), written
    /// as PAX `SCHILY.xattr.<name>` records.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Entry {
    /// An entry of `kind` at `path`, root-owned, [`DEFAULT_MTIME`].
    pub fn new(path: &str, kind: Kind, mode: u32) -> Entry {
        Entry {
            path: path.trim_start_matches('/').to_string(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: DEFAULT_MTIME,
            xattrs: Vec::new(),
        }
    }
}

/// The `security.capability` value granting `cap_net_raw` (bit 13) as
/// permitted and effective (`vfs_cap_data` revision 2, 20 bytes). Setting
/// it needs root.
pub fn cap_net_raw_xattr() -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes()); // VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
    v.extend_from_slice(&(1u32 << 13).to_le_bytes()); // permitted, low word
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable, low word
    v.extend_from_slice(&0u32.to_le_bytes()); // permitted, high word
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable, high word
    v
}

/// A layer: tar entries in order. Builder methods append an entry; the
/// modifiers ([`Layer::owner`], [`Layer::xattr`], [`Layer::mtime`]) change
/// the last one. Parent directories are not added implicitly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layer {
    /// The entries, written in this order.
    pub entries: Vec<Entry>,
}

impl Layer {
    /// An empty layer.
    pub fn new() -> Layer {
        Layer::default()
    }

    /// Appends `entry`.
    pub fn entry(mut self, entry: Entry) -> Layer {
        self.entries.push(entry);
        self
    }

    /// A directory.
    pub fn dir(self, path: &str, mode: u32) -> Layer {
        self.entry(Entry::new(path, Kind::Dir, mode))
    }

    /// A regular file.
    pub fn file(self, path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Layer {
        self.entry(Entry::new(path, Kind::File(contents.into()), mode))
    }

    /// A symbolic link.
    pub fn symlink(self, path: &str, target: &str) -> Layer {
        self.entry(Entry::new(path, Kind::Symlink(target.to_string()), 0o777))
    }

    /// A hard link to `target`, an earlier entry of this layer.
    pub fn hardlink(self, path: &str, target: &str) -> Layer {
        self.entry(Entry::new(
            path,
            Kind::Hardlink(target.trim_start_matches('/').to_string()),
            0o644,
        ))
    }

    /// A character device.
    pub fn char_device(self, path: &str, major: u32, minor: u32, mode: u32) -> Layer {
        self.entry(Entry::new(path, Kind::CharDevice { major, minor }, mode))
    }

    /// A block device.
    pub fn block_device(self, path: &str, major: u32, minor: u32, mode: u32) -> Layer {
        self.entry(Entry::new(path, Kind::BlockDevice { major, minor }, mode))
    }

    /// A named pipe.
    pub fn fifo(self, path: &str, mode: u32) -> Layer {
        self.entry(Entry::new(path, Kind::Fifo, mode))
    }

    /// Deletes `path` of a lower layer: an empty file `<dir>/.wh.<name>`.
    pub fn whiteout(self, path: &str) -> Layer {
        let path = path.trim_start_matches('/').trim_end_matches('/');
        let wh = match path.rsplit_once('/') {
            Some((dir, name)) => format!("{dir}/.wh.{name}"),
            None => format!(".wh.{path}"),
        };
        self.entry(Entry::new(&wh, Kind::File(Vec::new()), 0o644))
    }

    /// Hides everything lower layers have in directory `dir`: an empty file
    /// `<dir>/.wh..wh..opq`. Add the directory entry itself before it.
    pub fn opaque(self, dir: &str) -> Layer {
        let dir = dir.trim_start_matches('/').trim_end_matches('/');
        self.entry(Entry::new(
            &format!("{dir}/.wh..wh..opq"),
            Kind::File(Vec::new()),
            0o644,
        ))
    }

    /// Sets the owner of the last entry.
    pub fn owner(mut self, uid: u64, gid: u64) -> Layer {
        if let Some(e) = self.entries.last_mut() {
            e.uid = uid;
            e.gid = gid;
        }
        self
    }

    /// Adds an xattr to the last entry.
    pub fn xattr(mut self, name: &str, value: impl Into<Vec<u8>>) -> Layer {
        if let Some(e) = self.entries.last_mut() {
            e.xattrs.push((name.to_string(), value.into()));
        }
        self
    }

    /// Sets the mtime of the last entry.
    pub fn mtime(mut self, secs: u64) -> Layer {
        if let Some(e) = self.entries.last_mut() {
            e.mtime = secs;
        }
        self
    }

    /// The busybox root filesystem: `bin/busybox` (copied from
    /// [`BUSYBOX`]), symlinks `bin/<applet>` for [`BUSYBOX_APPLETS`],
    /// `etc/passwd`, `etc/group`, `tmp` (1777), `root`, and empty `proc`,
    /// `sys`, `dev`.
    pub fn busybox() -> Result<Layer, String> {
        let bin = std::fs::read(BUSYBOX).map_err(|e| format!("read {BUSYBOX}: {e}"))?;
        let mut l = Layer::new()
            .dir("bin", 0o755)
            .file("bin/busybox", bin, 0o755)
            .dir("dev", 0o755)
            .dir("etc", 0o755)
            .file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n", 0o644)
            .file("etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644)
            .dir("proc", 0o555)
            .dir("root", 0o700)
            .dir("sys", 0o555)
            .dir("tmp", 0o1777);
        for applet in BUSYBOX_APPLETS {
            l = l.symlink(&format!("bin/{applet}"), "busybox");
        }
        Ok(l)
    }

    /// The layer as an uncompressed tar.
    pub fn to_tar(&self) -> Result<Vec<u8>, String> {
        let mut b = tar::Builder::new(Vec::new());
        for e in &self.entries {
            append_entry(&mut b, e).map_err(|err| format!("tar entry {}: {err}", e.path))?;
        }
        b.into_inner().map_err(|e| format!("finish tar: {e}"))
    }
}

/// One PAX record: `"<len> <key>=<value>\n"`, `len` counting itself.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut rec = format!("{len} {key}=").into_bytes();
    rec.extend_from_slice(value);
    rec.push(b'\n');
    debug_assert_eq!(rec.len(), len);
    rec
}

fn append_entry(b: &mut tar::Builder<Vec<u8>>, e: &Entry) -> std::io::Result<()> {
    if !e.xattrs.is_empty() {
        let mut records = Vec::new();
        for (name, value) in &e.xattrs {
            records.extend(pax_record(&format!("SCHILY.xattr.{name}"), value));
        }
        let mut h = Header::new_ustar();
        let base = e
            .path
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or("x");
        let name: String = format!("PaxHeaders.0/{base}").chars().take(99).collect();
        h.set_path(&name)?;
        h.set_entry_type(EntryType::XHeader);
        h.set_mode(0o644);
        h.set_size(records.len() as u64);
        h.set_mtime(e.mtime);
        h.set_cksum();
        b.append(&h, records.as_slice())?;
    }
    let mut h = Header::new_gnu();
    h.set_mode(e.mode);
    h.set_uid(e.uid);
    h.set_gid(e.gid);
    h.set_mtime(e.mtime);
    h.set_size(0);
    match &e.kind {
        Kind::Dir => {
            h.set_entry_type(EntryType::Directory);
            let path = format!("{}/", e.path.trim_end_matches('/'));
            b.append_data(&mut h, path, std::io::empty())
        }
        Kind::File(data) => {
            h.set_entry_type(EntryType::Regular);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, &e.path, data.as_slice())
        }
        Kind::Symlink(target) => {
            h.set_entry_type(EntryType::Symlink);
            b.append_link(&mut h, &e.path, target)
        }
        Kind::Hardlink(target) => {
            h.set_entry_type(EntryType::Link);
            b.append_link(&mut h, &e.path, target)
        }
        Kind::CharDevice { major, minor } | Kind::BlockDevice { major, minor } => {
            h.set_entry_type(if matches!(e.kind, Kind::CharDevice { .. }) {
                EntryType::Char
            } else {
                EntryType::Block
            });
            h.set_device_major(*major)?;
            h.set_device_minor(*minor)?;
            b.append_data(&mut h, &e.path, std::io::empty())
        }
        Kind::Fifo => {
            h.set_entry_type(EntryType::Fifo);
            b.append_data(&mut h, &e.path, std::io::empty())
        }
    }
}

/// The busybox rootfs ([`Layer::busybox`]) as a tar, for `docker import`.
pub fn busybox_rootfs_tar() -> Result<Vec<u8>, String> {
    Layer::busybox()?.to_tar()
}

/// Writes [`busybox_rootfs_tar`] to `path`.
pub fn write_busybox_rootfs_tar(path: &Path) -> Result<(), String> {
    std::fs::write(path, busybox_rootfs_tar()?)
        .map_err(|e| format!("write {}: {e}", path.display()))
}

/// An image to `docker load`.
#[derive(Debug, Clone)]
pub struct Image {
    /// `repo:tag` it loads as.
    pub repo_tag: String,
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    /// `Config.Cmd`.
    pub cmd: Vec<String>,
    /// `Config.Env`.
    pub env: Vec<String>,
}

/// A `docker save`-format tarball and what `docker load` will make of it.
#[derive(Debug, Clone)]
pub struct SavedImage {
    /// The tarball.
    pub tar: Vec<u8>,
    /// Image id, `sha256:<hex of the config>`.
    pub id: String,
    /// `sha256:<hex>` of each layer tar, bottom first.
    pub diff_ids: Vec<String>,
    /// The image config JSON.
    pub config: Vec<u8>,
}

impl Image {
    /// An image `repo_tag` of `layers` with `CMD ["sh"]`.
    pub fn new(repo_tag: &str, layers: Vec<Layer>) -> Image {
        Image {
            repo_tag: repo_tag.to_string(),
            layers,
            cmd: vec!["sh".to_string()],
            env: vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ],
        }
    }

    /// The `docker save`-format tarball.
    pub fn save_tar(&self) -> Result<SavedImage, String> {
        let (repo, tag) = match self.repo_tag.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r.to_string(), t.to_string()),
            _ => (self.repo_tag.clone(), "latest".to_string()),
        };
        let created = "2023-11-14T22:13:20Z";
        let mut layer_tars = Vec::new();
        let mut diff_ids = Vec::new();
        for l in &self.layers {
            let tar = l.to_tar()?;
            diff_ids.push(format!("sha256:{}", sha256::hex_digest(&tar)));
            layer_tars.push(tar);
        }
        let history: Vec<_> = (0..self.layers.len())
            .map(|i| json!({"created": created, "created_by": format!("docker-rbd testkit layer {i}")}))
            .collect();
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "created": created,
            "config": {"Cmd": self.cmd, "Env": self.env},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        });
        let config = serde_json::to_vec(&config).map_err(|e| e.to_string())?;
        let config_hex = sha256::hex_digest(&config);

        let mut out = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8], dir: bool| -> Result<(), String> {
            let mut h = Header::new_gnu();
            h.set_mtime(DEFAULT_MTIME);
            if dir {
                h.set_entry_type(EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
            } else {
                h.set_entry_type(EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
            }
            out.append_data(&mut h, path, data)
                .map_err(|e| format!("save tar {path}: {e}"))
        };
        // v1 layer directories named by a chain of the diff ids.
        let mut parent = String::new();
        let mut layer_paths = Vec::new();
        for (i, tar) in layer_tars.iter().enumerate() {
            let v1 = sha256::hex_digest(format!("{parent}\n{}", diff_ids[i]).as_bytes());
            let mut v1_json = json!({"id": v1, "created": created, "os": "linux"});
            if !parent.is_empty() {
                v1_json["parent"] = json!(parent);
            }
            add(&format!("{v1}/"), &[], true)?;
            add(&format!("{v1}/VERSION"), b"1.0", false)?;
            add(
                &format!("{v1}/json"),
                &serde_json::to_vec(&v1_json).map_err(|e| e.to_string())?,
                false,
            )?;
            add(&format!("{v1}/layer.tar"), tar, false)?;
            layer_paths.push(format!("{v1}/layer.tar"));
            parent = v1;
        }
        add(&format!("{config_hex}.json"), &config, false)?;
        let manifest = json!([{"Config": format!("{config_hex}.json"), "RepoTags": [self.repo_tag], "Layers": layer_paths}]);
        add(
            "manifest.json",
            &serde_json::to_vec(&manifest).map_err(|e| e.to_string())?,
            false,
        )?;
        let mut repos = BTreeMap::new();
        repos.insert(repo, BTreeMap::from([(tag, parent.clone())]));
        add(
            "repositories",
            &serde_json::to_vec(&repos).map_err(|e| e.to_string())?,
            false,
        )?;
        let tar = out
            .into_inner()
            .map_err(|e| format!("finish save tar: {e}"))?;
        Ok(SavedImage {
            tar,
            id: format!("sha256:{config_hex}"),
            diff_ids,
            config,
        })
    }

    /// Writes the `docker save`-format tarball to `path`.
    pub fn write_save_tar(&self, path: &Path) -> Result<SavedImage, String> {
        let saved = self.save_tar()?;
        std::fs::write(path, &saved.tar).map_err(|e| format!("write {}: {e}", path.display()))?;
        Ok(saved)
    }
}

/// The three layers of [`special_image`]:
///
/// 1. busybox ([`Layer::busybox`]) plus `/x` = `layer1`.
/// 2. `/x` = `layer2`; `/data/` with `keep`, `gone`, `opq/old`, `setuid`
///    (mode 4755), `hard1` + hardlink `hard2`, `null` (char device 1:3,
///    0666), `cap` (xattr `security.capability` = [`cap_net_raw_xattr`]),
///    `owned` (1000:1000, 0600), `fifo`, symlink `link` -> `keep`.
/// 3. `/x` = `layer3`; whiteout of `/data/gone`; `/data/opq` made opaque
///    with a new file `new`; `/data/added`.
pub fn special_layers() -> Result<Vec<Layer>, String> {
    let base = Layer::busybox()?.file("x", "layer1\n", 0o644);
    let middle = Layer::new()
        .file("x", "layer2\n", 0o644)
        .dir("data", 0o755)
        .file("data/keep", "keep\n", 0o644)
        .file("data/gone", "gone\n", 0o644)
        .dir("data/opq", 0o755)
        .file("data/opq/old", "old\n", 0o644)
        .file("data/setuid", "#!/bin/sh\necho setuid\n", 0o4755)
        .file("data/hard1", "hardlinked\n", 0o644)
        .hardlink("data/hard2", "data/hard1")
        .char_device("data/null", 1, 3, 0o666)
        .file("data/cap", "capable\n", 0o755)
        .xattr("security.capability", cap_net_raw_xattr())
        .file("data/owned", "owned\n", 0o600)
        .owner(1000, 1000)
        .fifo("data/fifo", 0o644)
        .symlink("data/link", "keep");
    let top = Layer::new()
        .file("x", "layer3\n", 0o644)
        .dir("data", 0o755)
        .whiteout("data/gone")
        .dir("data/opq", 0o755)
        .opaque("data/opq")
        .file("data/opq/new", "new\n", 0o644)
        .file("data/added", "added\n", 0o644);
    Ok(vec![base, middle, top])
}

/// A three-layer image `repo_tag` using every special entry
/// ([`special_layers`]).
pub fn special_image(repo_tag: &str) -> Result<Image, String> {
    Ok(Image::new(repo_tag, special_layers()?))
}

/// A busybox `sh -c` script that prints the state of [`special_image`]'s
/// special entries; its output must equal [`SPECIAL_CHECK_EXPECTED`].
pub const SPECIAL_CHECK_SCRIPT: &str = "\
cat /x; \
cat /data/keep; \
if [ -e /data/gone ]; then echo gone-present; else echo gone-absent; fi; \
ls /data/opq; \
stat -c '%a %u:%g %F' /data/setuid; \
stat -c '%h' /data/hard1; \
[ \"$(stat -c %i /data/hard1)\" = \"$(stat -c %i /data/hard2)\" ] && echo same-inode; \
stat -c '%F %t:%T %a' /data/null; \
stat -c '%a %u:%g' /data/owned; \
stat -c '%F' /data/fifo; \
readlink /data/link; \
cat /data/added; \
ls /data\
";

/// The output of [`SPECIAL_CHECK_SCRIPT`] in a container of
/// [`special_image`].
pub const SPECIAL_CHECK_EXPECTED: &str = "\
layer3
keep
gone-absent
new
4755 0:0 regular file
2
same-inode
character special file 1:3 666
600 1000:1000
fifo
keep
added
added
cap
fifo
hard1
hard2
keep
link
null
opq
owned
setuid
";

/// Checks a `docker export` tar of a container of [`special_image`]: the
/// special entries with their metadata, including the
/// `security.capability` xattr, which no busybox applet can read.
pub fn check_special_export(tar_bytes: &[u8]) -> Result<(), String> {
    #[derive(Default, Debug)]
    struct Seen {
        kind: Option<EntryType>,
        mode: u32,
        uid: u64,
        gid: u64,
        data: Vec<u8>,
        link: Option<String>,
        dev: Option<(u32, u32)>,
        xattrs: Vec<(String, Vec<u8>)>,
    }
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let mut ar = tar::Archive::new(tar_bytes);
    for entry in ar.entries().map_err(|e| format!("export tar: {e}"))? {
        let mut entry = entry.map_err(|e| format!("export tar entry: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| e.to_string())?
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        let path = path.trim_start_matches("./").to_string();
        let mut s = Seen::default();
        if let Some(exts) = entry.pax_extensions().map_err(|e| e.to_string())? {
            for ext in exts {
                let ext = ext.map_err(|e| e.to_string())?;
                if let Some(name) = ext.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr.")) {
                    s.xattrs
                        .push((name.to_string(), ext.value_bytes().to_vec()));
                }
            }
        }
        let h = entry.header();
        s.kind = Some(h.entry_type());
        s.mode = h.mode().map_err(|e| e.to_string())? & 0o7777;
        s.uid = h.uid().map_err(|e| e.to_string())?;
        s.gid = h.gid().map_err(|e| e.to_string())?;
        s.link = entry
            .link_name()
            .ok()
            .flatten()
            .map(|l| l.to_string_lossy().into_owned());
        if matches!(h.entry_type(), EntryType::Char | EntryType::Block) {
            s.dev = Some((
                h.device_major().ok().flatten().unwrap_or(0),
                h.device_minor().ok().flatten().unwrap_or(0),
            ));
        }
        entry.read_to_end(&mut s.data).map_err(|e| e.to_string())?;
        seen.insert(path, s);
    }
    let get = |p: &str| seen.get(p).ok_or_else(|| format!("export lacks {p}"));
    let mut errors = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            errors.push(what);
        }
    };
    let x = get("x")?;
    expect(
        x.data == b"layer3\n",
        format!("x holds {:?}", String::from_utf8_lossy(&x.data)),
    );
    expect(
        !seen.contains_key("data/gone"),
        "data/gone is present".into(),
    );
    expect(
        !seen.contains_key("data/opq/old"),
        "data/opq/old is present".into(),
    );
    expect(
        get("data/opq/new")?.data == b"new\n",
        "data/opq/new content".into(),
    );
    let setuid = get("data/setuid")?;
    expect(
        setuid.mode == 0o4755,
        format!("data/setuid mode {:o}", setuid.mode),
    );
    let h1 = get("data/hard1")?;
    let h2 = get("data/hard2")?;
    // One of the two is the hardlink to the other.
    let linked = (h2.kind == Some(EntryType::Link) && h2.link.as_deref() == Some("data/hard1"))
        || (h1.kind == Some(EntryType::Link) && h1.link.as_deref() == Some("data/hard2"));
    expect(
        linked,
        format!("data/hard1 and data/hard2 are not hardlinked: {h1:?} {h2:?}"),
    );
    let null = get("data/null")?;
    expect(
        null.kind == Some(EntryType::Char) && null.dev == Some((1, 3)) && null.mode == 0o666,
        format!("data/null: {null:?}"),
    );
    let cap = get("data/cap")?;
    expect(
        cap.xattrs
            .iter()
            .any(|(k, v)| k == "security.capability" && *v == cap_net_raw_xattr()),
        format!("data/cap xattrs: {:?}", cap.xattrs),
    );
    let owned = get("data/owned")?;
    expect(
        owned.uid == 1000 && owned.gid == 1000 && owned.mode == 0o600,
        format!("data/owned: {owned:?}"),
    );
    expect(
        get("data/fifo")?.kind == Some(EntryType::Fifo),
        "data/fifo is not a fifo".into(),
    );
    let link = get("data/link")?;
    expect(
        link.kind == Some(EntryType::Symlink) && link.link.as_deref() == Some("keep"),
        format!("data/link: {link:?}"),
    );
    expect(
        get("bin/busybox")?.data.len() > 100_000,
        "bin/busybox is short".into(),
    );
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

/// An `n`-layer image (`n >= 1`) for chain-depth tests: layer 0 is busybox;
/// layer `i` (1..n) writes `/chain/<i:03>` = `i` and `/depth` = `i`, and
/// every tenth layer whites out the file of five layers before.
/// [`chain_expected`] gives the resulting `/chain` listing.
pub fn chain_image(repo_tag: &str, n: usize) -> Result<Image, String> {
    let mut layers = vec![
        Layer::busybox()?
            .dir("chain", 0o755)
            .file("depth", "0\n", 0o644),
    ];
    for i in 1..n {
        let mut l = Layer::new().dir("chain", 0o755).file(
            &format!("chain/{i:03}"),
            format!("{i}\n"),
            0o644,
        );
        l = l.file("depth", format!("{i}\n"), 0o644);
        if i % 10 == 0 && i > 5 {
            l = l.whiteout(&format!("chain/{:03}", i - 5));
        }
        layers.push(l);
    }
    Ok(Image::new(repo_tag, layers))
}

/// The names in `/chain` of [`chain_image`]`(n)`, sorted; `/depth` holds
/// `n - 1`.
pub fn chain_expected(n: usize) -> Vec<String> {
    (1..n)
        .filter(|i| !(i + 5 < n && (i + 5) % 10 == 0))
        .map(|i| format!("{i:03}"))
        .collect()
}

/// Reads a `docker save` tarball: the first image's config and the
/// `sha256:<hex>` of each of its layer tars, bottom first (which equal
/// the image's diff ids when the layers were reproduced byte for byte).
pub fn read_saved(tar_bytes: &[u8]) -> Result<(Vec<u8>, Vec<String>), String> {
    let mut files = std::collections::BTreeMap::new();
    let mut archive = tar::Archive::new(tar_bytes);
    for entry in archive
        .entries()
        .map_err(|e| format!("save tarball: {e}"))?
    {
        let mut entry = entry.map_err(|e| format!("save tarball: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("save tarball: {e}"))?
            .display()
            .to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data)
            .map_err(|e| format!("save tarball {path}: {e}"))?;
        files.insert(path, data);
    }
    let manifest = files.get("manifest.json").ok_or("no manifest.json")?;
    let manifest: serde_json::Value =
        serde_json::from_slice(manifest).map_err(|e| format!("manifest.json: {e}"))?;
    let first = &manifest[0];
    let file = |name: &serde_json::Value| {
        let name = name.as_str().ok_or("manifest entry is not a string")?;
        files
            .get(name)
            .ok_or_else(|| format!("{name} is missing from the tarball"))
    };
    let config = file(&first["Config"])?.clone();
    let layers = first["Layers"]
        .as_array()
        .ok_or("manifest has no Layers")?
        .iter()
        .map(|l| file(l).map(|bytes| format!("sha256:{}", crate::sha256::hex_digest(bytes))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((config, layers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths_count_themselves() {
        for n in [0usize, 1, 5, 80, 90, 95, 1000] {
            let r = pax_record("SCHILY.xattr.user.k", &vec![b'v'; n]);
            let len: usize = std::str::from_utf8(&r[..r.iter().position(|b| *b == b' ').unwrap()])
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(len, r.len(), "value length {n}");
        }
    }

    #[test]
    fn layer_tar_round_trips_special_entries() {
        let tar = special_layers().unwrap()[1].to_tar().unwrap();
        let mut ar = tar::Archive::new(tar.as_slice());
        let mut found = BTreeMap::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut xattrs = Vec::new();
            if let Some(exts) = e.pax_extensions().unwrap() {
                for ext in exts {
                    let ext = ext.unwrap();
                    xattrs.push((ext.key().unwrap().to_string(), ext.value_bytes().to_vec()));
                }
            }
            let h = e.header();
            found.insert(
                path,
                (
                    h.entry_type(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    if h.entry_type() == EntryType::Char {
                        h.device_major().unwrap()
                    } else {
                        None
                    },
                    xattrs,
                ),
            );
        }
        assert_eq!(found["data/"].0, EntryType::Directory);
        assert_eq!(found["data/setuid"].1, 0o4755);
        assert_eq!(found["data/hard2"].0, EntryType::Link);
        assert_eq!(found["data/null"].0, EntryType::Char);
        assert_eq!(found["data/null"].3, Some(1));
        assert_eq!(found["data/owned"].2, 1000);
        assert_eq!(
            found["data/cap"].4,
            vec![(
                "SCHILY.xattr.security.capability".to_string(),
                cap_net_raw_xattr()
            )]
        );
        assert_eq!(found["data/fifo"].0, EntryType::Fifo);

        let top = special_layers().unwrap()[2].to_tar().unwrap();
        let names: Vec<String> = tar::Archive::new(top.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"data/.wh.gone".to_string()), "{names:?}");
        assert!(
            names.contains(&"data/opq/.wh..wh..opq".to_string()),
            "{names:?}"
        );
    }

    #[test]
    fn save_tar_has_manifest_config_and_matching_diff_ids() {
        let img = Image::new(
            "t/x:1",
            vec![
                Layer::new().file("a", "a\n", 0o644),
                Layer::new().whiteout("a"),
            ],
        );
        let saved = img.save_tar().unwrap();
        let mut files = BTreeMap::new();
        for e in tar::Archive::new(saved.tar.as_slice()).entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            files.insert(path, data);
        }
        let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        let config_name = manifest[0]["Config"].as_str().unwrap();
        assert_eq!(
            format!("sha256:{}", config_name.trim_end_matches(".json")),
            saved.id
        );
        assert_eq!(manifest[0]["RepoTags"][0], "t/x:1");
        let config: serde_json::Value = serde_json::from_slice(&files[config_name]).unwrap();
        let layers = manifest[0]["Layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2);
        for (i, l) in layers.iter().enumerate() {
            let tar = &files[l.as_str().unwrap()];
            assert_eq!(
                config["rootfs"]["diff_ids"][i],
                format!("sha256:{}", sha256::hex_digest(tar))
            );
        }
        let repos: serde_json::Value = serde_json::from_slice(&files["repositories"]).unwrap();
        assert!(repos["t/x"]["1"].is_string());
    }

    #[test]
    fn chain_expected_matches_whiteouts() {
        let e = chain_expected(21);
        assert_eq!(e.len(), 20 - 2); // 005 and 015 whited out by 010 and 020
        assert!(!e.contains(&"005".to_string()) && !e.contains(&"015".to_string()));
        assert!(e.contains(&"020".to_string()));
        let img = chain_image("c:1", 21).unwrap();
        assert_eq!(img.layers.len(), 21);
    }
}
