//! A full cluster, through the graphdriver plugin: requests that would
//! write fail at once saying the pool is full, leave nothing behind, and
//! work again once there is room; `Status` says how full the pool is.
//!
//! The test fills a cluster of its own (`testkit::ceph::PrivateCluster`):
//! the full ratios are the whole cluster's, so the suite's shared cluster
//! cannot be used. Needs root, FUSE and loop devices.

use std::collections::BTreeSet;

use ceph_client::{IoCtx, Rados, rbd};
use docker_rbd::config::{RawSettings, Source};
use docker_rbd::mapper::fuse::HelperCommand;
use docker_rbd::plugin::RbdPlugin;
use graphdriver_api::GraphDriver;
use graphdriver_api::types::{CreateRequest, InitRequest};
use testkit::ceph::PrivateCluster;
use testkit::images::Layer;

fn id(n: u32) -> String {
    format!("{n:064x}")
}

fn request(id: &str, parent: &str) -> CreateRequest {
    CreateRequest {
        id: id.to_string(),
        parent: parent.to_string(),
        ..CreateRequest::default()
    }
}

fn tar(name: &str) -> Vec<u8> {
    Layer::new()
        .file(name, format!("{name}\n"), 0o644)
        .to_tar()
        .expect("tar")
}

/// Unmounts and ends what the plugin left under its Home, whatever the
/// test's outcome; the cluster (dropped after) goes with its images.
struct Cleanup {
    test: &'static str,
    home: tempfile::TempDir,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let test = self.test;
        let home = self.home.path().join("rbd");
        let left = testkit::driver::cleanup_home(test, &home, None).finish();
        if let Err(e) = testkit::mounts::unmount_under(None, self.home.path()) {
            eprintln!("[{test}] cleanup: {e}");
        }
        if !left.is_empty() && !std::thread::panicking() {
            panic!("[{test}] left behind: {left:?}");
        }
    }
}

/// A plugin initialised on a cluster of the test's own; dropped in field
/// order: the plugin, then what it left on this host, then the cluster.
struct Setup {
    plugin: RbdPlugin,
    /// The fleet's namespace, writes sent even while the pool is full.
    ioctx: IoCtx,
    _rados: Rados,
    _cleanup: Cleanup,
    cluster: PrivateCluster,
}

fn setup(test: &'static str, with_mgr: bool) -> Option<Setup> {
    if !testkit::require::layer_mounts(test) {
        return None;
    }
    let cluster = if with_mgr {
        PrivateCluster::start_with_mgr(test, 1 << 30)?
    } else {
        PrivateCluster::start(test, 1 << 30)?
    };
    let cleanup = Cleanup {
        test,
        home: tempfile::tempdir().expect("tempdir"),
    };
    let ceph = cluster.env();
    let namespace = "fleet";
    let mut flags = RawSettings::default();
    for (k, v) in [
        ("conf", ceph.conf.display().to_string()),
        ("id", ceph.id.clone()),
        ("keyring", ceph.keyring.display().to_string()),
        ("pool", ceph.pool.clone()),
        ("namespace", namespace.to_string()),
        ("mapper", "fuse".to_string()),
        ("basesize", "256M".to_string()),
        ("hostid", "h-full".to_string()),
        ("leaseduration", "3".to_string()),
        ("leaserenew", "1".to_string()),
    ] {
        flags.set(k, &v, Source::Flag);
    }
    let plugin = RbdPlugin::new(flags, None)
        .with_fuse_helper(HelperCommand::binary(env!("CARGO_BIN_EXE_docker-rbd-fuse")));
    plugin
        .init(InitRequest {
            home: cleanup.home.path().join("rbd").display().to_string(),
            ..InitRequest::default()
        })
        .expect("init");
    let rados = Rados::connect(&ceph.connect_config()).expect("connect");
    let ioctx = rados
        .ioctx_full_try(&ceph.pool, Some(namespace))
        .expect("ioctx");
    Some(Setup {
        plugin,
        ioctx,
        _rados: rados,
        _cleanup: cleanup,
        cluster,
    })
}

fn said_full(pool: &str, what: &str, err: &dyn std::fmt::Display) {
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("pool {pool:?} is full")),
        "{what}: {msg}"
    );
}

fn status_of(plugin: &RbdPlugin, key: &str) -> String {
    plugin
        .status()
        .expect("status")
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no {key:?} in Status"))
}

fn images(ioctx: &IoCtx) -> BTreeSet<String> {
    rbd::list(ioctx)
        .expect("list images")
        .into_iter()
        .map(|i| i.name)
        .collect()
}

