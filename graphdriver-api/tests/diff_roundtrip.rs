//! Round trips: a tree with every entry type and every kind of metadata is
//! exported as a layer tar and applied into an empty directory; the two trees
//! must be the same (types, modes incl. setuid/setgid/sticky, owners, device
//! numbers, contents, symlink targets, xattrs incl. security.capability,
//! mtimes, hardlinks sharing an inode). Also against GNU tar in both
//! directions, and through `NaiveDiff` with a directory-backed `LayerFs`.

mod diff_support;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use diff_support::{
    DirLayers, assert_same_tree, chmod, lchown, list_tar, mknod, need_root, set_capability,
    set_mtime, snapshot, symlink, write,
};
use graphdriver_api::diff::{IdMappings, NaiveDiff, apply_layer, changes_dirs, write_changes};
use nix::sys::stat::SFlag;

/// Builds the rich tree under `root` and returns the bytes of regular file
/// data it holds (each inode once): the expected applied size.
fn build_rich_tree(root: &Path) -> u64 {
    let p = |rel: &str| root.join(rel);
    fs::create_dir_all(p("d/sub")).expect("mkdir");
    write(&p("d/file.txt"), b"hello layer\n");
    write(&p("d/other"), b"other\n");
    write(&p("empty"), b"");
    chmod(&p("empty"), 0o600);
    let big: Vec<u8> = (0..1_000_003u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    write(&p("big.bin"), &big);

    // Ownership and special mode bits (chown first: it clears setuid).
    lchown(&p("d/file.txt"), 1234, 5678);
    lchown(&p("d/sub"), 1000, 1000);
    chmod(&p("d/sub"), 0o700);
    write(&p("setuid"), b"#!/bin/true\n");
    chmod(&p("setuid"), 0o4755);
    write(&p("setgid"), b"sg\n");
    lchown(&p("setgid"), 0, 50);
    chmod(&p("setgid"), 0o2711);
    fs::create_dir(p("sticky")).expect("mkdir");
    chmod(&p("sticky"), 0o1777);
    fs::create_dir(p("sgid_dir")).expect("mkdir");
    chmod(&p("sgid_dir"), 0o2775);
    fs::create_dir(p("nomode")).expect("mkdir");
    chmod(&p("nomode"), 0o000);

    // Xattrs: user, trusted with binary bytes (newline and NUL), and a
    // real file capability.
    write(&p("xattr_file"), b"x\n");
    xattr::set(p("xattr_file"), "user.comment", b"hello").expect("xattr");
    xattr::set(p("xattr_file"), "trusted.bin", b"\x00\n\xff\n").expect("xattr");
    write(&p("ping"), b"\x7fELF-ish\n");
    lchown(&p("ping"), 0, 0);
    chmod(&p("ping"), 0o755);
    set_capability(&p("ping"));

    // Symlinks: relative, absolute, dangling, owned, with an xattr, long.
    symlink("d/file.txt", &p("link_rel"));
    symlink("/etc/passwd", &p("link_abs"));
    symlink("nowhere/at/all", &p("link_dangling"));
    symlink("d", &p("link_owned"));
    lchown(&p("link_owned"), 42, 43);
    symlink("empty", &p("link_xattr"));
    xattr::set(p("link_xattr"), "trusted.on_link", b"yes").expect("xattr on symlink");
    let long_target = format!("{}/{}", "t".repeat(120), "u".repeat(90));
    symlink(&long_target, &p("link_long"));

    // Hardlinks: three names, one inode.
    fs::hard_link(p("d/file.txt"), p("hard1")).expect("link");
    fs::hard_link(p("d/file.txt"), p("d/sub/hard2")).expect("link");

    // Devices and a fifo.
    fs::create_dir(p("dev")).expect("mkdir");
    mknod(&p("dev/null"), SFlag::S_IFCHR, 1, 3);
    mknod(&p("dev/loop9"), SFlag::S_IFBLK, 7, 9);
    lchown(&p("dev/loop9"), 0, 6);
    chmod(&p("dev/loop9"), 0o660);
    mknod(&p("dev/bigdev"), SFlag::S_IFCHR, 259, 1_048_575);
    nix::unistd::mkfifo(
        &p("dev/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .expect("mkfifo");

    // Awkward names: non-UTF-8, newline, long component, long path.
    write(&root.join(OsStr::from_bytes(b"bad\xffname")), b"latin1\n");
    write(&p("new\nline"), b"nl\n");
    write(&p("with space"), b"sp\n");
    write(&p(&format!("long/{}", "L".repeat(200))), b"long name\n");
    let deep = format!(
        "{}/{}/{}/file",
        "a".repeat(100),
        "b".repeat(100),
        "c".repeat(100)
    );
    write(&p(&deep), b"deep\n");

    // Distinct mtimes, children before their directories.
    let snap = snapshot(root);
    let mut names: Vec<&Vec<u8>> = snap.keys().filter(|k| !k.is_empty()).collect();
    names.sort_by_key(|k| std::cmp::Reverse(k.iter().filter(|b| **b == b'/').count()));
    for (i, name) in names.iter().enumerate() {
        set_mtime(
            &root.join(OsStr::from_bytes(name)),
            1_000_000_000 + i as i64 * 3600,
        );
    }

    let mut seen = HashSet::new();
    snapshot(root)
        .values()
        .filter(|s| s.kind == 'f' && seen.insert(s.ino))
        .map(|s| s.size)
        .sum()
}

fn export_tree(root: &Path, maps: &IdMappings) -> Vec<u8> {
    let changes = changes_dirs(root, None).expect("changes");
    let mut out = Vec::new();
    write_changes(root, &changes, maps, &mut out).expect("export");
    out
}

#[test]
fn every_entry_type_round_trips() {
    if !need_root("every_entry_type_round_trips") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    fs::create_dir(&src).expect("src");
    fs::create_dir(&dst).expect("dst");
    let data_bytes = build_rich_tree(&src);

    let tar = export_tree(&src, &IdMappings::identity());
    let size = apply_layer(&dst, &mut tar.as_slice(), &IdMappings::identity()).expect("apply");
    assert_eq!(size, data_bytes, "applied size is the regular file bytes");
    assert_same_tree(&src, &dst);

    // Spot checks that the comparison covered what matters.
    let ping = snapshot(&dst)[&b"ping".to_vec()].clone();
    assert!(
        ping.xattrs.contains_key(b"security.capability".as_slice()),
        "capability kept"
    );
    let hard = fs::metadata(dst.join("hard1")).expect("hard1");
    assert_eq!(
        hard.ino(),
        fs::metadata(dst.join("d/sub/hard2")).expect("hard2").ino()
    );
    assert_eq!(hard.nlink(), 3);
    assert_eq!(
        fs::metadata(dst.join("setuid")).expect("setuid").mode() & 0o7777,
        0o4755
    );

    // The tar is a standard one: the tar crate lists hardlinks as links,
    // devices and fifos with their own types, directories with a slash.
    let listed = list_tar(&tar);
    let kinds: HashSet<u8> = listed.iter().map(|e| e.0).collect();
    for k in [b'0', b'1', b'2', b'3', b'4', b'5', b'6'] {
        assert!(kinds.contains(&k), "no entry of type {}", k as char);
    }
    assert!(listed.iter().any(|e| e.1 == b"d/" && e.0 == b'5'));
    let links: Vec<_> = listed.iter().filter(|e| e.0 == b'1').collect();
    assert_eq!(links.len(), 2, "two hardlink entries for the three names");
    assert!(
        links.iter().all(|e| e.2 == b"d/file.txt"),
        "links point at the first name in order"
    );
}

#[test]
fn exported_tar_extracts_the_same_with_gnu_tar() {
    if !need_root("exported_tar_extracts_the_same_with_gnu_tar") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    fs::create_dir(&src).expect("src");
    fs::create_dir(&dst).expect("dst");
    build_rich_tree(&src);
    let tar_path = tmp.path().join("layer.tar");
    fs::write(&tar_path, export_tree(&src, &IdMappings::identity())).expect("write tar");
    let status = Command::new("tar")
        .args([
            "-x",
            "-p",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-f",
        ])
        .arg(&tar_path)
        .arg("-C")
        .arg(&dst)
        .status()
        .expect("run tar");
    assert!(status.success(), "GNU tar failed to extract our export");
    assert_same_tree(&src, &dst);
}

#[test]
fn gnu_tar_archives_apply_the_same() {
    if !need_root("gnu_tar_archives_apply_the_same") {
        return;
    }
    for format in ["pax", "gnu"] {
        let tmp = tempfile::tempdir().expect("tmp");
        let src = tmp.path().join("src");
        let dst = tmp.path().join("dst");
        fs::create_dir(&src).expect("src");
        fs::create_dir(&dst).expect("dst");
        build_rich_tree(&src);
        let tar_path = tmp.path().join("layer.tar");
        let mut cmd = Command::new("tar");
        cmd.arg("-c")
            .arg(format!("--format={format}"))
            .args(["--numeric-owner", "-f"]);
        cmd.arg(&tar_path).arg("-C").arg(&src);
        if format == "pax" {
            cmd.args(["--xattrs", "--xattrs-include=*"]);
        }
        let status = cmd.arg(".").status().expect("run tar");
        assert!(
            status.success(),
            "GNU tar failed to create a {format} archive"
        );
        let mut file = fs::File::open(&tar_path).expect("open tar");
        apply_layer(&dst, &mut file, &IdMappings::identity())
            .unwrap_or_else(|e| panic!("{format}: {e:?}"));
        if format == "pax" {
            assert_same_tree(&src, &dst);
        } else {
            // GNU format carries no xattrs; everything else must match.
            for (name, a) in snapshot(&src) {
                let b = &snapshot(&dst)[&name];
                assert_eq!(
                    (a.kind, a.uid, a.gid, a.rdev, &a.content, &a.link),
                    (b.kind, b.uid, b.gid, b.rdev, &b.content, &b.link)
                );
                if a.kind != 'l' && !name.is_empty() {
                    assert_eq!(a.mode, b.mode, "{}", String::from_utf8_lossy(&name));
                    assert_eq!(a.mtime, b.mtime, "{}", String::from_utf8_lossy(&name));
                }
            }
        }
    }
}

#[test]
fn tar_crate_builder_archives_apply() {
    if !need_root("tar_crate_builder_archives_apply") {
        return;
    }
    // The tar crate writes GNU long names ('L') for long paths.
    let mut b = tar::Builder::new(Vec::new());
    let long = format!("x/{}/{}", "p".repeat(150), "q".repeat(150));
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o640);
    h.set_uid(3);
    h.set_gid(4);
    h.set_mtime(1_234_567_890);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, &long, &b"long\n"[..])
        .expect("append");
    let bytes = b.into_inner().expect("tar");
    let tmp = tempfile::tempdir().expect("tmp");
    apply_layer(tmp.path(), &mut bytes.as_slice(), &IdMappings::identity()).expect("apply");
    let md = fs::metadata(tmp.path().join(&long)).expect("long file");
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid(), md.mtime()),
        (0o640, 3, 4, 1_234_567_890)
    );
}

