//! A graphdriver plugin that keeps every layer as a plain directory under its
//! Home, for testing the protocol end to end against a real dockerd. Never
//! shipped: it copies the whole parent tree for every layer.
//!
//! - `Create`/`CreateReadWrite`: an empty 0755 directory for a base layer,
//!   otherwise a full copy of the parent's tree preserving type, ownership,
//!   mode (setuid included), xattrs, device numbers, hardlinks within the
//!   tree and timestamps (nanoseconds). Built under `<Home>/tmp/` and renamed
//!   into `<Home>/layers/<id>` when complete.
//! - `Get`/`Put`: reference-counted; `Get` returns the same path on every
//!   call. `Put` without a `Get`, and `Remove` of a layer still held, are
//!   errors (they would be bugs in dockerd or in the server).
//! - `Diff`, `Changes`, `ApplyDiff`, `DiffSize`: [`NaiveDiff`] on top of the
//!   directories.
//!
//! Run: `dir_driver [--name NAME | --socket PATH]`, then
//! `dockerd --experimental -s NAME`. Logs go to stderr (`RUST_LOG`).

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use graphdriver_api::diff::{DiffError, IdMappings, LayerFs, NaiveDiff};
use graphdriver_api::server::{self, ServerConfig};
use graphdriver_api::{Capabilities, Change, CreateRequest, DiffStream, GraphDriver, InitRequest};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

/// Why a call failed; every message names the layer or path.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// A file system operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// A call before `Init`.
    #[error("the driver is not initialised (no Init yet)")]
    NotInitialised,
    /// An id that is not a plain file name.
    #[error("invalid layer id {0:?}")]
    InvalidId(String),
    /// Copying an xattr failed.
    #[error("set xattr {name} on {path}")]
    Xattr {
        /// The xattr.
        name: String,
        /// The copy.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// `Create` of an existing layer.
    #[error("layer {0} already exists")]
    Exists(String),
    /// A layer that does not exist.
    #[error("no layer {0}")]
    Unknown(String),
    /// `Remove` of a layer still held by `Get`.
    #[error("layer {id} is still in use ({refs} gets without put)")]
    InUse {
        /// The layer.
        id: String,
        /// Outstanding gets.
        refs: usize,
    },
    /// `Put` without a matching `Get`.
    #[error("put of layer {0} which is not held")]
    NotHeld(String),
    /// Storage options this driver does not support.
    #[error("unsupported storage options: {0}")]
    StorageOpt(String),
    /// The naive diff layer failed.
    #[error(transparent)]
    Diff(#[from] DiffError),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DirError + 'a {
    move |source| DirError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn nix_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> DirError + 'a {
    move |errno| DirError::Io {
        op,
        path: path.to_path_buf(),
        source: io::Error::from(errno),
    }
}

/// The layer directories and their reference counts.
#[derive(Debug, Default)]
pub struct Layers {
    home: Mutex<Option<PathBuf>>,
    refs: Mutex<HashMap<String, usize>>,
}

impl Layers {
    fn home(&self) -> Result<PathBuf, DirError> {
        self.home
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(DirError::NotInitialised)
    }

    /// `<Home>/layers/<id>` after checking that `id` is a plain name.
    fn dir(&self, id: &str) -> Result<PathBuf, DirError> {
        if id.is_empty() || id == "." || id == ".." || id.contains('/') || id.contains('\0') {
            return Err(DirError::InvalidId(id.to_string()));
        }
        Ok(self.home()?.join("layers").join(id))
    }

    fn existing(&self, id: &str) -> Result<PathBuf, DirError> {
        let dir = self.dir(id)?;
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => Ok(dir),
            Ok(_) => Err(DirError::Unknown(id.to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(DirError::Unknown(id.to_string())),
            Err(e) => Err(io_err("stat", &dir)(e)),
        }
    }

    fn create(&self, req: &CreateRequest) -> Result<(), DirError> {
        if !req.storage_opt.is_empty() {
            let keys: Vec<&str> = req.storage_opt.keys().map(String::as_str).collect();
            return Err(DirError::StorageOpt(keys.join(", ")));
        }
        let dir = self.dir(&req.id)?;
        if std::fs::symlink_metadata(&dir).is_ok() {
            return Err(DirError::Exists(req.id.clone()));
        }
        let tmp = self.home()?.join("tmp").join(&req.id);
        if std::fs::symlink_metadata(&tmp).is_ok() {
            // A creation interrupted earlier.
            std::fs::remove_dir_all(&tmp).map_err(io_err("remove", &tmp))?;
        }
        let built = if req.parent.is_empty() {
            std::fs::create_dir(&tmp)
                .and_then(|()| {
                    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
                })
                .map_err(io_err("mkdir", &tmp))
        } else {
            let parent = self.existing(&req.parent)?;
            copy_tree(&parent, &tmp)
        };
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &dir).map_err(io_err("rename into place", &dir))
    }
}

impl LayerFs for Layers {
    type Error = DirError;

    fn get(&self, id: &str, _mount_label: &str) -> Result<PathBuf, DirError> {
        let dir = self.existing(id)?;
        *self
            .refs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_insert(0) += 1;
        Ok(dir)
    }

    fn put(&self, id: &str) -> Result<(), DirError> {
        let mut refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        match refs.get_mut(id) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                refs.remove(id);
            }
            None => return Err(DirError::NotHeld(id.to_string())),
        }
        Ok(())
    }
}

