//! Watch/notify against a real cluster.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ObjectGuard, setup};

type Seen = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

fn recorder() -> (Seen, ceph_client::WatchCallback) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    (
        seen,
        Box::new(move |_notify_id, notifier_id, payload: &[u8]| {
            s.lock().unwrap().push((notifier_id, payload.to_vec()))
        }),
    )
}

#[test]
fn notify_reaches_watchers_and_waits_for_their_ack() {
    let Some(t) = setup("notify_reaches_watchers") else {
        return;
    };
    let _g = ObjectGuard::new(&t.io, "events");
    t.io.write_full("events", b"").unwrap();

    // Two watchers: one on this connection, one on another client.
    let (seen_a, cb_a) = recorder();
    let watch_a = t.io.watch("events", cb_a).unwrap();
    let (rados_b, io_b) = t.second_client();
    let (seen_b, cb_b) = recorder();
    let watch_b = io_b.watch("events", cb_b).unwrap();
    assert_eq!(watch_a.oid(), "events");
    assert!(watch_a.check().is_ok());
    assert_eq!(watch_a.last_error(), None);

    // notify returns after every callback ran (acks follow the callback).
    let started = Instant::now();
    t.io.notify("events", b"layer abc removed", Duration::from_secs(10))
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "acked promptly: {:?}",
        started.elapsed()
    );
    let me = t.rados.instance_id();
    assert_eq!(
        *seen_a.lock().unwrap(),
        vec![(me, b"layer abc removed".to_vec())]
    );
    assert_eq!(
        *seen_b.lock().unwrap(),
        vec![(me, b"layer abc removed".to_vec())]
    );

    // From the other side, with an empty and a binary payload.
    io_b.notify("events", b"", Duration::from_secs(10)).unwrap();
    io_b.notify("events", &[0, 1, 2, 0], Duration::from_secs(10))
        .unwrap();
    let other = rados_b.instance_id();
    assert_eq!(
        seen_a.lock().unwrap()[1..],
        [(other, vec![]), (other, vec![0, 1, 2, 0])]
    );
    assert_eq!(watch_a.notifies(), 3);
    assert_eq!(watch_b.notifies(), 3);

    // After unwatching, nothing more arrives and notify still succeeds.
    drop(watch_b);
    t.io.notify("events", b"again", Duration::from_secs(10))
        .unwrap();
    assert_eq!(seen_b.lock().unwrap().len(), 3);
    assert_eq!(seen_a.lock().unwrap().len(), 4);
    drop(watch_a);
    t.io.notify("events", b"nobody", Duration::from_secs(10))
        .unwrap();
    assert_eq!(seen_a.lock().unwrap().len(), 4);
}

#[test]
fn watch_errors_and_notify_without_object() {
    let Some(t) = setup("watch_errors") else {
        return;
    };
    let (_, cb) = recorder();
    let e = t.io.watch("missing", cb).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(
        e.to_string()
            .starts_with(r#"rados_watch2 on object "missing""#),
        "{e}"
    );
    let e =
        t.io.notify("missing", b"x", Duration::from_secs(5))
            .unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

#[test]
fn panicking_callback_still_acks() {
    let Some(t) = setup("panicking_callback_still_acks") else {
        return;
    };
    let _g = ObjectGuard::new(&t.io, "p");
    t.io.write_full("p", b"").unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let _w =
        t.io.watch(
            "p",
            Box::new(move |_, _, _| {
                c.fetch_add(1, Ordering::SeqCst);
                panic!("callback bug");
            }),
        )
        .unwrap();
    t.io.notify("p", b"1", Duration::from_secs(10)).unwrap();
    t.io.notify("p", b"2", Duration::from_secs(10)).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[test]
fn slow_watcher_times_out_the_notifier() {
    let Some(t) = setup("slow_watcher_times_out") else {
        return;
    };
    let _g = ObjectGuard::new(&t.io, "slow");
    t.io.write_full("slow", b"").unwrap();
    let (_rados_b, io_b) = t.second_client();
    let w = io_b
        .watch(
            "slow",
            Box::new(|_, _, _| std::thread::sleep(Duration::from_secs(3))),
        )
        .unwrap();
    let started = Instant::now();
    let e =
        t.io.notify("slow", b"hurry", Duration::from_secs(1))
            .unwrap_err();
    assert!(e.is_timed_out(), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Dropping the watch waits for the running callback, then frees it.
    drop(w);
}

#[test]
fn watches_from_many_threads() {
    let Some(t) = setup("watches_from_many_threads") else {
        return;
    };
    let objs: Vec<String> = (0..4).map(|i| format!("obj{i}")).collect();
    let _guards: Vec<ObjectGuard> = objs.iter().map(|o| ObjectGuard::new(&t.io, o)).collect();
    let total = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|s| {
        for o in &objs {
            let io = t.io.clone();
            let total = total.clone();
            s.spawn(move || {
                io.write_full(o, b"").unwrap();
                let n = total.clone();
                let w = io
                    .watch(
                        o,
                        Box::new(move |_, _, _| {
                            n.fetch_add(1, Ordering::SeqCst);
                        }),
                    )
                    .unwrap();
                for _ in 0..5 {
                    io.notify(o, b"tick", Duration::from_secs(10)).unwrap();
                }
                drop(w);
            });
        }
    });
    assert_eq!(total.load(Ordering::SeqCst), 20);
}
