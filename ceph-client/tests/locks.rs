//! cls advisory locks (leases) against a real cluster, from two clients.

mod common;

use std::time::Duration;

use ceph_client::LockFlags;
use common::{ObjectGuard, setup};

const RENEW: LockFlags = LockFlags {
    may_renew: true,
    must_renew: false,
};
const MUST: LockFlags = LockFlags {
    may_renew: false,
    must_renew: true,
};

#[test]
fn exclusive_lock_conflicts_and_release() {
    let Some(t) = setup("exclusive_lock_conflicts_and_release") else {
        return;
    };
    let _g = ObjectGuard::new(&t.io, "host.a");
    let (rados_b, io_b) = t.second_client();

    // Locking creates the object if needed.
    t.io.lock_exclusive(
        "host.a",
        "lease",
        "cookie-a",
        "host a",
        None,
        LockFlags::default(),
    )
    .unwrap();
    t.io.stat("host.a").unwrap();

    // Another client: EBUSY. Same client and cookie again: EEXIST.
    let e = io_b
        .lock_exclusive(
            "host.a",
            "lease",
            "cookie-b",
            "host b",
            None,
            LockFlags::default(),
        )
        .unwrap_err();
    assert!(e.is_busy(), "{e}");
    assert!(
        e.to_string().contains("Device or resource busy (errno 16)"),
        "{e}"
    );
    let e =
        t.io.lock_exclusive(
            "host.a",
            "lease",
            "cookie-a",
            "host a",
            None,
            LockFlags::default(),
        )
        .unwrap_err();
    assert!(e.is_exists(), "{e}");
    // Same client, other cookie: also someone else.
    let e =
        t.io.lock_exclusive(
            "host.a",
            "lease",
            "cookie-x",
            "",
            None,
            LockFlags::default(),
        )
        .unwrap_err();
    assert!(e.is_busy(), "{e}");
    // A lock of another name on the same object is independent.
    io_b.lock_exclusive(
        "host.a",
        "other",
        "cookie-b",
        "",
        None,
        LockFlags::default(),
    )
    .unwrap();

    let l = io_b.list_lockers("host.a", "lease").unwrap();
    assert!(l.exclusive);
    assert_eq!(l.tag, "");
    assert_eq!(l.lockers.len(), 1);
    assert_eq!(
        l.lockers[0].client,
        format!("client.{}", t.rados.instance_id())
    );
    assert_eq!(l.lockers[0].cookie, "cookie-a");
    assert_eq!(l.lockers[0].addr, t.rados.client_addr().unwrap());

    // Only the holder can unlock.
    let e = io_b.unlock("host.a", "lease", "cookie-a").unwrap_err();
    assert!(e.is_not_found(), "{e}");
    t.io.unlock("host.a", "lease", "cookie-a").unwrap();
    assert!(
        io_b.list_lockers("host.a", "lease")
            .unwrap()
            .lockers
            .is_empty()
    );
    let e = t.io.unlock("host.a", "lease", "cookie-a").unwrap_err();
    assert!(e.is_not_found(), "{e}");
    io_b.lock_exclusive(
        "host.a",
        "lease",
        "cookie-b",
        "host b",
        None,
        LockFlags::default(),
    )
    .unwrap();
    drop(rados_b);
    drop(io_b);
}

#[test]
fn lease_expiry_and_renewal() {
    let Some(t) = setup("lease_expiry_and_renewal") else {
        return;
    };
    let _g = ObjectGuard::new(&t.io, "lease");
    let (_rados_b, io_b) = t.second_client();
    let lease = Some(Duration::from_secs(2));

    // MUST_RENEW fails when the lock is not held.
    let e =
        t.io.lock_exclusive("lease", "l", "me", "", lease, MUST)
            .unwrap_err();
    assert!(e.is_not_found(), "{e}");

    t.io.lock_exclusive("lease", "l", "me", "", lease, LockFlags::default())
        .unwrap();
    // Renewal by the holder, both ways.
    t.io.lock_exclusive("lease", "l", "me", "", lease, RENEW)
        .unwrap();
    t.io.lock_exclusive("lease", "l", "me", "", lease, MUST)
        .unwrap();
    // The other client still cannot take it, and cannot "renew" it.
    assert!(
        io_b.lock_exclusive("lease", "l", "you", "", lease, LockFlags::default())
            .unwrap_err()
            .is_busy()
    );
    assert!(
        io_b.lock_exclusive("lease", "l", "you", "", lease, MUST)
            .is_err()
    );

    // Keep renewing past the original expiry: still ours.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(900));
        t.io.lock_exclusive("lease", "l", "me", "", lease, MUST)
            .unwrap();
    }
    assert!(
        io_b.lock_exclusive("lease", "l", "you", "", lease, LockFlags::default())
            .unwrap_err()
            .is_busy()
    );

    // Stop renewing: the lease expires and the other client takes over.
    std::thread::sleep(Duration::from_millis(2600));
    assert!(
        io_b.list_lockers("lease", "l").unwrap().lockers.is_empty(),
        "expired lockers are dropped"
    );
    io_b.lock_exclusive("lease", "l", "you", "", lease, LockFlags::default())
        .unwrap();
    // The former holder's renewal now fails.
    let e =
        t.io.lock_exclusive("lease", "l", "me", "", lease, MUST)
            .unwrap_err();
    assert!(e.errno().is_some(), "{e}");
    io_b.unlock("lease", "l", "you").unwrap();
}

