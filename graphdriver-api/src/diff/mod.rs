//! The naive diff layer: Docker's tar rules on top of a driver that can only
//! hand out a directory per layer (moby's `NaiveDiffDriver`).
//!
//! A driver implements [`LayerFs`] (Get/Put of a layer's root directory) and
//! gets `Diff`, `Changes`, `ApplyDiff` and `DiffSize` from [`NaiveDiff`]:
//!
//! - `diff`: Get the layer (and its parent); a parentless layer exports its
//!   whole tree, otherwise the [`changes_dirs`] against the parent, with
//!   whiteouts for deletions ([`export_changes`]). The tar is produced while
//!   the returned stream is read. The parent is Put as soon as the changes
//!   are known (moby does the same: only the layer is read while
//!   streaming); the layer is Put when the stream is dropped.
//! - `changes`: [`changes_dirs`] of the two mounted trees.
//! - `apply_diff`: Get the layer, [`apply_layer`], Put; returns the applied
//!   size.
//! - `diff_size`: [`changes_size`] of the changes.
//!
//! The pure functions work on any two directories and are usable without a
//! [`LayerFs`]. Submodules: [`apply`] (unpacking, with the confinement rules
//! described there), [`changes`], [`export`], [`idmap`] (user-namespace ID
//! maps); `confine` holds the fd-relative primitives, `tarfmt` the tar
//! reader and header encoding.
//!
//! Deliberate differences from moby, each safer or more exact:
//! - Apply refuses a relative name climbing above the root (moby also
//!   refuses, but only after `filepath.Clean`, and lets `..` alone name the
//!   parent of the root); symlinks in parent paths resolve inside the layer
//!   like in moby's chroot, but without a chroot.
//! - Changes compare all xattrs (not only `security.capability`) and symlink
//!   targets; the list is sorted by path.
//! - Export reads with `RESOLVE_NO_SYMLINKS` and fails on an unmappable
//!   owner instead of silently leaving the file out.
//! - No one-second sleep after `Diff` (moby's workaround for tests that diff
//!   twice within a second).
//! - `Put` failures are logged, not returned, as moby ignores them.

pub mod apply;
pub mod changes;

/// How deep a layer's tree may go for the walks that descend it (comparing
/// trees, removing what a whiteout, an opaque directory or a replacing
/// entry of an applied tar removes): they keep one directory open per
/// level, so a tree made deeper than this (a tar can chain entries through
/// in-layer symlinks without limit) gets an error naming it. Far beyond
/// any real image: the kernel resolves paths of at most 4096 bytes, about
/// 2048 levels.
pub const MAX_TREE_DEPTH: usize = 4096;

/// The stack a thread needs to run those walks to [`MAX_TREE_DEPTH`]
/// (the removals recurse, a frame per level; measured in debug builds,
/// whose frames are the larger): the plugin's request threads get it.
/// Reserved, not committed: a thread touches only what its walk uses.
pub const WALK_STACK_SIZE: usize = 16 << 20;
mod confine;
pub mod export;
pub mod idmap;
mod tarfmt;

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tracing::{debug, error};

pub use apply::{ApplyError, apply_layer};
pub use changes::{ChangesError, LayerChange, changes_dirs, changes_size};
pub use export::{ExportError, ExportReader, export_changes, write_changes};
pub use idmap::{IdKind, IdMapError, IdMappings};
pub use tarfmt::TarFormatError;

use crate::driver::DiffStream;
use crate::types::Change;

/// What [`NaiveDiff`] needs from a driver: a mounted root directory per
/// layer, reference-counted.
pub trait LayerFs: Send + Sync + 'static {
    /// The driver's error.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Root directory of the layer, mounted; refcounted with put.
    fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf, Self::Error>;
    /// Releases one [`LayerFs::get`].
    fn put(&self, id: &str) -> Result<(), Self::Error>;
}

/// Which [`LayerFs`] call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOp {
    /// `get`.
    Get,
    /// `put`.
    Put,
}

impl std::fmt::Display for LayerOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LayerOp::Get => "get",
            LayerOp::Put => "put",
        })
    }
}

/// Why a [`NaiveDiff`] operation failed. Every variant names the layer.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// The driver could not get (mount) or put a layer.
    #[error("{op} of layer {id}")]
    Layer {
        /// Which call.
        op: LayerOp,
        /// The layer.
        id: String,
        /// The driver's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Comparing the layer with its parent failed.
    #[error("changes of layer {id} against parent {parent:?}")]
    Changes {
        /// The layer.
        id: String,
        /// Its parent (empty for none).
        parent: String,
        /// The failure.
        #[source]
        source: ChangesError,
    },
    /// Starting the export of the layer failed.
    #[error("diff of layer {id} against parent {parent:?}")]
    Export {
        /// The layer.
        id: String,
        /// Its parent (empty for none).
        parent: String,
        /// The failure.
        #[source]
        source: ExportError,
    },
    /// Applying a tar to the layer failed.
    #[error("applying a layer tar to layer {id}")]
    Apply {
        /// The layer.
        id: String,
        /// The failure.
        #[source]
        source: ApplyError,
    },
}

/// `Diff`, `Changes`, `ApplyDiff` and `DiffSize` for a driver that only
/// mounts layers (moby's `NaiveDiffDriver`).
pub struct NaiveDiff<F: LayerFs> {
    fs: Arc<F>,
    maps: RwLock<IdMappings>,
}

