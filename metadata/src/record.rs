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
}

/// Where a layer is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerState {
    /// Recorded; its image is being cloned (or the clone was interrupted).
    Creating,
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
}

impl Record for HostRecord {}
