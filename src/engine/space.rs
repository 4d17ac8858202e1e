//! Whether the pool has room for new layers.
//!
//! When an OSD fills up (or the pool reaches its quota) Ceph marks the pool
//! full and clients hold their writes until space returns. The engine's
//! I/O context sends them anyway ([`ceph_client::Rados::ioctx_full_try`]),
//! so its metadata and RBD calls fail at once with `ENOSPC`/`EDQUOT`
//! instead of after the operation timeout; and before work that writes
//! (create, a writable mapping, ApplyDiff) it reads the pool's flags, so
//! such a request is refused with [`EngineError::PoolFull`] before it
//! records or makes anything. Containers already running keep their
//! mappings: their writes wait for space, as with any RBD client.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Engine, EngineError, Result};

/// How long a read of the pool's flags is trusted: one monitor command
/// per second at most, however many requests arrive.
const FLAGS_TTL: Duration = Duration::from_secs(1);

/// What the OSD map says about the pool's room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSpace {
    /// Room to write.
    Available,
    /// An OSD of the pool passed the near-full ratio: writes still work.
    NearFull,
    /// Writes are refused.
    Full(FullCause),
}

/// Why a pool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullCause {
    /// An OSD the pool maps to reached the cluster's full ratio.
    OsdFull,
    /// The pool reached its quota (`ceph osd pool set-quota`).
    Quota,
}

impl std::fmt::Display for FullCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FullCause::OsdFull => {
                "an OSD holding it reached the cluster's full ratio (free space or add OSDs)"
            }
            FullCause::Quota => "it reached its quota (ceph osd pool set-quota)",
        })
    }
}

impl std::fmt::Display for PoolSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolSpace::Available => f.write_str("available"),
            PoolSpace::NearFull => f.write_str("nearly full (an OSD passed the near-full ratio)"),
            PoolSpace::Full(cause) => write!(f, "FULL: {cause}"),
        }
    }
}

impl From<ceph_client::PoolFlags> for PoolSpace {
    fn from(flags: ceph_client::PoolFlags) -> Self {
        if flags.full_quota {
            PoolSpace::Full(FullCause::Quota)
        } else if flags.full {
            PoolSpace::Full(FullCause::OsdFull)
        } else if flags.nearfull || flags.backfillfull {
            PoolSpace::NearFull
        } else {
            PoolSpace::Available
        }
    }
}

/// The last read of the pool's flags.
#[derive(Default)]
pub(crate) struct SpaceCache(Mutex<Option<(Instant, PoolSpace)>>);

impl SpaceCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, PoolSpace)>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Engine {
    /// The pool's room as the OSD map says now (read at most once a second).
    pub fn pool_space(&self) -> Result<PoolSpace> {
        let mut last = self.space.lock();
        if let Some((at, space)) = *last
            && at.elapsed() < FLAGS_TTL
        {
            return Ok(space);
        }
        let pool = &self.settings.pool;
        let space = PoolSpace::from(self.rados.pool_flags(pool).map_err(super::ceph(
            "reading the full flags",
            format!("pool {pool}"),
        ))?);
        *last = Some((Instant::now(), space));
        Ok(space)
    }

    /// Refuses work that writes to a full pool, before it starts.
    pub fn ensure_room(&self) -> Result<()> {
        match self.pool_space()? {
            PoolSpace::Full(cause) => Err(self.pool_full(cause)),
            PoolSpace::Available | PoolSpace::NearFull => Ok(()),
        }
    }

    /// `e`, or [`EngineError::PoolFull`] when Ceph refused a write of it
    /// because the pool is full (or is now: librbd hides the cause of some
    /// refused writes behind other errnos).
    pub(crate) fn explain_full(&self, e: EngineError) -> EngineError {
        if matches!(e, EngineError::PoolFull { .. }) {
            return e;
        }
        if ceph_errors(&e).next().is_none() {
            return e;
        }
        // What Ceph said, if it said full: EDQUOT for a quota.
        let refused = ceph_errors(&e).find_map(|c| match c.errno() {
            Some(libc::EDQUOT) => Some(FullCause::Quota),
            Some(libc::ENOSPC) => Some(FullCause::OsdFull),
            _ => None,
        });
        self.space.lock().take();
        match (self.pool_space(), refused) {
            (Ok(PoolSpace::Full(cause)), _) => self.pool_full(cause),
            (_, Some(cause)) => self.pool_full(cause),
            _ => e,
        }
    }

    fn pool_full(&self, cause: FullCause) -> EngineError {
        EngineError::PoolFull {
            pool: self.settings.pool.clone(),
            cause,
        }
    }
}

/// The Ceph errors in `e`'s chain of sources.
fn ceph_errors(e: &EngineError) -> impl Iterator<Item = &ceph_client::Error> {
    std::iter::successors(Some(e as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .filter_map(|e| e.downcast_ref::<ceph_client::Error>())
}

#[cfg(test)]
mod tests {
    use ceph_client::PoolFlags;

    use super::*;

    #[test]
    fn flags_say_how_full() {
        let space = |f: PoolFlags| PoolSpace::from(f);
        assert_eq!(space(PoolFlags::default()), PoolSpace::Available);
        let near = PoolFlags {
            nearfull: true,
            ..PoolFlags::default()
        };
        assert_eq!(space(near), PoolSpace::NearFull);
        let full = PoolFlags {
            full: true,
            nearfull: true,
            ..PoolFlags::default()
        };
        assert_eq!(space(full), PoolSpace::Full(FullCause::OsdFull));
        let quota = PoolFlags {
            full: true,
            full_quota: true,
            ..PoolFlags::default()
        };
        assert_eq!(space(quota), PoolSpace::Full(FullCause::Quota));
        assert_eq!(
            PoolSpace::Full(FullCause::Quota).to_string(),
            "FULL: it reached its quota (ceph osd pool set-quota)"
        );
    }
}
