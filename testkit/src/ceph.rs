//! Where the test Ceph cluster is.
//!
//! `scripts/ceph-dev start DIR` writes `DIR/env`; `scripts/test` sources it,
//! which exports:
//!
//! | variable | meaning |
//! |---|---|
//! | `DOCKER_RBD_CEPH_CONF` | path of the cluster's ceph.conf |
//! | `DOCKER_RBD_CEPH_ID` | cephx client id, without `client.` (e.g. `docker-rbd`) |
//! | `DOCKER_RBD_CEPH_KEYRING` | keyring holding that client's key |
//! | `DOCKER_RBD_POOL` | a pool initialised for rbd |
//!
//! Tests isolate themselves in a fresh RADOS namespace each
//! ([`unique_namespace`]), so they can run in parallel on one pool.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// Coordinates of the test cluster.
#[derive(Debug, Clone)]
pub struct CephEnv {
    /// ceph.conf path.
    pub conf: PathBuf,
    /// cephx client id (without `client.`).
    pub id: String,
    /// keyring path.
    pub keyring: PathBuf,
    /// rbd pool.
    pub pool: String,
}

/// Reads the cluster coordinates from the environment, or says what is
/// missing.
pub fn env() -> Result<CephEnv, String> {
    let var = |name: &str| {
        std::env::var(name)
            .map_err(|_| format!("{name} is not set (no test cluster; see scripts/ceph-dev)"))
    };
    let env = CephEnv {
        conf: var("DOCKER_RBD_CEPH_CONF")?.into(),
        id: var("DOCKER_RBD_CEPH_ID")?,
        keyring: var("DOCKER_RBD_CEPH_KEYRING")?.into(),
        pool: var("DOCKER_RBD_POOL")?,
    };
    if !env.conf.exists() {
        return Err(format!("{} does not exist", env.conf.display()));
    }
    Ok(env)
}

/// The cluster for test `test`, or `None` when the test must skip (bare
/// `cargo test` without a cluster). Panics under `scripts/test` when the
/// cluster is missing.
pub fn require(test: &str) -> Option<CephEnv> {
    match env() {
        Ok(env) => Some(env),
        Err(why) => {
            crate::require::check(test, Some(why));
            None
        }
    }
}

/// A RADOS namespace no other test (of this or another process) uses.
pub fn unique_namespace(test: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let clean: String = test
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!(
        "t-{clean}-{}-{}-{nanos:x}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}
