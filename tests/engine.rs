//! The layer engine against a real Ceph cluster, with the fuse mapper and
//! real mounts. Needs root, /dev/fuse and loop devices; skipped (not failed)
//! when run bare without them, failed under scripts/test.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;

use ceph_client::rbd::{self, Image};
use ceph_client::{IoCtx, Rados};
use docker_rbd::config::{RawSettings, Settings, Source};
use docker_rbd::engine::mounts::MountOn;
use docker_rbd::engine::{CreateOptions, Engine, EngineError};
use docker_rbd::mapper::fuse::HelperCommand;
use metadata::{LayerKind, LayerRecord, LayerState};

fn fuse_helper() -> HelperCommand {
    HelperCommand::binary(env!("CARGO_BIN_EXE_docker-rbd-fuse"))
}

fn hex(n: u32) -> String {
    format!("{n:064x}")
}

struct Fixture {
    settings: Settings,
    home: tempfile::TempDir,
    /// `rbd.mountroot` of every engine of the test: outside its Homes.
    mounts: tempfile::TempDir,
    ioctx: Arc<IoCtx>,
    _rados: Rados,
}

impl Fixture {
    fn new(test: &str, extra: &[(&str, &str)]) -> Option<Self> {
        let ceph = testkit::ceph::require(test)?;
        if !testkit::require::layer_mounts(test) {
            return None;
        }
        let namespace = testkit::ceph::unique_namespace(test);
        let mounts = tempfile::tempdir().expect("tempdir");
        let mut raw = RawSettings::default();
        for (k, v) in [
            ("conf", ceph.conf.display().to_string()),
            ("id", ceph.id.clone()),
            ("keyring", ceph.keyring.display().to_string()),
            ("pool", ceph.pool.clone()),
            ("namespace", namespace.clone()),
            ("mapper", "fuse".to_string()),
            ("basesize", "256M".to_string()),
            ("mountroot", mounts.path().display().to_string()),
        ] {
            raw.set(k, &v, Source::Flag);
        }
        // Per-test settings override the defaults above, as flags do a file.
        let mut over = RawSettings::default();
        for (k, v) in extra {
            over.set(k, v, Source::StorageOpt);
        }
        let settings = raw.overlay(over).resolve().expect("test settings");
        let rados = Rados::connect(&ceph.connect_config()).expect("connect");
        let ioctx = Arc::new(rados.ioctx(&ceph.pool, Some(&namespace)).expect("ioctx"));
        Some(Self {
            settings,
            home: tempfile::tempdir().expect("tempdir"),
            mounts,
            ioctx,
            _rados: rados,
        })
    }

    fn engine(&self) -> Engine {
        self.engine_at(self.home.path())
    }

    /// An engine on `home`, as a host of its own: its host id is named
    /// after the Home, so two Homes are two hosts of one fleet.
    fn engine_at(&self, home: &std::path::Path) -> Engine {
        Engine::open_with(self.settings_for(home), home, fuse_helper()).expect("engine opens")
    }

    fn settings_for(&self, home: &std::path::Path) -> docker_rbd::config::Settings {
        let mut settings = self.settings.clone();
        let name = home.file_name().and_then(|n| n.to_str()).unwrap_or("home");
        let id: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        settings.host_id = Some(format!("h-{id}"));
        settings
    }

    fn images(&self) -> BTreeSet<String> {
        rbd::list(&self.ioctx)
            .expect("list images")
            .into_iter()
            .map(|i| i.name)
            .collect()
    }

    fn record(&self, engine: &Engine, id: &str) -> Option<LayerRecord> {
        engine
            .store()
            .layers()
            .get(id)
            .expect("read record")
            .map(|v| v.value)
    }
}

impl Drop for Fixture {
    /// Unmounts whatever a failed test left mounted, then removes every
    /// image of the test's namespace (clones before parents) and its
    /// metadata objects.
    fn drop(&mut self) {
        if let Err(e) = testkit::mounts::unmount_under(None, self.mounts.path()) {
            eprintln!("cleanup: {e}");
        }
        if let Ok(engine) = Engine::open_with(
            self.settings_for(self.home.path()),
            self.home.path(),
            fuse_helper(),
        ) {
            for (id, _) in engine.mounts().unwrap_or_default() {
                let _ = engine.put(&id);
                while engine.mount_record(&id).ok().flatten().is_some() {
                    if engine.put(&id).is_err() {
                        break;
                    }
                }
            }
        }
        for _ in 0..10 {
            let images = self.images();
            if images.is_empty() {
                break;
            }
            for name in images {
                if let Ok(img) = Image::open(&self.ioctx, &name, None) {
                    for snap in img.snap_list().unwrap_or_default() {
                        let _ = img.snap_remove(&snap.name);
                    }
                }
                let _ = rbd::remove(&self.ioctx, &name);
            }
        }
        let prefix = self.settings.naming.prefix();
        for object in ["layers", "hosts", "base.lock"] {
            let _ = self.ioctx.remove(&format!("{prefix}{object}"));
        }
        if let Ok(pool) = self._rados.ioctx(self.ioctx.pool_name(), None) {
            let _ = rbd::namespace_remove(&pool, &self.settings.namespace);
        }
        // A plugin's Init binds its Home and mount directory onto
        // themselves (private mounts).
        for dir in [self.home.path(), self.mounts.path()] {
            if let Err(e) = testkit::mounts::unmount_under(None, dir) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

fn image_layer() -> CreateOptions {
    CreateOptions {
        kind: LayerKind::Image,
        size: None,
        mount_label: String::new(),
    }
}

fn rw_layer(size: Option<u64>) -> CreateOptions {
    CreateOptions {
        kind: LayerKind::ReadWrite,
        size,
        mount_label: String::new(),
    }
}

#[test]
fn layers_clone_their_parent_and_seal_it() {
    let Some(fx) = Fixture::new("layers_clone_their_parent_and_seal_it", &[]) else {
        return;
    };
    let engine = fx.engine();
    let (l1, l2) = (hex(1), hex(2));

    engine.create(&l1, "", &image_layer()).unwrap();
    let root = engine.get(&l1, "").unwrap();
    assert_eq!(root, engine.mount_dir().join(&l1).join("rootfs"));
    assert!(root.starts_with(fx.mounts.path()) && !root.starts_with(fx.home.path()));
    let meta = std::fs::metadata(&root).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "a new layer is empty"
    );
    std::fs::write(root.join("hello"), b"from layer one").unwrap();
    engine.put(&l1).unwrap();
    assert!(!docker_rbd::fs::is_mounted(root.parent().unwrap()));

    engine.create(&l2, &l1, &image_layer()).unwrap();
    assert!(fx.record(&engine, &l1).unwrap().sealed);
    let r1 = fx.record(&engine, &l2).unwrap();
    assert_eq!(r1.parent.as_deref(), Some(l1.as_str()));
    assert_eq!(r1.state, LayerState::Created);
    assert_eq!(r1.depth, 1);

    let child = engine.get(&l2, "").unwrap();
    assert_eq!(
        std::fs::read(child.join("hello")).unwrap(),
        b"from layer one"
    );
    std::fs::write(child.join("hello"), b"changed in two").unwrap();

    let parent = engine.get(&l1, "").unwrap();
    assert_eq!(
        std::fs::read(parent.join("hello")).unwrap(),
        b"from layer one"
    );
    let err = std::fs::write(parent.join("new"), b"x").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EROFS),
        "sealed layers mount read-only"
    );
    engine.put(&l1).unwrap();
    engine.put(&l2).unwrap();

    engine.remove(&l2).unwrap();
    engine.remove(&l1).unwrap();
    let left: Vec<String> = fx
        .images()
        .into_iter()
        .filter(|i| !i.contains(".base."))
        .collect();
    assert!(left.is_empty(), "images left: {left:?}");
    assert!(engine.list().unwrap().is_empty());
}

