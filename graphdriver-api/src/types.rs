//! Wire types, exactly as dockerd 20.10 encodes and decodes them.
//!
//! dockerd's Go structs use `omitempty`, so any key may be missing, and
//! `Opts`, `UIDMaps` and `GIDMaps` may be `null`. Every request type therefore
//! defaults every field, and reads `null` as the default, as Go's decoder
//! does. Response types always write their field, even when empty (`{"Exists":
//! false}`, `{"Changes":[]}`): Go reads a present zero value exactly as it
//! reads a missing one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One entry of a user-namespace ID map (`--userns-remap`).
///
/// dockerd encodes these in snake_case (`pkg/idtools`), unlike every other
/// field of the protocol; the official documentation is wrong about this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    /// First ID inside the container.
    pub container_id: i64,
    /// First ID on the host that `container_id` maps to.
    pub host_id: i64,
    /// Number of consecutive IDs mapped.
    pub size: i64,
}

/// `/GraphDriver.Init` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct InitRequest {
    /// `<data-root>/<driver name>`; dockerd does not create it.
    #[serde(rename = "Home", deserialize_with = "null_as_default")]
    pub home: String,
    /// `dockerd --storage-opt k=v` values, verbatim.
    #[serde(rename = "Opts", deserialize_with = "null_as_default")]
    pub opts: Vec<String>,
    /// UID map, empty without `--userns-remap`.
    #[serde(rename = "UIDMaps", deserialize_with = "null_as_default")]
    pub uid_maps: Vec<IdMap>,
    /// GID map, empty without `--userns-remap`.
    #[serde(rename = "GIDMaps", deserialize_with = "null_as_default")]
    pub gid_maps: Vec<IdMap>,
}

/// `Create` / `CreateReadWrite` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct CreateRequest {
    /// The new layer's id (64 hex, or `<64 hex>-init`).
    #[serde(rename = "ID", deserialize_with = "null_as_default")]
    pub id: String,
    /// The parent layer's id; empty for a base layer.
    #[serde(rename = "Parent", deserialize_with = "null_as_default")]
    pub parent: String,
    /// SELinux mount label; empty when SELinux is off.
    #[serde(rename = "MountLabel", deserialize_with = "null_as_default")]
    pub mount_label: String,
    /// Per-container `docker run --storage-opt` values (e.g. `size`).
    #[serde(rename = "StorageOpt", deserialize_with = "null_as_default")]
    pub storage_opt: BTreeMap<String, String>,
}

/// Requests that name one layer (`Remove`, `Get`, `Put`, `Exists`,
/// `GetMetadata`) and the diff requests that name a layer and its parent
/// (`Diff`, `Changes`, `DiffSize`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct IdRequest {
    /// The layer's id.
    #[serde(rename = "ID", deserialize_with = "null_as_default")]
    pub id: String,
    /// The parent layer's id, for the diff requests; empty otherwise.
    #[serde(rename = "Parent", deserialize_with = "null_as_default")]
    pub parent: String,
    /// SELinux mount label, sent on `Get`.
    #[serde(rename = "MountLabel", deserialize_with = "null_as_default")]
    pub mount_label: String,
}

/// `ApplyDiff` query string: `?id=<id>&parent=<parent>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ApplyDiffQuery {
    /// The layer the tar is applied to.
    pub id: String,
    /// Its parent; empty for a base layer.
    pub parent: String,
}

/// What kind of change a [`Change`] is, encoded as dockerd's integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChangeKind {
    /// `C` in `docker diff`.
    Modify,
    /// `A` in `docker diff`.
    Add,
    /// `D` in `docker diff`.
    Delete,
}

impl ChangeKind {
    /// dockerd's integer (`pkg/archive/changes.go`).
    pub fn as_wire(self) -> u8 {
        match self {
            ChangeKind::Modify => 0,
            ChangeKind::Add => 1,
            ChangeKind::Delete => 2,
        }
    }

