//! `Changes` and `DiffSize`: a table of modifications made to a copy of a
//! parent tree, and the exact list moby's rules give for them.

mod diff_support;

use std::collections::HashSet;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use diff_support::{DirLayers, chmod, lchown, need_root, set_mtime, symlink, write};
use graphdriver_api::diff::{
    IdMappings, LayerChange, NaiveDiff, apply_layer, changes_dirs, changes_size, write_changes,
};
use graphdriver_api::{Change, ChangeKind};

const T0: i64 = 1_600_000_000;

/// The parent tree.
fn build_parent(root: &Path) {
    let p = |r: &str| root.join(r);
    write(&p("d/file.txt"), b"original\n");
    write(&p("d/other"), b"other\n");
    write(&p("owned"), b"owned\n");
    write(&p("gone"), b"gone\n");
    write(&p("gonedir/a"), b"a\n");
    write(&p("gonedir/deeper/b"), b"b\n");
    write(&p("f2dir"), b"file then dir\n");
    write(&p("dir2f/x"), b"x\n");
    write(&p("dir2f/y/z"), b"z\n");
    symlink("target-1", &p("link"));
    write(&p("xat"), b"xattr\n");
    fs::create_dir_all(p("touched")).expect("mkdir");
    write(&p("touched/inner"), b"inner\n");
    write(&p("same"), b"same\n");
    write(&p("a/b/c/file"), b"nested\n");
    fs::create_dir_all(p("modedir")).expect("mkdir");
    write(&p("touchfile"), b"touch me\n");
    write(&p("nsec"), b"nsec\n");
    fs::create_dir_all(p("untouched_dir/sub")).expect("mkdir");
    write(&p("untouched_dir/sub/f"), b"f\n");
    set_all_mtimes(root, T0);
}

fn set_all_mtimes(root: &Path, t: i64) {
    let snap = diff_support::snapshot(root);
    for name in snap.keys() {
        set_mtime(&root.join(std::ffi::OsStr::from_bytes(name)), t);
    }
}

/// A copy of `from` at `to` (through export and apply: mtimes in seconds).
fn copy_tree(from: &Path, to: &Path) {
    let changes = changes_dirs(from, None).expect("changes");
    let mut tar = Vec::new();
    write_changes(from, &changes, &IdMappings::identity(), &mut tar).expect("export");
    apply_layer(to, &mut tar.as_slice(), &IdMappings::identity()).expect("apply");
}

/// The modifications of the table, each commented with what moby reports.
fn modify(c: &Path) {
    let p = |r: &str| c.join(r);
    let later = T0 + 100;
    // A /newfile
    write(&p("newfile"), b"new\n");
    // A /newdir, A /newdir/f
    write(&p("newdir/f"), b"new f\n");
    // C /d (holds a change), C /d/file.txt (content and mtime)
    write(&p("d/file.txt"), b"changed!!\n");
    set_mtime(&p("d/file.txt"), later);
    set_mtime(&p("d"), T0);
    // C /d/other (mode only)
    chmod(&p("d/other"), 0o600);
    // C /owned (owner only)
    lchown(&p("owned"), 1000, 1000);
    // D /gone
    fs::remove_file(p("gone")).expect("rm");
    // D /gonedir (not its children)
    fs::remove_dir_all(p("gonedir")).expect("rm -r");
    // C /f2dir (file became dir), A /f2dir/x
    fs::remove_file(p("f2dir")).expect("rm");
    write(&p("f2dir/x"), b"x\n");
    // C /dir2f (dir became file; its old children are not listed)
    fs::remove_dir_all(p("dir2f")).expect("rm -r");
    write(&p("dir2f"), b"now a file\n");
    // C /link: same length, same mtime, other target (beyond moby)
    fs::remove_file(p("link")).expect("rm");
    symlink("target-2", &p("link"));
    set_mtime(&p("link"), T0);
    // C /xat: xattr only (beyond moby, which compares security.capability)
    xattr::set(p("xat"), "user.tag", b"v").expect("xattr");
    // nothing: a directory whose mtime alone changed (moby#9874)
    set_mtime(&p("touched"), later);
    // C /a, C /a/b, C /a/b/c (hold a change), C /a/b/c/file
    write(&p("a/b/c/file"), b"nested changed\n");
    for d in ["a/b/c", "a/b", "a"] {
        set_mtime(&p(d), T0);
    }
    // C /modedir (directory mode)
    chmod(&p("modedir"), 0o700);
    // C /touchfile (mtime only)
    set_mtime(&p("touchfile"), later);
    // nothing: /nsec gets nanoseconds within the same second (tars carry
    // seconds; moby's sameFsTime)
    let ts = nix::sys::time::TimeSpec::new(T0, 123_456_789);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        &p("nsec"),
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .expect("utimensat");
    // A /h1, A /h2: one new inode, two names
    write(&p("h1"), b"hardlinked\n");
    fs::hard_link(p("h1"), p("h2")).expect("link");
    // Root mtime changes are never reported.
    set_mtime(c, T0);
}

