//! A pool's full state, as the OSD map carries it.

/// The flags the monitors set on a pool as it fills up (`ceph osd pool ls
/// detail`), from an OSD's use against the cluster's ratios (`ceph osd
/// set-nearfull-ratio`, `set-full-ratio`) or from the pool's quota (`ceph
/// osd pool set-quota`).
///
/// While `full` is set, clients hold their writes until it clears, unless
/// the I/O context sends them anyway ([`crate::Rados::ioctx_full_try`]);
/// reads and removals still work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolFlags {
    /// Writes to the pool are refused: some OSD it maps to is full, or its
    /// quota is reached.
    pub full: bool,
    /// The pool reached its quota (`full` is set too).
    pub full_quota: bool,
    /// Some OSD the pool maps to passed the near-full ratio: a warning.
    pub nearfull: bool,
    /// Some OSD the pool maps to passed the backfill-full ratio (above
    /// near-full, below full).
    pub backfillfull: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ParseError {
    NoPool,
    Json(String),
}

impl PoolFlags {
    /// Reads `pool`'s flags out of the JSON of `osd pool ls detail`.
    pub(crate) fn from_pool_list(json: &str, pool: &str) -> Result<Self, ParseError> {
        let list: serde_json::Value =
            serde_json::from_str(json).map_err(|e| ParseError::Json(e.to_string()))?;
        let pools = list
            .as_array()
            .ok_or_else(|| ParseError::Json("not a list of pools".into()))?;
        let entry = pools
            .iter()
            .find(|p| p.get("pool_name").and_then(|n| n.as_str()) == Some(pool))
            .ok_or(ParseError::NoPool)?;
        let names = entry
            .get("flags_names")
            .and_then(|n| n.as_str())
            .ok_or_else(|| ParseError::Json(format!("pool {pool:?} has no flags_names")))?;
        let mut flags = PoolFlags::default();
        for name in names.split(',') {
            match name.trim() {
                "full" => flags.full = true,
                "full_quota" => flags.full_quota = true,
                "nearfull" => flags.nearfull = true,
                "backfillfull" => flags.backfillfull = true,
                _ => {}
            }
        }
        // A reached quota always refuses writes, whatever else is set.
        flags.full |= flags.full_quota;
        Ok(flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"[
        {"pool_id":1,"pool_name":"rbd","flags":8195,"flags_names":"hashpspool,full,selfmanaged_snaps"},
        {"pool_id":2,"pool_name":"quota","flags_names":"hashpspool,full_quota"},
        {"pool_id":3,"pool_name":"warm","flags_names":"hashpspool,nearfull,backfillfull"},
        {"pool_id":4,"pool_name":"fine","flags_names":"hashpspool"}
    ]"#;

    #[test]
    fn flags_are_read_per_pool() {
        let full = PoolFlags::from_pool_list(LIST, "rbd").unwrap();
        assert!(full.full && !full.full_quota && !full.nearfull);
        let quota = PoolFlags::from_pool_list(LIST, "quota").unwrap();
        assert!(quota.full && quota.full_quota);
        let warm = PoolFlags::from_pool_list(LIST, "warm").unwrap();
        assert!(!warm.full && warm.nearfull && warm.backfillfull);
        assert_eq!(
            PoolFlags::from_pool_list(LIST, "fine").unwrap(),
            PoolFlags::default()
        );
    }

    #[test]
    fn a_missing_pool_or_bad_json_is_an_error() {
        assert_eq!(
            PoolFlags::from_pool_list(LIST, "nope"),
            Err(ParseError::NoPool)
        );
        assert!(matches!(
            PoolFlags::from_pool_list("{}", "rbd"),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            PoolFlags::from_pool_list("[{\"pool_name\":\"rbd\"}]", "rbd"),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            PoolFlags::from_pool_list("not json", "rbd"),
            Err(ParseError::Json(_))
        ));
    }
}
