//! Test support shared by the crates' integration tests. Never shipped.
//!
//! - [`require`] decides whether a test that needs a prerequisite (a Ceph
//!   cluster, root, FUSE, loop devices, dockerd) runs, skips, or fails: bare
//!   `cargo test` skips with a message; under `scripts/test`, which sets
//!   `DOCKER_RBD_TEST_STRICT=1`, a missing prerequisite is a failure.
//! - [`ceph`]: where the test cluster is; a private cluster for a test
//!   that fills it up ([`ceph::PrivateCluster`]).
//! - [`dockerd`]: a private dockerd per test ([`dockerd::Dockerd`]).
//! - [`host`]: a private mount namespace standing for one machine
//!   ([`host::Host`]), so one test can run several dockerds side by side.
//! - [`driver`]: cleaning up what the RBD driver left under its Home and
//!   in a test's RADOS namespace.
//! - [`fleet`]: several hosts ([`host::Host`], each with its own
//!   `docker-rbd serve` and dockerd) sharing one RADOS namespace, for the
//!   tests that move containers between hosts.
//! - [`images`]: image tarballs without a registry (`docker import` rootfs,
//!   `docker save`-format multi-layer images with Docker's special entries).
//! - [`daemon`]: a background daemon (a plugin server) started by a test,
//!   ready when its socket answers, stopped by pid on drop.
//! - [`scratch`]: scratch directories tagged with their owning test process,
//!   and [`sweep_orphans`], which cleans up after killed test processes.
//! - [`bench`], [`plot`]: what the benchmarks share (timing summaries,
//!   PNG charts).
//! - [`process`], [`mounts`], [`sha256`]: the pieces those are built from.

pub mod bench;
pub mod ceph;
pub mod daemon;
pub mod dockerd;
pub mod driver;
pub mod fleet;
pub mod host;
pub mod images;
pub mod mounts;
pub mod plot;
pub mod process;
pub mod require;
pub mod scratch;
pub mod sha256;

pub use scratch::{scratch_dir, scratch_root, sweep_orphans};

use std::sync::atomic::{AtomicU32, Ordering};

/// A short name no other test (of this or another process) uses:
/// `prefix` followed by lower-case hex. Use it for graphdriver plugin
/// names (`-s <name>`, `/run/docker/plugins/<name>.sock`), image tags and
/// container names.
pub fn unique_name(prefix: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!(
        "{prefix}{:x}t{seq:x}n{:04x}",
        std::process::id(),
        nanos & 0xffff
    )
}
