//! The record types, schema version 1.
//!
//! These are storage types: change a field only together with a
//! [`crate::SCHEMA_VERSION`] bump and a reader for the old shape.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::table::Record;

/// What a layer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// An image layer (`Create`): read-only once sealed.
    Image,
    /// A container's `-init` layer.
    Init,
    /// A container's read-write layer.
    ReadWrite,
    /// The files dockerd writes into a container's init layer, over one
    /// image layer (its parent), shared by every container whose init layer
    /// holds exactly the same: those containers' read-write layers are
    /// clones of its snapshot. Kept while its parent is, so that starting a
    /// container costs no snapshot.
    SharedInit,
}

/// Where an init layer's files are (a container's `-init` layer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitContent {
    /// Not written yet, and no image made: its first `Get` is an overlay
    /// over its parent, and the `Put` after it checks what dockerd wrote
    /// and serves the layer from a shared init layer (or makes it an image
    /// of its own).
    Pending,
    /// In shared init layer `layer`, whose image [`LayerRecord::image`]
    /// names: the layer has no image of its own.
    Shared {
        /// The shared init layer's id.
        layer: String,
    },
}

/// Where a layer is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerState {
    /// Recorded; its image is being cloned (or the clone was interrupted).
    Creating,
    /// Made, as far as dockerd knows, and its image is being cloned in the
    /// background (or the clone was interrupted): whoever needs the image
    /// next waits for the clone or makes it. Only a container's read-write
    /// layer over a shared init layer's files is made this way.
    Cloning,
    /// Its image exists and is usable.
    Created,
    /// Docker removed it, but clones of its snapshot still exist; its image
    /// is removed when the last child goes.
    Retired,
    /// Its image is being removed (or the removal was interrupted).
    Removing,
}

/// One layer (`<prefix>layers`, key = layer id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Parent layer id; `None` for a layer cloned from the base image.
    pub parent: Option<String>,
    /// RBD image name.
    pub image: String,
    /// What it is for.
    pub kind: LayerKind,
    /// Life-cycle state.
    pub state: LayerState,
    /// Ancestors between this layer and the image it was last flattened
    /// from or cloned from the base (0 for a flattened or parentless layer).
    pub depth: u32,
    /// Image size in bytes.
    pub size: u64,
    /// Project quota limit in bytes (xfs layers with `size=` below the
    /// base size); mounts of the layer enforce it.
    #[serde(default)]
    pub quota: Option<u64>,
    /// Whether the layer has its `sealed` snapshot (it has or had children).
    pub sealed: bool,
    /// Hosts whose dockerd holds this layer. The image goes only when no
    /// host holds it and no clone depends on it.
    pub holders: BTreeSet<String>,
    /// Host that created it.
    pub created_by: String,
    /// Creation time, seconds since the epoch.
    pub created_at: u64,
    /// For a container's init layer without an image of its own: where its
    /// files are. `None` for every layer with its own image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitContent>,
}

impl LayerRecord {
    /// Whether the layer's image is its own (a shared or pending init
    /// layer has none: removing the layer removes only its record).
    pub fn owns_image(&self) -> bool {
        self.init.is_none()
    }

    /// The shared init layer serving this one, if any.
    pub fn shared_init(&self) -> Option<&str> {
        match &self.init {
            Some(InitContent::Shared { layer }) => Some(layer),
            _ => None,
        }
    }
}

impl Record for LayerRecord {}

/// One host of the fleet (`<prefix>hosts`, key = host id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Host name, for humans.
    pub hostname: String,
    /// docker-rbd version it runs.
    pub version: String,
    /// Last heartbeat, seconds since the epoch.
    pub heartbeat: u64,
    /// RADOS client address (for fencing a dead host).
    pub client_addr: String,
    /// The driver's Home on that host (`<dockerd root>/<driver name>`).
    #[serde(default)]
    pub home: String,
    /// Length of its lease in seconds.
    #[serde(default)]
    pub lease_secs: u64,
    /// When its daemon started, seconds since the epoch.
    #[serde(default)]
    pub started: u64,
}