impl<F: LayerFs> std::fmt::Debug for NaiveDiff<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NaiveDiff")
            .field("maps", &self.id_mappings())
            .finish_non_exhaustive()
    }
}

/// A layer held by `get`, released by `put` on drop.
struct Held<F: LayerFs> {
    fs: Arc<F>,
    id: String,
    path: PathBuf,
}

impl<F: LayerFs> Held<F> {
    fn get(fs: &Arc<F>, id: &str) -> Result<Self, DiffError> {
        let path = fs.get(id, "").map_err(|e| DiffError::Layer {
            op: LayerOp::Get,
            id: id.to_string(),
            source: Box::new(e),
        })?;
        Ok(Self {
            fs: Arc::clone(fs),
            id: id.to_string(),
            path,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl<F: LayerFs> Drop for Held<F> {
    fn drop(&mut self) {
        if let Err(e) = self.fs.put(&self.id) {
            error!(layer = %self.id, error = %e, "put of a layer after a diff operation failed");
        }
    }
}

/// The tar stream of `diff`, holding the layer until dropped.
struct DiffReader<F: LayerFs> {
    reader: ExportReader,
    _layer: Held<F>,
}

impl<F: LayerFs> Read for DiffReader<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl<F: LayerFs> NaiveDiff<F> {
    /// Wraps a driver's [`LayerFs`]; `maps` may be replaced later with
    /// [`NaiveDiff::set_id_mappings`] (dockerd sends them in `Init`).
    pub fn new(fs: Arc<F>, maps: IdMappings) -> Self {
        Self {
            fs,
            maps: RwLock::new(maps),
        }
    }

    /// Replaces the UID/GID maps (from `Init`).
    pub fn set_id_mappings(&self, maps: IdMappings) {
        let mut guard = self
            .maps
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard = maps;
    }

    /// The current UID/GID maps.
    pub fn id_mappings(&self) -> IdMappings {
        self.maps
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The wrapped driver.
    pub fn layer_fs(&self) -> &Arc<F> {
        &self.fs
    }

    /// The layer's changes against `parent` as a Docker layer tar (the whole
    /// layer when `parent` is empty), produced as the stream is read.
    pub fn diff(&self, id: &str, parent: &str) -> Result<DiffStream, DiffError> {
        let span = tracing::debug_span!("diff", layer = id, parent);
        let _enter = span.enter();
        let layer = Held::get(&self.fs, id)?;
        let changes = self.changes_of(&layer, parent)?;
        let reader =
            export_changes(layer.path(), &changes, &self.id_mappings()).map_err(|source| {
                DiffError::Export {
                    id: id.to_string(),
                    parent: parent.to_string(),
                    source,
                }
            })?;
        debug!(changes = changes.len(), "diff stream started");
        Ok(Box::new(DiffReader {
            reader,
            _layer: layer,
        }))
    }

    /// The changes `docker diff` prints, sorted by path.
    pub fn changes(&self, id: &str, parent: &str) -> Result<Vec<Change>, DiffError> {
        let span = tracing::debug_span!("changes", layer = id, parent);
        let _enter = span.enter();
        Ok(self
            .layer_changes(id, parent)?
            .iter()
            .map(LayerChange::to_wire)
            .collect())
    }

    /// [`NaiveDiff::changes`] with the paths as raw bytes.
    pub fn layer_changes(&self, id: &str, parent: &str) -> Result<Vec<LayerChange>, DiffError> {
        let layer = Held::get(&self.fs, id)?;
        self.changes_of(&layer, parent)
    }

    /// The changes of a held layer against `parent` (the whole layer when
    /// `parent` is empty). The parent is held only while they are computed.
    fn changes_of(&self, layer: &Held<F>, parent: &str) -> Result<Vec<LayerChange>, DiffError> {
        let parent_held = if parent.is_empty() {
            None
        } else {
            Some(Held::get(&self.fs, parent)?)
        };
        changes_dirs(layer.path(), parent_held.as_ref().map(Held::path)).map_err(|source| {
            DiffError::Changes {
                id: layer.id.clone(),
                parent: parent.to_string(),
                source,
            }
        })
    }

    /// Applies a Docker layer tar to the layer; returns the applied size.
    /// `parent` is informational: the layer already holds its parent's
    /// content.
    pub fn apply_diff(&self, id: &str, parent: &str, tar: &mut dyn Read) -> Result<u64, DiffError> {
        let span = tracing::debug_span!("apply_diff", layer = id, parent);
        let _enter = span.enter();
        let layer = Held::get(&self.fs, id)?;
        let size = apply_layer(layer.path(), tar, &self.id_mappings()).map_err(|source| {
            DiffError::Apply {
                id: id.to_string(),
                source,
            }
        })?;
        debug!(size, "diff applied");
        Ok(size)
    }

    /// Size in bytes of the layer's changes against `parent`.
    pub fn diff_size(&self, id: &str, parent: &str) -> Result<u64, DiffError> {
        let span = tracing::debug_span!("diff_size", layer = id, parent);
        let _enter = span.enter();
        let layer = Held::get(&self.fs, id)?;
        let changes = self.changes_of(&layer, parent)?;
        Ok(changes_size(layer.path(), &changes))
    }
}
