//! A full pool, on a cluster of this test's own (it fills the whole OSD):
//! its flags, and an I/O context that fails at once instead of waiting for
//! space while object removals still go through.

use ceph_client::Rados;
use ceph_client::rbd::{self, ImageOptions};
use testkit::ceph::PrivateCluster;

const MIB: u64 = 1 << 20;

#[test]
fn a_full_pool_refuses_writes_at_once_and_still_takes_removals() {
    let test = "a_full_pool_refuses_writes_at_once_and_still_takes_removals";
    let Some(cluster) = PrivateCluster::start(test, 512 * MIB) else {
        return;
    };
    let env = cluster.env();
    let rados = Rados::connect(&env.connect_config()).expect("connect");
    // The client's own monitor caps (profile rbd) can read the flags.
    assert_eq!(
        rados.pool_flags(&env.pool).expect("flags"),
        ceph_client::PoolFlags::default()
    );
    let missing = rados.pool_flags("no-such-pool").unwrap_err();
    assert!(missing.is_not_found(), "{missing}");

    let ioctx = rados.ioctx_full_try(&env.pool, None).expect("ioctx");
    ioctx.write_full("kept", b"written before").expect("write");
    rbd::create(&ioctx, "before", 64 * MIB, &ImageOptions::default()).expect("create image");

    cluster.make_full(8 << 20).expect("fill the cluster");
    let flags = rados.pool_flags(&env.pool).expect("flags");
    assert!(flags.full && !flags.full_quota, "{flags:?}");

    let err = ioctx.write_full("new", b"x").unwrap_err();
    assert!(err.is_pool_full(), "a write: {err}");
    let err = rbd::create(&ioctx, "during", 64 * MIB, &ImageOptions::default()).unwrap_err();
    assert!(err.is_pool_full(), "an image create: {err}");
    assert_eq!(ioctx.read("kept").expect("read"), b"written before");
    ioctx
        .remove("kept")
        .expect("an object removal goes through");
    // librbd 16 first moves an image to the trash, a write: an image
    // removal fails (with a misleading ENOENT) and leaves it whole.
    assert!(rbd::remove(&ioctx, "before").is_err());
    let names = || -> Vec<String> {
        let images = rbd::list(&ioctx).expect("list");
        images.into_iter().map(|i| i.name).collect()
    };
    assert_eq!(names(), ["before"]);

    cluster.make_nearfull().expect("near full");
    let flags = rados.pool_flags(&env.pool).expect("flags");
    assert!(flags.nearfull && !flags.full, "{flags:?}");
    ioctx
        .write_full("new", b"x")
        .expect("near full still writes");
    rbd::remove(&ioctx, "before").expect("an image removal once there is room");
    assert!(names().is_empty());
    cluster.clear_full().expect("clear");
}