#[test]
fn naive_diff_of_a_parentless_layer_is_the_whole_tree() {
    if !need_root("naive_diff_of_a_parentless_layer_is_the_whole_tree") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let layers = Arc::new(DirLayers::new(tmp.path()));
    let base = layers.create("base");
    build_rich_tree(&base);
    layers.create("copy");
    let diff = NaiveDiff::new(Arc::clone(&layers), IdMappings::identity());

    let mut stream = diff.diff("base", "").expect("diff");
    assert_eq!(
        layers.outstanding().get("base"),
        Some(&1),
        "layer held while streaming"
    );
    let size = diff.apply_diff("copy", "", &mut stream).expect("apply");
    drop(stream);
    assert!(
        layers.outstanding().is_empty(),
        "gets and puts balance: {:?}",
        layers.outstanding()
    );
    assert!(size > 1_000_000);
    assert_same_tree(&base, &layers.path("copy"));

    // Unknown layers fail with the layer named, holding nothing.
    let err = diff.diff("missing", "").err().expect("no such layer");
    assert!(format!("{err}").contains("missing"));
    let err = diff.diff("base", "missing").err().expect("no such parent");
    assert!(format!("{err}").contains("missing"));
    assert!(
        layers.outstanding().is_empty(),
        "failed calls leak no gets: {:?}",
        layers.outstanding()
    );
}
