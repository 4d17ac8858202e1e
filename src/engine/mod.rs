//! The layer engine: layers as RBD clones, mapped and mounted on this host.
//!
//! The engine is the storage logic behind the graphdriver plugin, and knows
//! nothing of Docker's protocol (a containerd snapshotter front end can use
//! it unchanged). It owns:
//!
//! - **layers** ([`layers`]): each layer is an RBD image, a format-2 clone of
//!   its parent's single `sealed` snapshot (taken when the parent gets its
//!   first child), or of the base image for parentless layers. Every change
//!   is recorded in the metadata store *before* the Ceph side effect
//!   (`Creating`, `Removing`) and confirmed after, so a crash leaves a record
//!   that says what was in flight.
//! - **deferred removal** ([`purge`]): `retire` records a removal and
//!   returns; a background thread purges the snapshot, image and record.
//! - **the base image** ([`base`]): one formatted filesystem per pool,
//!   namespace, filesystem and size, made once under a RADOS lock.
//! - **mounts** ([`mounts`]): `get`/`put` map the image with the configured
//!   mapper, mount it at `<mount dir>/<id>` (outside the Home) and hand out
//!   its `rootfs` subdirectory, reference-counted; the local state file records each step
//!   so a restarted daemon adopts live mounts and clears stale ones
//!   ([`Engine::recover`]).
//! - **pool space** ([`space`]): requests that would write to a full pool
//!   are refused at once.
//! - **init layers** (`init`) and **container layers at create**
//!   (`staged`): a container's init layer is a record served by a shared
//!   sealed init layer, and dockerd's create-time `Get` of the container's
//!   own layer is an overlay over that layer's mount: starting a container
//!   costs one clone, no snapshot, and one mapping.
//!
//! Concurrency: every operation on a layer holds that layer's lock within
//! this daemon (`locks`); an operation touching a layer and its parent
//! takes both at once, so two operations never wait on each other in a
//! cycle. Across hosts, the metadata store's compare-and-set and the base
//! image's RADOS lock serialise what must be serialised.

pub mod base;
mod deferred;
pub mod fsck;
mod init;
pub mod layers;
pub mod lease;
mod locks;
pub mod mounts;
pub mod purge;
pub mod reaper;
pub mod space;
mod staged;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ceph_client::{ConnectConfig, IoCtx, Rados};

use crate::config::Settings;
use crate::localstate::{LocalState, StateError};
use crate::mapper::fuse::HelperCommand;
use crate::mapper::{self, Mapper, MapperConfig};
use crate::names::{InvalidLayerId, LayerId};