/// Copies the tree at `src` to `dst` (which must not exist), preserving
/// everything a layer carries. Hardlinks inside the tree stay hardlinks.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<(), DirError> {
    let mut links = HashMap::new();
    copy_entry(src, dst, &mut links)
}

fn copy_entry(
    src: &Path,
    dst: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<(), DirError> {
    let meta = std::fs::symlink_metadata(src).map_err(io_err("lstat", src))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        std::fs::create_dir(dst).map_err(io_err("mkdir", dst))?;
        let mut names: Vec<_> = std::fs::read_dir(src)
            .map_err(io_err("readdir", src))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err("readdir", src))?;
        names.sort();
        for name in names {
            copy_entry(&src.join(&name), &dst.join(&name), links)?;
        }
    } else if ft.is_file() {
        if meta.nlink() > 1 {
            if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                return std::fs::hard_link(first, dst).map_err(io_err("link", dst));
            }
            links.insert((meta.dev(), meta.ino()), dst.to_path_buf());
        }
        let mut from = std::fs::File::open(src).map_err(io_err("open", src))?;
        let mut to = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dst)
            .map_err(io_err("create", dst))?;
        io::copy(&mut from, &mut to).map_err(io_err("copy to", dst))?;
    } else if ft.is_symlink() {
        let target = std::fs::read_link(src).map_err(io_err("readlink", src))?;
        std::os::unix::fs::symlink(&target, dst).map_err(io_err("symlink", dst))?;
    } else {
        let kind = if ft.is_char_device() {
            SFlag::S_IFCHR
        } else if ft.is_block_device() {
            SFlag::S_IFBLK
        } else if ft.is_fifo() {
            SFlag::S_IFIFO
        } else if ft.is_socket() {
            SFlag::S_IFSOCK
        } else {
            return Err(DirError::Io {
                op: "copy (unknown file type)",
                path: src.to_path_buf(),
                source: io::Error::from(io::ErrorKind::Unsupported),
            });
        };
        nix::sys::stat::mknod(dst, kind, Mode::from_bits_truncate(0o600), meta.rdev())
            .map_err(nix_err("mknod", dst))?;
    }
    copy_metadata(src, dst, &meta)
}

/// Owner, then xattrs (a chown clears `security.capability`), then mode (a
/// chown clears setuid), then times.
fn copy_metadata(src: &Path, dst: &Path, meta: &std::fs::Metadata) -> Result<(), DirError> {
    std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))
        .map_err(io_err("lchown", dst))?;
    let names = xattr::list(src).map_err(io_err("list xattrs of", src))?;
    for name in names {
        if let Some(value) = xattr::get(src, &name).map_err(io_err("read xattr of", src))? {
            xattr::set(dst, &name, &value).map_err(|source| DirError::Xattr {
                name: name.to_string_lossy().into_owned(),
                path: dst.to_path_buf(),
                source,
            })?;
        }
    }
    if !meta.file_type().is_symlink() {
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(io_err("chmod", dst))?;
    }
    let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        dst,
        &atime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(nix_err("utimensat", dst))
}

/// The plugin: [`Layers`] plus [`NaiveDiff`] over them.
pub struct DirDriver {
    layers: Arc<Layers>,
    diff: NaiveDiff<Layers>,
}

impl Default for DirDriver {
    fn default() -> Self {
        let layers = Arc::new(Layers::default());
        DirDriver {
            diff: NaiveDiff::new(Arc::clone(&layers), IdMappings::identity()),
            layers,
        }
    }
}

