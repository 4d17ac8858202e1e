//! Layers over layers: whiteouts and opaque directories applied over a lower
//! layer, in either order; AUFS hardlink targets; directory mtimes; and the
//! full cycle `Diff` of a child against its parent applied onto a copy of
//! the parent giving the child back.

mod diff_support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use diff_support::{
    DirLayers, Ent, assert_same_tree, chmod, lchown, need_root, snapshot, symlink, tar_of, write,
};
use graphdriver_api::diff::{IdMappings, NaiveDiff, apply_layer};

fn layer1() -> Vec<u8> {
    tar_of(&[
        Ent::dir("etc/"),
        Ent::file("etc/a", "a\n"),
        Ent::file("etc/b", "b\n"),
        Ent::dir("etc/dir/"),
        Ent::file("etc/dir/inner", "inner\n"),
        Ent::dir("opt/"),
        Ent::dir("opt/app/"),
        Ent::file("opt/app/x", "x\n"),
        Ent::file("opt/app/y", "y\n"),
        Ent::dir("opt/app/sub/"),
        Ent::file("opt/app/sub/z", "z\n"),
        Ent::file("keep", "keep\n"),
    ])
}

fn apply(root: &Path, tar: &[u8]) -> u64 {
    apply_layer(root, &mut &tar[..], &IdMappings::identity()).expect("apply")
}

fn names(root: &Path) -> Vec<String> {
    snapshot(root)
        .keys()
        .filter(|k| !k.is_empty())
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect()
}

#[test]
fn whiteouts_remove_files_and_trees() {
    if !need_root("whiteouts_remove_files_and_trees") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    assert_eq!(apply(tmp.path(), &layer1()), 2 + 2 + 6 + 2 + 2 + 2 + 5);
    let size = apply(
        tmp.path(),
        &tar_of(&[
            Ent::file("etc/.wh.a", ""),
            Ent::file("etc/.wh.dir", ""),
            Ent::file("etc/.wh.never-existed", ""),
            Ent::file("missing/dir/.wh.x", ""),
            Ent::file(".wh.keep", ""),
        ]),
    );
    assert_eq!(size, 0, "whiteouts carry no data");
    assert_eq!(
        names(tmp.path()),
        [
            "etc",
            "etc/b",
            "opt",
            "opt/app",
            "opt/app/sub",
            "opt/app/sub/z",
            "opt/app/x",
            "opt/app/y"
        ]
    );
    assert!(
        !tmp.path().join("missing").exists(),
        "a whiteout creates no directories"
    );
}

#[test]
fn opaque_directories_are_order_independent() {
    if !need_root("opaque_directories_are_order_independent") {
        return;
    }
    let marker = Ent::file("opt/app/.wh..wh..opq", "");
    let added = [
        Ent::dir("opt/app/"),
        Ent::file("opt/app/new", "new\n"),
        Ent::dir("opt/app/sub/"),
        Ent::file("opt/app/sub/fresh", "fresh\n"),
    ];
    let want = [
        "opt",
        "opt/app",
        "opt/app/new",
        "opt/app/sub",
        "opt/app/sub/fresh",
    ];
    let mut first = vec![marker.clone()];
    first.extend(added.iter().cloned());
    let mut last: Vec<Ent> = added.to_vec();
    last.push(marker.clone());
    let mut middle = added[..2].to_vec();
    middle.push(marker);
    middle.extend(added[2..].iter().cloned());
    for (order, layer2) in [
        ("marker first", first),
        ("marker last", last),
        ("marker between", middle),
    ] {
        let tmp = tempfile::tempdir().expect("tmp");
        apply(tmp.path(), &layer1());
        apply(tmp.path(), &tar_of(&layer2));
        let got: Vec<String> = names(tmp.path())
            .into_iter()
            .filter(|n| n.starts_with("opt"))
            .collect();
        assert_eq!(got, want, "{order}");
        assert!(
            tmp.path().join("etc/a").exists(),
            "{order}: outside the opaque dir untouched"
        );
    }
}

