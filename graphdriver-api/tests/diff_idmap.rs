//! User-namespace ID maps: container IDs in a tar become host IDs on apply,
//! host IDs become container IDs on export, and an ID no range covers is an
//! error naming it.

mod diff_support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use diff_support::{DirLayers, Ent, assert_same_tree, lchown, need_root, tar_of, write};
use graphdriver_api::IdMap;
use graphdriver_api::diff::{
    IdKind, IdMapError, IdMappings, NaiveDiff, apply_layer, changes_dirs, write_changes,
};

fn remap() -> IdMappings {
    IdMappings::new(
        vec![
            IdMap {
                container_id: 0,
                host_id: 100_000,
                size: 1000,
            },
            IdMap {
                container_id: 1000,
                host_id: 300_000,
                size: 64_536,
            },
        ],
        vec![IdMap {
            container_id: 0,
            host_id: 200_000,
            size: 65_536,
        }],
    )
    .expect("valid maps")
}

#[test]
fn mapping_functions() {
    let m = remap();
    assert_eq!(m.uid_to_host(0), Ok(100_000));
    assert_eq!(m.uid_to_host(999), Ok(100_999));
    assert_eq!(m.uid_to_host(1000), Ok(300_000));
    assert_eq!(m.uid_to_host(65_535), Ok(364_535));
    assert_eq!(
        m.uid_to_host(65_536),
        Err(IdMapError::NoHostId {
            kind: IdKind::Uid,
            id: 65_536
        })
    );
    assert_eq!(m.gid_to_host(7), Ok(200_007));
    assert_eq!(m.uid_to_container(100_500), Ok(500));
    assert_eq!(m.uid_to_container(300_001), Ok(1001));
    assert_eq!(
        m.gid_to_container(0),
        Err(IdMapError::NoContainerId {
            kind: IdKind::Gid,
            id: 0
        })
    );
    assert_eq!(m.root_pair(), (100_000, 200_000));

    let id = IdMappings::identity();
    assert!(id.is_identity());
    assert_eq!(id.uid_to_host(4_294_967_295), Ok(u32::MAX));
    assert!(matches!(
        id.uid_to_host(1 << 32),
        Err(IdMapError::OutOfRange { .. })
    ));
    assert_eq!(id.gid_to_container(77), Ok(77));

    // A map for one kind only leaves the other as the identity (moby).
    let uid_only = IdMappings::new(
        vec![IdMap {
            container_id: 0,
            host_id: 5000,
            size: 10,
        }],
        Vec::new(),
    )
    .expect("valid");
    assert_eq!(uid_only.gid_to_host(123), Ok(123));

    let msg = m.uid_to_host(70_000).expect_err("unmapped").to_string();
    assert!(msg.contains("70000") && msg.contains("uid"), "{msg}");
}

#[test]
fn invalid_maps_are_refused() {
    let bad = |container_id, host_id, size| {
        IdMappings::new(
            vec![IdMap {
                container_id,
                host_id,
                size,
            }],
            Vec::new(),
        )
    };
    assert!(matches!(bad(-1, 0, 1), Err(IdMapError::InvalidMap { .. })));
    assert!(matches!(bad(0, -5, 1), Err(IdMapError::InvalidMap { .. })));
    assert!(matches!(bad(0, 0, 0), Err(IdMapError::InvalidMap { .. })));
    assert!(matches!(
        bad(0, 4_294_967_000, 1000),
        Err(IdMapError::InvalidMap { .. })
    ));
    assert!(bad(0, 4_294_966_296, 1000).is_ok());
}

