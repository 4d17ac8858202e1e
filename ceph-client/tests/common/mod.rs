//! Shared helpers of the ceph-client integration tests: connecting to the
//! test cluster, a private RADOS namespace per test, and guards that remove
//! what a test created even when it fails.

#![allow(dead_code)]

use std::time::Duration;

use ceph_client::rbd::{self, Image, SnapNamespace};
use ceph_client::{ConnectConfig, IoCtx, Rados};
use testkit::ceph::CephEnv;

/// A test's view of the cluster: one connection and an ioctx on a fresh
/// namespace of the test pool.
pub struct Ctx {
    pub env: CephEnv,
    pub rados: Rados,
    pub io: IoCtx,
    pub namespace: String,
}

pub fn config(env: &CephEnv) -> ConnectConfig {
    ConnectConfig {
        conf: Some(env.conf.clone()),
        id: Some(env.id.clone()),
        keyring: Some(env.keyring.clone()),
        timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

/// `None` when the test must skip (no cluster, bare `cargo test`).
pub fn setup(test: &str) -> Option<Ctx> {
    let env = testkit::ceph::require(test)?;
    let rados = Rados::connect(&config(&env)).expect("connect to the test cluster");
    let namespace = testkit::ceph::unique_namespace(test);
    let io = rados.ioctx(&env.pool, Some(&namespace)).expect("ioctx");
    // librbd only creates images in namespaces it knows.
    rbd::namespace_create(&io, &namespace).expect("create the test's rbd namespace");
    Some(Ctx {
        env,
        rados,
        io,
        namespace,
    })
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // Runs after the test's own guards (the context is created first),
        // so the namespace is empty unless a cleanup failed.
        if let Err(e) = rbd::namespace_remove(&self.io, &self.namespace) {
            eprintln!("cleanup: {e}");
        }
    }
}

impl Ctx {
    /// A second, independent client (its own session and client id).
    pub fn second_client(&self) -> (Rados, IoCtx) {
        let rados = Rados::connect(&config(&self.env)).expect("second connection");
        let io = rados
            .ioctx(&self.env.pool, Some(&self.namespace))
            .expect("ioctx");
        (rados, io)
    }
}

/// Removes an object on drop (missing is fine).
pub struct ObjectGuard {
    io: IoCtx,
    oid: String,
}

impl ObjectGuard {
    pub fn new(io: &IoCtx, oid: &str) -> ObjectGuard {
        ObjectGuard {
            io: io.clone(),
            oid: oid.to_string(),
        }
    }
}

impl Drop for ObjectGuard {
    fn drop(&mut self) {
        match self.io.remove(&self.oid) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => eprintln!("cleanup: {e}"),
        }
    }
}

/// Removes an image on drop, with its user snapshots. Declare guards of
/// children after their parents' so they drop first.
pub struct ImageGuard {
    io: IoCtx,
    name: String,
}

impl ImageGuard {
    pub fn new(io: &IoCtx, name: &str) -> ImageGuard {
        ImageGuard {
            io: io.clone(),
            name: name.to_string(),
        }
    }

    /// Creates the image and returns its guard.
    pub fn create(io: &IoCtx, name: &str, size: u64, opts: &rbd::ImageOptions) -> ImageGuard {
        rbd::create(io, name, size, opts).unwrap_or_else(|e| panic!("create {name}: {e}"));
        ImageGuard::new(io, name)
    }
}

impl Drop for ImageGuard {
    fn drop(&mut self) {
        match Image::open(&self.io, &self.name, None) {
            Ok(img) => {
                for snap in img.snap_list().unwrap_or_default() {
                    if snap.namespace == SnapNamespace::User
                        && let Err(e) = img.snap_remove(&snap.name)
                    {
                        eprintln!("cleanup: {e}");
                    }
                }
            }
            // Not openable: `remove` still finishes a half-removed one.
            Err(e) if e.is_not_found() => {}
            Err(e) => eprintln!("cleanup: {e}"),
        }
        match rbd::remove(&self.io, &self.name) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => eprintln!("cleanup: {e}"),
        }
    }
}

/// Feature set for most test images: cloneable, lockable, krbd-friendly.
pub fn opts() -> rbd::ImageOptions {
    rbd::ImageOptions {
        features: Some(
            rbd::RBD_FEATURE_LAYERING
                | rbd::RBD_FEATURE_EXCLUSIVE_LOCK
                | rbd::RBD_FEATURE_DEEP_FLATTEN,
        ),
        order: Some(22),
    }
}

pub const MIB: u64 = 1 << 20;