#[test]
fn break_lock_of_a_dead_holder() {
    let Some(t) = setup("break_lock_of_a_dead_holder") else {
        return;
    };
    let _g = ObjectGuard::new(&t.io, "owned");
    let (rados_b, io_b) = t.second_client();
    io_b.lock_exclusive("owned", "l", "b-cookie", "", None, LockFlags::default())
        .unwrap();
    let holder = t.io.list_lockers("owned", "l").unwrap().lockers.remove(0);
    assert_eq!(holder.client, format!("client.{}", rados_b.instance_id()));
    assert_eq!(holder.addr, rados_b.client_addr().unwrap());

    // Fence the holder, then break its lock. An OSD applies the blocklist
    // when it has the map carrying it; the fencer's own operation (sent with
    // that map's epoch) makes the OSD catch up first, so from then on the
    // fenced client is refused. Before it, a zombie write could still land.
    let _g2 = ObjectGuard::new(&t.io, "owned-by-b");
    t.rados
        .blocklist_add(&holder.addr, Duration::from_secs(60))
        .unwrap();
    t.io.write_full("owned-by-b", b"new owner").unwrap();
    let e = io_b.write_full("owned-by-b", b"zombie write").unwrap_err();
    assert_eq!(
        e.errno(),
        Some(108),
        "a blocklisted client is refused (EBLOCKLISTED): {e}"
    );
    assert_eq!(t.io.read("owned-by-b").unwrap(), b"new owner");

    let e =
        t.io.break_lock("owned", "l", &holder.client, "wrong-cookie")
            .unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e =
        t.io.break_lock("owned", "l", "not-a-client", &holder.cookie)
            .unwrap_err();
    assert!(e.errno().is_some(), "{e}");
    t.io.break_lock("owned", "l", &holder.client, &holder.cookie)
        .unwrap();
    assert!(t.io.list_lockers("owned", "l").unwrap().lockers.is_empty());
    t.io.lock_exclusive("owned", "l", "a-cookie", "", None, LockFlags::default())
        .unwrap();

    drop(io_b);
    drop(rados_b);
    let cmd = format!(
        r#"{{"prefix":"osd blocklist","blocklistop":"rm","addr":"{}"}}"#,
        holder.addr
    );
    let (_, status) = t.rados.mon_command(&cmd).unwrap();
    assert!(status.contains("un-blocklisting"), "{status}");
}

#[test]
fn shared_locks_and_long_names() {
    let Some(t) = setup("shared_locks_and_long_names") else {
        return;
    };
    let _g = ObjectGuard::new(&t.io, "shared");
    let (_rados_b, io_b) = t.second_client();
    // Cookies longer than list_lockers' first buffers (ERANGE retry).
    let cookie_a = "a".repeat(300);
    let cookie_b = "b".repeat(700);
    t.io.lock_shared(
        "shared",
        "s",
        &cookie_a,
        "readers",
        "",
        None,
        LockFlags::default(),
    )
    .unwrap();
    io_b.lock_shared(
        "shared",
        "s",
        &cookie_b,
        "readers",
        "",
        None,
        LockFlags::default(),
    )
    .unwrap();
    // Exclusive while shared holders exist: EBUSY.
    let e = io_b
        .lock_exclusive("shared", "s", "x", "", None, LockFlags::default())
        .unwrap_err();
    assert!(e.is_busy(), "{e}");

    let mut l = t.io.list_lockers("shared", "s").unwrap();
    assert!(!l.exclusive);
    assert_eq!(l.tag, "readers");
    l.lockers.sort_by(|a, b| a.cookie.cmp(&b.cookie));
    assert_eq!(l.lockers.len(), 2);
    assert_eq!(l.lockers[0].cookie, cookie_a);
    assert_eq!(l.lockers[1].cookie, cookie_b);

    // Listing a lock nobody ever took, and an object that does not exist.
    assert_eq!(
        t.io.list_lockers("shared", "never").unwrap().lockers,
        vec![]
    );
    assert!(
        t.io.list_lockers("no-such-object", "s")
            .unwrap_err()
            .is_not_found()
    );
}
