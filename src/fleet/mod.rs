//! The Docker-state mirror: dockerd's image graph and containers, shared by
//! every host of the fleet through RADOS.
//!
//! dockerd keeps its images, layers, tags and containers in files under its
//! root and reads them once, at start, right after `GraphDriver.Init`
//! returns; it never reloads them. So:
//!
//! - **hydrate** ([`hydrate`]), in `Init` before replying: every layer,
//!   image, tag and container of the fleet that this dockerd lacks (or
//!   holds an older copy of) is written into its root in dockerd's own
//!   formats ([`dockerfs`]). A host with an empty data root thus boots
//!   into the fleet's images and stopped containers, and `docker start`
//!   mounts the container's own RBD layer: nothing is copied.
//! - **export** ([`export`]), from then on: a thread follows dockerd's
//!   files (inotify, `Put`/`Remove`, and a pass every
//!   [`export::PERIOD`]) and mirrors them into the `metadata` crate's
//!   `docker.*` and `containers` records, by compare-and-set.
//! - **state at `Get`/`Put`**: `Get` of a container's read-write layer
//!   records the container as running on this host, and refuses while
//!   another live host has it in use; the last `Put` records it stopped,
//!   before dockerd is answered, so a host that dies right after a
//!   `docker stop` has already told the fleet.
//!
//! What stays per host: networks, volumes, logs, and dockerd's own
//! settings. This module knows dockerd's files but not its protocol; it
//! never calls dockerd's API (dockerd answers nothing until `Init`
//! returns).
//!
//! A small ledger, `<Home>/fleet-sync.json`, remembers per container the
//! generation this host last synced and a digest of its files then, so
//! that a hydrate only replaces what another host changed since, and an
//! export only sends what changed here.

pub mod dockerfs;
pub mod export;
pub mod hydrate;
pub mod takeover;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metadata::ContainerState;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineError};
use dockerfs::{DockerRoot, FileError};
pub use hydrate::HydrateReport;

/// Why a fleet operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The metadata store failed.
    #[error(transparent)]
    Metadata(#[from] metadata::Error),
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// One of dockerd's files could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// A blob object could not be written.
    #[error("cannot write RADOS object {object}")]
    Blob {
        /// The object.
        object: String,
        /// Why.
        #[source]
        source: Box<ceph_client::Error>,
    },
    /// The ledger could not be read or written.
    #[error("fleet ledger {path}")]
    Ledger {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The driver's Home is not `<dockerd root>/<driver name>`.
    #[error("Home {home} is not <dockerd root>/<driver name>")]
    Home {
        /// The Home.
        home: PathBuf,
    },
    /// No fleet container has that id, id prefix or name.
    #[error("no container {reference:?} in the fleet (by id, id prefix or name)")]
    NoSuchContainer {
        /// What was asked for.
        reference: String,
    },
    /// More than one container matches.
    #[error("{reference:?} names several containers: {}", .candidates.join(", "))]
    AmbiguousContainer {
        /// What was asked for.
        reference: String,
        /// The ids it matches.
        candidates: Vec<String>,
    },
    /// A takeover was refused: the owner is alive.
    #[error(
        "container {container} ({name}) is in use on host {host}, whose lease is live{}: \
         stop it there, or wait until the lease lapses (--force only if you know host {host} is down)",
        .lapses_in.map(|s| format!(" (it lapses in about {s} s unless renewed)")).unwrap_or_default()
    )]
    OwnerAlive {
        /// The container id.
        container: String,
        /// Its name.
        name: String,
        /// The owning host.
        host: String,
        /// Seconds until its lease lapses, if known.
        lapses_in: Option<u64>,
    },
    /// The container's host died with it in use.
    #[error(
        "container {container} ({name}) was in use on host {host}, whose lease has lapsed: \
         run `docker-rbd takeover {name}` on this host to fence {host} and take it over \
         (or set rbd.autotakeover=true)"
    )]
    OwnerDead {
        /// The container id.
        container: String,
        /// Its name.
        name: String,
        /// The dead host.
        host: String,
    },
    /// The container's record names a host the fleet has no record of.
    #[error(
        "container {container} ({name}) is recorded in use on host {host}, which has no host \
         record in the fleet (removed, or never a docker-rbd host here): run \
         `docker-rbd takeover {name}` on this host to take it over (or set rbd.autotakeover=true)"
    )]
    OwnerUnknown {
        /// The container id.
        container: String,
        /// Its name.
        name: String,
        /// The host named.
        host: String,
    },
    /// Fencing the old owner failed.
    #[error("fencing the owner of container {container}: {what}")]
    Fence {
        /// The container id.
        container: String,
        /// The step that failed.
        what: String,
        /// Why.
        #[source]
        source: Box<ceph_client::Error>,
    },
    /// Another live host has the container in use.
    #[error(
        "container {container} ({name}) is in use on host {host}: stop it there first \
         (or, if that host is dead, wait until its lease lapses)"
    )]
    Busy {
        /// The container id.
        container: String,
        /// Its name.
        name: String,
        /// The host using it.
        host: String,
    },
}