#[test]
fn a_full_pool_is_refused_at_once_and_nothing_is_left_half_made() {
    let test = "a_full_pool_is_refused_at_once_and_nothing_is_left_half_made";
    let Some(setup) = setup(test, false) else {
        return;
    };
    let (plugin, ioctx, cluster) = (&setup.plugin, &setup.ioctx, &setup.cluster);
    let pool = cluster.env().pool.clone();
    assert_eq!(status_of(plugin, "Pool Space"), "available");

    // An image layer with a file, and a container's layer on it.
    let (image, container) = (id(1), id(2));
    plugin.create(request(&image, "")).expect("create");
    plugin
        .apply_diff(&image, "", &mut tar("before").as_slice())
        .expect("apply");
    plugin
        .create_read_write(request(&container, &image))
        .expect("create rw");
    let (doomed, later) = (id(5), id(6));
    for layer in [&doomed, &later] {
        plugin
            .create_read_write(request(layer, &image))
            .expect("create rw");
    }
    let before = images(ioctx);

    cluster.make_full(16 << 20).expect("fill the cluster");
    // Status reads the flags at most once a second.
    wait_until("Status says full", || {
        status_of(plugin, "Pool Space").starts_with("FULL: an OSD")
    });
    let said_full = |what: &str, err: &dyn std::fmt::Display| said_full(&pool, what, err);

    // Each refused at once (the OSD operation timeout would say ETIMEDOUT
    // after 120 s instead), changing nothing.
    let new = id(3);
    let err = plugin.create(request(&new, &image)).unwrap_err();
    said_full("a create", &err);
    let err = plugin
        .create_read_write(request(&id(4), &image))
        .unwrap_err();
    said_full("a read-write create", &err);
    let err = plugin
        .apply_diff(&container, &image, &mut tar("during").as_slice())
        .unwrap_err();
    said_full("an ApplyDiff", &err);
    let err = plugin.get(&container, "").unwrap_err();
    said_full("a Get of a writable layer", &err);
    assert!(!plugin.exists(&new).expect("exists"));
    assert!(!plugin.exists(&id(4)).expect("exists"));
    assert!(plugin.exists(&container).expect("exists"));
    assert_eq!(images(ioctx), before, "no image made");

    // A sealed layer is read-only: it still mounts, its files there.
    let root = plugin.get(&image, "").expect("a read-only Get");
    assert_eq!(
        std::fs::read_to_string(root.join("before")).expect("read"),
        "before\n"
    );
    plugin.put(&image).expect("put");

    // A removal goes through, freeing space (its image in the background).
    plugin.remove(&doomed).expect("a Remove on a full pool");
    assert!(!plugin.exists(&doomed).expect("exists"));
    let doomed_image = format!("docker-rbd.layer.{doomed}");
    assert!(before.contains(&doomed_image), "{before:?}");
    wait_until("the removed layer's image is gone", || {
        !images(ioctx).contains(&doomed_image)
    });

    // Without the trash object (librbd makes it on a first removal, which
    // a full pool refuses) the image stays until there is room; the purge
    // is tried again meanwhile, no restart needed.
    ioctx.remove("rbd_trash").expect("remove the trash object");
    plugin.remove(&later).expect("a Remove on a full pool");
    assert!(!plugin.exists(&later).expect("exists"));
    let later_image = format!("docker-rbd.layer.{later}");
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(images(ioctx).contains(&later_image), "purged while full?");

    // The host lease is renewed all the while (3 renewals at least).
    std::thread::sleep(std::time::Duration::from_secs(3));
    let status = plugin.status().expect("status");
    assert!(
        !status.iter().any(|(_, v)| v.starts_with("LOST")),
        "{status:?}"
    );
    assert!(cluster.flags().expect("flags").full);

    // Near full is a warning only.
    cluster.make_nearfull().expect("near full");
    wait_until("Status says nearly full", || {
        status_of(plugin, "Pool Space").starts_with("nearly full")
    });
    wait_until("the purge tried again has removed the image", || {
        !images(ioctx).contains(&later_image)
    });
    plugin
        .create(request(&new, &image))
        .expect("create near full");
    let root = plugin.get(&container, "").expect("get");
    plugin
        .apply_diff(&new, &image, &mut tar("after").as_slice())
        .expect("apply near full");
    assert!(root.join("before").is_file());
    plugin.put(&container).expect("put");

    cluster.clear_full().expect("room again");
    wait_until("Status says available", || {
        status_of(plugin, "Pool Space") == "available"
    });
    for layer in [&new, &container, &image] {
        plugin.remove(layer).expect("remove");
    }
    plugin.cleanup().expect("cleanup");
    let Setup { plugin, ioctx, .. } = setup;
    let ioctx = &ioctx;
    drop(plugin);
    wait_until("every layer image is gone", || {
        !images(ioctx).iter().any(|i| i.contains(".layer."))
    });
}

/// A pool at its quota (`ceph osd pool set-quota`, enforced from the
/// mgr's pool statistics): the same refusals, saying so.
#[test]
fn a_pool_at_its_quota_is_refused_at_once() {
    let test = "a_pool_at_its_quota_is_refused_at_once";
    let Some(setup) = setup(test, true) else {
        return;
    };
    let (plugin, cluster) = (&setup.plugin, &setup.cluster);
    let pool = cluster.env().pool.clone();
    let (image, container) = (id(1), id(2));
    plugin.create(request(&image, "")).expect("create");
    plugin
        .apply_diff(&image, "", &mut tar("before").as_slice())
        .expect("apply");

    cluster
        .fill_to_quota(1 << 20, 2 << 20)
        .expect("reach the quota");
    wait_until("Status says the quota is reached", || {
        status_of(plugin, "Pool Space") == "FULL: it reached its quota (ceph osd pool set-quota)"
    });
    let err = plugin
        .create_read_write(request(&container, &image))
        .unwrap_err();
    said_full(&pool, "a create at the quota", &err);
    assert!(err.to_string().contains("quota"), "{err}");
    assert!(!plugin.exists(&container).expect("exists"));
    let err = plugin
        .apply_diff(&image, "", &mut tar("during").as_slice())
        .unwrap_err();
    said_full(&pool, "an ApplyDiff at the quota", &err);

    cluster.clear_quota().expect("lift the quota");
    wait_until("Status says available", || {
        status_of(plugin, "Pool Space") == "available"
    });
    plugin
        .create_read_write(request(&container, &image))
        .expect("create once the quota is lifted");
    for layer in [&container, &image] {
        plugin.remove(layer).expect("remove");
    }
    plugin.cleanup().expect("cleanup");
    let Setup { plugin, ioctx, .. } = setup;
    drop(plugin);
    wait_until("every layer image is gone", || {
        !images(&ioctx).iter().any(|i| i.contains(".layer."))
    });
}

fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not after 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
