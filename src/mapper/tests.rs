use std::sync::Arc;

use super::runner::fake::{Answer, FakeRunner};
use super::*;

#[test]
fn kinds_parse_and_print() {
    for kind in MapperKind::ALL {
        assert_eq!(kind.to_string().parse::<MapperKind>().unwrap(), kind);
    }
    assert_eq!(" FUSE ".parse::<MapperKind>().unwrap(), MapperKind::Fuse);
    let err = "magic".parse::<MapperKind>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown mapper \"magic\": expected one of auto, krbd, nbd, fuse"
    );
    assert!(matches!(Error::from(err), Error::UnknownKind { .. }));
    assert_eq!(MapperKind::default(), MapperKind::Auto);
}

#[test]
fn spec_spelling_and_validation() {
    let mut req = MapRequest::new("rbd", Some("fleet".into()), "img");
    assert_eq!(req.spec().to_string(), "rbd/fleet/img");
    req.snap = Some("s".into());
    assert_eq!(req.spec().to_string(), "rbd/fleet/img@s");
    assert!(req.effective_read_only());
    req.spec().validate().unwrap();
    for (field, bad) in [
        ("image", ""),
        ("image", "a/b"),
        ("image", "a\nb"),
        ("image", "-o"),
    ] {
        let mut r = MapRequest::new("rbd", None, "x");
        r.image = bad.into();
        match r.spec().validate() {
            Err(Error::InvalidRequest { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    let mut r = MapRequest::new("rbd", Some(String::new()), "x");
    assert!(r.spec().validate().is_err());
    r.namespace = None;
    r.snap = Some("a@b".into());
    assert!(r.spec().validate().is_err());
}

#[test]
fn ceph_global_arguments() {
    assert!(CephConnection::default().cli_args().is_empty());
    let c = CephConnection {
        conf: Some("/c".into()),
        id: Some("u".into()),
        keyring: Some("/k".into()),
        cluster: Some("x".into()),
    };
    assert_eq!(
        c.cli_args(),
        [
            "--cluster",
            "x",
            "--id",
            "u",
            "--conf",
            "/c",
            "--keyring",
            "/k"
        ]
    );
}

#[test]
fn mapped_devices_persist_as_json() {
    let devs = [
        MappedDevice {
            device: "/dev/rbd0".into(),
            spec: MapRequest::new("rbd", None, "a").spec(),
            read_only: false,
            handle: MappingHandle::Krbd { id: "0".into() },
        },
        MappedDevice {
            device: "/dev/nbd1".into(),
            spec: MapRequest::new("rbd", Some("n".into()), "b").spec(),
            read_only: true,
            handle: MappingHandle::Nbd { pid: Some(12) },
        },
        MappedDevice {
            device: "/dev/loop2".into(),
            spec: MapRequest::new("rbd", None, "c").spec(),
            read_only: false,
            handle: MappingHandle::Fuse(fuse::FuseHandle {
                loop_number: 2,
                mountpoint: "/run/x/mnt".into(),
                state_dir: "/run/x".into(),
                server_pid: 99,
                server_start: None,
            }),
        },
    ];
    for dev in devs {
        let json = serde_json::to_string(&dev).unwrap();
        assert!(
            json.contains(&format!("\"mapper\":\"{}\"", dev.kind())),
            "{json}"
        );
        let back: MappedDevice = serde_json::from_str(&json).unwrap();
        assert_eq!(back, dev);
    }
}

fn config(root: &std::path::Path, answers: Vec<Answer>) -> (Arc<FakeRunner>, MapperConfig) {
    let fake = Arc::new(FakeRunner::new(answers));
    let mut c = MapperConfig::new(CephConnection::default());
    c.runner = fake.clone();
    c.host_root = root.to_path_buf();
    // Programs that certainly exist, standing in for rbd and rbd-nbd.
    c.rbd_program = "/bin/sh".into();
    c.rbd_nbd_program = "/bin/sh".into();
    c.fuse.run_dir = root.join("run");
    (fake, c)
}

fn touch(root: &std::path::Path, rel: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, "").unwrap();
}

#[test]
fn auto_prefers_krbd_then_nbd_then_fuse() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let failing = || {
        Answer::Output(runner::CommandOutput::failed(
            1,
            "modprobe: FATAL: Module rbd not found",
        ))
    };

    // nothing at all
    let (fake, c) = config(r, vec![failing(), failing()]);
    match Mapper::probe(MapperKind::Auto, &c) {
        Err(Error::NoneAvailable { reasons }) => {
            assert_eq!(reasons.len(), 3, "{reasons:?}");
            assert!(reasons[2].contains("/dev/fuse is missing"), "{reasons:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        fake.rendered(),
        [
            "modprobe --dry-run --quiet rbd",
            "modprobe --dry-run --quiet nbd"
        ]
    );

    // fuse only
    touch(r, "dev/fuse");
    touch(r, "dev/loop-control");
    let (_, c) = config(r, vec![failing(), failing()]);
    assert_eq!(
        Mapper::probe(MapperKind::Auto, &c).unwrap().kind(),
        MapperKind::Fuse
    );

    // nbd device present
    touch(r, "dev/nbd0");
    let (_, c) = config(r, vec![failing()]);
    assert_eq!(
        Mapper::probe(MapperKind::Auto, &c).unwrap().kind(),
        MapperKind::Nbd
    );

    // rbd loadable as a module
    let (_, c) = config(r, vec![Answer::Output(runner::CommandOutput::ok(""))]);
    assert_eq!(
        Mapper::probe(MapperKind::Auto, &c).unwrap().kind(),
        MapperKind::Krbd
    );

    // rbd loaded
    std::fs::create_dir_all(r.join("sys/bus/rbd")).unwrap();
    let (fake, c) = config(r, vec![]);
    assert_eq!(
        Mapper::probe(MapperKind::Auto, &c).unwrap().kind(),
        MapperKind::Krbd
    );
    assert!(fake.calls().is_empty());
}

#[test]
fn explicit_kinds_are_checked() {
    let root = tempfile::tempdir().unwrap();
    let (_, mut c) = config(root.path(), vec![Answer::NotFound]);
    match Mapper::probe(MapperKind::Krbd, &c) {
        Err(
            e @ Error::Unavailable {
                kind: MapperKind::Krbd,
                ..
            },
        ) => {
            assert!(e.to_string().contains("modprobe"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    c.rbd_nbd_program = "/nonexistent/rbd-nbd".into();
    match Mapper::probe(MapperKind::Nbd, &c) {
        Err(e @ Error::Unavailable { .. }) => {
            assert!(e.to_string().contains("not installed"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        Mapper::probe(MapperKind::Fuse, &c),
        Err(Error::Unavailable { .. })
    ));
    touch(root.path(), "dev/fuse");
    touch(root.path(), "dev/loop-control");
    assert_eq!(
        Mapper::probe(MapperKind::Fuse, &c).unwrap().kind(),
        MapperKind::Fuse
    );
    c.fuse.helper = fuse::HelperCommand::binary("/nonexistent/docker-rbd-fuse");
    match Mapper::probe(MapperKind::Fuse, &c) {
        Err(e @ Error::Unavailable { .. }) => {
            assert!(e.to_string().contains("server program"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn program_lookup() {
    assert!(program_exists("sh"));
    assert!(program_exists("/bin/sh"));
    assert!(!program_exists("surely-no-such-program-here"));
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    std::fs::write(&plain, "").unwrap();
    assert!(!program_exists(plain.to_str().unwrap()));
}

#[test]
fn busy_commands_become_busy_errors() {
    let fake = FakeRunner::new([Answer::Output(runner::CommandOutput::failed(
        16,
        "x: (16) Device or resource busy",
    ))]);
    let err = run_checked(
        &fake,
        &runner::CommandLine::new("rbd"),
        Some(std::path::Path::new("/dev/rbd0")),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Busy { .. }));
    assert!(err.to_string().contains("/dev/rbd0 is busy"), "{err}");
}