/// What a host last synced of one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The record's generation.
    pub generation: u64,
    /// [`dockerfs::LocalContainer::content_hash`] of the files then.
    pub hash: String,
}

#[derive(Serialize, Deserialize)]
struct Ledger {
    v: u32,
    containers: BTreeMap<String, LedgerEntry>,
}

/// What this host last wrote to the fleet.
#[derive(Debug, Default)]
pub(crate) struct Synced {
    /// Chain id to whether this host is among the record's holders.
    layers: BTreeMap<String, bool>,
    /// Image id to the metadata exported.
    images: BTreeMap<String, (Option<String>, Option<String>)>,
    /// Reference to the image id exported.
    tags: BTreeMap<String, String>,
    /// The container ledger.
    containers: BTreeMap<String, LedgerEntry>,
    /// Read-write layer (mount id) to container id.
    mounts: BTreeMap<String, String>,
    /// Containers between `before_get` and `after_put` here. The first
    /// export of a container that has no record yet takes `Running` and
    /// `active_on` from this (and the engine's mounts), not from
    /// config.v2.json, which dockerd writes after `Get`: a record made
    /// between the two would otherwise say stopped for as long as the
    /// container runs.
    in_use: BTreeSet<String>,
}

#[derive(Default)]
struct Wake {
    stop: bool,
    requested: bool,
}

#[derive(Debug, Default, Clone)]
struct Stats {
    passes: u64,
    last_error: Option<String>,
    hydrate: HydrateReport,
}

pub(crate) struct Inner {
    engine: Arc<Engine>,
    root: DockerRoot,
    ledger: PathBuf,
    synced: Mutex<Synced>,
    wake: Mutex<Wake>,
    wakeup: Condvar,
    stats: Mutex<Stats>,
}

/// The mirror of one dockerd root; the exporter runs until it is dropped.
pub struct Fleet {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl Fleet {
    /// Opens the mirror for `engine`'s Home: reads the ledger and what this
    /// host holds in the fleet, hydrates dockerd's root when `hydrate` is
    /// set (dockerd is about to read it: a fresh `Init`), and starts the
    /// exporter.
    pub fn start(engine: Arc<Engine>, hydrate: bool) -> Result<Fleet, FleetError> {
        let home = engine.home().to_path_buf();
        let root =
            DockerRoot::of_home(&home).ok_or_else(|| FleetError::Home { home: home.clone() })?;
        let ledger = home.join("fleet-sync.json");
        let me = engine.host_id().to_string();
        let store = engine.store().clone();
        let synced = Synced {
            layers: export::held_by(&store.docker_layers(), &me, |r| &r.holders, |_| true)?,
            images: export::held_by(
                &store.docker_images(),
                &me,
                |r| &r.holders,
                |r| (r.parent.clone(), r.last_updated.clone()),
            )?,
            tags: export::held_by(
                &store.docker_tags(),
                &me,
                |r| &r.holders,
                |r| r.image.clone(),
            )?,
            containers: read_ledger(&ledger)?,
            mounts: BTreeMap::new(),
            in_use: BTreeSet::new(),
        };
        let inner = Arc::new(Inner {
            engine,
            root,
            ledger,
            synced: Mutex::new(synced),
            wake: Mutex::new(Wake::default()),
            wakeup: Condvar::new(),
            stats: Mutex::new(Stats::default()),
        });
        if hydrate {
            let report = inner.hydrate()?;
            inner.lock_stats().hydrate = report;
        }
        let thread = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("fleet-export".into())
                .spawn(move || inner.run_exporter())
                .map_err(|e| FleetError::Ledger {
                    path: home,
                    source: Box::new(e),
                })?
        };
        Ok(Fleet {
            inner,
            thread: Some(thread),
        })
    }

    /// What the last hydrate did.
    pub fn hydrate_report(&self) -> HydrateReport {
        self.inner.lock_stats().hydrate.clone()
    }

    /// Runs an export pass now, in the caller's thread.
    pub fn export_now(&self) -> Result<export::ExportCounts, FleetError> {
        self.inner.export()
    }

