//! Object I/O, omap and atomic compound writes against a real cluster.

mod common;

use std::time::{Duration, SystemTime};

use ceph_client::{CmpOp, Error, WriteOp};
use common::{ObjectGuard, setup};

#[test]
fn whole_object_io() {
    let Some(t) = setup("whole_object_io") else {
        return;
    };
    let _g = ObjectGuard::new(&t.io, "obj");
    assert!(t.io.read("obj").unwrap_err().is_not_found());
    let e = t.io.stat("obj").unwrap_err();
    assert!(e.is_not_found());
    assert_eq!(
        e.to_string(),
        r#"rados_stat on object "obj": No such file or directory (errno 2)"#
    );
    assert!(t.io.remove("obj").unwrap_err().is_not_found());

    t.io.write_full("obj", b"hello").unwrap();
    assert_eq!(t.io.read("obj").unwrap(), b"hello");
    let (size, mtime) = t.io.stat("obj").unwrap();
    assert_eq!(size, 5);
    let age = SystemTime::now().duration_since(mtime).unwrap_or_default();
    assert!(age < Duration::from_secs(120), "mtime {mtime:?}");

    // Larger than one read round (stat size + 4 KiB), binary, replaced whole.
    let big: Vec<u8> = (0..(3 << 20) + 7).map(|i| (i * 7 % 256) as u8).collect();
    t.io.write_full("obj", &big).unwrap();
    assert!(t.io.read("obj").unwrap() == big);
    t.io.write_full("obj", b"").unwrap();
    assert_eq!(t.io.read("obj").unwrap(), b"");
    assert_eq!(t.io.stat("obj").unwrap().0, 0);

    t.io.remove("obj").unwrap();
    assert!(t.io.stat("obj").unwrap_err().is_not_found());
    let e = t.io.write_full("a\0b", b"x").unwrap_err();
    assert!(matches!(e, Error::Nul { .. }), "{e}");
    assert_eq!(e.errno(), None);
}

