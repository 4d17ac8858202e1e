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
//! ([`RbdPlugin::resume`]) before it serves.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use graphdriver_api::diff::{DiffError, IdMapError, IdMappings, LayerFs, NaiveDiff};
use graphdriver_api::{Change, CreateRequest, DiffStream, GraphDriver, IdMap, InitRequest};
use metadata::LayerKind;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::OpenOptionsExt;

use crate::config::{ConfigError, RawSettings, Settings};
use crate::engine::{CreateOptions, Engine, EngineError};
use crate::units::parse_size;

/// What the plugin answers dockerd with when a call fails.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// A call arrived before `Init`.
    #[error("docker-rbd is not initialised: dockerd has not called GraphDriver.Init")]
    NotInitialized,
    /// `Init` came again with different settings.
    #[error(
        "docker-rbd is already serving {home} with other settings; restart docker-rbd to change them"
    )]
    AlreadyInitialized {
        /// The Home being served.
        home: PathBuf,
    },
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
    /// The diff layer failed.
    #[error(transparent)]
    Diff(#[from] DiffError),
}

type EngineCell = Arc<OnceLock<Arc<Engine>>>;

fn engine(cell: &EngineCell) -> Result<&Arc<Engine>, PluginError> {
    cell.get().ok_or(PluginError::NotInitialized)
}

/// The engine as the diff layer sees it: a directory per layer.
pub struct EngineFs(EngineCell);

impl LayerFs for EngineFs {
    type Error = PluginError;

    fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf, PluginError> {
        Ok(engine(&self.0)?.get(id, mount_label)?)
    }

    fn put(&self, id: &str) -> Result<(), PluginError> {
        Ok(engine(&self.0)?.put(id)?)
    }
}

/// The RBD graphdriver plugin.
pub struct RbdPlugin {
    flags: RawSettings,
    engine: EngineCell,
    diff: NaiveDiff<EngineFs>,
    saved_init: Option<PathBuf>,
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
        let engine: EngineCell = Arc::default();
        Self {
            flags,
            diff: NaiveDiff::new(Arc::new(EngineFs(engine.clone())), IdMappings::default()),
            engine,
            saved_init,
        }
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
        tracing::info!(home = %saved.home, "resuming the Init of the previous run");
        self.init(InitRequest {
            home: saved.home,
            opts: saved.opts,
            uid_maps: saved.uid_maps,
            gid_maps: saved.gid_maps,
        })?;
        Ok(true)
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
    pub fn engine(&self) -> Option<&Arc<Engine>> {
        self.engine.get()
    }

    fn settings_for(&self, req: &InitRequest) -> Result<Settings, PluginError> {
        Ok(self
            .flags
            .clone()
            .overlay(RawSettings::from_storage_opts(&req.opts))
            .resolve()?)
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
        let settings = self.settings_for(&req)?;
        let home = PathBuf::from(&req.home);
        if !home.is_absolute() {
            return Err(PluginError::BadHome { home: req.home });
        }
        let maps = IdMappings::new(req.uid_maps.clone(), req.gid_maps.clone())?;
        self.diff.set_id_mappings(maps);
        if let Some(existing) = self.engine.get() {
            if existing.home() == home && *existing.settings() == settings {
                tracing::info!(home = %home.display(), "dockerd restarted; re-running recovery");
                existing.recover();
                return Ok(());
            }
            return Err(PluginError::AlreadyInitialized {
                home: existing.home().to_path_buf(),
            });
        }
        let engine = Arc::new(Engine::open(settings, &home)?);
        self.save_init(&req)?;
        tracing::info!(
            home = %home.display(),
            host = engine.host_id(),
            mapper = %engine.mapper().kind(),
            "initialised"
        );
        // A concurrent Init lost the race: the winner serves.
        let _ = self.engine.set(engine);
        Ok(())
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
        Ok(engine(&self.engine)?.remove(id)?)
    }

    fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf, PluginError> {
        Ok(engine(&self.engine)?.get(id, mount_label)?)
    }

    fn put(&self, id: &str) -> Result<(), PluginError> {
        Ok(engine(&self.engine)?.put(id)?)
    }

    fn exists(&self, id: &str) -> Result<bool, PluginError> {
        Ok(engine(&self.engine)?.exists(id)?)
    }

    fn status(&self) -> Result<Vec<(String, String)>, PluginError> {
        let engine = engine(&self.engine)?;
        let mut status = engine.settings().describe();
        status.push(("Mapper".into(), engine.mapper().kind().to_string()));
        status.push(("Host".into(), engine.host_id().to_string()));
        status.push(("Layers".into(), engine.list()?.len().to_string()));
        status.push(("Mounted Layers".into(), engine.mounts()?.len().to_string()));
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
        // Mounts stay: containers may outlive dockerd (live-restore), and a
        // restarted dockerd's Init adopts them.
        if let Some(engine) = self.engine.get() {
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
        Ok(self.diff.apply_diff(id, parent, diff)?)
    }

    fn diff_size(&self, id: &str, parent: &str) -> Result<u64, PluginError> {
        Ok(self.diff.diff_size(id, parent)?)
    }
}