    /// The letter `docker diff` prints.
    pub fn letter(self) -> char {
        match self {
            ChangeKind::Modify => 'C',
            ChangeKind::Add => 'A',
            ChangeKind::Delete => 'D',
        }
    }
}

impl Serialize for ChangeKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.as_wire())
    }
}

impl<'de> Deserialize<'de> for ChangeKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u8::deserialize(d)? {
            0 => Ok(ChangeKind::Modify),
            1 => Ok(ChangeKind::Add),
            2 => Ok(ChangeKind::Delete),
            other => Err(serde::de::Error::custom(format!(
                "change kind {other} is not 0 (modify), 1 (add) or 2 (delete)"
            ))),
        }
    }
}

/// One entry of a `Changes` reply: an absolute path inside the layer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Change {
    /// Absolute path inside the layer, e.g. `/etc/hosts`.
    #[serde(rename = "Path")]
    pub path: String,
    /// What happened to it.
    #[serde(rename = "Kind")]
    pub kind: ChangeKind,
}

/// The driver's capabilities, nested as `{"Capabilities":{...}}` on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Whether `Diff` reproduces the exact tar that `ApplyDiff` received.
    /// Keep this false: dockerd then keeps tar-split data and rebuilds image
    /// layer tars itself through `Get`/`Put`.
    #[serde(rename = "ReproducesExactDiffs")]
    pub reproduces_exact_diffs: bool,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `{"Err": "..."}`: every error reply, with a non-200 status.
///
/// dockerd turns it into `GraphDriver.<Method>: <Err>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ErrorResponse {
    /// What went wrong, including the error's `source()` chain.
    #[serde(rename = "Err")]
    pub err: String,
}

/// The `{}` reply of calls that return nothing (`Init`, `Create`, `Put`, ...).
///
/// dockerd decodes every reply, so an empty body would be an EOF error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmptyResponse {}

/// `/Plugin.Activate` reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ActivateResponse {
    /// The plugin interfaces served; dockerd wants exactly `"GraphDriver"`.
    #[serde(rename = "Implements")]
    pub implements: Vec<String>,
}

impl ActivateResponse {
    /// The reply of a graphdriver plugin: `{"Implements":["GraphDriver"]}`.
    pub fn graph_driver() -> Self {
        ActivateResponse {
            implements: vec!["GraphDriver".to_owned()],
        }
    }
}

/// `/GraphDriver.Get` reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GetResponse {
    /// Absolute host path of the layer's root directory.
    #[serde(rename = "Dir")]
    pub dir: String,
}

/// `/GraphDriver.Exists` reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExistsResponse {
    /// Whether the layer exists.
    #[serde(rename = "Exists")]
    pub exists: bool,
}

/// `/GraphDriver.Status` reply: `{"Status":[["key","value"],...]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusResponse {
    /// Pairs shown by `docker info`, in order.
    #[serde(rename = "Status")]
    pub status: Vec<[String; 2]>,
}

/// `/GraphDriver.GetMetadata` reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MetadataResponse {
    /// Pairs shown as `GraphDriver.Data` by `docker inspect`.
    #[serde(rename = "Metadata")]
    pub metadata: BTreeMap<String, String>,
}

/// `/GraphDriver.Changes` reply; `Kind` is an integer on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChangesResponse {
    /// The changes, as `docker diff` prints them.
    #[serde(rename = "Changes")]
    pub changes: Vec<Change>,
}

/// `/GraphDriver.ApplyDiff` and `/GraphDriver.DiffSize` reply.
///
/// Go decodes it into an `int64`, so the server refuses sizes above
/// `i64::MAX` rather than sending a number dockerd cannot read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SizeResponse {
    /// Size in bytes.
    #[serde(rename = "Size")]
    pub size: i64,
}

/// `/GraphDriver.Capabilities` reply: `{"Capabilities":{...}}`.
///
/// The nesting is what dockerd's code reads; its documentation shows the
/// inner object alone, which dockerd would silently ignore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CapabilitiesResponse {
    /// The driver's capabilities.
    #[serde(rename = "Capabilities")]
    pub capabilities: Capabilities,
}
