//! User-namespace ID mappings (`dockerd --userns-remap`).
//!
//! A layer tar carries container IDs; files on the layer's filesystem carry
//! host IDs. [`IdMappings`] converts both ways: apply maps container to host,
//! export maps host back to container. Empty maps mean identity, per kind
//! (moby's `idtools` rule). An ID that no range covers is an error naming it.

use std::fmt;

use crate::types::IdMap;

/// Which kind of ID a map or an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdKind {
    /// User ID.
    Uid,
    /// Group ID.
    Gid,
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdKind::Uid => "uid",
            IdKind::Gid => "gid",
        })
    }
}

/// Why an ID could not be mapped, or why a map is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdMapError {
    /// A map entry has a negative field, a zero size, or runs past 2^32.
    #[error(
        "{kind} map entry {{container_id: {}, host_id: {}, size: {}}} is invalid: {reason}",
        entry.container_id,
        entry.host_id,
        entry.size
    )]
    InvalidMap {
        /// Which map.
        kind: IdKind,
        /// The offending entry.
        entry: IdMap,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A container ID (from a tar) that no range of the map covers.
    #[error("container {kind} {id} is not covered by the {kind} map, so it has no host {kind}")]
    NoHostId {
        /// Which map.
        kind: IdKind,
        /// The container ID.
        id: u64,
    },
    /// A host ID (from a file) that no range of the map covers.
    #[error("host {kind} {id} is not covered by the {kind} map, so it has no container {kind}")]
    NoContainerId {
        /// Which map.
        kind: IdKind,
        /// The host ID.
        id: u64,
    },
    /// Without a map, an ID that does not fit a 32-bit `uid_t`/`gid_t`.
    #[error("{kind} {id} does not fit in 32 bits")]
    OutOfRange {
        /// Which kind.
        kind: IdKind,
        /// The ID.
        id: u64,
    },
}

/// UID and GID maps, container <-> host. Empty maps are the identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMappings {
    uid: Vec<IdMap>,
    gid: Vec<IdMap>,
}

impl IdMappings {
    /// Validates and stores the maps as dockerd sends them in `Init`.
    pub fn new(uid: Vec<IdMap>, gid: Vec<IdMap>) -> Result<Self, IdMapError> {
        for (kind, maps) in [(IdKind::Uid, &uid), (IdKind::Gid, &gid)] {
            for entry in maps {
                validate(kind, entry)?;
            }
        }
        Ok(Self { uid, gid })
    }

    /// No remapping: every ID maps to itself.
    pub fn identity() -> Self {
        Self::default()
    }

    /// Whether both maps are empty (identity).
    pub fn is_identity(&self) -> bool {
        self.uid.is_empty() && self.gid.is_empty()
    }

    /// The UID map.
    pub fn uid_maps(&self) -> &[IdMap] {
        &self.uid
    }

    /// The GID map.
    pub fn gid_maps(&self) -> &[IdMap] {
        &self.gid
    }

    /// Container UID (from a tar) to host UID.
    pub fn uid_to_host(&self, id: u64) -> Result<u32, IdMapError> {
        to_host(IdKind::Uid, &self.uid, id)
    }

    /// Container GID (from a tar) to host GID.
    pub fn gid_to_host(&self, id: u64) -> Result<u32, IdMapError> {
        to_host(IdKind::Gid, &self.gid, id)
    }

    /// Host UID (of a file) to container UID.
    pub fn uid_to_container(&self, id: u32) -> Result<u32, IdMapError> {
        to_container(IdKind::Uid, &self.uid, id)
    }

    /// Host GID (of a file) to container GID.
    pub fn gid_to_container(&self, id: u32) -> Result<u32, IdMapError> {
        to_container(IdKind::Gid, &self.gid, id)
    }

    /// The host IDs of the container's root user and group, used for
    /// directories the tar implies but does not contain. Falls back to host
    /// root for a kind whose map does not cover container ID 0.
    pub fn root_pair(&self) -> (u32, u32) {
        (
            self.uid_to_host(0).unwrap_or(0),
            self.gid_to_host(0).unwrap_or(0),
        )
    }
}

const ID_SPACE: i64 = 1 << 32;

fn validate(kind: IdKind, entry: &IdMap) -> Result<(), IdMapError> {
    let invalid = |reason| IdMapError::InvalidMap {
        kind,
        entry: *entry,
        reason,
    };
    if entry.container_id < 0 || entry.host_id < 0 {
        return Err(invalid("IDs must not be negative"));
    }
    if entry.size <= 0 {
        return Err(invalid("size must be at least 1"));
    }
    let fits = |start: i64| {
        start
            .checked_add(entry.size)
            .is_some_and(|end| end <= ID_SPACE)
    };
    if !fits(entry.container_id) || !fits(entry.host_id) {
        return Err(invalid("range runs past 2^32"));
    }
    Ok(())
}

fn to_host(kind: IdKind, maps: &[IdMap], id: u64) -> Result<u32, IdMapError> {
    if maps.is_empty() {
        return u32::try_from(id).map_err(|_| IdMapError::OutOfRange { kind, id });
    }
    translate(maps, id, |m| (m.container_id, m.host_id)).ok_or(IdMapError::NoHostId { kind, id })
}

fn to_container(kind: IdKind, maps: &[IdMap], id: u32) -> Result<u32, IdMapError> {
    if maps.is_empty() {
        return Ok(id);
    }
    translate(maps, u64::from(id), |m| (m.host_id, m.container_id)).ok_or(
        IdMapError::NoContainerId {
            kind,
            id: u64::from(id),
        },
    )
}

/// First range (in map order, as moby) whose `from` side covers `id`.
fn translate(maps: &[IdMap], id: u64, sides: impl Fn(&IdMap) -> (i64, i64)) -> Option<u32> {
    let id = i64::try_from(id).ok()?;
    maps.iter().find_map(|m| {
        let (from, to) = sides(m);
        if id >= from && id - from < m.size {
            u32::try_from(to + (id - from)).ok()
        } else {
            None
        }
    })
}
