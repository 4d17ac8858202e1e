//! docker-rbd's metadata store: typed, versioned records in RADOS omaps,
//! updated only by compare-and-set.
//!
//! The store is the fleet's source of truth for what layers exist, what
//! state each is in, and which hosts hold them. It knows nothing of Docker's
//! protocol; the driver decides what to record and when.
//!
//! # Object layout
//!
//! All objects live in the driver's pool and RADOS namespace and start with
//! the configured prefix `P` (default `docker-rbd.`):
//!
//! | object | omap key | value | written by |
//! |---|---|---|---|
//! | `P` `layers` | layer id (dockerd's 64 hex, BuildKit's 25 base-36, either optionally `-init`) | [`LayerRecord`] | Create, Remove, sealing, startup recovery |
//! | `P` `hosts` | host id | [`HostRecord`] | each host at start and on every heartbeat |
//! | `P` `host.<id>` | (cls lock `lease`, no omap) | the host's lease: held while it lives | its own daemon, renewed every few seconds |
//! | `P` `docker.layers` | chain id `sha256:<hex>` | [`DockerLayerRecord`] | export, when a host's dockerd has or drops the layer |
//! | `P` `docker.tarsplit.<hex>` | (object data) | the layer's `tar-split.json.gz` | export, before the layer's record names it |
//! | `P` `docker.images` | image id `sha256:<hex>` | [`DockerImageRecord`] | export |
//! | `P` `docker.tags` | reference (`repo:tag`, `repo@digest`) | [`DockerTagRecord`] | export |
//! | `P` `containers` | container id | [`ContainerRecord`] | export; `Get`/`Put` of its read-write layer (state) |
//!
//! The `docker.*` and `containers` tables mirror dockerd's own files (see
//! the driver's `fleet` module): each record lists its `holders`, the hosts
//! whose dockerd has it. A host that drops something removes itself; the
//! record goes with its last holder (a tar-split object after its record).
//!
//! Every value is JSON with a schema version `"v"` ([`SCHEMA_VERSION`]). A
//! reader refuses a value from a newer schema rather than misreading it.
//!
//! # Updates
//!
//! Every write is one atomic RADOS write op holding `create` (idempotent,
//! so the first write makes the object), `omap_cmp` of the key against the
//! exact bytes the writer read (empty for "absent"), and the `omap_set` or
//! `omap_rm_keys`. A concurrent writer makes the compare fail with
//! `ECANCELED` and nothing is written; [`Table::update`] then re-reads and
//! retries. There is no last-writer-wins anywhere.
//!
//! # Creation and deletion order (intent first)
//!
//! A layer is recorded `Creating` **before** its RBD image is cloned, and
//! moved to `Created` after (a container's layer may be recorded `Cloning`
//! instead: answered, its clone made in the background or by its next
//! user). It is marked `Removing` **before** its image is
//! removed, and its key is deleted after. A crash between the two steps
//! leaves a record whose state says what was in flight, so a restarted
//! daemon (or `docker-rbd fsck`) rolls it forward or back; an image without
//! a record, or a record without an image, is never ambiguous.

mod record;
mod table;

pub use record::{
    Blob, ContainerRecord, ContainerState, DockerImageRecord, DockerLayerRecord, DockerTagRecord,
    HostRecord, InitContent, LayerKind, LayerRecord, LayerState,
};
pub use table::{Record, Table, Versioned};

use std::sync::Arc;

use ceph_client::IoCtx;

/// Schema version written into every value.
pub const SCHEMA_VERSION: u32 = 1;

/// Why a metadata operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A RADOS operation failed.
    #[error("metadata {op} of {object}/{key}")]
    Rados {
        /// What was attempted.
        op: &'static str,
        /// The RADOS object.
        object: String,
        /// The omap key (empty for whole-object operations).
        key: String,
        /// The Ceph error.
        #[source]
        source: Box<ceph_client::Error>,
    },
    /// The record changed since it was read (compare-and-set lost).
    #[error("metadata {object}/{key} changed concurrently")]
    Conflict {
        /// The RADOS object.
        object: String,
        /// The omap key.
        key: String,
    },
    /// A create found the key already present.
    #[error("metadata {object}/{key} already exists")]
    Exists {
        /// The RADOS object.
        object: String,
        /// The omap key.
        key: String,
    },
    /// A value does not decode.
    #[error("metadata {object}/{key} holds an unreadable value")]
    Decode {
        /// The RADOS object.
        object: String,
        /// The omap key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A value was written by a newer docker-rbd.
    #[error(
        "metadata {object}/{key} has schema version {found}, newer than this docker-rbd's {SCHEMA_VERSION}"
    )]
    FutureSchema {
        /// The RADOS object.
        object: String,
        /// The omap key.
        key: String,
        /// The version found.
        found: u32,
    },
    /// A compare-and-set update kept losing to concurrent writers.
    #[error("metadata {object}/{key}: gave up after {attempts} concurrent updates")]
    Contended {
        /// The RADOS object.
        object: String,
        /// The omap key.
        key: String,
        /// How many attempts were made.
        attempts: u32,
    },
}

/// Result of the metadata store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The store: tables in one pool and namespace, under one prefix.
#[derive(Clone)]
pub struct Store {
    ioctx: Arc<IoCtx>,
    prefix: String,
}

impl Store {
    /// A store over `ioctx` (pool and namespace already chosen) with object
    /// names starting with `prefix`.
    pub fn new(ioctx: Arc<IoCtx>, prefix: &str) -> Self {
        Self {
            ioctx,
            prefix: prefix.to_string(),
        }
    }

    /// The layer table (`<prefix>layers`).
    pub fn layers(&self) -> Table<LayerRecord> {
        Table::new(self.ioctx.clone(), format!("{}layers", self.prefix))
    }

    /// The host table (`<prefix>hosts`).
    pub fn hosts(&self) -> Table<HostRecord> {
        Table::new(self.ioctx.clone(), format!("{}hosts", self.prefix))
    }

    /// dockerd's layer store entries (`<prefix>docker.layers`).
    pub fn docker_layers(&self) -> Table<DockerLayerRecord> {
        Table::new(self.ioctx.clone(), format!("{}docker.layers", self.prefix))
    }

    /// dockerd's images (`<prefix>docker.images`).
    pub fn docker_images(&self) -> Table<DockerImageRecord> {
        Table::new(self.ioctx.clone(), format!("{}docker.images", self.prefix))
    }

    /// dockerd's image references (`<prefix>docker.tags`).
    pub fn docker_tags(&self) -> Table<DockerTagRecord> {
        Table::new(self.ioctx.clone(), format!("{}docker.tags", self.prefix))
    }

    /// The fleet's containers (`<prefix>containers`).
    pub fn containers(&self) -> Table<ContainerRecord> {
        Table::new(self.ioctx.clone(), format!("{}containers", self.prefix))
    }

    /// Name of the object holding the tar-split of layer `chain_hex`.
    pub fn tar_split_object(&self, chain_hex: &str) -> String {
        format!("{}docker.tarsplit.{chain_hex}", self.prefix)
    }

    /// The I/O context.
    pub fn ioctx(&self) -> &Arc<IoCtx> {
        &self.ioctx
    }

    /// The prefix of every object name.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}
