//! The graphdriver plugin: Docker's protocol on top of the layer engine.
//!
//! This is a thin adapter. It validates what dockerd sends, merges the
//! settings at `Init` (flags, then `Init.Opts`), and forwards each call to
//! the [`Engine`]; `Diff`, `Changes`, `ApplyDiff` and `DiffSize` come from
//! the protocol crate's naive diff layer over the engine's `get`/`put`.
//!
//! dockerd calls `Init` once, when it starts, and never again: a plugin that
//! crashes and restarts under a running dockerd would otherwise answer
//! every call with "not initialised". So the accepted `Init` request is
//! saved (in a tmpfs run directory, so a reboot, after which dockerd calls
//! `Init` afresh, forgets it), and a restarted plugin resumes from it
//! ([`RbdPlugin::resume`]) before it serves. dockerd's `Cleanup` (it is
//! shutting down) forgets it, and an `Init` from dockerd always wins over a
//! resumed or earlier one: the engine is replaced when the settings differ.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use graphdriver_api::diff::{DiffError, IdMapError, IdMappings, LayerFs, NaiveDiff};
use graphdriver_api::{Change, CreateRequest, DiffStream, GraphDriver, IdMap, InitRequest};
use metadata::LayerKind;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, RawSettings, Settings};
use crate::engine::purge::Purger;
use crate::engine::reaper::Reaper;
use crate::engine::{CreateOptions, Engine, EngineError};
use crate::fleet::{Fleet, FleetError};
use crate::mapper::fuse::HelperCommand;
use crate::units::parse_size;

