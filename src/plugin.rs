//! The graphdriver plugin: Docker's protocol on top of the layer engine.
//!
//! This is a thin adapter. It validates what dockerd sends, merges the
//! settings at `Init` (flags, then `Init.Opts`), and forwards each call to
//! the [`Engine`]; `Diff`, `Changes`, `ApplyDiff` and `DiffSize` come from
//! the protocol crate's naive diff layer over the engine's `get`/`put`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use graphdriver_api::diff::{DiffError, IdMapError, IdMappings, LayerFs, NaiveDiff};
use graphdriver_api::{Change, CreateRequest, DiffStream, GraphDriver, InitRequest};
use metadata::LayerKind;

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
}

impl RbdPlugin {
    /// A plugin whose settings start from `flags` (`docker-rbd serve`
    /// flags and config file); dockerd's `Init.Opts` override them.
    pub fn new(flags: RawSettings) -> Self {
        let engine: EngineCell = Arc::default();
        Self {
            flags,
            diff: NaiveDiff::new(Arc::new(EngineFs(engine.clone())), IdMappings::default()),
            engine,
        }
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