impl Record for HostRecord {}

/// One entry of dockerd's layer store (`<prefix>docker.layers`, key = the
/// chain id, `sha256:<hex>`): the files of `layerdb/sha256/<hex>/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerLayerRecord {
    /// `diff`: the layer's diff id.
    pub diff_id: String,
    /// `size`: bytes of the layer's own changes.
    pub size: u64,
    /// `cache-id`: the driver's layer id.
    pub cache_id: String,
    /// `parent`: the parent's chain id; `None` for a base layer.
    pub parent: Option<String>,
    /// `descriptor.json`, for layers pulled from a registry with one.
    pub descriptor: Option<String>,
    /// `tar-split.json.gz`, kept in an object of its own.
    pub tar_split: Option<Blob>,
    /// Hosts whose dockerd has the layer.
    pub holders: BTreeSet<String>,
}

impl Record for DockerLayerRecord {}

/// A blob kept in a RADOS object of its own, with what a reader checks
/// it against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    /// The object's name.
    pub object: String,
    /// Its length in bytes.
    pub size: u64,
    /// SHA-256 of its bytes, lowercase hex.
    pub sha256: String,
}

/// One image of dockerd's image store (`<prefix>docker.images`, key = the
/// image id, `sha256:<hex>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerImageRecord {
    /// `imagedb/content/sha256/<hex>`: the image config, byte for byte
    /// (its SHA-256 is the image id).
    pub config: String,
    /// `imagedb/metadata/sha256/<hex>/parent`.
    pub parent: Option<String>,
    /// `imagedb/metadata/sha256/<hex>/lastUpdated`.
    pub last_updated: Option<String>,
    /// Hosts whose dockerd has the image.
    pub holders: BTreeSet<String>,
}

impl Record for DockerImageRecord {}

/// One reference of `repositories.json` (`<prefix>docker.tags`, key =
/// the reference, e.g. `busybox:latest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerTagRecord {
    /// The repository it is listed under (`busybox`).
    pub repository: String,
    /// The image id it names.
    pub image: String,
    /// Hosts whose dockerd has the reference.
    pub holders: BTreeSet<String>,
}

impl Record for DockerTagRecord {}

/// Whether a container runs, as far as the fleet knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerState {
    /// Its read-write layer is in use on [`ContainerRecord::active_on`].
    Running,
    /// Not running anywhere.
    Stopped,
}

/// One container (`<prefix>containers`, key = the container id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Its name, as dockerd writes it (`/name`).
    pub name: String,
    /// `containers/<id>/config.v2.json` as the exporting host wrote it.
    pub config: String,
    /// `containers/<id>/hostconfig.json`.
    pub hostconfig: Option<String>,
    /// `layerdb/mounts/<id>/mount-id`: its read-write layer.
    pub mount_id: String,
    /// `layerdb/mounts/<id>/init-id`.
    pub init_id: Option<String>,
    /// `layerdb/mounts/<id>/parent`: the chain id of its image's top layer.
    pub parent: Option<String>,
    /// Running or stopped.
    pub state: ContainerState,
    /// The host its read-write layer is in use on (`Running`).
    pub active_on: Option<String>,
    /// The host that started it last.
    pub ran_on: String,
    /// `State.StartedAt` of the config, as written.
    pub started_at: String,
    /// The dockerd root of the host that exported `config` (the paths in it
    /// start with it).
    pub docker_root: String,
    /// The host that exported `config`.
    pub exported_by: String,
    /// Bumped by every change; a host knows which generation it has.
    pub generation: u64,
    /// Hosts whose dockerd has the container.
    pub holders: BTreeSet<String>,
    /// Last change, seconds since the epoch.
    pub updated_at: u64,
}

impl Record for ContainerRecord {}
