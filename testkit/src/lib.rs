//! Test support shared by the crates' integration tests. Never shipped.
//!
//! [`require`] decides whether a test that needs a prerequisite (a Ceph
//! cluster, root, FUSE, loop devices, dockerd) runs, skips, or fails: bare
//! `cargo test` skips with a message; under `scripts/test`, which sets
//! `DOCKER_RBD_TEST_STRICT=1`, a missing prerequisite is a failure.

pub mod ceph;
pub mod require;