#[test]
fn opaque_keeps_implied_parents_of_added_entries() {
    if !need_root("opaque_keeps_implied_parents_of_added_entries") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    apply(tmp.path(), &layer1());
    // Only a deep entry is added (its parents pre-exist below); the marker
    // comes last. The lower content around it goes, the path to it stays.
    apply(
        tmp.path(),
        &tar_of(&[
            Ent::file("opt/app/sub/deep/n", "n\n"),
            Ent::file("opt/.wh..wh..opq", ""),
        ]),
    );
    let got: Vec<String> = names(tmp.path())
        .into_iter()
        .filter(|n| n.starts_with("opt"))
        .collect();
    assert_eq!(
        got,
        [
            "opt",
            "opt/app",
            "opt/app/sub",
            "opt/app/sub/deep",
            "opt/app/sub/deep/n"
        ]
    );
}

#[test]
fn opaque_marker_for_a_missing_directory_creates_it_empty() {
    if !need_root("opaque_marker_for_a_missing_directory_creates_it_empty") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    apply(tmp.path(), &tar_of(&[Ent::file("fresh/.wh..wh..opq", "")]));
    assert_eq!(names(tmp.path()), ["fresh"]);
}

#[test]
fn aufs_hardlink_targets_become_real_links() {
    if !need_root("aufs_hardlink_targets_become_real_links") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let size = apply(
        tmp.path(),
        &tar_of(&[
            Ent::file(".wh..wh.aufs", ""),
            Ent::dir(".wh..wh.orph/"),
            Ent::dir(".wh..wh.plnk/"),
            Ent::file(".wh..wh.plnk/1234.5678", "shared\n")
                .owner(5, 6)
                .mode(0o751),
            Ent::hardlink("usr/bin/a", ".wh..wh.plnk/1234.5678")
                .owner(5, 6)
                .mode(0o751),
            Ent::hardlink("usr/sbin/b", "/.wh..wh.plnk/1234.5678")
                .owner(5, 6)
                .mode(0o751),
        ]),
    );
    assert_eq!(size, 7);
    assert_eq!(
        names(tmp.path()),
        ["usr", "usr/bin", "usr/bin/a", "usr/sbin", "usr/sbin/b"]
    );
    let a = fs::metadata(tmp.path().join("usr/bin/a")).expect("a");
    let b = fs::metadata(tmp.path().join("usr/sbin/b")).expect("b");
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2, "no third name left behind");
    assert_eq!((a.uid(), a.gid(), a.mode() & 0o7777), (5, 6, 0o751));
    assert_eq!(
        fs::read(tmp.path().join("usr/sbin/b")).expect("read"),
        b"shared\n"
    );
}

#[test]
fn directory_times_are_set_after_their_children() {
    if !need_root("directory_times_are_set_after_their_children") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    apply(
        tmp.path(),
        &tar_of(&[
            Ent::dir("./").mtime(1_111_111_111).mode(0o711),
            Ent::dir("t/").mtime(1_000_000_000),
            Ent::dir("t/u/").mtime(1_000_000_100),
            Ent::file("t/u/f", "f\n").mtime(1_000_000_200),
            Ent::file("t/g", "g\n").mtime(1_000_000_300),
            Ent::symlink("t/s", "g").mtime(1_000_000_400),
            Ent::file("t/.wh.g", ""),
        ]),
    );
    let m = |r: &str| {
        fs::symlink_metadata(tmp.path().join(r))
            .expect("lstat")
            .mtime()
    };
    assert_eq!(m("t"), 1_000_000_000);
    assert_eq!(m("t/u"), 1_000_000_100);
    assert_eq!(m("t/u/f"), 1_000_000_200);
    assert_eq!(
        m("t/s"),
        1_000_000_400,
        "symlink times set on the link itself"
    );
    let root = fs::metadata(tmp.path()).expect("root");
    assert_eq!(
        (root.mtime(), root.mode() & 0o7777),
        (1_111_111_111, 0o711),
        "a ./ entry applies to the root"
    );
}