impl DirDriver {
    /// Reference counts of the layers currently held, by id.
    pub fn held(&self) -> BTreeMap<String, usize> {
        self.layers
            .refs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

impl GraphDriver for DirDriver {
    type Error = DirError;

    fn init(&self, req: InitRequest) -> Result<(), DirError> {
        let home = PathBuf::from(&req.home);
        for sub in ["layers", "tmp"] {
            let dir = home.join(sub);
            std::fs::create_dir_all(&dir).map_err(io_err("mkdir", &dir))?;
        }
        let maps = IdMappings::new(req.uid_maps, req.gid_maps).map_err(|e| DirError::Io {
            op: "id maps of Init",
            path: home.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, e),
        })?;
        self.diff.set_id_mappings(maps);
        *self.layers.home.lock().unwrap_or_else(|p| p.into_inner()) = Some(home);
        tracing::info!(home = %req.home, opts = ?req.opts, "initialised");
        Ok(())
    }

    fn create(&self, req: CreateRequest) -> Result<(), DirError> {
        self.layers.create(&req)
    }

    fn create_read_write(&self, req: CreateRequest) -> Result<(), DirError> {
        self.layers.create(&req)
    }

    fn remove(&self, id: &str) -> Result<(), DirError> {
        let dir = self.layers.dir(id)?;
        if let Some(&refs) = self
            .layers
            .refs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return Err(DirError::InUse {
                id: id.to_string(),
                refs,
            });
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &dir)(e)),
        }
    }

    fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf, DirError> {
        self.layers.get(id, mount_label)
    }

    fn put(&self, id: &str) -> Result<(), DirError> {
        self.layers.put(id)
    }

    fn exists(&self, id: &str) -> Result<bool, DirError> {
        match self.layers.existing(id) {
            Ok(_) => Ok(true),
            Err(DirError::Unknown(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn status(&self) -> Result<Vec<(String, String)>, DirError> {
        let home = self.layers.home()?;
        let layers = home.join("layers");
        let count = std::fs::read_dir(&layers)
            .map_err(io_err("readdir", &layers))?
            .count();
        Ok(vec![
            ("Home".to_string(), home.display().to_string()),
            ("Layers".to_string(), count.to_string()),
            ("Held".to_string(), self.held().len().to_string()),
        ])
    }

    fn get_metadata(&self, id: &str) -> Result<BTreeMap<String, String>, DirError> {
        let dir = self.layers.existing(id)?;
        Ok(BTreeMap::from([(
            "Dir".to_string(),
            dir.display().to_string(),
        )]))
    }

    fn cleanup(&self) -> Result<(), DirError> {
        let held = self.held();
        if !held.is_empty() {
            tracing::warn!(?held, "dockerd shuts down while layers are held");
        }
        Ok(())
    }

    fn diff(&self, id: &str, parent: &str) -> Result<DiffStream, DirError> {
        Ok(self.diff.diff(id, parent)?)
    }

    fn changes(&self, id: &str, parent: &str) -> Result<Vec<Change>, DirError> {
        Ok(self.diff.changes(id, parent)?)
    }

    fn apply_diff(&self, id: &str, parent: &str, diff: &mut dyn Read) -> Result<u64, DirError> {
        Ok(self.diff.apply_diff(id, parent, diff)?)
    }

    fn diff_size(&self, id: &str, parent: &str) -> Result<u64, DirError> {
        Ok(self.diff.diff_size(id, parent)?)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
}

/// `--name NAME` (socket `/run/docker/plugins/NAME.sock`, default `dir`) or
/// `--socket PATH`.
fn socket_from_args(args: &[String]) -> Result<PathBuf, String> {
    match args {
        [] => Ok(ServerConfig::for_plugin("dir").socket),
        [flag, name] if flag == "--name" => Ok(ServerConfig::for_plugin(name).socket),
        [flag, path] if flag == "--socket" => Ok(PathBuf::from(path)),
        _ => Err(format!(
            "usage: dir_driver [--name NAME | --socket PATH]; got {args:?}"
        )),
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let socket = match socket_from_args(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dir_driver: tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = server::shutdown_signal()?;
        server::serve(
            Arc::new(DirDriver::default()),
            ServerConfig::at(socket),
            shutdown,
        )
        .await
    });
    if let Err(e) = result {
        eprintln!("dir_driver: {e}");
        std::process::exit(1);
    }
}