    /// Asks the exporter for a pass soon.
    pub fn trigger(&self) {
        self.inner.trigger();
    }

    /// Before `Get` of `layer`: if it is a container's read-write layer,
    /// refuse while another live host has the container in use, else
    /// record it running here.
    pub fn before_get(&self, layer: &str) -> Result<(), FleetError> {
        let Some(container) = self.inner.container_of(layer)? else {
            return Ok(());
        };
        let me = self.inner.engine.host_id().to_string();
        let table = self.inner.engine.store().containers();
        for _ in 0..8 {
            let Some(current) = table.get(&container)? else {
                // Not exported yet. Under the export's lock, so that the
                // pass that makes the record sees the claim.
                let mut synced = self.inner.lock_synced();
                if table.get(&container)?.is_some() {
                    continue;
                }
                synced.in_use.insert(container);
                return Ok(());
            };
            let rec = &current.value;
            if let Some(host) = &rec.active_on
                && *host != me
            {
                let name = rec.name.trim_start_matches('/').to_string();
                if self.inner.engine.host_is_live(host)? {
                    return Err(FleetError::Busy {
                        container,
                        name,
                        host: host.clone(),
                    });
                }
                if !self.inner.engine.settings().auto_takeover {
                    let known = self.inner.engine.store().hosts().get(host)?.is_some();
                    let host = host.clone();
                    return Err(if known {
                        FleetError::OwnerDead {
                            container,
                            name,
                            host,
                        }
                    } else {
                        FleetError::OwnerUnknown {
                            container,
                            name,
                            host,
                        }
                    });
                }
                let engine = &self.inner.engine;
                let cluster = takeover::Cluster {
                    rados: engine.rados(),
                    store: engine.store(),
                    naming: &engine.settings().naming,
                };
                let fenced = takeover::fence(&cluster, &container, rec, Some(host))?;
                tracing::warn!(%container, %name, from = %host, ?fenced, "took over a container whose host died (rbd.autotakeover)");
            }
            let mut next = rec.clone();
            next.state = ContainerState::Running;
            next.active_on = Some(me.clone());
            next.updated_at = crate::engine::now();
            match table.replace(&container, &current, &next) {
                Ok(_) => {
                    self.inner.lock_synced().in_use.insert(container);
                    return Ok(());
                }
                Err(metadata::Error::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(metadata::Error::Contended {
            object: table.object().to_string(),
            key: container,
            attempts: 8,
        }
        .into())
    }

    /// After `Put` (or a failed `Get`) of `layer`: once it is no longer
    /// mounted here, record its container stopped, and ask for an export.
    pub fn after_put(&self, layer: &str) -> Result<(), FleetError> {
        if self.inner.engine.mount_record(layer)?.is_some() {
            return Ok(());
        }
        if let Some(container) = self.inner.container_of(layer)? {
            let me = self.inner.engine.host_id().to_string();
            // Under the export's lock: a pass either made the record
            // before (and this marks it stopped) or makes it after.
            let mut synced = self.inner.lock_synced();
            synced.in_use.remove(&container);
            self.inner
                .engine
                .store()
                .containers()
                .modify(&container, |r| {
                    if r.active_on.as_deref() == Some(me.as_str()) {
                        r.active_on = None;
                        r.state = ContainerState::Stopped;
                        r.updated_at = crate::engine::now();
                    }
                })?;
        }
        self.inner.trigger();
        Ok(())
    }

    /// Lines for `docker info`.
    pub fn status(&self) -> Vec<(String, String)> {
        let stats = self.inner.lock_stats().clone();
        let synced = self.inner.lock_synced();
        let mut out = vec![
            (
                "Fleet Containers Here".to_string(),
                synced.containers.len().to_string(),
            ),
            ("Fleet Export Passes".to_string(), stats.passes.to_string()),
            (
                "Fleet Hydrated".to_string(),
                format!(
                    "{} layers, {} images, {} tags, {} containers, {} skipped",
                    stats.hydrate.layers,
                    stats.hydrate.images,
                    stats.hydrate.tags,
                    stats.hydrate.containers,
                    stats.hydrate.skipped.len()
                ),
            ),
        ];
        if let Some(e) = stats.last_error {
            out.push(("Fleet Export Error".to_string(), e));
        }
        out
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.inner.lock_wake().stop = true;
        self.inner.wakeup.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Inner {
    fn lock_synced(&self) -> MutexGuard<'_, Synced> {
        self.synced.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_wake(&self) -> MutexGuard<'_, Wake> {
        self.wake.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_stats(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn trigger(&self) {
        self.lock_wake().requested = true;
        self.wakeup.notify_all();
    }

    /// The container whose read-write layer is `layer`, if any.
    fn container_of(&self, layer: &str) -> Result<Option<String>, FleetError> {
        if layer.ends_with("-init") {
            return Ok(None);
        }
        if let Some(c) = self.lock_synced().mounts.get(layer) {
            return Ok(Some(c.clone()));
        }
        let found = self.root.container_of_mount(layer)?;
        if let Some(c) = &found {
            self.lock_synced()
                .mounts
                .insert(layer.to_string(), c.clone());
        }
        Ok(found)
    }

    fn save_ledger(&self, synced: &Synced) -> Result<(), FleetError> {
        let ledger = Ledger {
            v: 1,
            containers: synced.containers.clone(),
        };
        let bytes = serde_json::to_vec(&ledger).map_err(|e| FleetError::Ledger {
            path: self.ledger.clone(),
            source: Box::new(e),
        })?;
        dockerfs::write_atomic(&self.ledger, &bytes)?;
        Ok(())
    }

    /// The exporter thread: a pass at each change dockerd makes to its
    /// files (debounced), at each trigger, and every [`export::PERIOD`].
    fn run_exporter(&self) {
        let mut watcher = Watcher::new();
        let mut last = Instant::now() - export::PERIOD;
        loop {
            let due = {
                let mut wake = self.lock_wake();
                if wake.stop {
                    return;
                }
                if !wake.requested {
                    wake = self
                        .wakeup
                        .wait_timeout(wake, Duration::from_millis(100))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                if wake.stop {
                    return;
                }
                std::mem::take(&mut wake.requested)
            };
            let changed = watcher.changed();
            if !(due || changed || last.elapsed() >= export::PERIOD) {
                continue;
            }
            last = Instant::now();
            let result = self.export();
            let mut stats = self.lock_stats();
            stats.passes += 1;
            match result {
                Ok(counts) => {
                    if counts.writes > 0 {
                        tracing::debug!(writes = counts.writes, "exported dockerd's changes");
                    }
                    stats.last_error = None;
                }
                Err(e) => {
                    let text = crate::error_chain(&e);
                    if stats.last_error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(error = %text, "export pass failed; retrying");
                    }
                    stats.last_error = Some(text);
                }
            }
            drop(stats);
            watcher.watch(&self.root);
        }
    }
}

/// inotify on dockerd's directories: tells whether anything changed since
/// the last look. Directories appear after `Init` (dockerd makes them);
/// each pass adds watches for those that exist now.
struct Watcher {
    inotify: Option<Inotify>,
    watched: BTreeSet<PathBuf>,
}

impl Watcher {
    fn new() -> Watcher {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| tracing::warn!(error = %e, "no inotify; exporting on a timer only"))
            .ok();
        Watcher {
            inotify,
            watched: BTreeSet::new(),
        }
    }

    fn changed(&mut self) -> bool {
        let Some(inotify) = &self.inotify else {
            return false;
        };
        let mut any = false;
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                break;
            }
            any = true;
        }
        if any {
            // dockerd writes several files per change; let it finish.
            std::thread::sleep(Duration::from_millis(50));
            while inotify.read_events().is_ok_and(|e| !e.is_empty()) {}
        }
        any
    }

    fn watch(&mut self, root: &DockerRoot) {
        let Some(inotify) = &self.inotify else {
            return;
        };
        let mut dirs = root.watched_dirs();
        for parent in [root.containers_dir(), root.mounts_dir()] {
            if let Ok(entries) = std::fs::read_dir(&parent) {
                dirs.extend(entries.flatten().map(|e| e.path()));
            }
        }
        self.watched.retain(|d| d.exists());
        let flags = AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_CLOSE_WRITE;
        for dir in dirs {
            if self.watched.contains(&dir) || !dir.is_dir() {
                continue;
            }
            if inotify.add_watch(dir.as_path(), flags).is_ok() {
                self.watched.insert(dir);
            }
        }
    }
}

fn read_ledger(path: &Path) -> Result<BTreeMap<String, LedgerEntry>, FleetError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => {
            return Err(FleetError::Ledger {
                path: path.to_path_buf(),
                source: Box::new(e),
            });
        }
    };
    match serde_json::from_slice::<Ledger>(&bytes) {
        Ok(l) if l.v == 1 => Ok(l.containers),
        Ok(l) => {
            tracing::warn!(path = %path.display(), version = l.v, "fleet ledger of an unknown version; starting afresh");
            Ok(BTreeMap::new())
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable fleet ledger; starting afresh");
            Ok(BTreeMap::new())
        }
    }
}