#[test]
fn apply_maps_container_ids_to_host_ids() {
    if !need_root("apply_maps_container_ids_to_host_ids") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    apply_layer(
        tmp.path(),
        &mut tar_of(&[
            Ent::file("implied/root_file", "r\n").owner(0, 0),
            Ent::file("user_file", "u\n").owner(1000, 1000),
            Ent::symlink("link", "user_file").owner(5, 6),
            Ent::file("setuid", "s\n").owner(1000, 0).mode(0o4755),
        ])
        .as_slice(),
        &remap(),
    )
    .expect("apply");
    let owner = |r: &str| {
        let md = fs::symlink_metadata(tmp.path().join(r)).expect("lstat");
        (md.uid(), md.gid())
    };
    assert_eq!(
        owner("implied"),
        (100_000, 200_000),
        "implied parents belong to the container's root"
    );
    assert_eq!(owner("implied/root_file"), (100_000, 200_000));
    assert_eq!(owner("user_file"), (300_000, 201_000));
    assert_eq!(owner("link"), (100_005, 200_006));
    let md = fs::metadata(tmp.path().join("setuid")).expect("setuid");
    assert_eq!(
        md.mode() & 0o7777,
        0o4755,
        "setuid survives the mapped chown"
    );
}

#[test]
fn apply_refuses_ids_outside_the_map() {
    if !need_root("apply_refuses_ids_outside_the_map") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let err = apply_layer(
        tmp.path(),
        &mut tar_of(&[Ent::file("f", "x").owner(70_000, 0)]).as_slice(),
        &remap(),
    )
    .expect_err("unmapped uid");
    let chain = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(
        chain.contains("\"f\"") && chain.contains("container uid 70000"),
        "{chain}"
    );
    assert!(
        !tmp.path().join("f").exists(),
        "nothing created for the refused entry"
    );
}

#[test]
fn export_maps_host_ids_back_and_refuses_unmapped_ones() {
    if !need_root("export_maps_host_ids_back_and_refuses_unmapped_ones") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    write(&src.join("a"), b"a\n");
    lchown(&src.join("a"), 300_010, 200_020);
    lchown(&src, 100_000, 200_000);
    let changes = changes_dirs(&src, None).expect("changes");
    let mut tar = Vec::new();
    write_changes(&src, &changes, &remap(), &mut tar).expect("export");
    let mut ar = tar::Archive::new(tar.as_slice());
    let headers: Vec<(u64, u64)> = ar
        .entries()
        .expect("entries")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.header().uid().expect("uid"),
                e.header().gid().expect("gid"),
            )
        })
        .collect();
    assert_eq!(headers, [(1010, 20)]);

    write(&src.join("stranger"), b"s\n");
    lchown(&src.join("stranger"), 5, 200_000);
    let changes = changes_dirs(&src, None).expect("changes");
    let err =
        write_changes(&src, &changes, &remap(), &mut Vec::new()).expect_err("unmapped host uid");
    let chain = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(
        chain.contains("/stranger") && chain.contains("host uid 5"),
        "{chain}"
    );
}

#[test]
fn remapped_round_trip_through_naive_diff_with_maps_set_after_construction() {
    if !need_root("remapped_round_trip_through_naive_diff_with_maps_set_after_construction") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let layers = Arc::new(DirLayers::new(tmp.path()));
    let diff = NaiveDiff::new(Arc::clone(&layers), IdMappings::identity());
    // dockerd sends the maps in Init, after the driver is built.
    diff.set_id_mappings(remap());
    assert_eq!(diff.id_mappings(), remap());
    for id in ["a", "b"] {
        layers.create(id);
    }
    let tar = tar_of(&[
        Ent::dir("home/"),
        Ent::dir("home/user/").owner(1000, 1000).mode(0o700),
        Ent::file("home/user/.profile", "export X=1\n").owner(1000, 1000),
        Ent::symlink("home/user/l", ".profile").owner(1000, 1000),
        Ent::chardev("null", 1, 3),
    ]);
    diff.apply_diff("a", "", &mut tar.as_slice())
        .expect("apply");
    assert_eq!(
        fs::metadata(layers.path("a").join("home/user"))
            .expect("stat")
            .uid(),
        300_000
    );

    let mut stream = diff.diff("a", "").expect("diff");
    diff.apply_diff("b", "", &mut stream).expect("re-apply");
    drop(stream);
    assert_same_tree(&layers.path("a"), &layers.path("b"));
    assert!(
        layers.outstanding().is_empty(),
        "{:?}",
        layers.outstanding()
    );
}
