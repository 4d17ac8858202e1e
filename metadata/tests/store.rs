//! The metadata store against the test cluster: compare-and-set under
//! conflict and contention, values from a newer schema, listing past one
//! omap page, and the fleet tables.

use std::collections::BTreeSet;
use std::sync::Arc;

use ceph_client::{IoCtx, Rados, WriteOp};
use metadata::{Error, HostRecord, Store};

struct Fixture {
    store: Store,
    ioctx: Arc<IoCtx>,
    _rados: Rados,
}

impl Fixture {
    fn new(test: &str) -> Option<Fixture> {
        let ceph = testkit::ceph::require(test)?;
        let rados = Rados::connect(&ceph.connect_config()).expect("connect");
        let ns = testkit::ceph::unique_namespace(test);
        let ioctx = Arc::new(rados.ioctx(&ceph.pool, Some(&ns)).expect("ioctx"));
        Some(Fixture {
            store: Store::new(ioctx.clone(), "t."),
            ioctx,
            _rados: rados,
        })
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for table in ["t.hosts", "t.layers", "t.containers"] {
            let _ = self.ioctx.remove(table);
        }
    }
}

fn host(beat: u64) -> HostRecord {
    HostRecord {
        hostname: "h".into(),
        version: "0".into(),
        heartbeat: beat,
        client_addr: String::new(),
        home: String::new(),
        lease_secs: 30,
        started: 0,
    }
}

#[test]
fn compare_and_set_refuses_stale_writers() {
    let Some(fx) = Fixture::new("compare_and_set_refuses_stale_writers") else {
        return;
    };
    let hosts = fx.store.hosts();
    let first = hosts.create("a", &host(1)).unwrap();
    assert!(matches!(
        hosts.create("a", &host(2)),
        Err(Error::Exists { .. })
    ));
    let second = hosts.replace("a", &first, &host(2)).unwrap();
    // `first` is stale now: both a replace and a delete from it fail.
    assert!(matches!(
        hosts.replace("a", &first, &host(3)),
        Err(Error::Conflict { .. })
    ));
    assert!(matches!(
        hosts.delete("a", &first),
        Err(Error::Conflict { .. })
    ));
    assert_eq!(hosts.get("a").unwrap().unwrap().value.heartbeat, 2);
    hosts.delete("a", &second).unwrap();
    assert!(hosts.get("a").unwrap().is_none());
    assert!(hosts.modify("a", |h| h.heartbeat = 9).unwrap().is_none());
}

#[test]
fn concurrent_updates_all_land() {
    let Some(fx) = Fixture::new("concurrent_updates_all_land") else {
        return;
    };
    let hosts = fx.store.hosts();
    hosts.create("counter", &host(0)).unwrap();
    std::thread::scope(|s| {
        for _ in 0..6 {
            s.spawn(|| {
                for _ in 0..5 {
                    fx.store
                        .hosts()
                        .modify("counter", |h| h.heartbeat += 1)
                        .unwrap();
                }
            });
        }
    });
    assert_eq!(hosts.get("counter").unwrap().unwrap().value.heartbeat, 30);
    // A closure that refuses leaves the record as it is.
    let refused = hosts
        .update("counter", |h| match h {
            Some(h) if h.heartbeat > 10 => Err("too high"),
            _ => Ok(None),
        })
        .unwrap();
    assert_eq!(refused, Err("too high"));
    assert!(hosts.get("counter").unwrap().is_some());
}

#[test]
fn a_newer_schema_is_refused_in_place() {
    let Some(fx) = Fixture::new("a_newer_schema_is_refused_in_place") else {
        return;
    };
    let hosts = fx.store.hosts();
    hosts.create("old", &host(1)).unwrap();
    fx.ioctx
        .operate(
            hosts.object(),
            WriteOp::new().omap_set(&[
                ("future", br#"{"v":99,"hostname":"x"}"#.as_slice()),
                ("garbage", b"{not json".as_slice()),
            ]),
        )
        .unwrap();
    assert!(matches!(
        hosts.get("future"),
        Err(Error::FutureSchema { found: 99, .. })
    ));
    assert!(matches!(hosts.get("garbage"), Err(Error::Decode { .. })));
    let listed = hosts.list().unwrap();
    let ok: BTreeSet<&str> = listed
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(ok, BTreeSet::from(["old"]), "bad values hide nothing else");
    assert_eq!(listed.len(), 3);
    // A writer never overwrites what it cannot read.
    let err = hosts.modify("future", |h| h.heartbeat = 5).unwrap_err();
    assert!(matches!(err, Error::FutureSchema { .. }), "{err}");
}

#[test]
fn listing_goes_past_one_omap_page() {
    let Some(fx) = Fixture::new("listing_goes_past_one_omap_page") else {
        return;
    };
    let hosts = fx.store.hosts();
    let n = 1300;
    let value = br#"{"v":1,"hostname":"h","version":"0","heartbeat":0,"client_addr":""}"#;
    for chunk in (0..n).collect::<Vec<_>>().chunks(250) {
        let keys: Vec<String> = chunk.iter().map(|i| format!("host{i:05}")).collect();
        let pairs: Vec<(&str, &[u8])> = keys
            .iter()
            .map(|k| (k.as_str(), value.as_slice()))
            .collect();
        fx.ioctx
            .operate(
                hosts.object(),
                WriteOp::new().create(false).omap_set(&pairs),
            )
            .unwrap();
    }
    let listed = hosts.list().unwrap();
    assert_eq!(listed.len(), n);
    assert!(listed.iter().all(|(_, r)| r.is_ok()));
    assert!(listed.windows(2).all(|w| w[0].0 < w[1].0), "in key order");
    assert_eq!(listed[n - 1].0, format!("host{:05}", n - 1));
}
