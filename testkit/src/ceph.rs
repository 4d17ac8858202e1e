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

impl CephEnv {
    /// How to connect to this cluster as its test client.
    pub fn connect_config(&self) -> ceph_client::ConnectConfig {
        ceph_client::ConnectConfig {
            conf: Some(self.conf.clone()),
            id: Some(self.id.clone()),
            keyring: Some(self.keyring.clone()),
            ..ceph_client::ConnectConfig::default()
        }
    }
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

/// A single-node cluster of one test's own (`scripts/ceph-dev` in a scratch
/// directory), for tests that change the whole cluster (its full ratios)
/// and so cannot share the suite's cluster. Stopped, by the pids it
/// recorded, when dropped; [`crate::sweep_orphans`] stops one whose test
/// process was killed.
pub struct PrivateCluster {
    env: CephEnv,
    dir: tempfile::TempDir,
    admin: ceph_client::Rados,
}

/// The OSD map ratios `scripts/ceph-dev` leaves (Ceph's defaults).
const DEFAULT_RATIOS: FullRatios = FullRatios {
    nearfull: 0.85,
    backfillfull: 0.90,
    full: 0.95,
};

/// The three fill ratios of the OSD map.
#[derive(Debug, Clone, Copy)]
struct FullRatios {
    nearfull: f64,
    backfillfull: f64,
    full: f64,
}

impl PrivateCluster {
    /// Starts a cluster whose OSD holds `memstore_bytes`; `None` when test
    /// `test` must skip (no Ceph daemons installed, bare `cargo test`).
    pub fn start(test: &str, memstore_bytes: u64) -> Option<Self> {
        Self::start_with(test, memstore_bytes, false)
    }

    /// [`PrivateCluster::start`] with a mgr too: pool statistics, which
    /// pool quotas are enforced from, come from it.
    pub fn start_with_mgr(test: &str, memstore_bytes: u64) -> Option<Self> {
        Self::start_with(test, memstore_bytes, true)
    }