#[test]
fn directory_entry_over_a_directory_merges() {
    if !need_root("directory_entry_over_a_directory_merges") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    apply(tmp.path(), &layer1());
    apply(
        tmp.path(),
        &tar_of(&[Ent::dir("etc/")
            .mode(0o700)
            .owner(3, 4)
            .xattr("user.k", b"v")]),
    );
    let md = fs::metadata(tmp.path().join("etc")).expect("etc");
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o700, 3, 4));
    assert_eq!(
        xattr::get(tmp.path().join("etc"), "user.k").expect("get"),
        Some(b"v".to_vec())
    );
    assert!(tmp.path().join("etc/a").exists(), "content kept");
}

/// Changes made to the child layer for the cycle test.
fn change_child(c: &Path) {
    write(&c.join("etc/new"), b"added\n");
    fs::remove_file(c.join("etc/a")).expect("rm");
    fs::remove_dir_all(c.join("opt/app/sub")).expect("rm -r");
    fs::remove_file(c.join("keep")).expect("rm");
    fs::create_dir(c.join("keep")).expect("mkdir");
    write(&c.join("keep/inside"), b"inside\n");
    chmod(&c.join("etc/b"), 0o4755);
    lchown(&c.join("opt/app/x"), 77, 88);
    symlink("/etc/b", &c.join("opt/link"));
    fs::hard_link(c.join("etc/new"), c.join("opt/newlink")).expect("link");
    xattr::set(c.join("opt/app/y"), "trusted.t", b"\n\0").expect("xattr");
    write(&c.join("etc/dir/inner"), b"rewritten inner\n");
}

#[test]
fn diff_against_parent_applied_to_a_copy_gives_the_child() {
    if !need_root("diff_against_parent_applied_to_a_copy_gives_the_child") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let layers = Arc::new(DirLayers::new(tmp.path()));
    let diff = NaiveDiff::new(Arc::clone(&layers), IdMappings::identity());
    for id in ["parent", "child", "copy"] {
        layers.create(id);
        diff.apply_diff(id, "", &mut layer1().as_slice())
            .expect("apply layer 1");
    }
    change_child(&layers.path("child"));

    let mut stream = diff.diff("child", "parent").expect("diff");
    assert_eq!(
        layers.outstanding().get("parent"),
        None,
        "the parent is released once the changes are known"
    );
    let mut tar = Vec::new();
    std::io::copy(&mut stream, &mut tar).expect("read diff");
    drop(stream);
    assert!(
        layers.outstanding().is_empty(),
        "{:?}",
        layers.outstanding()
    );

    let listed = diff_support::list_tar(&tar);
    let names: Vec<String> = listed
        .iter()
        .map(|e| String::from_utf8_lossy(&e.1).into_owned())
        .collect();
    for want in [
        "etc/.wh.a",
        "opt/app/.wh.sub",
        "keep/",
        "keep/inside",
        "opt/newlink",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }

    diff.apply_diff("copy", "parent", &mut tar.as_slice())
        .expect("apply diff");
    assert_same_tree(&layers.path("child"), &layers.path("copy"));
    assert!(
        layers.outstanding().is_empty(),
        "{:?}",
        layers.outstanding()
    );
}

#[test]
fn a_failed_apply_leaves_a_removable_layer() {
    if !need_root("a_failed_apply_leaves_a_removable_layer") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let layers = Arc::new(DirLayers::new(tmp.path()));
    let diff = NaiveDiff::new(Arc::clone(&layers), IdMappings::identity());
    layers.create("l");
    let full = tar_of(&[
        Ent::dir("a/").mode(0o000),
        Ent::file("a/f", vec![1u8; 10_000]).mode(0o000),
        Ent::file("b", "b"),
    ]);
    let cut = &full[..512 * 4];
    let err = diff
        .apply_diff("l", "", &mut &cut[..])
        .expect_err("truncated");
    let msg = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(msg.contains("layer l"), "{msg}");
    assert!(layers.outstanding().is_empty());
    fs::remove_dir_all(layers.path("l")).expect("removable");
}