#[test]
fn removing_a_parent_first_retires_it_until_its_clone_goes() {
    let Some(fx) = Fixture::new("removing_a_parent_first_retires_it", &[]) else {
        return;
    };
    let engine = fx.engine();
    let (l1, l2) = (hex(11), hex(12));
    engine.create(&l1, "", &image_layer()).unwrap();
    engine.create(&l2, &l1, &image_layer()).unwrap();
    engine.remove(&l1).unwrap();
    assert_eq!(fx.record(&engine, &l1).unwrap().state, LayerState::Retired);
    assert!(!engine.exists(&l1).unwrap());
    assert!(
        fx.images().contains(
            &fx.settings
                .naming
                .layer_image(&docker_rbd::names::LayerId::parse(&l1).unwrap())
        )
    );
    engine.remove(&l2).unwrap();
    assert!(
        engine.list().unwrap().is_empty(),
        "the retired parent went with its last clone"
    );
    assert_eq!(
        fx.images().len(),
        1,
        "only the base image is left: {:?}",
        fx.images()
    );
}

#[test]
fn create_and_remove_are_idempotent_and_validate_ids() {
    let Some(fx) = Fixture::new("create_and_remove_are_idempotent", &[]) else {
        return;
    };
    let engine = fx.engine();
    let l1 = hex(21);
    engine.create(&l1, "", &image_layer()).unwrap();
    engine.create(&l1, "", &image_layer()).unwrap();
    let err = engine.create(&l1, &hex(99), &image_layer()).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    engine.remove(&hex(77)).unwrap();
    engine.remove(&l1).unwrap();
    engine.remove(&l1).unwrap();
    for bad in ["", "../etc", ".", "..", "a\0b", &"x".repeat(256)] {
        let err = engine.create(bad, "", &image_layer()).unwrap_err();
        assert!(matches!(err, EngineError::InvalidId(_)), "{bad}: {err}");
    }
    let err = engine
        .create(&hex(22), &hex(404), &image_layer())
        .unwrap_err();
    assert!(matches!(err, EngineError::NotFound { .. }), "{err}");
    assert!(
        engine.list().unwrap().is_empty(),
        "a failed create leaves no record"
    );
}

#[test]
fn get_and_put_are_reference_counted() {
    let Some(fx) = Fixture::new("get_and_put_are_reference_counted", &[]) else {
        return;
    };
    let engine = fx.engine();
    let l1 = hex(31);
    engine.create(&l1, "", &image_layer()).unwrap();
    let a = engine.get(&l1, "").unwrap();
    let b = engine.get(&l1, "").unwrap();
    assert_eq!(a, b);
    assert_eq!(engine.mount_record(&l1).unwrap().unwrap().refcount, 2);
    // Removing a layer still in use waits a while for its Puts, then is
    // refused; it stays whole.
    let err = engine.remove(&l1).unwrap_err();
    assert!(
        matches!(&err, EngineError::Conflict { reason, .. } if reason.contains("in use")),
        "{err}"
    );
    assert_eq!(fx.record(&engine, &l1).unwrap().state, LayerState::Created);
    assert_eq!(engine.mount_record(&l1).unwrap().unwrap().refcount, 2);
    assert!(docker_rbd::fs::is_mounted(a.parent().unwrap()));
    engine.put(&l1).unwrap();
    assert!(docker_rbd::fs::is_mounted(a.parent().unwrap()));
    engine.put(&l1).unwrap();
    assert!(!docker_rbd::fs::is_mounted(a.parent().unwrap()));
    assert!(engine.mount_record(&l1).unwrap().is_none());
    engine.put(&l1).unwrap();
    // A user that Puts while the removal waits: the removal goes on.
    engine.get(&l1, "").unwrap();
    let engine = Arc::new(engine);
    let late = {
        let engine = engine.clone();
        let l1 = l1.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            engine.put(&l1).unwrap();
        })
    };
    engine.remove(&l1).unwrap();
    late.join().unwrap();
    assert!(fx.record(&engine, &l1).is_none());
}

#[test]
fn a_read_only_layer_stays_mounted_idle_for_the_next_get() {
    let Some(fx) = Fixture::new("a_read_only_layer_stays_mounted_idle_for_the_next_get", &[])
    else {
        return;
    };
    let engine = fx.engine();
    let (l1, l2) = (hex(36), hex(37));
    engine.create(&l1, "", &image_layer()).unwrap();
    // A child seals l1: from then on it is mounted read-only.
    engine.create(&l2, &l1, &image_layer()).unwrap();
    let root = engine.get(&l1, "").unwrap();
    let first = engine.mount_record(&l1).unwrap().unwrap();
    assert!(first.read_only);
    engine.put(&l1).unwrap();
    let idle = engine.mount_record(&l1).unwrap().expect("still mounted");
    assert!(idle.is_idle() && idle.idle_until.is_some(), "{idle:?}");
    assert!(docker_rbd::fs::is_mounted(root.parent().unwrap()));
    // A Put too many changes nothing.
    engine.put(&l1).unwrap();
    assert_eq!(engine.mount_record(&l1).unwrap(), Some(idle));

    // The next Get takes the same mount and device as they are.
    assert_eq!(engine.get(&l1, "").unwrap(), root);
    let again = engine.mount_record(&l1).unwrap().unwrap();
    assert_eq!((again.refcount, again.idle_until), (1, None));
    assert_eq!(again.device, first.device, "not mapped again");
    engine.put(&l1).unwrap();
    assert_eq!(
        engine.release_idle_mounts(false),
        0,
        "the linger (10 s) is not over"
    );
    assert_eq!(engine.release_idle_mounts(true), 1);
    assert!(!docker_rbd::fs::is_mounted(root.parent().unwrap()));
    assert!(engine.mount_record(&l1).unwrap().is_none());

    // A removal takes an idle mount with it.
    engine.get(&l1, "").unwrap();
    engine.put(&l1).unwrap();
    engine.remove(&l2).unwrap();
    engine.remove(&l1).unwrap();
    assert!(engine.mounts().unwrap().is_empty());
    assert!(!docker_rbd::fs::is_mounted(root.parent().unwrap()));
    drop(engine);

    // With rbd.mountlinger=0 the last Put unmounts.
    let Some(fx) = Fixture::new(
        "a_read_only_layer_stays_mounted_idle_for_the_next_get",
        &[("mountlinger", "0")],
    ) else {
        return;
    };
    let engine = fx.engine();
    engine.create(&l1, "", &image_layer()).unwrap();
    engine.create(&l2, &l1, &image_layer()).unwrap();
    let root = engine.get(&l1, "").unwrap();
    engine.put(&l1).unwrap();
    assert!(engine.mount_record(&l1).unwrap().is_none());
    assert!(!docker_rbd::fs::is_mounted(root.parent().unwrap()));
    engine.remove(&l2).unwrap();
    engine.remove(&l1).unwrap();
}

#[test]
fn a_restarted_engine_adopts_live_mounts() {
    let Some(fx) = Fixture::new("a_restarted_engine_adopts_live_mounts", &[]) else {
        return;
    };
    let l1 = hex(41);
    let root = {
        let engine = fx.engine();
        engine.create(&l1, "", &rw_layer(None)).unwrap();
        let root = engine.get(&l1, "").unwrap();
        std::fs::write(root.join("data"), b"written before the crash").unwrap();
        root
        // The engine goes away without a put, as a killed daemon would.
    };
    let engine = fx.engine();
    let m = engine.mount_record(&l1).unwrap().expect("mount adopted");
    assert_eq!(m.refcount, 1);
    assert_eq!(
        std::fs::read(root.join("data")).unwrap(),
        b"written before the crash"
    );
    engine.put(&l1).unwrap();
    assert!(!docker_rbd::fs::is_mounted(root.parent().unwrap()));
    engine.remove(&l1).unwrap();
}

#[test]
fn a_restarted_engine_rolls_back_an_interrupted_create() {
    let Some(fx) = Fixture::new("rolls_back_an_interrupted_create", &[]) else {
        return;
    };
    let l1 = hex(51);
    let engine = fx.engine();
    engine.create(&l1, "", &image_layer()).unwrap();
    // Fake a crash between "record Creating" and "record Created".
    engine
        .store()
        .layers()
        .modify(&l1, |r| r.state = LayerState::Creating)
        .unwrap();
    drop(engine);
    let engine = fx.engine();
    assert!(fx.record(&engine, &l1).is_none(), "record rolled back");
    assert_eq!(fx.images().len(), 1, "image rolled back: {:?}", fx.images());
}