pub use layers::{CreateOptions, LayerInfo, Purge};
pub use locks::LayerLocks;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A layer id that Docker could not have made.
    #[error(transparent)]
    InvalidId(#[from] InvalidLayerId),
    /// The cluster could not be reached.
    #[error("cannot connect to the Ceph cluster (pool {pool:?})")]
    Connect {
        /// The pool asked for.
        pool: String,
        /// Why.
        #[source]
        source: Box<ceph_client::Error>,
    },
    /// A Ceph operation on a layer failed.
    #[error("{op} of layer {layer} failed")]
    Ceph {
        /// What was attempted.
        op: &'static str,
        /// The layer (or image) concerned.
        layer: String,
        /// The Ceph error.
        #[source]
        source: Box<ceph_client::Error>,
    },
    /// The metadata store failed.
    #[error(transparent)]
    Metadata(#[from] metadata::Error),
    /// The local state file failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Mapping or unmapping a device failed.
    #[error("{op} of layer {layer} failed")]
    Mapper {
        /// What was attempted.
        op: &'static str,
        /// The layer.
        layer: String,
        /// The mapper's error.
        #[source]
        source: Box<mapper::Error>,
    },
    /// A filesystem operation failed.
    #[error("{op} of layer {layer} failed")]
    Fs {
        /// What was attempted.
        op: &'static str,
        /// The layer.
        layer: String,
        /// The filesystem error.
        #[source]
        source: Box<crate::fs::FsError>,
    },
    /// A local I/O operation failed.
    #[error("{op} {path} failed")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The fleet's RBD namespace does not exist (and was not to be made).
    #[error("no RBD namespace {namespace:?} in pool {pool:?}: no fleet there")]
    NoNamespace {
        /// The pool.
        pool: String,
        /// The namespace asked for.
        namespace: String,
    },
    /// The layer does not exist.
    #[error("layer {layer} does not exist")]
    NotFound {
        /// The layer.
        layer: String,
    },
    /// The request conflicts with the layer's state.
    #[error("layer {layer}: {reason}")]
    Conflict {
        /// The layer.
        layer: String,
        /// What conflicts.
        reason: String,
    },
    /// Another live daemon holds this host id's lease.
    #[error(
        "host id {host:?} is in use by another live docker-rbd (client {holder}, host name {hostname:?}, home {home:?}): give each host its own rbd.hostid"
    )]
    HostConflict {
        /// The host id.
        host: String,
        /// The RADOS address of the daemon holding it.
        holder: String,
        /// The host name that daemon recorded.
        hostname: String,
        /// The Home that daemon recorded.
        home: String,
    },
    /// The pool is full: Ceph refuses writes to it.
    #[error("pool {pool:?} is full: {cause}")]
    PoolFull {
        /// The pool.
        pool: String,
        /// Why it is full.
        cause: space::FullCause,
    },
    /// A per-container storage option is wrong.
    #[error("invalid storage option {key}={value:?}: {reason}")]
    StorageOpt {
        /// The option.
        key: String,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result of the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

pub(crate) fn ceph(
    op: &'static str,
    layer: impl ToString,
) -> impl FnOnce(ceph_client::Error) -> EngineError {
    let layer = layer.to_string();
    move |source| EngineError::Ceph {
        op,
        layer,
        source: Box::new(source),
    }
}

pub(crate) fn mapper_err(
    op: &'static str,
    layer: impl ToString,
) -> impl FnOnce(mapper::Error) -> EngineError {
    let layer = layer.to_string();
    move |source| EngineError::Mapper {
        op,
        layer,
        source: Box::new(source),
    }
}

pub(crate) fn fs_err(
    op: &'static str,
    layer: impl ToString,
) -> impl FnOnce(crate::fs::FsError) -> EngineError {
    let layer = layer.to_string();
    move |source| EngineError::Fs {
        op,
        layer,
        source: Box::new(source),
    }
}

fn connect_err(pool: &str) -> impl FnOnce(ceph_client::Error) -> EngineError {
    let pool = pool.to_string();
    move |source| EngineError::Connect {
        pool,
        source: Box::new(source),
    }
}

pub(crate) fn io<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> EngineError + 'a {
    move |source| EngineError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Seconds one OSD operation may take before it fails with `ETIMEDOUT`.
const OSD_OP_TIMEOUT_SECS: u64 = 120;

/// The engine of one host: one pool and namespace, one Home.
pub struct Engine {
    settings: Settings,
    home: PathBuf,
    mount_dir: PathBuf,
    host_id: String,
    rados: Rados,
    ioctx: Arc<IoCtx>,
    store: metadata::Store,
    mapper: Mapper,
    runner: Arc<dyn mapper::runner::CommandRunner>,
    local: LocalState,
    locks: LayerLocks,
    lease: Option<lease::HostLease>,
    space: space::SpaceCache,
    fresh: staged::FreshLayers,
    clones: deferred::Clones,
}

impl Engine {
    /// Connects to the cluster, opens the local state under `home`, picks
    /// the mapper, and recovers what a previous daemon left.
    pub fn open(settings: Settings, home: &Path) -> Result<Self> {
        Self::open_with(settings, home, HelperCommand::locate())
    }

    /// [`Engine::open`] with an explicit FUSE server program for the fuse
    /// mapper (the default is found next to the running executable).
    pub fn open_with(settings: Settings, home: &Path, fuse_helper: HelperCommand) -> Result<Self> {
        std::fs::create_dir_all(home).map_err(io("create", home))?;
        let (rados, ioctx) = connect(&settings)?;
        keep_trash_object(&ioctx);
        let store = metadata::Store::new(ioctx.clone(), settings.naming.metadata_prefix());
        let mut mapper_config = MapperConfig::new(settings.ceph.clone());
        mapper_config.fuse.run_dir = home.join("fuse");
        mapper_config.fuse.helper = fuse_helper;
        let runner = mapper_config.runner.clone();
        let mapper = Mapper::probe(settings.mapper, &mapper_config)
            .map_err(mapper_err("choosing the block-device mapper", ""))?;
        let local = LocalState::open(&home.join("state.redb"))?;
        let host_id = host_id_of(&settings);
        let client_addr = rados.client_addr().unwrap_or_default();
        let lease = lease::HostLease::acquire(lease::LeaseRequest {
            store: &store,
            host: &host_id,
            home,
            duration: settings.lease_duration,
            renew: settings.lease_renew,
            client_addr,
            rados: &rados,
        })?;
        let mount_dir = settings.mount_dir(home);
        std::fs::create_dir_all(&mount_dir).map_err(io("create", &mount_dir))?;
        let engine = Self {
            settings,
            home: home.to_path_buf(),
            mount_dir,
            host_id,
            rados,
            ioctx,
            store,
            mapper,
            runner,
            local,
            locks: LayerLocks::default(),
            lease: Some(lease),
            space: space::SpaceCache::default(),
            fresh: staged::FreshLayers::default(),
            clones: deferred::Clones::default(),
        };
        engine.recover();
        Ok(engine)
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// This host's id in the fleet (`rbd.hostid`, else from
    /// `/etc/machine-id`).
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// The driver's Home.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Where layers are mounted ([`Settings::mount_dir`]).
    pub fn mount_dir(&self) -> &Path {
        &self.mount_dir
    }

    /// The mapper in use.
    pub fn mapper(&self) -> &Mapper {
        &self.mapper
    }

    /// The metadata store.
    pub fn store(&self) -> &metadata::Store {
        &self.store
    }

    /// The cluster handle.
    pub fn rados(&self) -> &Rados {
        &self.rados
    }

    /// Whether host `host` holds its lease (is alive).
    pub fn host_is_live(&self, host: &str) -> Result<bool> {
        if host == self.host_id {
            return Ok(true);
        }
        lease::host_is_live(&self.ioctx, self.store.prefix(), host)
    }

    /// Whether this host's last lease renewal failed.
    pub fn lease_lost(&self) -> bool {
        self.lease.as_ref().is_some_and(lease::HostLease::is_lost)
    }

    /// Startup recovery: adopt or clean up local mounts, then finish or
    /// roll back layer changes this host left in flight. Problems are
    /// logged, never fatal: a layer that cannot be recovered stays as it is
    /// for `docker-rbd fsck` to report.
    pub fn recover(&self) {
        self.recover_mounts();
        self.recover_staged();
        self.recover_layers();
    }

    fn parse(id: &str) -> Result<LayerId> {
        Ok(LayerId::parse(id)?)
    }
}

/// Connects to the cluster of `settings` and opens its pool and namespace
/// (registering the namespace with RBD if this is the fleet's first
/// host), within `rbd.connecttimeout`.
pub fn connect(settings: &Settings) -> Result<(Rados, Arc<IoCtx>)> {
    connect_with(settings, Vec::new(), true)
}

/// [`connect`] with further librados options (e.g. `mon_host` from the
/// command line), applied after the conf file; an unregistered namespace
/// is registered if `register`, else `NotFound`.
pub fn connect_with(
    settings: &Settings,
    extra: Vec<(String, String)>,
    register: bool,
) -> Result<(Rados, Arc<IoCtx>)> {
    let mut options = vec![(
        "rados_osd_op_timeout".to_string(),
        OSD_OP_TIMEOUT_SECS.to_string(),
    )];
    options.extend(extra);
    let rados = Rados::connect(&ConnectConfig {
        conf: settings.ceph.conf.clone(),
        id: settings.ceph.id.clone(),
        keyring: settings.ceph.keyring.clone(),
        cluster: settings.ceph.cluster.clone(),
        // The connect timeout bounds reaching the cluster; single OSD
        // operations (a flatten is many) get longer before failing.
        options,
        timeout: settings.connect_timeout,
    })
    .map_err(connect_err(&settings.pool))?;
    let namespace = (!settings.namespace.is_empty()).then_some(settings.namespace.as_str());
    if let Some(ns) = namespace {
        if register {
            ensure_namespace(&rados, &settings.pool, ns)?;
        } else {
            let pool_ctx = rados
                .ioctx(&settings.pool, None)
                .map_err(connect_err(&settings.pool))?;
            if !ceph_client::rbd::namespace_exists(&pool_ctx, ns)
                .map_err(ceph("namespace lookup", ns))?
            {
                return Err(EngineError::NoNamespace {
                    pool: settings.pool.clone(),
                    namespace: ns.to_string(),
                });
            }
        }
    }
    let ioctx = Arc::new(
        rados
            .ioctx_full_try(&settings.pool, namespace)
            .map_err(connect_err(&settings.pool))?,
    );
    Ok((rados, ioctx))
}

/// librbd removes an image by moving it to the trash first: a key added to
/// the `rbd_trash` object, which librbd makes on the first removal. On a
/// full pool making an object is refused while adding a key is not (the
/// OSDs refuse only writes that add bytes or objects), so with the object
/// made beforehand layers can still be removed, freeing space, when the
/// pool is full.
fn keep_trash_object(ioctx: &IoCtx) {
    if let Err(e) = ioctx.operate("rbd_trash", ceph_client::WriteOp::new().create(false)) {
        tracing::warn!(error = %e, "cannot make the rbd_trash object: removals will wait for room while the pool is full");
    }
}

/// RBD keeps images of a RADOS namespace only once the namespace is
/// registered in the pool (`rbd namespace create`); the first daemon of a
/// fleet registers it.
fn ensure_namespace(rados: &Rados, pool: &str, namespace: &str) -> Result<()> {
    let pool_ctx = rados.ioctx(pool, None).map_err(connect_err(pool))?;
    if ceph_client::rbd::namespace_exists(&pool_ctx, namespace)
        .map_err(ceph("namespace lookup", namespace))?
    {
        return Ok(());
    }
    match ceph_client::rbd::namespace_create(&pool_ctx, namespace) {
        Ok(()) => {
            tracing::info!(pool, namespace, "registered the RBD namespace");
            Ok(())
        }
        Err(e) if e.is_exists() => Ok(()),
        Err(e) => Err(ceph("namespace create", namespace)(e)),
    }
}

/// This host's id: `rbd.hostid`, else `/etc/machine-id`, else the host
/// name ([`crate::names::default_host_id`]).
pub fn host_id_of(settings: &Settings) -> String {
    if let Some(id) = &settings.host_id {
        return id.clone();
    }
    let machine_id = std::fs::read_to_string("/etc/machine-id").ok();
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    crate::names::default_host_id(machine_id.as_deref(), &hostname)
}

impl Drop for Engine {
    /// Stops renewing the lease. It is released at once only when no layer
    /// is mounted here: a container still running on a mounted layer
    /// (live-restore, a plugin restart) must not look abandoned to other
    /// hosts while the lease would still run.
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            let idle = self.mounts().is_ok_and(|m| m.is_empty());
            lease.stop(idle);
        }
    }
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
