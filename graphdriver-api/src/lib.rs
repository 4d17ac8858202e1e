//! Docker's graphdriver plugin protocol, as dockerd 20.10 to 26 speaks it.
//!
//! This crate owns the wire types ([`types`]), the [`GraphDriver`] trait a
//! storage driver implements, the HTTP server on a unix socket ([`server`]),
//! and the naive diff layer ([`diff`]) that gives a driver which can only
//! hand out a directory per layer Docker's `Diff`, `Changes`, `ApplyDiff` and
//! `DiffSize`.
//!
//! Boundaries: it knows nothing of Ceph, RBD or any particular storage; the
//! RBD driver lives in the `docker-rbd` binary crate and uses this crate
//! unchanged.

pub mod diff;
pub mod driver;
pub mod server;
pub mod types;

pub use diff::{DiffError, IdMappings, LayerFs, NaiveDiff};
pub use driver::{DiffStream, GraphDriver};
pub use server::{ServerConfig, ServerError, SocketGroup, router, serve, shutdown_signal};
pub use types::{Capabilities, Change, ChangeKind, CreateRequest, IdMap, InitRequest};