#[test]
fn size_option_grows_or_limits_the_layer() {
    let Some(fx) = Fixture::new("size_option_grows_or_limits_the_layer", &[]) else {
        return;
    };
    let engine = fx.engine();
    let (big, small) = (hex(61), hex(62));

    engine.create(&big, "", &rw_layer(Some(512 << 20))).unwrap();
    assert_eq!(fx.record(&engine, &big).unwrap().size, 512 << 20);
    let root = engine.get(&big, "").unwrap();
    let stat = nix::sys::statvfs::statvfs(&root).unwrap();
    let total = stat.blocks() * stat.fragment_size();
    assert!(
        total > 400 << 20,
        "filesystem grown to the image: {total} bytes"
    );
    engine.put(&big).unwrap();

    engine
        .create(&small, "", &rw_layer(Some(32 << 20)))
        .unwrap();
    let root = engine.get(&small, "").unwrap();
    let chunk = vec![7u8; 1 << 20];
    let mut written = 0u64;
    let err = loop {
        let path = root.join(format!("f{}", written >> 20));
        match std::fs::write(&path, &chunk).and_then(|()| std::fs::File::open(&path)?.sync_all()) {
            Ok(()) => written += 1 << 20,
            Err(e) => break e,
        }
        assert!(
            written < 128 << 20,
            "wrote {written} bytes past a 32 MiB limit"
        );
    };
    assert!(
        matches!(err.raw_os_error(), Some(libc::EDQUOT) | Some(libc::ENOSPC)),
        "{err}"
    );
    // ext4 shrinks the layer's filesystem to the limit; its journal and
    // metadata take a share of it.
    assert!(
        (12 << 20..=32 << 20).contains(&written),
        "stopped after {written} bytes"
    );
    assert_eq!(fx.record(&engine, &small).unwrap().size, 32 << 20);
    engine.put(&small).unwrap();

    let err = engine
        .create(&hex(63), "", &rw_layer(Some(1 << 20)))
        .unwrap_err();
    assert!(
        err.to_string().contains("below the 16 MiB minimum"),
        "{err}"
    );
    engine.remove(&big).unwrap();
    engine.remove(&small).unwrap();
}

#[test]
fn deep_chains_are_flattened() {
    let Some(fx) = Fixture::new("deep_chains_are_flattened", &[("flattendepth", "2")]) else {
        return;
    };
    let engine = fx.engine();
    let ids: Vec<String> = (70..75).map(hex).collect();
    let mut parent = String::new();
    for id in &ids {
        engine.create(id, &parent, &image_layer()).unwrap();
        let root = engine.get(id, "").unwrap();
        std::fs::write(root.join(format!("file-{}", &id[60..])), id.as_bytes()).unwrap();
        engine.put(id).unwrap();
        parent = id.clone();
    }
    let depths: Vec<u32> = ids
        .iter()
        .map(|id| fx.record(&engine, id).unwrap().depth)
        .collect();
    assert_eq!(depths, vec![0, 1, 2, 0, 1]);
    let flattened =
        Image::open_read_only(&fx.ioctx, &fx.record(&engine, &ids[3]).unwrap().image, None)
            .unwrap();
    assert!(
        flattened.parent().unwrap().is_none(),
        "depth 3 was flattened"
    );
    drop(flattened);
    let last = engine.get(&ids[4], "").unwrap();
    for id in &ids {
        assert_eq!(
            std::fs::read(last.join(format!("file-{}", &id[60..]))).unwrap(),
            id.as_bytes()
        );
    }
    engine.put(&ids[4]).unwrap();
    for id in ids.iter().rev() {
        engine.remove(id).unwrap();
    }
}

#[test]
fn two_daemons_racing_make_one_base_image() {
    let Some(fx) = Fixture::new("two_daemons_racing_make_one_base_image", &[]) else {
        return;
    };
    let other_home = tempfile::tempdir().unwrap();
    let a = fx.engine();
    let b = fx.engine_at(other_home.path());
    std::thread::scope(|s| {
        let ta = s.spawn(|| a.create(&hex(81), "", &image_layer()));
        let tb = s.spawn(|| b.create(&hex(82), "", &image_layer()));
        ta.join().unwrap().unwrap();
        tb.join().unwrap().unwrap();
    });
    let bases: Vec<String> = fx
        .images()
        .into_iter()
        .filter(|i| i.contains(".base."))
        .collect();
    assert_eq!(bases.len(), 1, "{bases:?}");
    assert_ne!(a.host_id(), b.host_id());
    a.remove(&hex(81)).unwrap();
    b.remove(&hex(82)).unwrap();
}

#[test]
fn a_parent_still_mounted_writable_is_frozen_for_its_snapshot() {
    let Some(fx) = Fixture::new("parent_still_mounted_writable", &[]) else {
        return;
    };
    let engine = fx.engine();
    let (parent, child) = (hex(91), hex(92));
    // BuildKit makes writable build snapshots with Create and keeps them
    // mounted while it writes; a child may be created before the Put.
    engine.create(&parent, "", &image_layer()).unwrap();
    let root = engine.get(&parent, "").unwrap();
    std::fs::write(root.join("built"), b"by the build step").unwrap();
    engine.create(&child, &parent, &image_layer()).unwrap();
    let after = std::fs::write(root.join("after-seal"), b"still writable");
    assert!(
        after.is_ok(),
        "the writable mount is thawed after the snapshot: {after:?}"
    );
    let child_root = engine.get(&child, "").unwrap();
    assert_eq!(
        std::fs::read(child_root.join("built")).unwrap(),
        b"by the build step",
        "the snapshot holds what was written before it, without an unmount"
    );
    assert!(!child_root.join("after-seal").exists());
    engine.put(&child).unwrap();
    engine.put(&parent).unwrap();
    engine.remove(&child).unwrap();
    engine.remove(&parent).unwrap();
}

