//! This host's identity in the fleet: its lease and its host record.
//!
//! A host is alive while it holds the exclusive cls lock `lease` on its
//! object `<prefix>host.<id>`, taken with a duration ([`Settings::lease_duration`])
//! and renewed by a background thread every [`Settings::lease_renew`]. A
//! host that dies stops renewing; once the duration has passed, RADOS no
//! longer reports the lock and every other host sees it as dead.
//!
//! Two daemons configured with one host id must not both run: the second
//! finds the lock held and refuses to open, naming the holder. The same
//! daemon restarted (same machine boot, same Home) is told apart by the
//! lock cookie, `<boot id>.<hash of Home>`: a lock under our own cookie
//! was left by our previous run, and is broken and taken again at once
//! instead of after the lease runs out.
//!
//! [`Settings::lease_duration`]: crate::config::Settings::lease_duration
//! [`Settings::lease_renew`]: crate::config::Settings::lease_renew

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ceph_client::{IoCtx, LockFlags};
use metadata::HostRecord;

use super::{EngineError, Result, ceph, now};

/// cls lock name of a host lease.
pub const LEASE_LOCK: &str = "lease";

/// Whether host `host`'s lease is held (it renewed within its lease
/// duration), read from the cluster.
pub fn host_is_live(ioctx: &IoCtx, prefix: &str, host: &str) -> Result<bool> {
    let object = host_object(prefix, host);
    match ioctx.list_lockers(&object, LEASE_LOCK) {
        Ok(l) => Ok(!l.lockers.is_empty()),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(ceph("lease lookup", format!("host {host}"))(e)),
    }
}

/// The object a host's lease lock is on.
pub fn host_object(prefix: &str, host: &str) -> String {
    format!("{prefix}host.{host}")
}

/// The cookie this daemon's lease is taken with: the machine's boot id
/// and a hash of the Home, so a restart on the same machine and Home is
/// recognised as the same host.
fn cookie(home: &Path) -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().replace('-', ""))
        .unwrap_or_default();
    let digest = crate::digest::sha256_hex(home.as_os_str().as_encoded_bytes());
    format!("{boot}.{}", &digest[..16])
}

/// Blocklists the RADOS client of this host's previous run, which died
/// holding the lease (a second live daemon on this Home is impossible: its
/// local state is locked). What that client had open, an image it was
/// resizing, a header it watched, stays "in use" for the OSDs' watch
/// timeout otherwise, and recovery could not roll back or remove it. A
/// failure only costs that wait, so it is logged, not returned.
fn fence_previous_run(rados: &ceph_client::Rados, old_addr: &str, own_addr: &str) {
    if old_addr.is_empty() || old_addr == own_addr {
        return;
    }
    match rados.blocklist_add(old_addr, PREVIOUS_RUN_FENCE) {
        Ok(()) => tracing::info!(
            client_addr = old_addr,
            "fenced the RADOS client of this host's previous run, so its open images and watches go at once"
        ),
        Err(e) => {
            tracing::warn!(client_addr = old_addr, error = %e, "cannot fence this host's previous run; what it had open stays in use until the OSDs time its watches out")
        }
    }
}

struct Shared {
    stop: Mutex<bool>,
    wake: Condvar,
    lost: AtomicBool,
}

/// This daemon's held lease; renewed until dropped.
pub struct HostLease {
    ioctx: Arc<IoCtx>,
    object: String,
    cookie: String,
    host: String,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What is needed to take a lease.
pub struct LeaseRequest<'a> {
    /// The metadata store (for the host record).
    pub store: &'a metadata::Store,
    /// This host's id.
    pub host: &'a str,
    /// The driver's Home.
    pub home: &'a Path,
    /// Lease length.
    pub duration: Duration,
    /// Renewal interval.
    pub renew: Duration,
    /// This client's address, for fencing.
    pub client_addr: String,
    /// The connection, to fence this host's previous run.
    pub rados: &'a ceph_client::Rados,
}

/// How long the client of this host's dead previous run stays blocklisted:
/// long past the OSDs' watch timeout, which is all the entry is for.
const PREVIOUS_RUN_FENCE: Duration = Duration::from_secs(3600);