/// What the plugin answers dockerd with when a call fails.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// A call arrived before `Init`.
    #[error("docker-rbd is not initialised: dockerd has not called GraphDriver.Init")]
    NotInitialized,
    /// `Init`'s Home is not an absolute path.
    #[error("Init Home {home:?} is not an absolute path")]
    BadHome {
        /// What was sent.
        home: String,
    },
    /// The settings are wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A `--storage-opt` dockerd passed for a container is unknown.
    #[error("unknown storage option(s) {} (docker-rbd supports: size)", .keys.join(", "))]
    UnknownStorageOpt {
        /// The unknown keys.
        keys: Vec<String>,
    },
    /// A storage option value is wrong.
    #[error("storage option size={value:?}: {reason}")]
    BadSize {
        /// What was sent.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// The Home or the mount directory could not be made a private mount.
    #[error("cannot make {dir} a private mount")]
    PrivateMount {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: crate::fs::FsError,
    },
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// `Init`'s UID or GID map is unusable.
    #[error(transparent)]
    IdMap(#[from] IdMapError),
    /// The saved `Init` of a previous run could not be read or written.
    #[error("saved Init request {path}")]
    SavedInit {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A layer's root could not be given to the remapped root user.
    #[error("cannot give {path} to the remapped root user")]
    RootOwner {
        /// The layer's root.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The diff layer failed.
    #[error(transparent)]
    Diff(#[from] DiffError),
    /// The fleet mirror failed.
    #[error(transparent)]
    Fleet(#[from] FleetError),
}

/// The engine and the fleet mirror of one `Init`.
pub struct Driver {
    // Dropped first: the exporter thread stops before the engine goes,
    // the reaper unmounts idle layers, then the purger finishes the
    // removals queued.
    fleet: Fleet,
    _reaper: Reaper,
    purger: Purger,
    engine: Arc<Engine>,
}

impl Driver {
    /// `Get`: the fleet's check that no other live host has the
    /// container in use comes before anything is mapped.
    fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf, PluginError> {
        self.fleet.before_get(id)?;
        match self.engine.get(id, mount_label) {
            Ok(root) => Ok(root),
            Err(e) => {
                if let Err(undo) = self.fleet.after_put(id) {
                    tracing::warn!(error = %undo, "recording a failed Get in the fleet failed");
                }
                Err(e.into())
            }
        }
    }

    fn put(&self, id: &str) -> Result<(), PluginError> {
        self.engine.put(id)?;
        self.fleet.after_put(id)?;
        Ok(())
    }
}

type DriverCell = Arc<RwLock<Option<Arc<Driver>>>>;

fn driver(cell: &DriverCell) -> Result<Arc<Driver>, PluginError> {
    cell.read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
        .ok_or(PluginError::NotInitialized)
}

fn engine(cell: &DriverCell) -> Result<Arc<Engine>, PluginError> {
    Ok(driver(cell)?.engine.clone())
}

/// The engine as the diff layer sees it: a directory per layer.
pub struct EngineFs(DriverCell);

impl LayerFs for EngineFs {
    type Error = PluginError;

    fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf, PluginError> {
        driver(&self.0)?.get(id, mount_label)
    }

    fn put(&self, id: &str) -> Result<(), PluginError> {
        driver(&self.0)?.put(id)
    }
}

/// The RBD graphdriver plugin.
pub struct RbdPlugin {
    flags: RawSettings,
    engine: DriverCell,
    diff: NaiveDiff<EngineFs>,
    saved_init: Option<PathBuf>,
    fuse_helper: HelperCommand,
}

/// The `Init` request as saved for a restarted plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SavedInit {
    v: u32,
    home: String,
    opts: Vec<String>,
    uid_maps: Vec<IdMap>,
    gid_maps: Vec<IdMap>,
}

impl RbdPlugin {
    /// A plugin whose settings start from `flags` (`docker-rbd serve`
    /// flags and config file); dockerd's `Init.Opts` override them. When
    /// `saved_init` is given, an accepted `Init` is saved there for
    /// [`RbdPlugin::resume`].
    pub fn new(flags: RawSettings, saved_init: Option<PathBuf>) -> Self {
        let engine: DriverCell = Arc::default();
        Self {
            flags,
            diff: NaiveDiff::new(Arc::new(EngineFs(engine.clone())), IdMappings::default()),
            engine,
            saved_init,
            fuse_helper: HelperCommand::locate(),
        }
    }

    /// The FUSE server program the fuse mapper starts (by default the
    /// `docker-rbd-fuse` next to the running executable, else this
    /// executable's `fuse-serve`).
    pub fn with_fuse_helper(mut self, helper: HelperCommand) -> Self {
        self.fuse_helper = helper;
        self
    }

    /// Initialises from the `Init` a previous run of this plugin accepted,
    /// if one was saved: the plugin restarted under a running dockerd.
    /// Returns whether it resumed.
    pub fn resume(&self) -> Result<bool, PluginError> {
        let Some(path) = &self.saved_init else {
            return Ok(false);
        };
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(PluginError::SavedInit {
                    path: path.clone(),
                    source: source.into(),
                });
            }
        };
        let saved: SavedInit =
            serde_json::from_slice(&text).map_err(|source| PluginError::SavedInit {
                path: path.clone(),
                source: source.into(),
            })?;
        // Home is <data-root>/<name>; without the data root no dockerd runs
        // with this Init any more.
        let data_root = Path::new(&saved.home).parent().map(Path::to_path_buf);
        if !data_root.is_some_and(|d| d.is_dir()) {
            tracing::info!(home = %saved.home, "the saved Init's data root is gone; forgetting it");
            self.forget_init();
            return Ok(false);
        }
        tracing::info!(home = %saved.home, "resuming the Init of the previous run");
        // dockerd runs already and has read its files: no hydrate.
        self.init_with(
            InitRequest {
                home: saved.home,
                opts: saved.opts,
                uid_maps: saved.uid_maps,
                gid_maps: saved.gid_maps,
            },
            false,
        )?;
        Ok(true)
    }

    fn forget_init(&self) {
        if let Some(path) = &self.saved_init
            && let Err(e) = std::fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the saved Init");
        }
    }

    fn save_init(&self, req: &InitRequest) -> Result<(), PluginError> {
        let Some(path) = &self.saved_init else {
            return Ok(());
        };
        let saved = SavedInit {
            v: 1,
            home: req.home.clone(),
            opts: req.opts.clone(),
            uid_maps: req.uid_maps.clone(),
            gid_maps: req.gid_maps.clone(),
        };
        let err = |source: std::io::Error| PluginError::SavedInit {
            path: path.clone(),
            source: source.into(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(&saved).map_err(|e| err(e.into()))?;
        {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(err)?;
            file.write_all(&bytes).map_err(err)?;
            file.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// The engine, once initialised.
    pub fn engine(&self) -> Option<Arc<Engine>> {
        engine(&self.engine).ok()
    }

    fn settings_for(&self, req: &InitRequest) -> Result<Settings, PluginError> {
        Ok(self
            .flags
            .clone()
            .overlay(RawSettings::from_storage_opts(&req.opts))
            .resolve()?)
    }

    /// With `--userns-remap`, the root of a layer belongs to the remapped
    /// root, as Docker's own drivers make it: a root-owned root of a
    /// writable layer is given to the mapped root (read-only layers are
    /// sealed with the owner they had).
    fn own_root(&self, root: &Path) -> Result<(), PluginError> {
        let maps = self.diff.id_mappings();
        if maps.is_identity() {
            return Ok(());
        }
        let io = |source: std::io::Error| PluginError::RootOwner {
            path: root.to_path_buf(),
            source,
        };
        let meta = std::fs::symlink_metadata(root).map_err(io)?;
        let (uid, gid) = maps.root_pair();
        if (meta.uid(), meta.gid()) != (0, 0) || (uid, gid) == (0, 0) {
            return Ok(());
        }
        match std::os::unix::fs::lchown(root, Some(uid), Some(gid)) {
            Ok(()) => Ok(()),
            // A sealed layer is mounted read-only and keeps its owner.
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => Ok(()),
            Err(e) => Err(io(e)),
        }
    }

    /// `Init`: opens the engine (or keeps the running one when dockerd
    /// restarted with the same settings) and the fleet mirror, hydrating
    /// dockerd's root when `hydrate` (dockerd reads it after this returns).
    fn init_with(&self, req: InitRequest, hydrate: bool) -> Result<(), PluginError> {
        let settings = self.settings_for(&req)?;
        let home = PathBuf::from(&req.home);
        if !home.is_absolute() {
            return Err(PluginError::BadHome { home: req.home });
        }
        let maps = IdMappings::new(req.uid_maps.clone(), req.gid_maps.clone())?;
        self.diff.set_id_mappings(maps);
        // FUSE mounts go below the Home, layer mounts below the mount
        // directory: both stay in this mount namespace (dockerd's) and are
        // seen nowhere else.
        for dir in [home.clone(), settings.mount_dir(&home)] {
            std::fs::create_dir_all(&dir).map_err(|e| EngineError::Io {
                op: "create",
                path: dir.clone(),
                source: e,
            })?;
            crate::fs::make_private(&dir)
                .map_err(|source| PluginError::PrivateMount { dir, source })?;
        }
        let current = driver(&self.engine).ok();
        let engine = match current {
            Some(existing)
                if existing.engine.home() == home && *existing.engine.settings() == settings =>
            {
                tracing::info!(home = %home.display(), "dockerd restarted; re-running recovery");
                existing.engine.recover();
                existing.engine.clone()
            }
            current => {
                if let Some(existing) = &current {
                    tracing::info!(
                        old_home = %existing.engine.home().display(),
                        new_home = %home.display(),
                        "dockerd initialised again with other settings; switching to them"
                    );
                }
                // The old engine and its lease go before the new one
                // takes the lease.
                *self.engine.write().unwrap_or_else(PoisonError::into_inner) = None;
                drop(current);
                let engine = Arc::new(Engine::open_with(
                    settings,
                    &home,
                    self.fuse_helper.clone(),
                )?);
                tracing::info!(
                    home = %home.display(),
                    host = engine.host_id(),
                    mapper = %engine.mapper().kind(),
                    "initialised"
                );
                engine
            }
        };
        // A running exporter stops before the hydrate writes.
        let old = self
            .engine
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(old);
        let fleet = Fleet::start(engine.clone(), hydrate)?;
        let purger = Purger::start(engine.clone()).map_err(|e| EngineError::Io {
            op: "start the purge thread for",
            path: home.clone(),
            source: e,
        })?;
        let reaper = Reaper::start(engine.clone()).map_err(|e| EngineError::Io {
            op: "start the idle mount thread for",
            path: home.clone(),
            source: e,
        })?;
        self.save_init(&req)?;
        *self.engine.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(Driver {
            fleet,
            _reaper: reaper,
            purger,
            engine,
        }));
        Ok(())
    }

    fn create_options(req: &CreateRequest, kind: LayerKind) -> Result<CreateOptions, PluginError> {
        let unknown: Vec<String> = req
            .storage_opt
            .keys()
            .filter(|k| k.as_str() != "size")
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(PluginError::UnknownStorageOpt { keys: unknown });
        }
        let size = req
            .storage_opt
            .get("size")
            .map(|v| {
                parse_size(v).map_err(|e| PluginError::BadSize {
                    value: v.clone(),
                    reason: e.reason.to_string(),
                })
            })
            .transpose()?;
        Ok(CreateOptions {
            kind,
            size,
            mount_label: req.mount_label.clone(),
        })
    }
}

impl GraphDriver for RbdPlugin {
    type Error = PluginError;

    fn init(&self, req: InitRequest) -> Result<(), PluginError> {
        self.init_with(req, true)
    }

    fn create(&self, req: CreateRequest) -> Result<(), PluginError> {
        let opts = Self::create_options(&req, LayerKind::Image)?;
        Ok(engine(&self.engine)?.create(&req.id, &req.parent, &opts)?)
    }

    fn create_read_write(&self, req: CreateRequest) -> Result<(), PluginError> {
        let kind = if req.id.ends_with("-init") {
            LayerKind::Init
        } else {
            LayerKind::ReadWrite
        };
        let opts = Self::create_options(&req, kind)?;
        Ok(engine(&self.engine)?.create(&req.id, &req.parent, &opts)?)
    }

    fn remove(&self, id: &str) -> Result<(), PluginError> {
        let driver = driver(&self.engine)?;
        // Recorded now; the snapshot and image go in the background.
        if let Some(purge) = driver.engine.retire(id)? {
            driver.purger.submit(&driver.engine, purge);
        }
        driver.fleet.trigger();
        Ok(())
    }

    fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf, PluginError> {
        let driver = driver(&self.engine)?;
        let root = driver.get(id, mount_label)?;
        if let Err(e) = self.own_root(&root) {
            // Hand nothing out that Docker would find wrongly owned.
            if let Err(put) = driver.put(id) {
                tracing::error!(error = %put, "releasing a layer after a failed chown failed");
            }
            return Err(e);
        }
        Ok(root)
    }

    fn put(&self, id: &str) -> Result<(), PluginError> {
        driver(&self.engine)?.put(id)
    }

    fn exists(&self, id: &str) -> Result<bool, PluginError> {
        Ok(engine(&self.engine)?.exists(id)?)
    }

    fn status(&self) -> Result<Vec<(String, String)>, PluginError> {
        let engine = engine(&self.engine)?;
        let mut status = engine.settings().describe();
        status.push(("Mapper".into(), engine.mapper().kind().to_string()));
        status.push(("Host".into(), engine.host_id().to_string()));
        // Docker's layers; the shared init layers serving its init layers
        // are the driver's own.
        let (shared, layers): (Vec<_>, Vec<_>) = engine
            .list()?
            .into_iter()
            .partition(|l| l.record.kind == LayerKind::SharedInit);
        status.push(("Layers".into(), layers.len().to_string()));
        status.push(("Shared Init Layers".into(), shared.len().to_string()));
        let (idle, mounted): (Vec<_>, Vec<_>) =
            engine.mounts()?.into_iter().partition(|(_, m)| m.is_idle());
        status.push(("Mounted Layers".into(), mounted.len().to_string()));
        status.push(("Idle Mounts".into(), idle.len().to_string()));
        status.push((
            "Pool Space".into(),
            engine
                .pool_space()
                .map_or_else(|e| format!("unknown: {e}"), |s| s.to_string()),
        ));
        if engine.lease_lost() {
            status.push(("Lease".into(), "LOST: renewals are failing".into()));
        }
        status.extend(driver(&self.engine)?.fleet.status());
        Ok(status)
    }

    fn get_metadata(&self, id: &str) -> Result<BTreeMap<String, String>, PluginError> {
        let engine = engine(&self.engine)?;
        let info = engine.info(id)?;
        let rec = info.record;
        let settings = engine.settings();
        let mut spec = settings.pool.clone();
        if !settings.namespace.is_empty() {
            spec = format!("{spec}/{}", settings.namespace);
        }
        let mut meta = BTreeMap::from([
            ("Image".to_string(), format!("{spec}/{}", rec.image)),
            ("Parent".to_string(), rec.parent.clone().unwrap_or_default()),
            ("Size".to_string(), rec.size.to_string()),
            (
                "State".to_string(),
                format!("{:?}", rec.state).to_lowercase(),
            ),
            ("Depth".to_string(), rec.depth.to_string()),
            ("Mapper".to_string(), engine.mapper().kind().to_string()),
        ]);
        if let Some(m) = engine.mount_record(id)?
            && let Some(device) = m.device
        {
            meta.insert("Device".into(), device.device.display().to_string());
            meta.insert("MountPoint".into(), m.mountpoint.display().to_string());
        }
        Ok(meta)
    }

    fn cleanup(&self) -> Result<(), PluginError> {
        // Mounts in use stay: containers may outlive dockerd (live-restore),
        // and a restarted dockerd's Init adopts them; idle ones go. The
        // saved Init goes: the next dockerd calls Init itself.
        self.forget_init();
        if let Ok(engine) = engine(&self.engine) {
            engine.release_idle_mounts(true);
            tracing::info!(mounted = engine.mounts()?.len(), "dockerd is shutting down");
        }
        Ok(())
    }

    fn diff(&self, id: &str, parent: &str) -> Result<DiffStream, PluginError> {
        Ok(self.diff.diff(id, parent)?)
    }

    fn changes(&self, id: &str, parent: &str) -> Result<Vec<Change>, PluginError> {
        Ok(self.diff.changes(id, parent)?)
    }

    fn apply_diff(&self, id: &str, parent: &str, diff: &mut dyn Read) -> Result<u64, PluginError> {
        // Its writes would wait for space, up to the request's timeout.
        engine(&self.engine)?.ensure_room()?;
        Ok(self.diff.apply_diff(id, parent, diff)?)
    }

    fn diff_size(&self, id: &str, parent: &str) -> Result<u64, PluginError> {
        Ok(self.diff.diff_size(id, parent)?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn request(opts: &[(&str, &str)]) -> CreateRequest {
        CreateRequest {
            id: format!("{:064x}", 1),
            storage_opt: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            ..CreateRequest::default()
        }
    }

    #[test]
    fn storage_options_are_validated() {
        let ok =
            RbdPlugin::create_options(&request(&[("size", "20G")]), LayerKind::ReadWrite).unwrap();
        assert_eq!(ok.size, Some(20 << 30));
        let none = RbdPlugin::create_options(&request(&[]), LayerKind::Image).unwrap();
        assert_eq!(none.size, None);
        let err = RbdPlugin::create_options(&request(&[("size", "lots")]), LayerKind::ReadWrite)
            .unwrap_err();
        assert!(err.to_string().contains("size=\"lots\""), "{err}");
        let err = RbdPlugin::create_options(
            &request(&[("size", "1G"), ("iops", "5"), ("zone", "a")]),
            LayerKind::ReadWrite,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown storage option(s) iops, zone (docker-rbd supports: size)"
        );
    }

    #[test]
    fn calls_before_init_say_so() {
        let plugin = RbdPlugin::new(RawSettings::default(), None);
        let id = format!("{:064x}", 1);
        for err in [
            plugin.get(&id, "").unwrap_err(),
            plugin.remove(&id).unwrap_err(),
            plugin.status().unwrap_err(),
            plugin.create(request(&[])).unwrap_err(),
        ] {
            assert!(matches!(err, PluginError::NotInitialized), "{err}");
        }
        assert!(plugin.engine().is_none());
        assert!(plugin.cleanup().is_ok());
    }

    #[test]
    fn init_rejects_bad_settings_and_relative_homes_before_connecting() {
        let plugin = RbdPlugin::new(RawSettings::default(), None);
        let err = plugin
            .init(InitRequest {
                home: "/var/lib/docker/rbd".into(),
                opts: vec!["rbd.fs=btrfs".into(), "rbd.nope=1".into()],
                ..InitRequest::default()
            })
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("btrfs") && text.contains("rbd.nope"),
            "{text}"
        );
        let err = plugin
            .init(InitRequest {
                home: "relative/home".into(),
                ..InitRequest::default()
            })
            .unwrap_err();
        assert!(matches!(err, PluginError::BadHome { .. }), "{err}");
    }

    #[test]
    fn a_saved_init_is_forgotten_when_its_data_root_is_gone_and_reported_when_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rbd.init.json");
        let plugin = RbdPlugin::new(RawSettings::default(), Some(path.clone()));
        assert!(!plugin.resume().unwrap(), "nothing saved, nothing resumed");

        let gone = SavedInit {
            v: 1,
            home: dir
                .path()
                .join("no-such-data-root/rbd")
                .display()
                .to_string(),
            opts: vec![],
            uid_maps: vec![],
            gid_maps: vec![],
        };
        std::fs::write(&path, serde_json::to_vec(&gone).unwrap()).unwrap();
        assert!(!plugin.resume().unwrap());
        assert!(!path.exists(), "a stale saved Init is removed");
        assert!(
            !dir.path().join("no-such-data-root").exists(),
            "and no Home is made for it"
        );

        std::fs::write(&path, b"{not json").unwrap();
        let err = plugin.resume().unwrap_err();
        assert!(err.to_string().contains("rbd.init.json"), "{err}");
        plugin.cleanup().unwrap();
        assert!(!path.exists(), "Cleanup forgets the saved Init");
    }

    #[test]
    fn with_userns_remap_a_root_owned_layer_root_goes_to_the_mapped_root() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIP: needs root to chown");
            return;
        }
        let plugin = RbdPlugin::new(RawSettings::default(), None);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        std::fs::create_dir(&root).unwrap();
        plugin.own_root(&root).unwrap();
        let owner = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.uid(), m.gid())
        };
        assert_eq!(owner(&root), (0, 0), "no maps, no change");
        let map = |host_id| IdMap {
            container_id: 0,
            host_id,
            size: 65536,
        };
        plugin
            .diff
            .set_id_mappings(IdMappings::new(vec![map(100_000)], vec![map(200_000)]).unwrap());
        plugin.own_root(&root).unwrap();
        assert_eq!(owner(&root), (100_000, 200_000));
        std::os::unix::fs::lchown(&root, Some(5), Some(6)).unwrap();
        plugin.own_root(&root).unwrap();
        assert_eq!(
            owner(&root),
            (5, 6),
            "a root someone chose an owner for is left alone"
        );
    }
}