#[test]
fn xfs_layers_clone_seal_and_grow() {
    let Some(fx) = Fixture::new(
        "xfs_layers_clone_seal_and_grow",
        &[("fs", "xfs"), ("basesize", "512M")],
    ) else {
        return;
    };
    let engine = fx.engine();
    let (l1, l2, big) = (hex(101), hex(102), hex(103));
    engine.create(&l1, "", &image_layer()).unwrap();
    let root = engine.get(&l1, "").unwrap();
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    std::fs::write(root.join("f"), b"xfs").unwrap();
    engine.put(&l1).unwrap();
    // Every clone shares the base filesystem's UUID: mounting a parent and
    // its child together needs nouuid.
    engine.create(&l2, &l1, &image_layer()).unwrap();
    let parent = engine.get(&l1, "").unwrap();
    let child = engine.get(&l2, "").unwrap();
    assert_eq!(std::fs::read(child.join("f")).unwrap(), b"xfs");
    assert_eq!(
        std::fs::write(parent.join("g"), b"x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    engine.put(&l1).unwrap();
    engine.put(&l2).unwrap();

    engine.create(&big, "", &rw_layer(Some(1 << 30))).unwrap();
    let root = engine.get(&big, "").unwrap();
    let stat = nix::sys::statvfs::statvfs(&root).unwrap();
    assert!(
        stat.blocks() * stat.fragment_size() > 900 << 20,
        "xfs grown online to the image"
    );
    engine.put(&big).unwrap();

    // xfs cannot shrink: a limit below the base size is a project quota,
    // which needs a kernel with XFS quota support.
    let quota = engine.create(&hex(104), "", &rw_layer(Some(128 << 20)));
    match quota {
        Ok(()) => {
            let root = engine.get(&hex(104), "").unwrap();
            let err = std::fs::write(root.join("big"), vec![1u8; 200 << 20]).unwrap_err();
            assert!(
                matches!(err.raw_os_error(), Some(libc::EDQUOT) | Some(libc::ENOSPC)),
                "{err}"
            );
            engine.put(&hex(104)).unwrap();
            engine.remove(&hex(104)).unwrap();
        }
        Err(e) => {
            let text = format!("{:#}", anyhow::Error::from(e));
            assert!(text.contains("mount") || text.contains("quota"), "{text}");
            assert!(
                fx.record(&engine, &hex(104)).is_none(),
                "a failed create leaves no record"
            );
        }
    }
    for id in [&l2, &l1, &big] {
        engine.remove(id).unwrap();
    }
}

#[test]
fn an_unreachable_cluster_fails_init_quickly() {
    if !testkit::require::check(
        "an_unreachable_cluster_fails_init_quickly",
        testkit::require::root(),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("ceph.conf");
    std::fs::write(&conf, "[global]\nmon host = 127.0.0.1:1\nauth cluster required = none\nauth service required = none\nauth client required = none\n").unwrap();
    let mut raw = RawSettings::default();
    raw.set("conf", &conf.display().to_string(), Source::Flag);
    raw.set("connecttimeout", "2", Source::Flag);
    raw.set("mapper", "fuse", Source::Flag);
    let started = std::time::Instant::now();
    let err = match Engine::open_with(
        raw.resolve().unwrap(),
        &dir.path().join("home"),
        fuse_helper(),
    ) {
        Ok(_) => panic!("connected to a closed port"),
        Err(e) => e,
    };
    let elapsed = started.elapsed();
    assert!(matches!(err, EngineError::Connect { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("cannot connect to the Ceph cluster"),
        "{err}"
    );
    assert!(
        elapsed < std::time::Duration::from_secs(20),
        "took {elapsed:?}"
    );
}

#[test]
fn one_host_id_is_one_live_daemon() {
    let Some(fx) = Fixture::new("one_host_id_is_one_live_daemon", &[]) else {
        return;
    };
    let (home_a, home_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut same_id = fx.settings_for(home_a.path());
    same_id.host_id = Some("twin".into());
    let a = Engine::open_with(same_id.clone(), home_a.path(), fuse_helper()).expect("first opens");
    assert_eq!(a.host_id(), "twin");
    let started = std::time::Instant::now();
    let err = match Engine::open_with(same_id.clone(), home_b.path(), fuse_helper()) {
        Ok(_) => panic!("a second live daemon took host id twin"),
        Err(e) => e,
    };
    assert!(matches!(err, EngineError::HostConflict { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("\"twin\"") && text.contains(&home_a.path().display().to_string()),
        "the error names the id and the holder's Home: {text}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let other = fx.engine_at(home_b.path());
    assert!(other.host_is_live("twin").unwrap());
    assert!(!other.host_is_live("nobody").unwrap());
    let record = a
        .store()
        .hosts()
        .get("twin")
        .unwrap()
        .expect("host record")
        .value;
    assert_eq!(record.home, home_a.path().display().to_string());
    assert_eq!(record.lease_secs, 30);
    assert!(!record.client_addr.is_empty());
    drop(other);
    // Reopening on the same Home is the same host restarting: at once.
    drop(a);
    let again = Engine::open_with(same_id.clone(), home_a.path(), fuse_helper()).expect("reopens");
    // Nothing was mounted, so the first one gave its lease up: another
    // Home may now take the id.
    drop(again);
    let b = Engine::open_with(same_id, home_b.path(), fuse_helper()).expect("released id reused");
    assert_eq!(b.host_id(), "twin");
}

#[test]
fn a_removal_is_recorded_at_once_and_purged_later_or_after_a_crash() {
    let Some(fx) = Fixture::new("removal_recorded_then_purged", &[]) else {
        return;
    };
    let engine = fx.engine();
    let (init, rw) = (format!("{}-init", hex(61)), hex(61));
    engine.create(&init, "", &image_layer()).unwrap();
    engine.create(&rw, &init, &rw_layer(None)).unwrap();
    let image_of = |id: &str| {
        fx.settings
            .naming
            .layer_image(&docker_rbd::names::LayerId::parse(id).unwrap())
    };

    // As dockerd removes a container: the layer, then its init layer.
    let purge = engine
        .retire(&rw)
        .unwrap()
        .expect("the last holder marks it");
    assert_eq!(fx.record(&engine, &rw).unwrap().state, LayerState::Removing);
    assert!(
        fx.images().contains(&image_of(&rw)),
        "the image waits for the purge"
    );
    assert!(
        engine.retire(&init).unwrap().is_none(),
        "its clone is still there"
    );
    assert_eq!(
        fx.record(&engine, &init).unwrap().state,
        LayerState::Retired
    );
    engine.purge(&purge).unwrap();
    assert!(
        engine.list().unwrap().is_empty(),
        "the purge took the parent along"
    );
    assert_eq!(fx.images().len(), 1, "only the base: {:?}", fx.images());
    engine.purge(&purge).unwrap();

    // A crash with a purge queued: the next start finishes it.
    engine.create(&init, "", &image_layer()).unwrap();
    engine.create(&rw, &init, &rw_layer(None)).unwrap();
    let queued = engine.retire(&rw).unwrap().unwrap();
    assert!(engine.retire(&init).unwrap().is_none());
    drop(engine);
    let engine = fx.engine();
    assert!(
        fx.record(&engine, &rw).is_none(),
        "recovery purged the layer"
    );
    assert!(engine.list().unwrap().is_empty(), "and its retired parent");
    assert_eq!(fx.images().len(), 1, "only the base: {:?}", fx.images());

    // A layer made again under the same id before its purge ran is left
    // alone by that purge.
    engine.create(&rw, "", &image_layer()).unwrap();
    let stale = engine.retire(&rw).unwrap().unwrap();
    engine.create(&rw, "", &image_layer()).unwrap();
    assert_eq!(fx.record(&engine, &rw).unwrap().state, LayerState::Created);
    engine.purge(&stale).unwrap();
    engine.purge(&queued).unwrap();
    assert_eq!(fx.record(&engine, &rw).unwrap().state, LayerState::Created);
    assert!(engine.exists(&rw).unwrap());
    engine.remove(&rw).unwrap();
    assert!(engine.list().unwrap().is_empty());
}

fn init_layer() -> CreateOptions {
    CreateOptions {
        kind: LayerKind::Init,
        size: None,
        mount_label: String::new(),
    }
}

/// Writes what dockerd's init step writes into an init layer's root,
/// plus `/etc/hostname` holding `hostname` when given.
fn write_init_files(root: &std::path::Path, hostname: Option<&str>) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("dev/pts")).unwrap();
    std::fs::write(root.join("etc/hosts"), b"").unwrap();
    std::fs::write(root.join("etc/resolv.conf"), b"").unwrap();
    std::fs::write(root.join("dev/console"), b"").unwrap();
    std::fs::write(root.join(".dockerenv"), b"").unwrap();
    std::os::unix::fs::symlink("/proc/mounts", root.join("etc/mtab")).unwrap();
    if let Some(name) = hostname {
        std::fs::write(root.join("etc/hostname"), name).unwrap();
    }
}

/// When the shared init layer it would use cannot be used (here: being
/// retired), an init layer gets an image of its own, holding the files
/// dockerd wrote (not only its parent's).
#[test]
fn an_init_layer_that_cannot_share_gets_its_files_in_an_image_of_its_own() {
    let Some(fx) = Fixture::new("init_layer_of_its_own_has_its_files", &[]) else {
        return;
    };
    let engine = fx.engine();
    let image = hex(81);
    engine.create(&image, "", &image_layer()).unwrap();
    std::fs::write(engine.get(&image, "").unwrap().join("in-image"), b"x").unwrap();
    engine.put(&image).unwrap();
    let first = format!("{}-init", hex(82));
    engine.create(&first, &image, &init_layer()).unwrap();
    write_init_files(&engine.get(&first, "").unwrap(), Some("own"));
    engine.put(&first).unwrap();
    let shared = fx
        .record(&engine, &first)
        .unwrap()
        .shared_init()
        .expect("served by a shared init layer")
        .to_string();
    // The shared layer is on its way out: not to be used by new inits.
    engine
        .store()
        .layers()
        .modify(&shared, |r| r.state = LayerState::Retired)
        .unwrap();

    let own = format!("{}-init", hex(83));
    engine.create(&own, &image, &init_layer()).unwrap();
    write_init_files(&engine.get(&own, "").unwrap(), Some("own"));
    engine.put(&own).unwrap();
    let rec = fx.record(&engine, &own).unwrap();
    assert_eq!(rec.init, None, "{rec:?}");
    assert!(fx.images().contains(&rec.image), "{rec:?}");
    let left: Vec<_> = std::fs::read_dir(fx.home.path().join("init"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in <Home>/init: {left:?}");
    // Its image holds dockerd's files, seen through a container's layer.
    let rw = hex(84);
    engine.create(&rw, &own, &rw_layer(None)).unwrap();
    let root = engine.get(&rw, "").unwrap();
    assert!(
        root.join(".dockerenv").exists(),
        "the init files are not in its image"
    );
    assert_eq!(std::fs::read(root.join("etc/hostname")).unwrap(), b"own");
    assert_eq!(std::fs::read(root.join("in-image")).unwrap(), b"x");
    engine.put(&rw).unwrap();
    engine
        .store()
        .layers()
        .modify(&shared, |r| r.state = LayerState::Created)
        .unwrap();
}

/// How layer `id` is mounted here: `Some(true)` staged for dockerd's
/// create (an overlay, its image not mapped), `Some(false)` from its own
/// mapped image, `None` not at all.
/// An image layer `hex(n)` holding `/in-image`, and a container's init
/// layer `hex(n + 1)-init` over it with dockerd's init files, served by a
/// shared init layer; returns the init layer's id.
fn image_with_shared_init(fx: &Fixture, engine: &Engine, n: u32) -> String {
    let image = hex(n);
    engine.create(&image, "", &image_layer()).unwrap();
    let root = engine.get(&image, "").unwrap();
    std::fs::write(root.join("in-image"), b"image data").unwrap();
    engine.put(&image).unwrap();
    let init = format!("{}-init", hex(n + 1));
    engine.create(&init, &image, &init_layer()).unwrap();
    write_init_files(&engine.get(&init, "").unwrap(), None);
    engine.put(&init).unwrap();
    assert!(fx.record(engine, &init).unwrap().shared_init().is_some());
    init
}

fn staged(engine: &Engine, id: &str) -> Option<bool> {
    engine.mount_record(id).unwrap().map(|m| {
        let staged = matches!(m.on, Some(MountOn::Staged { .. }));
        assert_eq!(staged, m.device.is_none(), "{m:?}");
        staged
    })
}

#[test]
fn a_container_layer_is_not_mapped_for_dockerds_create_time_get() {
    let Some(fx) = Fixture::new("container_layer_staged_at_create", &[]) else {
        return;
    };
    let engine = fx.engine();
    let init = image_with_shared_init(&fx, &engine, 71);

    // dockerd's create: Get, nothing written, Put. The image is never
    // mapped; the overlay shows the layer's files.
    let quiet = hex(73);
    engine.create(&quiet, &init, &rw_layer(None)).unwrap();
    let root = engine.get(&quiet, "").unwrap();
    assert_eq!(staged(&engine, &quiet), Some(true));
    assert_eq!(std::fs::read(root.join("in-image")).unwrap(), b"image data");
    assert!(root.join(".dockerenv").exists());
    engine.put(&quiet).unwrap();
    assert_eq!(staged(&engine, &quiet), None);
    // The start maps it, and what the container writes is in its image.
    let root = engine.get(&quiet, "").unwrap();
    assert_eq!(staged(&engine, &quiet), Some(false));
    std::fs::write(root.join("run"), b"written while running").unwrap();
    engine.put(&quiet).unwrap();
    let root = engine.get(&quiet, "").unwrap();
    assert_eq!(staged(&engine, &quiet), Some(false));
    assert_eq!(
        std::fs::read(root.join("run")).unwrap(),
        b"written while running"
    );
    engine.put(&quiet).unwrap();

    // dockerd writes at create (a working directory, a volume
    // mountpoint): it is put into the image at the Put.
    let busy = hex(74);
    engine.create(&busy, &init, &rw_layer(None)).unwrap();
    let root = engine.get(&busy, "").unwrap();
    assert_eq!(staged(&engine, &busy), Some(true));
    std::fs::create_dir_all(root.join("app/data")).unwrap();
    std::fs::write(root.join("app/config"), b"made at create").unwrap();
    std::fs::remove_file(root.join("in-image")).unwrap();
    engine.put(&busy).unwrap();
    assert_eq!(staged(&engine, &busy), None);
    let stage = fx.home.path().join("stage");
    let left: Vec<_> = std::fs::read_dir(&stage)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", stage.display());
    let root = engine.get(&busy, "").unwrap();
    assert_eq!(staged(&engine, &busy), Some(false));
    assert_eq!(
        std::fs::read(root.join("app/config")).unwrap(),
        b"made at create"
    );
    assert!(root.join("app/data").is_dir());
    assert!(
        !root.join("in-image").exists(),
        "a deletion at create came back"
    );
    assert!(root.join(".dockerenv").exists());
    engine.put(&busy).unwrap();

    // Only the first Get is staged, and only while nothing else holds it:
    // a second Get of a staged layer counts one more user of the overlay.
    let twice = hex(75);
    engine.create(&twice, &init, &rw_layer(None)).unwrap();
    let first = engine.get(&twice, "").unwrap();
    let second = engine.get(&twice, "").unwrap();
    assert_eq!(first, second);
    assert_eq!(engine.mount_record(&twice).unwrap().unwrap().refcount, 2);
    engine.put(&twice).unwrap();
    assert_eq!(staged(&engine, &twice), Some(true));
    // A staged layer cannot be a parent until it is put (its files are
    // not in its image yet).
    let child = hex(76);
    let e = engine.create(&child, &twice, &image_layer()).unwrap_err();
    assert!(
        e.to_string().contains("mounted for dockerd's create"),
        "{e}"
    );
    engine.put(&twice).unwrap();
    assert_eq!(staged(&engine, &twice), None);
    engine.remove(&twice).unwrap();

    // A layer with a size option is mapped at once (its filesystem is not
    // the shared layer's size).
    let sized = hex(77);
    engine
        .create(&sized, &init, &rw_layer(Some(20 << 30)))
        .unwrap();
    engine.get(&sized, "").unwrap();
    assert_eq!(staged(&engine, &sized), Some(false));
    engine.put(&sized).unwrap();
    for id in [&sized, &busy, &quiet] {
        engine.remove(id).unwrap();
    }
}

/// Waits (up to 20 s) until layer `id`'s record leaves `Cloning`.
fn cloned(fx: &Fixture, engine: &Engine, id: &str) -> LayerRecord {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let rec = fx.record(engine, id).expect("a record");
        if rec.state != LayerState::Cloning || std::time::Instant::now() > deadline {
            return rec;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// What a clone cut short by a crash leaves in RBD.
enum CutShort {
    NoImage,
    /// An image of the layer's name that is not its clone.
    NotAClone,
}

/// Puts layer `id`'s record back to `Cloning` and its image as `left`.
fn as_if_cut_short(fx: &Fixture, engine: &Engine, id: &str, left: CutShort) {
    let rec = fx.record(engine, id).unwrap();
    rbd::remove(&fx.ioctx, &rec.image).unwrap();
    if let CutShort::NotAClone = left {
        rbd::create(&fx.ioctx, &rec.image, 4 << 20, &Default::default()).unwrap();
    }
    engine
        .store()
        .layers()
        .modify(id, |r| r.state = LayerState::Cloning)
        .unwrap();
}

#[test]
fn a_container_layer_is_answered_before_its_clone_is_made() {
    let Some(fx) = Fixture::new("container_layer_cloned_in_background", &[]) else {
        return;
    };
    let engine = fx.engine();
    let init = image_with_shared_init(&fx, &engine, 81);
    let shared = fx.record(&engine, &init).unwrap();
    let shared_image = shared.image.clone();

    // Answered with the record made; the clone lands in the background as
    // a clone of the shared init layer's snapshot, and the record says so.
    let rw = hex(83);
    engine.create(&rw, &init, &rw_layer(None)).unwrap();
    let rec = fx.record(&engine, &rw).unwrap();
    assert!(
        matches!(rec.state, LayerState::Cloning | LayerState::Created),
        "{rec:?}"
    );
    assert_eq!(rec.size, shared.size);
    let rec = cloned(&fx, &engine, &rw);
    assert_eq!(rec.state, LayerState::Created, "{rec:?}");
    let parent = Image::open_read_only(&fx.ioctx, &rec.image, None)
        .unwrap()
        .parent()
        .unwrap()
        .expect("a clone");
    assert_eq!(
        (parent.image_name.as_str(), parent.snap_name.as_str()),
        (shared_image.as_str(), "sealed")
    );
    // dockerd's create (staged), then the start (mapped): its files, and
    // what it writes stays.
    engine.get(&rw, "").unwrap();
    engine.put(&rw).unwrap();
    let root = engine.get(&rw, "").unwrap();
    assert_eq!(staged(&engine, &rw), Some(false));
    assert_eq!(std::fs::read(root.join("in-image")).unwrap(), b"image data");
    std::fs::write(root.join("run"), b"written while running").unwrap();
    engine.put(&rw).unwrap();

    // Removed at once after its create: the clone is waited for, and
    // nothing is left of it.
    let gone = hex(84);
    engine.create(&gone, &init, &rw_layer(None)).unwrap();
    let gone_image = fx.record(&engine, &gone).unwrap().image;
    engine.remove(&gone).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while fx.record(&engine, &gone).is_some() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(fx.record(&engine, &gone), None);
    assert!(!fx.images().contains(&gone_image));

    // Cut short with no image (a crash before the clone): the next Get
    // makes it, in this run.
    let lazy = hex(85);
    engine.create(&lazy, &init, &rw_layer(None)).unwrap();
    cloned(&fx, &engine, &lazy);
    as_if_cut_short(&fx, &engine, &lazy, CutShort::NoImage);
    engine.get(&lazy, "").unwrap(); // dockerd's create: staged, no image
    engine.put(&lazy).unwrap();
    assert_eq!(
        fx.record(&engine, &lazy).unwrap().state,
        LayerState::Cloning
    );
    let root = engine.get(&lazy, "").unwrap();
    assert_eq!(std::fs::read(root.join("in-image")).unwrap(), b"image data");
    assert_eq!(
        fx.record(&engine, &lazy).unwrap().state,
        LayerState::Created
    );
    engine.put(&lazy).unwrap();

    // A restart rolls the host's cloning layers forward: one without an
    // image, one with an image of its name that is not its clone (an
    // empty image, as a clone cut short might leave).
    let bare = hex(86);
    let wrong = hex(87);
    for id in [&bare, &wrong] {
        engine.create(id, &init, &rw_layer(None)).unwrap();
        cloned(&fx, &engine, id);
    }
    as_if_cut_short(&fx, &engine, &bare, CutShort::NoImage);
    as_if_cut_short(&fx, &engine, &wrong, CutShort::NotAClone);
    drop(engine);
    let engine = fx.engine();
    for id in [&bare, &wrong] {
        let rec = fx.record(&engine, id).unwrap();
        assert_eq!(rec.state, LayerState::Created, "{id}: {rec:?}");
        let parent = Image::open_read_only(&fx.ioctx, &rec.image, None)
            .unwrap()
            .parent()
            .unwrap();
        assert!(parent.is_some(), "{id}: not a clone after the restart");
        let root = engine.get(id, "").unwrap();
        assert_eq!(std::fs::read(root.join("in-image")).unwrap(), b"image data");
        engine.put(id).unwrap();
    }
    // What the first layer's container wrote survived all of this.
    let root = engine.get(&rw, "").unwrap();
    assert_eq!(
        std::fs::read(root.join("run")).unwrap(),
        b"written while running"
    );
    engine.put(&rw).unwrap();
    for id in [&rw, &lazy, &bare, &wrong] {
        engine.remove(id).unwrap();
    }
}

#[test]
fn init_layers_with_the_same_files_share_one_sealed_layer_and_others_do_not() {
    let Some(fx) = Fixture::new("init_layers_share_one_sealed_layer", &[]) else {
        return;
    };
    let engine = fx.engine();
    let image = hex(61);
    engine.create(&image, "", &image_layer()).unwrap();
    let root = engine.get(&image, "").unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
    engine.put(&image).unwrap();

    let make_init = |n: u32, hostname: Option<&str>| {
        let id = format!("{}-init", hex(n));
        engine.create(&id, &image, &init_layer()).unwrap();
        let rec = fx.record(&engine, &id).unwrap();
        assert_eq!(rec.init, Some(metadata::InitContent::Pending));
        assert!(
            !fx.images().contains(&rec.image),
            "a pending init layer has no image"
        );
        let root = engine.get(&id, "").unwrap();
        assert_eq!(
            std::fs::read(root.join("etc/passwd")).unwrap(),
            b"root:x:0:0::/root:/bin/sh\n",
            "the overlay shows the parent"
        );
        write_init_files(&root, hostname);
        engine.put(&id).unwrap();
        let mounts = engine.mounts().unwrap();
        assert!(
            mounts
                .iter()
                .all(|(layer, m)| *layer == image && m.is_idle()),
            "only the image layer stays mounted, idle: {mounts:?}"
        );
        id
    };
    let a = make_init(62, None);
    let b = make_init(63, None);
    let c = make_init(64, Some("other"));
    let shared = |engine: &Engine, id: &str| {
        let rec = fx.record(engine, id).unwrap();
        rec.shared_init()
            .unwrap_or_else(|| panic!("{id} is not served by a shared init layer: {rec:?}"))
            .to_string()
    };
    assert_eq!(
        shared(&engine, &a),
        shared(&engine, &b),
        "same files: one shared init layer"
    );
    assert_ne!(
        shared(&engine, &a),
        shared(&engine, &c),
        "other files: another one"
    );
    let s = fx.record(&engine, &shared(&engine, &a)).unwrap();
    assert_eq!(s.kind, LayerKind::SharedInit);
    assert!(s.sealed && s.state == LayerState::Created);
    assert_eq!(s.parent.as_deref(), Some(image.as_str()));
    let layer_images: Vec<_> = fx
        .images()
        .into_iter()
        .filter(|i| !fx.settings.naming.is_base_image(i))
        .collect();
    assert_eq!(
        layer_images.len(),
        3,
        "the image layer and two shared init layers: {layer_images:?}"
    );

    // A container layer over `a` is a clone of the shared layer: it sees
    // the init files, and its changes against `a` are its own only.
    let rw = hex(65);
    engine.create(&rw, &a, &rw_layer(None)).unwrap();
    let rw_root = engine.get(&rw, "").unwrap();
    assert!(rw_root.join(".dockerenv").exists());
    assert_eq!(
        std::fs::read_link(rw_root.join("etc/mtab")).unwrap(),
        std::path::Path::new("/proc/mounts")
    );
    std::fs::write(rw_root.join("written"), b"by the container").unwrap();
    let init_root = engine.get(&a, "").unwrap();
    let changes = graphdriver_api::diff::changes_dirs(&rw_root, Some(&init_root)).unwrap();
    let paths: Vec<_> = changes
        .iter()
        .map(|c| c.path.display().to_string())
        .collect();
    assert_eq!(paths, ["/written"], "{changes:?}");
    assert_eq!(
        std::fs::read_to_string(init_root.join("etc/hostname")).ok(),
        None,
        "a's init files are a's"
    );
    engine.put(&a).unwrap();
    engine.put(&rw).unwrap();

    // A daemon killed while dockerd writes an init layer: the restarted
    // one drops the overlay and the parent's mount, and removes the init
    // layer, which dockerd forgets when the container's create fails (its
    // container layer was never made). The create tried again works.
    let d = format!("{}-init", hex(66));
    engine.create(&d, &image, &init_layer()).unwrap();
    let root = engine.get(&d, "").unwrap();
    write_init_files(&root, None);
    drop(engine);
    let engine = fx.engine();
    // What stays are the idle read-only mounts, adopted as they were.
    let mounts = engine.mounts().unwrap();
    assert!(
        mounts.iter().all(|(layer, m)| *layer != d && m.is_idle()),
        "{mounts:?}"
    );
    assert!(!docker_rbd::fs::is_mounted(&root));
    assert!(
        fx.record(&engine, &d).is_none(),
        "the abandoned init layer is removed"
    );
    assert!(
        fx.record(&engine, &rw).is_some() && fx.record(&engine, &a).is_some(),
        "an init layer with its container layer stays"
    );
    engine.create(&d, &image, &init_layer()).unwrap();
    let root = engine.get(&d, "").unwrap();
    write_init_files(&root, None);
    engine.put(&d).unwrap();
    assert_eq!(
        fx.record(&engine, &d).unwrap().shared_init(),
        Some(shared(&engine, &a).as_str())
    );

    // Removing init layers removes records only; the shared layers go with
    // the image layer.
    for id in [&rw, &a, &b, &c, &d] {
        engine.remove(id).unwrap();
        assert!(fx.record(&engine, id).is_none(), "{id} removed");
    }
    assert_eq!(
        fx.images()
            .into_iter()
            .filter(|i| !fx.settings.naming.is_base_image(i))
            .count(),
        3,
        "shared init layers stay while their image layer does"
    );
    engine.remove(&image).unwrap();
    let left: Vec<_> = engine.list().unwrap().into_iter().map(|l| l.id).collect();
    assert!(left.is_empty(), "records left: {left:?}");
    let images: Vec<_> = fx
        .images()
        .into_iter()
        .filter(|i| !fx.settings.naming.is_base_image(i))
        .collect();
    assert!(images.is_empty(), "images left: {images:?}");
}

/// dockerd restarted with other `--storage-opt rbd.*` values calls `Init`
/// again on the same Home while the plugin runs: the running engine must
/// give way (its local state and lease) and the new settings hold.
#[test]
fn init_again_with_other_settings_on_the_same_home_switches_to_them() {
    use graphdriver_api::GraphDriver;
    use graphdriver_api::types::InitRequest;
    let test = "init_again_with_other_settings_on_the_same_home_switches_to_them";
    let Some(fx) = Fixture::new(test, &[]) else {
        return;
    };
    let ceph = testkit::ceph::require(test).expect("cluster");
    let mut flags = RawSettings::default();
    for (k, v) in [
        ("conf", ceph.conf.display().to_string()),
        ("id", ceph.id.clone()),
        ("keyring", ceph.keyring.display().to_string()),
        ("pool", ceph.pool.clone()),
        ("namespace", fx.settings.namespace.clone()),
        ("mapper", "fuse".to_string()),
        ("basesize", "256M".to_string()),
        ("mountroot", fx.mounts.path().display().to_string()),
        ("hostid", "h-reinit".to_string()),
    ] {
        flags.set(k, &v, Source::Flag);
    }
    let plugin = docker_rbd::plugin::RbdPlugin::new(flags, None);
    let home = fx.home.path().join("rbd");
    let init = |depth: &str| {
        plugin.init(InitRequest {
            home: home.display().to_string(),
            opts: vec![format!("rbd.flattendepth={depth}")],
            uid_maps: Vec::new(),
            gid_maps: Vec::new(),
        })
    };
    let flatten_depth = || {
        plugin
            .status()
            .expect("status")
            .into_iter()
            .find(|(k, _)| k == "Flatten Depth")
            .map(|(_, v)| v)
    };
    init("5").expect("first init");
    assert_eq!(flatten_depth().as_deref(), Some("5"));
    init("7").expect("init again, other settings, same Home");
    assert_eq!(flatten_depth().as_deref(), Some("7"));
    // The same settings again keep the running engine.
    init("7").expect("init again, same settings");
    assert_eq!(flatten_depth().as_deref(), Some("7"));
    plugin.cleanup().expect("cleanup");
}

/// Runs `op` on a thread of its own that stops at `point` until `during`
/// (run on another thread) has returned, or for at most a second: a
/// `during` that waits for `op` (as it should when both touch the same
/// layer) lets it go on after that second. Returns what `op` returned.
fn during_an_operation<T: Send + 'static>(
    point: docker_rbd::crashpoint::CrashPoint,
    op: impl FnOnce() -> T + Send + 'static,
    during: impl FnOnce() + Send + 'static,
) -> T {
    use std::sync::mpsc;
    use std::time::Duration;
    let (at_point, reached) = mpsc::channel();
    let (done, finished) = mpsc::channel::<()>();
    let op = std::thread::spawn(move || {
        docker_rbd::crashpoint::on_this_thread(point, move || {
            at_point.send(()).unwrap();
            let _ = finished.recv_timeout(Duration::from_secs(1));
        });
        op()
    });
    reached
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("the operation never reached {point}"));
    let during = std::thread::spawn(move || {
        during();
        let _ = done.send(());
    });
    let result = op.join().expect("the operation panicked");
    during.join().expect("the concurrent call panicked");
    result
}

/// dockerd's Init again runs recovery while the plugin serves: a create
/// (with flatten) or a Get in flight is waited for, not taken for a
/// crash's leftover and undone.
#[test]
fn recovery_waits_for_requests_in_flight() {
    use docker_rbd::crashpoint::CrashPoint;
    let Some(fx) = Fixture::new(
        "recovery_waits_for_requests_in_flight",
        &[("flattendepth", "1")],
    ) else {
        return;
    };
    let engine = Arc::new(fx.engine());
    let (base, mid, child) = (hex(1201), hex(1202), hex(1203));
    engine.create(&base, "", &image_layer()).unwrap();
    let root = engine.get(&base, "").unwrap();
    std::fs::write(root.join("f"), b"in the parent").unwrap();
    engine.put(&base).unwrap();
    engine.create(&mid, &base, &image_layer()).unwrap();

    // A create held after its record says Creating, recovery meanwhile.
    let (e1, e2) = (engine.clone(), engine.clone());
    let (p, c) = (mid.clone(), child.clone());
    let created = during_an_operation(
        CrashPoint::CreateRecorded,
        move || e1.create(&c, &p, &image_layer()),
        move || e2.recover(),
    );
    created.expect("the create comes through recovery");
    let rec = fx.record(&engine, &child).expect("record");
    assert_eq!(rec.state, LayerState::Created);
    let img = Image::open_read_only(&fx.ioctx, &rec.image, None).expect("the image exists");
    assert!(img.parent().unwrap().is_none(), "depth 2: flattened");
    drop(img);

    // A Get held between its map and the record naming the device.
    let (e1, e2) = (engine.clone(), engine.clone());
    let c = child.clone();
    let got = during_an_operation(
        CrashPoint::Mapped,
        move || e1.get(&c, ""),
        move || e2.recover(),
    );
    let root = got.expect("the Get comes through recovery");
    assert_eq!(std::fs::read(root.join("f")).unwrap(), b"in the parent");
    let m = engine.mount_record(&child).unwrap().expect("mount record");
    assert_eq!(m.refcount, 1);
    assert!(m.device.is_some(), "{m:?}");
    engine.put(&child).unwrap();
    assert!(engine.mount_record(&child).unwrap().is_none());
    for id in [&child, &mid, &base] {
        engine.remove(id).unwrap();
    }
}

/// Docker's own drivers take any id that could be a file name, and its
/// graphdriver tests use `Base`, `Snap` and `rbdTest`: such layers work,
/// their images named reversibly, today's hex ids keeping their names.
#[test]
fn layer_ids_are_what_dockers_own_drivers_accept() {
    let Some(fx) = Fixture::new("layer_ids_are_what_dockers_own_drivers_accept", &[]) else {
        return;
    };
    let engine = fx.engine();
    let long = "Z".repeat(255);
    let ids = [
        "Base",
        "Snap",
        "rbdTest",
        "with space, comma: colon=",
        long.as_str(),
    ];
    let mut parent = String::new();
    for (n, id) in ids.iter().enumerate() {
        engine.create(id, &parent, &image_layer()).unwrap();
        let root = engine.get(id, "").unwrap();
        std::fs::write(root.join(format!("file-{n}")), id.as_bytes()).unwrap();
        engine.put(id).unwrap();
        parent = id.to_string();
    }
    let images = fx.images();
    for expected in [
        "docker-rbd.layer._42ase",
        "docker-rbd.layer._53nap",
        "docker-rbd.layer.rbd_54est",
    ] {
        assert!(images.contains(expected), "{expected} in {images:?}");
    }
    let naming = &fx.settings.naming;
    let listed: BTreeSet<String> = engine.list().unwrap().into_iter().map(|l| l.id).collect();
    for id in ids {
        assert!(listed.contains(id), "{id:?} listed");
        let rec = fx.record(&engine, id).unwrap();
        assert_eq!(naming.layer_of_image(&rec.image).unwrap().as_str(), id);
    }
    // The last layer sees every layer's file: the chain is whole.
    let top = engine.get(&long, "").unwrap();
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(
            std::fs::read(top.join(format!("file-{n}"))).unwrap(),
            id.as_bytes()
        );
    }
    engine.put(&long).unwrap();
    for id in ids.iter().rev() {
        engine.remove(id).unwrap();
    }
    let err = engine.create("a/b", "", &image_layer()).unwrap_err();
    assert!(err.to_string().contains("invalid layer id"), "{err}");
}

/// `size=` below what the clone's ext4 can shrink to (its inode tables
/// and journal are sized for the base): the layer gets a filesystem made
/// for that size with the parent's files copied in, and writes past the
/// size fail. Below what the parent holds, a clear refusal, nothing left.
#[test]
fn a_size_below_the_shrink_minimum_gets_a_filesystem_of_its_own() {
    let Some(fx) = Fixture::new(
        "a_size_below_the_shrink_minimum_gets_a_filesystem_of_its_own",
        &[("basesize", "4G")],
    ) else {
        return;
    };
    let engine = fx.engine();
    let (image, small, tiny) = (hex(1301), hex(1302), hex(1303));
    engine.create(&image, "", &image_layer()).unwrap();
    let root = engine.get(&image, "").unwrap();
    std::fs::create_dir(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), b"from the parent").unwrap();
    std::os::unix::fs::symlink("etc/hostname", root.join("link")).unwrap();
    std::fs::write(root.join("blob"), vec![7u8; 20 << 20]).unwrap();
    engine.put(&image).unwrap();

    engine
        .create(&small, &image, &rw_layer(Some(48 << 20)))
        .unwrap();
    let rec = fx.record(&engine, &small).unwrap();
    assert_eq!(
        (rec.state, rec.size, rec.depth),
        (LayerState::Created, 48 << 20, 0)
    );
    let img = Image::open_read_only(&fx.ioctx, &rec.image, None).unwrap();
    assert!(
        img.parent().unwrap().is_none(),
        "its own filesystem, not a clone"
    );
    assert_eq!(img.size().unwrap(), 48 << 20);
    drop(img);
    let root = engine.get(&small, "").unwrap();
    assert_eq!(
        std::fs::read(root.join("etc/hostname")).unwrap(),
        b"from the parent"
    );
    assert_eq!(
        std::fs::read_link(root.join("link")).unwrap(),
        std::path::Path::new("etc/hostname")
    );
    assert_eq!(std::fs::read(root.join("blob")).unwrap().len(), 20 << 20);
    let st = nix::sys::statvfs::statvfs(&root).unwrap();
    assert!(
        st.blocks() * st.fragment_size() <= 48 << 20,
        "the filesystem is at most 48 MiB"
    );
    let err = std::fs::write(root.join("fill"), vec![1u8; 48 << 20]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    engine.put(&small).unwrap();

    // 16 MiB cannot hold the parent's 20 MiB: refused, nothing left.
    let err = engine
        .create(&tiny, &image, &rw_layer(Some(16 << 20)))
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::StorageOpt { reason, .. } if reason.contains("already hold")),
        "{err}"
    );
    assert!(fx.record(&engine, &tiny).is_none());
    let images = fx.images();
    assert!(
        !images.iter().any(|i| i.ends_with(&tiny)),
        "the refused layer's image is gone: {images:?}"
    );
    engine.remove(&small).unwrap();
    engine.remove(&image).unwrap();
}

/// dockerd's `Cleanup` leaves the layers of running containers mounted
/// (live-restore); a caller who then deletes the data root (`rm -rf`, as
/// test harnesses do) must not delete the files of such a layer, which
/// live in the cluster for every host. Layers are mounted outside the Home.
#[test]
fn deleting_the_home_never_reaches_into_a_mounted_layer() {
    let Some(fx) = Fixture::new("deleting_the_home_never_reaches_into_a_mounted_layer", &[]) else {
        return;
    };
    let engine = fx.engine();
    let (image, container) = (hex(1), hex(2));
    engine.create(&image, "", &image_layer()).unwrap();
    engine.create(&container, &image, &rw_layer(None)).unwrap();
    let root = engine.get(&container, "").unwrap();
    std::fs::write(root.join("precious"), b"kept\n").unwrap();
    assert!(!root.starts_with(fx.home.path()), "{}", root.display());

    // The FUSE mounts under the Home refuse the removal of their files;
    // the rest of the Home goes.
    let rm = std::process::Command::new("rm")
        .arg("-rf")
        .arg(fx.home.path())
        .output()
        .expect("rm");
    assert!(!fx.home.path().join("state.redb").exists(), "{rm:?}");
    assert_eq!(std::fs::read(root.join("precious")).unwrap(), b"kept\n");
    engine.put(&container).unwrap();

    let root = engine.get(&container, "").unwrap();
    assert_eq!(std::fs::read(root.join("precious")).unwrap(), b"kept\n");
    engine.put(&container).unwrap();
}

/// The RADOS objects of layer `id`'s own image: (count, bytes), each
/// object counted at its logical size (holes included: an upper bound).
fn own_data(fx: &Fixture, engine: &Engine, id: &str) -> (usize, u64) {
    let image = engine.info(id).unwrap().record.image;
    let prefix = format!(
        "rbd_data.{}.",
        Image::open_read_only(&fx.ioctx, &image, None)
            .unwrap()
            .id()
            .unwrap()
    );
    let objects: Vec<String> = fx
        .ioctx
        .list_objects()
        .unwrap()
        .into_iter()
        .filter(|o| o.starts_with(&prefix))
        .collect();
    let bytes = objects.iter().map(|o| fx.ioctx.stat(o).unwrap().0).sum();
    (objects.len(), bytes)
}

/// A layer holding a few tiny files costs little new data in the cluster:
/// its first writes to an object copy the parent's object up whole, so
/// layer images use small (256 KiB) objects, with an object map so that a
/// removal deletes only what exists. With RBD's 4 MiB objects and no
/// object map the same layer held 6.4 MiB.
#[test]
fn a_tiny_layer_costs_under_a_mebibyte_of_new_data() {
    let Some(fx) = Fixture::new(
        "a_tiny_layer_costs_under_a_mebibyte_of_new_data",
        &[("basesize", "10G")],
    ) else {
        return;
    };
    let engine = fx.engine();
    let (base_layer, tiny) = (hex(1), hex(2));
    engine.create(&base_layer, "", &image_layer()).unwrap();
    let root = engine.get(&base_layer, "").unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/os-release"), b"ID=test\n").unwrap();
    engine.put(&base_layer).unwrap();
    engine.release_idle_mounts(true);

    engine.create(&tiny, &base_layer, &image_layer()).unwrap();
    let root = engine.get(&tiny, "").unwrap();
    for name in ["a", "b", "c"] {
        std::fs::write(root.join(name), name).unwrap();
    }
    engine.put(&tiny).unwrap();
    engine.release_idle_mounts(true);

    let (objects, bytes) = own_data(&fx, &engine, &tiny);
    eprintln!("tiny layer: {objects} objects, {bytes} bytes");
    assert!(bytes < 1 << 20, "{objects} objects, {bytes} bytes");
    let image = engine.info(&tiny).unwrap().record.image;
    let img = Image::open_read_only(&fx.ioctx, &image, None).unwrap();
    let features = img.features().unwrap();
    assert_ne!(features & rbd::RBD_FEATURE_OBJECT_MAP, 0, "{features:#x}");
    assert_ne!(features & rbd::RBD_FEATURE_FAST_DIFF, 0, "{features:#x}");
    drop(img);
    engine.remove(&tiny).unwrap();
    engine.remove(&base_layer).unwrap();
}