impl HostLease {
    /// Takes the lease of `req.host` and writes its host record; refuses
    /// with [`EngineError::HostConflict`] while another daemon holds it.
    pub fn acquire(req: LeaseRequest<'_>) -> Result<HostLease> {
        let ioctx = req.store.ioctx().clone();
        let object = host_object(req.store.prefix(), req.host);
        let cookie = cookie(req.home);
        let take = |flags| {
            ioctx.lock_exclusive(
                &object,
                LEASE_LOCK,
                &cookie,
                "docker-rbd host lease",
                Some(req.duration),
                flags,
            )
        };
        match take(LockFlags::default()) {
            Ok(()) => {}
            Err(e) if e.is_busy() || e.is_exists() => {
                let lockers = ioctx
                    .list_lockers(&object, LEASE_LOCK)
                    .map_err(ceph("lease lookup", format!("host {}", req.host)))?;
                let others: Vec<_> = lockers
                    .lockers
                    .iter()
                    .filter(|l| l.cookie != cookie)
                    .collect();
                if let Some(other) = others.first() {
                    let record = req.store.hosts().get(req.host).ok().flatten();
                    return Err(EngineError::HostConflict {
                        host: req.host.to_string(),
                        holder: other.addr.clone(),
                        hostname: record
                            .as_ref()
                            .map(|r| r.value.hostname.clone())
                            .unwrap_or_default(),
                        home: record.map(|r| r.value.home).unwrap_or_default(),
                    });
                }
                for old in &lockers.lockers {
                    tracing::info!(client = %old.client, "taking over the lease of this host's previous run");
                    match ioctx.break_lock(&object, LEASE_LOCK, &old.client, &old.cookie) {
                        Ok(()) => {}
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(ceph("lease break", format!("host {}", req.host))(e)),
                    }
                    fence_previous_run(req.rados, &old.addr, &req.client_addr);
                }
                take(LockFlags::default()).map_err(ceph("lease", format!("host {}", req.host)))?;
            }
            Err(e) => return Err(ceph("lease", format!("host {}", req.host))(e)),
        }
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        let record = HostRecord {
            hostname,
            version: env!("CARGO_PKG_VERSION").to_string(),
            heartbeat: now(),
            client_addr: req.client_addr,
            home: req.home.display().to_string(),
            lease_secs: req.duration.as_secs(),
            started: now(),
        };
        let hosts = req.store.hosts();
        hosts
            .update(req.host, |_| {
                Ok::<_, std::convert::Infallible>(Some(record.clone()))
            })?
            .unwrap_or_else(|never| match never {});
        tracing::info!(
            host = req.host,
            lease_secs = req.duration.as_secs(),
            "holding the host lease"
        );

        let shared = Arc::new(Shared {
            stop: Mutex::new(false),
            wake: Condvar::new(),
            lost: AtomicBool::new(false),
        });
        let thread = {
            let (ioctx, object, cookie, shared) = (
                ioctx.clone(),
                object.clone(),
                cookie.clone(),
                shared.clone(),
            );
            let (duration, renew, host) = (req.duration, req.renew, req.host.to_string());
            let store = req.store.clone();
            std::thread::Builder::new()
                .name("host-lease".into())
                .spawn(move || {
                    let mut stop = shared.stop.lock().unwrap_or_else(PoisonError::into_inner);
                    let mut renewed_at = Instant::now();
                    loop {
                        stop = shared
                            .wake
                            .wait_timeout(stop, renew)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                        if *stop {
                            return;
                        }
                        let renewed = ioctx.lock_exclusive(
                            &object,
                            LEASE_LOCK,
                            &cookie,
                            "docker-rbd host lease",
                            Some(duration),
                            LockFlags {
                                may_renew: true,
                                must_renew: false,
                            },
                        );
                        match renewed {
                            Ok(()) => {
                                let gap = renewed_at.elapsed();
                                renewed_at = Instant::now();
                                if gap > duration {
                                    tracing::warn!(
                                        host,
                                        gap_secs = gap.as_secs(),
                                        lease_secs = duration.as_secs(),
                                        "the host lease had lapsed (this host was stopped or cut off): \
                                         meanwhile other hosts saw it as dead and could take its containers \
                                         over; a host that did fenced this one, which then cannot write them; \
                                         the lease is held again"
                                    );
                                }
                                if shared.lost.swap(false, Ordering::SeqCst) {
                                    tracing::warn!(host, "host lease held again");
                                }
                                let beat = store.hosts().modify(&host, |r| r.heartbeat = now());
                                if let Err(e) = beat {
                                    tracing::warn!(host, error = %e, "heartbeat not recorded");
                                }
                            }
                            Err(e) if e.is_blocklisted() => {
                                if !shared.lost.swap(true, Ordering::SeqCst) {
                                    tracing::error!(host, error = %e, "cannot renew the host lease: this docker-rbd was fenced (its RADOS client is blocklisted) because another host took its containers over; it can write nothing more to the cluster; restart docker-rbd to reconnect with a new client");
                                }
                            }
                            Err(e) => {
                                shared.lost.store(true, Ordering::SeqCst);
                                tracing::error!(host, error = %e, "cannot renew the host lease; other hosts will presume this one dead when it lapses");
                            }
                        }
                    }
                })
                .map_err(|e| EngineError::Io {
                    op: "spawn the lease thread for",
                    path: req.home.to_path_buf(),
                    source: e,
                })?
        };
        Ok(HostLease {
            ioctx,
            object,
            cookie,
            host: req.host.to_string(),
            shared,
            thread: Some(thread),
        })
    }

    /// Whether the last renewal failed.
    pub fn is_lost(&self) -> bool {
        self.shared.lost.load(Ordering::SeqCst)
    }

    /// Stops renewing. With `release`, gives the lease up at once (other
    /// hosts see this one as gone); without, it lapses after its duration,
    /// so that nothing this host still runs looks abandoned meanwhile.
    pub fn stop(mut self, release: bool) {
        self.stop_thread();
        if release {
            match self.ioctx.unlock(&self.object, LEASE_LOCK, &self.cookie) {
                Ok(()) => tracing::info!(host = %self.host, "host lease released"),
                Err(e) => {
                    tracing::warn!(host = %self.host, error = %e, "releasing the host lease failed; it lapses by itself")
                }
            }
        }
    }

    fn stop_thread(&mut self) {
        *self
            .shared
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HostLease {
    fn drop(&mut self) {
        self.stop_thread();
    }
}
