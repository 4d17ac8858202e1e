//! Safe Rust over librados and librbd, Ceph's C client libraries.
//!
//! What it is: RAII handles and plain Rust types over the C APIs of
//! librados (`librados.so.2`) and librbd (`librbd.so.1`), written against
//! the Ceph 16.2 "Pacific" headers with this crate's own `extern "C"`
//! declarations ([`ffi`]); no bindgen, no C++ API.
//!
//! - [`Rados`]: a cluster connection, configured like the `rbd` tool
//!   (conf, id, keyring, cluster name, options) with a bounded connect
//!   ([`ConnectConfig::timeout`]); monitor commands, blocklisting, this
//!   client's id and address for fencing; a pool's full flags
//!   ([`PoolFlags`]).
//! - [`IoCtx`]: a pool and RADOS namespace. Whole-object I/O, omap reads,
//!   atomic compound writes ([`WriteOp`]: create, asserts, omap
//!   compare-and-set), cls advisory locks with leases, watch/notify
//!   ([`Watch`]). [`Rados::ioctx_full_try`] makes writes to a full pool
//!   fail at once (`ENOSPC`, `EDQUOT`) instead of waiting for space.
//! - [`rbd`]: image create, clone (always clone format 2), list, remove; an
//!   open [`rbd::Image`] for I/O, snapshots, parent and children, flatten,
//!   the managed exclusive lock, per-image metadata and diffs.
//!
//! Every failure is an [`Error`] naming the C call, what it acted on and the
//! errno (`rbd_clone3 on image "x": No such file or directory (errno 2)`),
//! with helpers for the errnos callers branch on ([`Error::is_not_found`],
//! [`Error::is_exists`], [`Error::is_busy`], [`Error::is_canceled`],
//! [`Error::is_timed_out`], [`Error::is_pool_full`]).
//!
//! Lifetimes: every [`IoCtx`], [`rbd::Image`] and [`Watch`] keeps the
//! cluster connection alive, so no handle can outlive `rados_shutdown`.
//! Handles are `Send + Sync`: librados and librbd allow concurrent use.
//!
//! Blocking: every call blocks the calling thread until Ceph answers (at
//! most the connection's timeout for monitor and OSD operations). From async
//! code, call them on a blocking thread (e.g. `tokio::task::spawn_blocking`).
//!
//! Boundaries: this crate knows nothing about Docker, layers, or the
//! records other crates store; it only wraps Ceph. It covers the calls the
//! rest of the workspace needs, not all of librados/librbd (no aio, no
//! pool management, no object listing, no mirroring).
//!
//! Requires the Ceph client libraries at build and run time
//! (`librados-dev`, `librbd-dev` on Debian).

pub mod error;
pub mod ffi;
mod ioctx;
mod pool;
mod rados;
pub mod rbd;
mod util;
mod watch;
mod write_op;

pub use error::{Error, Result, Target};
pub use ioctx::{IoCtx, LockFlags, Locker, Lockers, OmapPage};
pub use pool::PoolFlags;
pub use rados::{ConnectConfig, Rados, librados_version};
pub use watch::{Watch, WatchCallback};
pub use write_op::{CmpOp, WriteOp};