fn expected() -> Vec<LayerChange> {
    use ChangeKind::{Add as A, Delete as D, Modify as C};
    let list = [
        ("/a", C),
        ("/a/b", C),
        ("/a/b/c", C),
        ("/a/b/c/file", C),
        ("/d", C),
        ("/d/file.txt", C),
        ("/d/other", C),
        ("/dir2f", C),
        ("/f2dir", C),
        ("/f2dir/x", A),
        ("/gone", D),
        ("/gonedir", D),
        ("/h1", A),
        ("/h2", A),
        ("/link", C),
        ("/modedir", C),
        ("/newdir", A),
        ("/newdir/f", A),
        ("/newfile", A),
        ("/owned", C),
        ("/touchfile", C),
        ("/xat", C),
    ];
    list.iter().map(|(p, k)| LayerChange::new(*p, *k)).collect()
}

#[test]
fn changes_follow_mobys_rules_exactly() {
    if !need_root("changes_follow_mobys_rules_exactly") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let parent = tmp.path().join("parent");
    let child = tmp.path().join("child");
    fs::create_dir(&parent).expect("mkdir");
    fs::create_dir(&child).expect("mkdir");
    build_parent(&parent);
    copy_tree(&parent, &child);
    assert_eq!(
        changes_dirs(&child, Some(&parent)).expect("changes"),
        Vec::new(),
        "a copy has no changes"
    );

    modify(&child);
    let got = changes_dirs(&child, Some(&parent)).expect("changes");
    let show = |v: &[LayerChange]| {
        v.iter()
            .map(|c| format!("{} {}", c.kind.letter(), c.path.display()))
            .collect::<Vec<_>>()
    };
    assert_eq!(show(&got), show(&expected()));
}

#[test]
fn diff_size_counts_added_and_modified_files_once_per_inode() {
    if !need_root("diff_size_counts_added_and_modified_files_once_per_inode") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let parent = tmp.path().join("parent");
    let child = tmp.path().join("child");
    fs::create_dir(&parent).expect("mkdir");
    fs::create_dir(&child).expect("mkdir");
    build_parent(&parent);
    copy_tree(&parent, &child);
    modify(&child);
    let changes = changes_dirs(&child, Some(&parent)).expect("changes");

    let mut seen = HashSet::new();
    let mut want = 0u64;
    for c in &expected() {
        if c.kind == ChangeKind::Delete {
            continue;
        }
        let md = fs::symlink_metadata(child.join(c.path.strip_prefix("/").expect("abs")))
            .expect("lstat");
        if !md.is_dir() && seen.insert(md.ino()) {
            want += md.size();
        }
    }
    assert_eq!(changes_size(&child, &changes), want);
    // Spelled out: newfile 4, newdir/f 6, d/file.txt 10, d/other 6, owned 6,
    // f2dir/x 2, dir2f 11, link 8, xat 6, a/b/c/file 15, touchfile 9, h1 11.
    assert_eq!(want, 4 + 6 + 10 + 6 + 6 + 2 + 11 + 8 + 6 + 15 + 9 + 11);
}

#[test]
fn naive_diff_changes_and_diff_size_through_layer_fs() {
    if !need_root("naive_diff_changes_and_diff_size_through_layer_fs") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let layers = Arc::new(DirLayers::new(tmp.path()));
    let parent = layers.create("parent");
    let child = layers.create("child");
    build_parent(&parent);
    copy_tree(&parent, &child);
    modify(&child);
    let diff = NaiveDiff::new(Arc::clone(&layers), IdMappings::identity());

    let wire = diff.changes("child", "parent").expect("changes");
    let want: Vec<Change> = expected().iter().map(LayerChange::to_wire).collect();
    assert_eq!(wire, want);
    let json = serde_json::to_string(&wire[0]).expect("json");
    assert_eq!(json, r#"{"Path":"/a","Kind":0}"#);

    let size = diff.diff_size("child", "parent").expect("diff size");
    assert_eq!(
        size,
        changes_size(
            &child,
            &changes_dirs(&child, Some(&parent)).expect("changes")
        )
    );

    // Parentless: every path is an Add.
    let all = diff.changes("parent", "").expect("changes");
    assert!(all.iter().all(|c| c.kind == ChangeKind::Add));
    assert!(all.iter().any(|c| c.path == "/untouched_dir/sub/f"));
    assert!(
        layers.outstanding().is_empty(),
        "gets and puts balance: {:?}",
        layers.outstanding()
    );
}
