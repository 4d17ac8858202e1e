//! Taking a container over from a host that died with it running.
//!
//! A container's read-write layer is mapped by one host at a time: its
//! fleet record names the host using it (`active_on`), and the mapping
//! holds the image's RBD exclusive lock. When that host dies, both stay:
//! the record until another host takes the container over, the lock until
//! it is broken. Taking over, once the owner's lease has lapsed:
//!
//! 1. **fences** the old owner: every client holding the image's exclusive
//!    lock, and the old host's docker-rbd client, are blocklisted in the
//!    OSD map, so a host that was only frozen or cut off can write nothing
//!    more when it comes back (its writes fail with `EBLOCKLISTED`);
//! 2. breaks the lock;
//! 3. records the new owner, by compare-and-set.
//!
//! While the owner's lease is live, a takeover is refused, naming the host
//! and when its lease lapses; `force` skips that check, which is safe only
//! when the operator knows the host is down: a live owner is fenced
//! mid-write, and its container dies with I/O errors.

use std::time::Duration;

use ceph_client::Rados;
use ceph_client::rbd::Image;
use metadata::{ContainerRecord, ContainerState, Store};

use super::FleetError;
use crate::engine::lease;
use crate::engine::now;
use crate::names::{LayerId, Naming};

/// How long a fenced client stays blocklisted.
pub const FENCE_DURATION: Duration = Duration::from_secs(24 * 3600);

/// What a takeover did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    /// The container id.
    pub container: String,
    /// Its name (without the leading `/`).
    pub name: String,
    /// The host it was taken from, if it was in use.
    pub from: Option<String>,
    /// RADOS client addresses blocklisted.
    pub fenced: Vec<String>,
}

/// The cluster handles a takeover needs.
pub struct Cluster<'a> {
    /// The connection (for blocklisting).
    pub rados: &'a Rados,
    /// The fleet's records.
    pub store: &'a Store,
    /// Image names.
    pub naming: &'a Naming,
}

/// Finds container `reference` in the fleet: a full id, a unique id
/// prefix, or a name (with or without `/`).
pub fn find_container(
    store: &Store,
    reference: &str,
) -> Result<(String, ContainerRecord), FleetError> {
    let all: Vec<(String, ContainerRecord)> = store
        .containers()
        .list()?
        .into_iter()
        .filter_map(|(id, r)| Some((id, r.ok()?.value)))
        .collect();
    let name = format!("/{}", reference.trim_start_matches('/'));
    if let Some(hit) = all.iter().find(|(id, _)| id == reference) {
        return Ok(hit.clone());
    }
    let matches: Vec<&(String, ContainerRecord)> = all
        .iter()
        .filter(|(id, r)| r.name == name || (reference.len() >= 4 && id.starts_with(reference)))
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(FleetError::NoSuchContainer {
            reference: reference.to_string(),
        }),
        many => Err(FleetError::AmbiguousContainer {
            reference: reference.to_string(),
            candidates: many.iter().map(|(id, _)| id.clone()).collect(),
        }),
    }
}

/// Seconds until host `host`'s lease lapses, from its record's last
/// heartbeat (an estimate: the lock itself is the truth).
fn lease_left(store: &Store, host: &str) -> Option<u64> {
    let rec = store.hosts().get(host).ok()??.value;
    Some((rec.heartbeat + rec.lease_secs).saturating_sub(now()))
}

/// Takes container `reference` over for host `me` (see the module doc).
pub fn takeover(
    cluster: &Cluster<'_>,
    me: &str,
    reference: &str,
    force: bool,
) -> Result<Takeover, FleetError> {
    let (id, rec) = find_container(cluster.store, reference)?;
    let name = rec.name.trim_start_matches('/').to_string();
    let Some(owner) = rec.active_on.clone().filter(|h| h != me) else {
        // In use nowhere, or here already: nothing to take.
        return Ok(Takeover {
            container: id,
            name,
            from: None,
            fenced: Vec::new(),
        });
    };
    if !force && lease::host_is_live(cluster.store.ioctx(), cluster.store.prefix(), &owner)? {
        return Err(FleetError::OwnerAlive {
            container: id,
            name,
            host: owner.clone(),
            lapses_in: lease_left(cluster.store, &owner),
        });
    }
    let fenced = fence(cluster, &id, &rec, Some(&owner))?;
    let host = me.to_string();
    let expected_owner = rec.active_on.clone();
    let written = cluster.store.containers().update(&id, |r| match r {
        Some(r) if r.active_on == expected_owner => {
            let mut next = r.clone();
            next.active_on = Some(host.clone());
            next.state = ContainerState::Stopped;
            next.updated_at = now();
            Ok(Some(next))
        }
        Some(r) => Err(r.active_on.clone()),
        None => Err(None),
    })?;
    if let Err(now_owner) = written {
        return Err(FleetError::Busy {
            container: id,
            name,
            host: now_owner.unwrap_or_else(|| "(removed)".into()),
        });
    }
    tracing::warn!(container = %id, %name, from = %owner, fenced = ?fenced, "took the container over");
    Ok(Takeover {
        container: id,
        name,
        from: Some(owner),
        fenced,
    })
}

/// Blocklists whoever holds the exclusive lock of container `id`'s
/// read-write layer and the docker-rbd client of `old_host`, then breaks
/// the lock. Returns the addresses blocklisted.
pub fn fence(
    cluster: &Cluster<'_>,
    id: &str,
    rec: &ContainerRecord,
    old_host: Option<&str>,
) -> Result<Vec<String>, FleetError> {
    let blob = |e: ceph_client::Error, what: &str| FleetError::Fence {
        container: id.to_string(),
        what: what.to_string(),
        source: Box::new(e),
    };
    let layer = LayerId::parse(&rec.mount_id).map_err(crate::engine::EngineError::from)?;
    let image_name = cluster.naming.layer_image(&layer);
    // No image yet (the layer was recorded `Cloning` and its host died
    // before the clone was made): no lock to break, but the old daemon is
    // still fenced, so that its clone cannot land after ours.
    let image = match Image::open(cluster.store.ioctx(), &image_name, None) {
        Ok(image) => Some(image),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(blob(e, &format!("open image {image_name}"))),
    };
    let owners = match &image {
        Some(image) => image
            .lock_owners()
            .map_err(|e| blob(e, "list the lock owners"))?,
        None => Vec::new(),
    };
    let mut fenced = Vec::new();
    let daemon = old_host
        .and_then(|h| cluster.store.hosts().get(h).ok().flatten())
        .map(|r| r.value.client_addr)
        .filter(|a| !a.is_empty());
    for addr in owners.iter().chain(daemon.iter()) {
        cluster
            .rados
            .blocklist_add(addr, FENCE_DURATION)
            .map_err(|e| blob(e, &format!("blocklist {addr}")))?;
        fenced.push(addr.clone());
    }
    if let Some(image) = &image {
        for owner in &owners {
            match image.lock_break(owner) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(blob(e, &format!("break the lock of {owner}"))),
            }
        }
    }
    Ok(fenced)
}