#[test]
fn namespaces_isolate_objects() {
    let Some(t) = setup("namespaces_isolate_objects") else {
        return;
    };
    let _g = ObjectGuard::new(&t.io, "same-name");
    t.io.write_full("same-name", b"mine").unwrap();
    let other = t
        .rados
        .ioctx(&t.env.pool, Some(&testkit::ceph::unique_namespace("other")))
        .unwrap();
    assert!(other.read("same-name").unwrap_err().is_not_found());
    assert_eq!(t.io.namespace(), Some(t.namespace.as_str()));
    assert_eq!(t.io.pool_name(), t.env.pool);
    let default = t.rados.ioctx(&t.env.pool, Some("")).unwrap();
    assert_eq!(default.namespace(), None);
    let e = t.rados.ioctx("no-such-pool", None).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(e.to_string().contains(r#"pool "no-such-pool""#), "{e}");
}

#[test]
fn listing_names_every_object_of_the_namespace_only() {
    let Some(t) = setup("listing_names_every_object_of_the_namespace_only") else {
        return;
    };
    // Registering the RBD namespace made librbd's own objects.
    let before: std::collections::BTreeSet<String> =
        t.io.list_objects().unwrap().into_iter().collect();
    let names = ["a", "b.c", "with space"];
    let _g: Vec<ObjectGuard> = names.iter().map(|n| ObjectGuard::new(&t.io, n)).collect();
    for n in names {
        t.io.write_full(n, b"x").unwrap();
    }
    let other = t
        .rados
        .ioctx(&t.env.pool, Some(&testkit::ceph::unique_namespace("other")))
        .unwrap();
    other.write_full("elsewhere", b"y").unwrap();
    let listed: Vec<String> =
        t.io.list_objects()
            .unwrap()
            .into_iter()
            .filter(|n| !before.contains(n))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
    assert_eq!(listed, names);
    other.remove("elsewhere").unwrap();
}

#[test]
fn exclusive_create_and_asserts() {
    let Some(t) = setup("exclusive_create_and_asserts") else {
        return;
    };
    let _g = ObjectGuard::new(&t.io, "rec");
    let e =
        t.io.operate("rec", WriteOp::new().assert_exists().write_full(b"x"))
            .unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(
        t.io.stat("rec").unwrap_err().is_not_found(),
        "nothing written"
    );

    t.io.operate(
        "rec",
        WriteOp::new()
            .create(true)
            .omap_set(&[("k", b"v1".as_slice())]),
    )
    .unwrap();
    let e =
        t.io.operate(
            "rec",
            WriteOp::new()
                .create(true)
                .omap_set(&[("k", b"v2".as_slice())]),
        )
        .unwrap_err();
    assert!(e.is_exists(), "{e}");
    assert!(
        e.to_string()
            .starts_with(r#"rados_write_op_operate on object "rec": File exists (errno 17)"#),
        "{e}"
    );
    // Idempotent create on an existing object is fine.
    t.io.operate("rec", WriteOp::new().create(false)).unwrap();
    assert_eq!(
        t.io.omap_get_vals_by_keys("rec", &["k"]).unwrap(),
        vec![("k".to_string(), b"v1".to_vec())]
    );

    // Version asserts.
    t.io.write_full("rec", b"data").unwrap();
    let v = t.io.last_version();
    assert!(v > 0);
    t.io.operate("rec", WriteOp::new().assert_version(v).write_full(b"data2"))
        .unwrap();
    let e =
        t.io.operate("rec", WriteOp::new().assert_version(v).write_full(b"stale"))
            .unwrap_err();
    assert_eq!(e.errno(), Some(libc::ERANGE), "{e}");
    let e =
        t.io.operate(
            "rec",
            WriteOp::new().assert_version(v + 100).write_full(b"future"),
        )
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::EOVERFLOW), "{e}");
    assert_eq!(t.io.read("rec").unwrap(), b"data2");

    // Remove through an op, guarded by an assert.
    t.io.operate("rec", WriteOp::new().assert_exists().remove())
        .unwrap();
    assert!(t.io.stat("rec").unwrap_err().is_not_found());
    let e = t.io.operate("rec", WriteOp::new().remove()).unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

#[test]
fn omap_compare_and_set() {
    let Some(t) = setup("omap_compare_and_set") else {
        return;
    };
    let _g = ObjectGuard::new(&t.io, "cas");

    // Comparing on a missing object: ENOENT.
    let e =
        t.io.operate(
            "cas",
            WriteOp::new()
                .omap_cmp_eq("k", b"")
                .omap_set(&[("k", b"v")]),
        )
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");

    t.io.operate("cas", WriteOp::new().create(false)).unwrap();
    // Absent key == empty value: create-if-absent.
    t.io.operate(
        "cas",
        WriteOp::new()
            .omap_cmp_eq("k", b"")
            .omap_set(&[("k", b"v1")]),
    )
    .unwrap();
    let e =
        t.io.operate(
            "cas",
            WriteOp::new()
                .omap_cmp_eq("k", b"")
                .omap_set(&[("k", b"other")]),
        )
        .unwrap_err();
    assert!(e.is_canceled(), "{e}");

    // Matching value: swap.
    t.io.operate(
        "cas",
        WriteOp::new()
            .omap_cmp_eq("k", b"v1")
            .omap_set(&[("k", b"v2")]),
    )
    .unwrap();

    // Stale value: ECANCELED and none of the op's writes happen.
    let stale = WriteOp::new()
        .omap_cmp_eq("k", b"v1")
        .omap_set(&[("k", b"v3".as_slice()), ("side", b"effect".as_slice())])
        .write_full(b"payload");
    let e = t.io.operate("cas", stale).unwrap_err();
    assert!(e.is_canceled(), "{e}");
    assert_eq!(e.errno(), Some(125));
    assert_eq!(
        t.io.omap_get_all("cas").unwrap(),
        vec![("k".to_string(), b"v2".to_vec())]
    );
    assert_eq!(t.io.read("cas").unwrap(), b"");

    // Several compares must all hold.
    t.io.operate("cas", WriteOp::new().omap_set(&[("a", b"1")]))
        .unwrap();
    let e =
        t.io.operate(
            "cas",
            WriteOp::new()
                .omap_cmp_eq("k", b"v2")
                .omap_cmp_eq("a", b"2")
                .omap_rm_keys(&["k"]),
        )
        .unwrap_err();
    assert!(e.is_canceled(), "{e}");
    t.io.operate(
        "cas",
        WriteOp::new()
            .omap_cmp_eq("k", b"v2")
            .omap_cmp_eq("a", b"1")
            .omap_rm_keys(&["k"]),
    )
    .unwrap();
    assert_eq!(
        t.io.omap_get_all("cas").unwrap(),
        vec![("a".to_string(), b"1".to_vec())]
    );

    // Other comparison operators (bytewise).
    t.io.operate(
        "cas",
        WriteOp::new()
            .omap_cmp("a", CmpOp::Lt, b"2")
            .omap_set(&[("lt", b"ok")]),
    )
    .unwrap();
    let e =
        t.io.operate("cas", WriteOp::new().omap_cmp("a", CmpOp::Gt, b"5"))
            .unwrap_err();
    assert!(e.is_canceled(), "{e}");
    // "stored > given": "1" > "0".
    t.io.operate("cas", WriteOp::new().omap_cmp("a", CmpOp::Gt, b"0"))
        .unwrap();
    let e =
        t.io.operate("cas", WriteOp::new().omap_cmp("a", CmpOp::Lt, b"1"))
            .unwrap_err();
    assert!(e.is_canceled(), "{e}");

    // Binary values with NUL bytes compare and store exactly.
    let bin = [0u8, 1, 0, 255];
    t.io.operate("cas", WriteOp::new().omap_set(&[("bin", bin)]))
        .unwrap();
    t.io.operate(
        "cas",
        WriteOp::new()
            .omap_cmp_eq("bin", &bin)
            .omap_set(&[("bin", [9u8])]),
    )
    .unwrap();
    let e =
        t.io.operate("cas", WriteOp::new().omap_cmp_eq("bin", &[0u8, 1]))
            .unwrap_err();
    assert!(e.is_canceled(), "{e}");

    t.io.operate("cas", WriteOp::new().omap_clear()).unwrap();
    assert!(t.io.omap_get_all("cas").unwrap().is_empty());
}

#[test]
fn omap_reads_page_and_filter() {
    let Some(t) = setup("omap_reads_page_and_filter") else {
        return;
    };
    let _g = ObjectGuard::new(&t.io, "map");
    assert!(
        t.io.omap_get_vals("map", None, None, 10)
            .unwrap_err()
            .is_not_found()
    );
    assert!(t.io.omap_get_all("map").unwrap_err().is_not_found());
    assert!(
        t.io.omap_get_vals_by_keys("map", &["x"])
            .unwrap_err()
            .is_not_found()
    );

    // More keys than one page of omap_get_all (512).
    let pairs: Vec<(String, Vec<u8>)> = (0..1200)
        .map(|i| (format!("layer.{i:05}"), format!("value-{i}").into_bytes()))
        .collect();
    for chunk in pairs.chunks(300) {
        t.io.operate("map", WriteOp::new().create(false).omap_set(chunk))
            .unwrap();
    }
    t.io.operate(
        "map",
        WriteOp::new().omap_set(&[("host.a", b"h1"), ("host.b", b"h2")]),
    )
    .unwrap();

    let all = t.io.omap_get_all("map").unwrap();
    assert_eq!(all.len(), 1202);
    assert!(
        all[2..] == pairs[..],
        "layer keys in order after the host keys"
    );
    assert_eq!(all[0].0, "host.a");

    let (page, more) = t.io.omap_get_vals("map", None, Some("host."), 10).unwrap();
    assert_eq!(
        page,
        vec![
            ("host.a".into(), b"h1".to_vec()),
            ("host.b".into(), b"h2".to_vec())
        ]
    );
    assert!(!more);
    let (page, more) =
        t.io.omap_get_vals("map", Some("layer.00009"), Some("layer."), 3)
            .unwrap();
    assert_eq!(
        page.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["layer.00010", "layer.00011", "layer.00012"]
    );
    assert!(more);
    let (page, more) =
        t.io.omap_get_vals("map", Some("layer.01199"), Some("layer."), 3)
            .unwrap();
    assert!(page.is_empty() && !more);

    let got =
        t.io.omap_get_vals_by_keys("map", &["host.b", "missing", "layer.00000"])
            .unwrap();
    assert_eq!(
        got,
        vec![
            ("host.b".into(), b"h2".to_vec()),
            ("layer.00000".into(), b"value-0".to_vec())
        ]
    );
    assert!(
        t.io.omap_get_vals_by_keys::<&str>("map", &[])
            .unwrap()
            .is_empty()
    );

    t.io.operate(
        "map",
        WriteOp::new().omap_rm_keys(&["host.a", "host.b", "never-there"]),
    )
    .unwrap();
    assert!(
        t.io.omap_get_vals("map", None, Some("host."), 10)
            .unwrap()
            .0
            .is_empty()
    );
}

#[test]
fn clones_of_an_ioctx_share_it_and_outlive_the_rados_value() {
    let Some(t) = setup("clones_of_an_ioctx") else {
        return;
    };
    let _g = ObjectGuard::new(&t.io, "shared");
    let (rados, io) = t.second_client();
    let io2 = io.clone();
    assert_eq!(io2.rados().instance_id(), rados.instance_id());
    drop(rados);
    drop(io);
    io2.write_full("shared", b"still connected").unwrap();
    assert_eq!(t.io.read("shared").unwrap(), b"still connected");
}