    fn start_with(test: &str, memstore_bytes: u64, mgr: bool) -> Option<Self> {
        let programs: &[&str] = if mgr {
            &["ceph-mon", "ceph-osd", "ceph-mgr"]
        } else {
            &["ceph-mon", "ceph-osd"]
        };
        for program in programs {
            let found = std::env::var_os("PATH").is_some_and(|path| {
                std::env::split_paths(&path).any(|d| d.join(program).is_file())
            });
            let missing = (!found).then(|| format!("{program} is not installed"));
            if !crate::require::check(test, missing) {
                return None;
            }
        }
        let dir = crate::scratch_dir("ceph").unwrap_or_else(|e| panic!("{test}: {e}"));
        let output = std::process::Command::new(ceph_dev())
            .arg("start")
            .arg(dir.path())
            .env("CEPH_DEV_MEMSTORE_BYTES", memstore_bytes.to_string())
            .env("CEPH_DEV_MGR", if mgr { "1" } else { "0" })
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{test}: running scripts/ceph-dev: {e}"));
        let stop_and_panic = |why: String| -> ! {
            stop(dir.path());
            panic!("{test}: private cluster: {why}")
        };
        if !output.status.success() {
            stop_and_panic(format!(
                "scripts/ceph-dev start failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let path = dir.path();
        let env = CephEnv {
            conf: path.join("ceph.conf"),
            id: "docker-rbd".into(),
            keyring: path.join("keyring"),
            pool: "rbd".into(),
        };
        let admin = ceph_client::Rados::connect(&ceph_client::ConnectConfig {
            conf: Some(env.conf.clone()),
            id: Some("admin".into()),
            keyring: Some(path.join("admin.keyring")),
            ..ceph_client::ConnectConfig::default()
        })
        .unwrap_or_else(|e| stop_and_panic(format!("connecting as client.admin: {e}")));
        Some(Self { env, dir, admin })
    }

    /// Its coordinates, as [`env`] gives the shared cluster's.
    pub fn env(&self) -> &CephEnv {
        &self.env
    }

    /// A client.admin connection.
    pub fn admin(&self) -> &ceph_client::Rados {
        &self.admin
    }

    /// Marks the OSD full (the pool's `full` flag, as when the cluster
    /// filled up): writes `filler` bytes of objects to the pool's default
    /// namespace, then sets the full ratios just below what the OSD holds.
    /// Waits until the OSD map says so.
    pub fn make_full(&self, filler: usize) -> Result<(), String> {
        self.write_filler(filler)?;
        self.set_ratios(FullRatios {
            nearfull: 0.001,
            backfillfull: 0.002,
            full: 0.003,
        })?;
        self.wait_for_flags(|f| f.full)
    }

    /// Only near full: a warning, writes go on.
    pub fn make_nearfull(&self) -> Result<(), String> {
        self.set_ratios(FullRatios {
            nearfull: 0.001,
            ..DEFAULT_RATIOS
        })?;
        self.wait_for_flags(|f| f.nearfull && !f.full)
    }

    /// Back to Ceph's default ratios; waits until the pool is not full.
    pub fn clear_full(&self) -> Result<(), String> {
        self.set_ratios(DEFAULT_RATIOS)?;
        self.wait_for_flags(|f| !f.full && !f.nearfull)
    }

    /// Sets the pool's byte quota to `max_bytes`, writes `filler` bytes to
    /// its default namespace and waits until the monitors mark the pool
    /// full for its quota (a cluster started with a mgr).
    pub fn fill_to_quota(&self, max_bytes: u64, filler: usize) -> Result<(), String> {
        self.set_quota(max_bytes)?;
        self.write_filler(filler)?;
        self.wait_for_flags(|f| f.full_quota)
    }

    /// Lifts the pool's quota; waits until it is not full.
    pub fn clear_quota(&self) -> Result<(), String> {
        self.set_quota(0)?;
        self.wait_for_flags(|f| !f.full)
    }

    fn set_quota(&self, max_bytes: u64) -> Result<(), String> {
        let command = format!(
            r#"{{"prefix":"osd pool set-quota","pool":"{}","field":"max_bytes","val":"{max_bytes}"}}"#,
            self.env.pool
        );
        self.admin
            .mon_command(&command)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn write_filler(&self, filler: usize) -> Result<(), String> {
        let ioctx = self
            .admin
            .ioctx(&self.env.pool, Some("filler"))
            .map_err(|e| e.to_string())?;
        let chunk = vec![0x5a_u8; 4 << 20];
        for (n, left) in (0..filler).step_by(chunk.len()).enumerate() {
            let len = chunk.len().min(filler - left);
            ioctx
                .write_full(&format!("filler.{n}"), &chunk[..len])
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The pool's flags now, as client.admin reads them.
    pub fn flags(&self) -> Result<ceph_client::PoolFlags, String> {
        self.admin
            .pool_flags(&self.env.pool)
            .map_err(|e| e.to_string())
    }

    fn set_ratios(&self, r: FullRatios) -> Result<(), String> {
        for (prefix, ratio) in [
            ("osd set-nearfull-ratio", r.nearfull),
            ("osd set-backfillfull-ratio", r.backfillfull),
            ("osd set-full-ratio", r.full),
        ] {
            self.admin
                .mon_command(&format!(r#"{{"prefix":"{prefix}","ratio":{ratio}}}"#))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The OSD reports its use to the monitors every few seconds; they set
    /// the pool's flags from it.
    fn wait_for_flags(&self, want: impl Fn(&ceph_client::PoolFlags) -> bool) -> Result<(), String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        loop {
            let flags = self.flags()?;
            if want(&flags) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("pool flags still {flags:?} after 90 s"));
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        stop(self.dir.path());
    }
}

/// Whether `dir` holds a cluster `scripts/ceph-dev` started.
pub(crate) fn is_cluster_dir(dir: &std::path::Path) -> bool {
    dir.join("ceph.conf").is_file() && dir.join("pids").is_dir()
}

/// Stops the daemons `scripts/ceph-dev` started in `dir` (by its recorded
/// pids); returns what went wrong.
pub(crate) fn stop(dir: &std::path::Path) -> Option<String> {
    match std::process::Command::new(ceph_dev())
        .arg("stop")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "scripts/ceph-dev stop {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Some(format!("scripts/ceph-dev stop: {e}")),
    }
}

fn ceph_dev() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-dev")
}
