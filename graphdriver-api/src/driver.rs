//! The [`GraphDriver`] trait: what a storage driver implements to be served.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use crate::types::{Capabilities, Change, CreateRequest, InitRequest};

/// A tar stream handed out by [`GraphDriver::diff`].
///
/// The server reads it on a blocking thread and streams it to dockerd. An
/// `Err` from `read` aborts the HTTP response, so dockerd sees a failed
/// transfer rather than a short tar. Dropping the reader releases whatever the
/// driver holds for it (e.g. the `Get` of the layer and its parent).
pub type DiffStream = Box<dyn Read + Send + 'static>;

/// A Docker storage driver.
///
/// Every method may block (Ceph calls, mounts, tar work): the server calls
/// them from a blocking thread pool, never from the async executor.
/// Methods take `&self`; a driver serialises what needs serialising itself.
pub trait GraphDriver: Send + Sync + 'static {
    /// The driver's error. The server answers it as `{"Err": "<Display>"}`
    /// with the whole `source()` chain appended, so make the message name
    /// what was wrong (the id, the option, the Ceph operation).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Once per dockerd start, before any other call but `Plugin.Activate`.
    fn init(&self, req: InitRequest) -> Result<(), Self::Error>;

    /// Creates a read-only (image) layer on `req.parent`. BuildKit still
    /// writes to such a layer through `get` until a child is created on it.
    fn create(&self, req: CreateRequest) -> Result<(), Self::Error>;

    /// Creates a container layer (`<id>-init` or the RW layer).
    fn create_read_write(&self, req: CreateRequest) -> Result<(), Self::Error>;

    /// Removes a layer. Removing an unknown id succeeds.
    fn remove(&self, id: &str) -> Result<(), Self::Error>;

    /// Makes the layer's root directory available and returns its absolute
    /// path: the same path on every call for one id. Reference-counted with
    /// [`GraphDriver::put`].
    fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf, Self::Error>;

    /// Releases one [`GraphDriver::get`].
    fn put(&self, id: &str) -> Result<(), Self::Error>;

    /// Whether the layer exists.
    fn exists(&self, id: &str) -> Result<bool, Self::Error>;

    /// Key/value pairs shown by `docker info`.
    fn status(&self) -> Result<Vec<(String, String)>, Self::Error>;

    /// Key/value pairs shown as `GraphDriver.Data` by `docker inspect`.
    fn get_metadata(&self, id: &str) -> Result<BTreeMap<String, String>, Self::Error>;

    /// dockerd is shutting down.
    fn cleanup(&self) -> Result<(), Self::Error>;

    /// The layer's changes against `parent` as a Docker layer tar (whole
    /// layer when `parent` is empty).
    fn diff(&self, id: &str, parent: &str) -> Result<DiffStream, Self::Error>;

    /// The list `docker diff` prints.
    fn changes(&self, id: &str, parent: &str) -> Result<Vec<Change>, Self::Error>;

    /// Applies a Docker layer tar to the layer; returns the applied size in
    /// bytes. Must never write outside the layer, whatever the tar holds.
    fn apply_diff(&self, id: &str, parent: &str, diff: &mut dyn Read) -> Result<u64, Self::Error>;

    /// Size in bytes of the layer's changes against `parent`.
    fn diff_size(&self, id: &str, parent: &str) -> Result<u64, Self::Error>;

    /// Capabilities reported to dockerd.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
}
