//! Hostile layer tars: whatever a tar holds, `apply_layer` must never create,
//! change or remove anything outside the layer root. Each case is applied to
//! a root nested in a sandbox with canaries beside it; after the apply the
//! sandbox outside the root must be byte-for-byte what it was (names, types,
//! contents, modes, owners, mtimes, xattrs, inodes), and the outcome must be
//! the expected error or the expected confined result.

mod diff_support;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use diff_support::{Ent, Sandbox, TarBuf, error_chain, need_root, snapshot, symlink, tar_of};
use graphdriver_api::diff::{IdMappings, apply_layer};
use proptest::prelude::*;

enum Expect {
    /// Fails with an error whose message (with its sources) contains this.
    Err(&'static str),
    /// Succeeds; then the check runs on the root.
    Ok(fn(&Path)),
}

/// Applies `tar` in a fresh sandbox, checks the outside is untouched and the
/// outcome is as expected. `prepare` may plant lower content in the root.
fn run_case(name: &str, prepare: fn(&Sandbox), tar: Vec<u8>, expect: Expect) {
    let sb = Sandbox::new();
    prepare(&sb);
    let before = sb.outside();
    let result = apply_layer(&sb.root, &mut tar.as_slice(), &IdMappings::identity());
    let after = sb.outside();
    assert_eq!(
        before, after,
        "case {name}: the sandbox outside the root changed"
    );
    match (expect, result) {
        (Expect::Err(want), Err(e)) => {
            let msg = error_chain(&e);
            assert!(
                msg.contains(want),
                "case {name}: error {msg:?} does not mention {want:?}"
            );
        }
        (Expect::Err(want), Ok(size)) => {
            panic!("case {name}: applied ({size} bytes) but should fail with {want:?}")
        }
        (Expect::Ok(check), Ok(_)) => check(&sb.root),
        (Expect::Ok(_), Err(e)) => panic!("case {name}: failed: {}", error_chain(&e)),
    }
    // Whatever happened, the layer stays removable.
    fs::remove_dir_all(&sb.root).unwrap_or_else(|e| panic!("case {name}: root not removable: {e}"));
}

fn nothing(_: &Sandbox) {}

fn plant_escape_symlinks(sb: &Sandbox) {
    symlink("../", &sb.root.join("esc"));
    symlink(sb.path(), &sb.root.join("abs"));
    symlink(sb.path().join("canary.txt"), &sb.root.join("abs_file"));
}

fn plant_links_in_dir(sb: &Sandbox) {
    symlink("../..", &sb.root.join("dir/up"));
    symlink(sb.path(), &sb.root.join("dir/abs"));
    symlink(
        sb.path().join("canary_dir"),
        &sb.root.join("dir/sub/abs_dir"),
    );
    std::os::unix::fs::symlink(
        sb.path().join("canary.txt"),
        sb.root.join("dir/sub/abs_file"),
    )
    .expect("symlink");
}

fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// A case whose tar depends on the sandbox path.
fn run_case_with(
    name: &str,
    prepare: fn(&Sandbox),
    build: impl Fn(&Path) -> Vec<u8>,
    expect: Expect,
) {
    let sb = Sandbox::new();
    prepare(&sb);
    let tar = build(sb.path());
    let before = sb.outside();
    let result = apply_layer(&sb.root, &mut tar.as_slice(), &IdMappings::identity());
    assert_eq!(
        before,
        sb.outside(),
        "case {name}: the sandbox outside the root changed"
    );
    match (expect, result) {
        (Expect::Err(want), Err(e)) => {
            let msg = error_chain(&e);
            assert!(
                msg.contains(want),
                "case {name}: error {msg:?} does not mention {want:?}"
            );
        }
        (Expect::Err(want), Ok(_)) => panic!("case {name}: applied but should fail with {want:?}"),
        (Expect::Ok(check), Ok(_)) => check(&sb.root),
        (Expect::Ok(_), Err(e)) => panic!("case {name}: failed: {}", error_chain(&e)),
    }
    fs::remove_dir_all(&sb.root).unwrap_or_else(|e| panic!("case {name}: root not removable: {e}"));
}

fn abs(sandbox: &Path, rest: &str) -> Vec<u8> {
    let mut v = sandbox.as_os_str().as_bytes().to_vec();
    v.extend_from_slice(rest.as_bytes());
    v
}

#[test]
fn dotdot_names_are_refused() {
    if !need_root("dotdot_names_are_refused") {
        return;
    }
    let cases: &[(&str, &[u8])] = &[
        ("file ../x", b"../x"),
        ("nested a/../../x", b"a/../../x"),
        ("deep a/b/../../../x", b"a/b/../../../x"),
        ("dot then dotdot ./../x", b"./../x"),
        ("dotdot alone", b".."),
        ("dotdot slash", b"../"),
        ("dotdot dir", b"../evil/"),
        ("dotdot canary", b"../canary.txt"),
    ];
    for (name, path) in cases {
        let kind = if path.ends_with(b"/") || *path == b".." {
            b'5'
        } else {
            b'0'
        };
        let mut e = Ent::new(path, kind);
        e.data = if kind == b'0' {
            b"pwned\n".to_vec()
        } else {
            Vec::new()
        };
        run_case(
            name,
            nothing,
            tar_of(&[e]),
            Expect::Err("escapes the layer"),
        );
    }
}

#[test]
fn absolute_names_land_inside_the_root() {
    if !need_root("absolute_names_land_inside_the_root") {
        return;
    }
    run_case(
        "absolute /x",
        nothing,
        tar_of(&[Ent::file("/x", "inside\n")]),
        Expect::Ok(|root| assert_eq!(read(&root.join("x")), b"inside\n")),
    );
    run_case(
        "rooted dotdot /../x",
        nothing,
        tar_of(&[Ent::file("/../x", "inside\n")]),
        Expect::Ok(|root| assert_eq!(read(&root.join("x")), b"inside\n")),
    );
    run_case(
        "absolute /etc/passwd",
        nothing,
        tar_of(&[Ent::file("/etc/passwd", "layer passwd\n")]),
        Expect::Ok(|root| assert_eq!(read(&root.join("etc/passwd")), b"layer passwd\n")),
    );
    run_case_with(
        "absolute sandbox path",
        nothing,
        |sb| tar_of(&[Ent::file(abs(sb, "/canary.txt"), "inside\n")]),
        Expect::Ok(|root| {
            // The whole sandbox path is recreated inside the root.
            let found = snapshot(root)
                .keys()
                .any(|k| k.ends_with(b"/canary.txt") && k.len() > b"canary.txt".len());
            assert!(found, "file not created under the root");
        }),
    );
}

#[test]
fn symlinked_parents_resolve_inside_the_root() {
    if !need_root("symlinked_parents_resolve_inside_the_root") {
        return;
    }
    run_case(
        "a -> /etc then a/passwd",
        nothing,
        tar_of(&[
            Ent::symlink("a", "/etc"),
            Ent::file("a/passwd", "layer passwd\n"),
        ]),
        Expect::Ok(|root| {
            assert_eq!(read(&root.join("etc/passwd")), b"layer passwd\n");
            assert_eq!(
                fs::read_link(root.join("a")).expect("link").as_os_str(),
                "/etc"
            );
        }),
    );
    run_case(
        "a -> ../../.. then a/x",
        nothing,
        tar_of(&[Ent::symlink("a", "../../.."), Ent::file("a/x", "clamped\n")]),
        Expect::Ok(|root| assert_eq!(read(&root.join("x")), b"clamped\n")),
    );
    run_case(
        "a -> ../canary_dir then a/inner.txt",
        nothing,
        tar_of(&[
            Ent::symlink("a", "../canary_dir"),
            Ent::file("a/inner.txt", "pwned\n"),
        ]),
        Expect::Err("dangling"),
    );
    run_case_with(
        "a -> <sandbox>/canary_dir then a/inner.txt",
        nothing,
        |sb| {
            tar_of(&[
                Ent::symlink("a", abs(sb, "/canary_dir")),
                Ent::file("a/inner.txt", "pwned\n"),
            ])
        },
        Expect::Err("dangling"),
    );
    run_case_with(
        "a -> /proc/self/root<sandbox> then a/canary.txt",
        nothing,
        |sb| {
            let mut target = b"/proc/self/root".to_vec();
            target.extend_from_slice(sb.as_os_str().as_bytes());
            tar_of(&[
                Ent::symlink("a", target),
                Ent::file("a/canary.txt", "pwned\n"),
            ])
        },
        Expect::Err("dangling"),
    );
    run_case(
        "a -> b, b -> a, then a/x (loop)",
        nothing,
        tar_of(&[
            Ent::symlink("a", "b"),
            Ent::symlink("b", "a"),
            Ent::file("a/x", "loop\n"),
        ]),
        Expect::Err("symbolic links"),
    );
    run_case(
        "directory replaced by an escaping symlink, then written through",
        nothing,
        tar_of(&[
            Ent::dir("d/"),
            Ent::file("d/f", "f\n"),
            Ent::symlink("d", "../canary_dir"),
            Ent::file("d/inner.txt", "pwned\n"),
        ]),
        Expect::Err("dangling"),
    );
    run_case(
        "lower symlinks pointing out, written through",
        plant_escape_symlinks,
        tar_of(&[Ent::file("esc/canary.txt", "inside\n")]),
        Expect::Ok(|root| assert_eq!(read(&root.join("canary.txt")), b"inside\n")),
    );
    run_case(
        "lower absolute symlink to the sandbox, written through",
        plant_escape_symlinks,
        tar_of(&[Ent::file("abs/canary.txt", "pwned\n")]),
        Expect::Err("dangling"),
    );
}

#[test]
fn final_symlinks_are_replaced_never_followed() {
    if !need_root("final_symlinks_are_replaced_never_followed") {
        return;
    }
    run_case(
        "symlink to canary replaced by a file",
        nothing,
        tar_of(&[
            Ent::symlink("s", "../canary.txt"),
            Ent::file("s", "replaced\n"),
        ]),
        Expect::Ok(|root| {
            let md = fs::symlink_metadata(root.join("s")).expect("lstat");
            assert!(md.is_file());
            assert_eq!(read(&root.join("s")), b"replaced\n");
        }),
    );
    run_case(
        "lower absolute symlink to a canary replaced by a file",
        plant_escape_symlinks,
        tar_of(&[Ent::file("abs_file", "replaced\n").mode(0o4777)]),
        Expect::Ok(|root| {
            assert!(
                fs::symlink_metadata(root.join("abs_file"))
                    .expect("lstat")
                    .is_file()
            )
        }),
    );
    run_case(
        "symlink dir replaced by a directory entry",
        nothing,
        tar_of(&[
            Ent::symlink("d", "../canary_dir"),
            Ent::dir("d/").mode(0o700),
        ]),
        Expect::Ok(|root| {
            assert!(
                fs::symlink_metadata(root.join("d"))
                    .expect("lstat")
                    .is_dir()
            )
        }),
    );
    run_case(
        "device node and fifo named like canaries, never opened",
        nothing,
        tar_of(&[
            Ent::chardev("null", 1, 3),
            Ent::fifo("fifo"),
            Ent::symlink("canary_link", "../canary.txt"),
        ]),
        Expect::Ok(|root| {
            assert!(
                fs::symlink_metadata(root.join("null"))
                    .expect("lstat")
                    .file_type()
                    .is_char_device()
            );
            assert!(
                fs::symlink_metadata(root.join("fifo"))
                    .expect("lstat")
                    .file_type()
                    .is_fifo()
            );
        }),
    );
    run_case(
        "symlink with an outside target is data",
        nothing,
        tar_of(&[Ent::symlink("passwd", "/etc/passwd").owner(7, 7)]),
        Expect::Ok(|root| {
            let md = fs::symlink_metadata(root.join("passwd")).expect("lstat");
            assert!(md.file_type().is_symlink());
            assert_eq!(
                (md.uid(), md.gid()),
                (7, 7),
                "lchown applies to the symlink itself"
            );
        }),
    );
}

#[test]
fn hardlinks_stay_inside() {
    if !need_root("hardlinks_stay_inside") {
        return;
    }
    run_case(
        "hardlink to ../canary.txt",
        nothing,
        tar_of(&[Ent::hardlink("l", "../canary.txt")]),
        Expect::Err("which escapes the layer"),
    );
    run_case(
        "hardlink to a/../../canary.txt",
        nothing,
        tar_of(&[Ent::hardlink("l", "a/../../canary.txt")]),
        Expect::Err("which escapes the layer"),
    );
    run_case_with(
        "hardlink to the absolute canary",
        nothing,
        |sb| tar_of(&[Ent::hardlink("l", abs(sb, "/canary.txt"))]),
        Expect::Err("link target"),
    );
    run_case_with(
        "hardlink through a symlink to the sandbox",
        nothing,
        |sb| {
            tar_of(&[
                Ent::symlink("s", abs(sb, "")),
                Ent::hardlink("l", "s/canary.txt"),
            ])
        },
        Expect::Err("link target"),
    );
    run_case(
        "hardlink through a lower escaping symlink",
        plant_escape_symlinks,
        tar_of(&[Ent::hardlink("l", "esc/lowerfile")]),
        Expect::Ok(|root| {
            let a = fs::metadata(root.join("l")).expect("l");
            let b = fs::metadata(root.join("lowerfile")).expect("lowerfile");
            assert_eq!(a.ino(), b.ino(), "linked to the file inside the root");
        }),
    );
    run_case(
        "hardlink to a symlink pointing out links the symlink",
        nothing,
        tar_of(&[Ent::symlink("s", "/etc/passwd"), Ent::hardlink("l", "s")]),
        Expect::Ok(|root| {
            let md = fs::symlink_metadata(root.join("l")).expect("lstat");
            assert!(md.file_type().is_symlink());
            assert_eq!(md.nlink(), 2);
        }),
    );
    run_case(
        "hardlink to the root",
        nothing,
        tar_of(&[Ent::hardlink("l", "/")]),
        Expect::Err("layer root"),
    );
    run_case(
        "hardlink to a directory",
        nothing,
        tar_of(&[Ent::hardlink("l", "dir")]),
        Expect::Err("linking"),
    );
    run_case(
        "hardlink to itself",
        nothing,
        tar_of(&[Ent::file("f", "f\n"), Ent::hardlink("f", "f")]),
        Expect::Err("linking"),
    );
    run_case(
        "hardlink to a missing AUFS target",
        nothing,
        tar_of(&[Ent::hardlink("l", ".wh..wh.plnk/123.456")]),
        Expect::Err("AUFS"),
    );
}

#[test]
fn whiteouts_stay_inside() {
    if !need_root("whiteouts_stay_inside") {
        return;
    }
    run_case(
        "whiteout ../.wh.canary.txt",
        nothing,
        tar_of(&[Ent::file("../.wh.canary.txt", "")]),
        Expect::Err("escapes the layer"),
    );
    run_case(
        "whiteout .wh.. (dot)",
        nothing,
        tar_of(&[Ent::file(".wh..", "")]),
        Expect::Err("whiteout"),
    );
    run_case(
        "whiteout .wh... (dotdot)",
        nothing,
        tar_of(&[Ent::file(".wh...", "")]),
        Expect::Err("whiteout"),
    );
    run_case(
        "whiteout with an empty name",
        nothing,
        tar_of(&[Ent::file("dir/.wh.", "")]),
        Expect::Err("whiteout"),
    );
    run_case(
        "whiteout through a symlink to the parent of the root",
        nothing,
        tar_of(&[Ent::symlink("s", "../"), Ent::file("s/.wh.canary.txt", "")]),
        Expect::Ok(|_| {}),
    );
    run_case_with(
        "whiteout through an absolute symlink to the sandbox",
        nothing,
        |sb| {
            tar_of(&[
                Ent::symlink("s", abs(sb, "")),
                Ent::file("s/.wh.canary_dir", ""),
            ])
        },
        Expect::Ok(|_| {}),
    );
    run_case(
        "whiteout through a lower escaping symlink removes inside",
        plant_escape_symlinks,
        tar_of(&[Ent::file("esc/.wh.lowerfile", "")]),
        Expect::Ok(|root| assert!(!root.join("lowerfile").exists())),
    );
    run_case(
        "whiteout of a lower symlink to the sandbox removes only the link",
        plant_escape_symlinks,
        tar_of(&[Ent::file(".wh.abs", ""), Ent::file(".wh.esc", "")]),
        Expect::Ok(|root| {
            assert!(fs::symlink_metadata(root.join("abs")).is_err());
            assert!(fs::symlink_metadata(root.join("esc")).is_err());
        }),
    );
    run_case(
        "opaque directory holding symlinks to the sandbox",
        plant_links_in_dir,
        tar_of(&[Ent::file("dir/.wh..wh..opq", "")]),
        Expect::Ok(|root| {
            let left: Vec<_> = fs::read_dir(root.join("dir")).expect("dir").collect();
            assert!(left.is_empty(), "opaque dir emptied: {left:?}");
        }),
    );
    run_case(
        "whiteout of a directory holding symlinks to the sandbox",
        plant_links_in_dir,
        tar_of(&[Ent::file(".wh.dir", "")]),
        Expect::Ok(|root| assert!(!root.join("dir").exists())),
    );
    run_case(
        "opaque through a symlink to the parent of the root",
        nothing,
        tar_of(&[Ent::symlink("s", "../.."), Ent::file("s/.wh..wh..opq", "")]),
        Expect::Ok(|root| {
            assert!(!root.join("lowerfile").exists(), "root emptied");
            assert!(
                fs::symlink_metadata(root.join("s")).is_ok(),
                "added entry kept"
            );
        }),
    );
    run_case_with(
        "opaque through an absolute symlink to the sandbox",
        nothing,
        |sb| {
            tar_of(&[
                Ent::symlink("s", abs(sb, "")),
                Ent::file("s/.wh..wh..opq", ""),
            ])
        },
        Expect::Err("dangling"),
    );
}

#[test]
fn malformed_names_and_headers_are_refused() {
    if !need_root("malformed_names_and_headers_are_refused") {
        return;
    }
    // The pax path wins over the harmless header name.
    run_case(
        "pax path ../../x",
        nothing,
        tar_of(&[Ent::file("harmless", "pwned\n").pax(b"path", b"../../x")]),
        Expect::Err("escapes the layer"),
    );
    run_case(
        "pax linkpath escaping",
        nothing,
        tar_of(&[Ent::hardlink("l", "lowerfile").pax(b"linkpath", b"../canary.txt")]),
        Expect::Err("which escapes the layer"),
    );
    run_case(
        "NUL in a pax path",
        nothing,
        tar_of(&[Ent::file("harmless", "x").pax(b"path", b"a\0../../x")]),
        Expect::Err("NUL"),
    );
    // GNU long name (type L) naming an escape.
    run_case(
        "GNU long name ../x",
        nothing,
        {
            let mut t = TarBuf::new();
            let mut name = b"../".to_vec();
            name.extend(std::iter::repeat_n(b'y', 150));
            t.raw(b"././@LongLink", b'L', name.len() as u64, &name);
            t.add(&Ent::file("short", "pwned\n"));
            t.finish()
        },
        Expect::Err("escapes the layer"),
    );
    run_case(
        "regular file naming the root",
        nothing,
        tar_of(&[Ent::file(".", "x")]),
        Expect::Err("layer root"),
    );
    run_case(
        "unsupported type flag",
        nothing,
        tar_of(&[Ent::new("weird", b'Z')]),
        Expect::Err("unsupported type"),
    );
    run_case(
        "bad checksum",
        nothing,
        {
            let mut t = tar_of(&[Ent::file("f", "x")]);
            t[0] ^= 1;
            t
        },
        Expect::Err("checksum"),
    );
    run_case(
        "pax record with a lying length",
        nothing,
        {
            let mut t = TarBuf::new();
            t.raw(b"././@PaxHeader", b'x', 20, b"99 path=../../x\n\0\0\0\0");
            t.add(&Ent::file("f", "x"));
            t.finish()
        },
        Expect::Err("pax"),
    );
    run_case(
        "truncated inside the data",
        nothing,
        {
            let t = tar_of(&[Ent::file("big", vec![7u8; 5000])]);
            t[..512 + 1000].to_vec()
        },
        Expect::Err("truncated"),
    );
    run_case(
        "truncated inside a header",
        nothing,
        {
            let t = tar_of(&[Ent::file("a", "a"), Ent::file("b", "b")]);
            t[..1024 + 100].to_vec()
        },
        Expect::Err("truncated"),
    );
    run_case(
        "huge size field on a directory is ignored like Go does",
        nothing,
        {
            let mut d = Ent::dir("d/");
            d.size_field = Some(1 << 40);
            tar_of(&[d, Ent::file("d/f", "f\n")])
        },
        Expect::Ok(|root| assert_eq!(read(&root.join("d/f")), b"f\n")),
    );
    run_case(
        "unmappable owner",
        nothing,
        tar_of(&[Ent::file("f", "x").owner(1 << 40, 0)]),
        Expect::Err("does not fit in 32 bits"),
    );
}

#[test]
fn replacements_inside_the_root() {
    if !need_root("replacements_inside_the_root") {
        return;
    }
    run_case(
        "two entries for one path: the last wins",
        nothing,
        tar_of(&[Ent::file("f", "first\n"), Ent::file("f", "second\n")]),
        Expect::Ok(|root| assert_eq!(read(&root.join("f")), b"second\n")),
    );
    run_case(
        "a file replaces a lower directory tree",
        nothing,
        tar_of(&[Ent::file("dir", "now a file\n")]),
        Expect::Ok(|root| assert_eq!(read(&root.join("dir")), b"now a file\n")),
    );
    run_case(
        "a directory replaces a lower file",
        nothing,
        tar_of(&[Ent::dir("lowerfile/"), Ent::file("lowerfile/inner", "i\n")]),
        Expect::Ok(|root| assert_eq!(read(&root.join("lowerfile/inner")), b"i\n")),
    );
    run_case(
        "a file under a file",
        nothing,
        tar_of(&[Ent::file("lowerfile/x", "x\n")]),
        Expect::Err("not a directory"),
    );
    run_case(
        "deep implied parents",
        nothing,
        tar_of(&[Ent::file("a/b/c/d/e", "deep\n")]),
        Expect::Ok(|root| {
            assert_eq!(read(&root.join("a/b/c/d/e")), b"deep\n");
            let md = fs::metadata(root.join("a/b")).expect("implied dir");
            assert_eq!(md.mode() & 0o7777, 0o755);
            assert_eq!((md.uid(), md.gid()), (0, 0));
        }),
    );
}

// ------------------------------------------------------------------ proptest

/// A small alphabet that keeps hitting the dangerous corners.
fn component() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"a".to_vec()),
        Just(b"b".to_vec()),
        Just(b"..".to_vec()),
        Just(b".".to_vec()),
        Just(b"".to_vec()),
        Just(b"dir".to_vec()),
        Just(b"lowerfile".to_vec()),
        Just(b"esc".to_vec()),
        Just(b"canary.txt".to_vec()),
        Just(b".wh.a".to_vec()),
        Just(b".wh.canary.txt".to_vec()),
        Just(b".wh..wh..opq".to_vec()),
        Just(b".wh..wh.plnk".to_vec()),
    ]
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    (any::<bool>(), prop::collection::vec(component(), 1..5)).prop_map(|(absolute, comps)| {
        let mut out = if absolute { b"/".to_vec() } else { Vec::new() };
        out.extend(comps.join(&b'/'));
        out
    })
}

fn target() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"..".to_vec()),
        Just(b"../..".to_vec()),
        Just(b"/".to_vec()),
        Just(b"/etc".to_vec()),
        Just(b"a".to_vec()),
        Just(b"../canary.txt".to_vec()),
        Just(b"../canary_dir".to_vec()),
        Just(b"@SANDBOX@".to_vec()),
        Just(b"@SANDBOX@/canary.txt".to_vec()),
        Just(b"/proc/self/root@SANDBOX@".to_vec()),
        name(),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    File(Vec<u8>, u32),
    Dir(Vec<u8>, u32),
    Symlink(Vec<u8>, Vec<u8>),
    Hardlink(Vec<u8>, Vec<u8>),
    Char(Vec<u8>),
    Fifo(Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (name(), 0u32..0o10000).prop_map(|(n, m)| Op::File(n, m)),
        (name(), 0u32..0o10000).prop_map(|(n, m)| Op::Dir(n, m)),
        (name(), target()).prop_map(|(n, t)| Op::Symlink(n, t)),
        (name(), target()).prop_map(|(n, t)| Op::Hardlink(n, t)),
        name().prop_map(Op::Char),
        name().prop_map(Op::Fifo),
    ]
}

fn substitute(bytes: &[u8], sandbox: &Path) -> Vec<u8> {
    let marker = b"@SANDBOX@";
    match bytes.windows(marker.len()).position(|w| w == marker) {
        Some(i) => {
            let mut out = bytes[..i].to_vec();
            out.extend_from_slice(sandbox.as_os_str().as_bytes());
            out.extend_from_slice(&bytes[i + marker.len()..]);
            out
        }
        None => bytes.to_vec(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_entry_sequences_never_touch_the_outside(ops in prop::collection::vec(op(), 1..10)) {
        if !need_root("random_entry_sequences_never_touch_the_outside") {
            return Ok(());
        }
        let sb = Sandbox::new();
        plant_escape_symlinks(&sb);
        let mut entries = Vec::new();
        for op in &ops {
            entries.push(match op {
                Op::File(n, m) => Ent::file(n, "data\n").mode(*m),
                Op::Dir(n, m) => Ent::dir(n).mode(*m),
                Op::Symlink(n, t) => Ent::symlink(n, substitute(t, sb.path())),
                Op::Hardlink(n, t) => Ent::hardlink(n, substitute(t, sb.path())),
                Op::Char(n) => Ent::chardev(n, 1, 3),
                Op::Fifo(n) => Ent::fifo(n),
            });
        }
        let tar = tar_of(&entries);
        let before = sb.outside();
        let _ = apply_layer(&sb.root, &mut tar.as_slice(), &IdMappings::identity());
        prop_assert_eq!(before, sb.outside());
        // The root stays removable whatever the apply did (a mode-0 dir
        // does not stop root).
        prop_assert!(fs::remove_dir_all(&sb.root).is_ok());
    }
}

#[test]
fn the_sandbox_snapshot_sees_every_kind_of_change() {
    if !need_root("the_sandbox_snapshot_sees_every_kind_of_change") {
        return;
    }
    type Change = (&'static str, fn(&Sandbox));
    let changes: &[Change] = &[
        ("content", |sb| {
            fs::write(sb.path().join("canary.txt"), b"canary: never change mE\n").expect("write")
        }),
        ("mode", |sb| {
            diff_support::chmod(&sb.path().join("canary.txt"), 0o644)
        }),
        ("owner", |sb| {
            diff_support::lchown(&sb.path().join("x"), 1, 1)
        }),
        ("mtime", |sb| {
            diff_support::set_mtime(&sb.path().join("x"), 1_500_000_001)
        }),
        ("xattr", |sb| {
            xattr::set(sb.path().join("x"), "user.t", b"1").expect("xattr")
        }),
        ("new file", |sb| {
            diff_support::write(&sb.path().join("new"), b"")
        }),
        ("removed file", |sb| {
            fs::remove_file(sb.path().join("canary_dir/inner.txt")).expect("rm")
        }),
        ("replaced file, same content", |sb| {
            let p = sb.path().join("x");
            let md = fs::metadata(&p).expect("stat");
            fs::remove_file(&p).expect("rm");
            fs::write(&p, b"x outside\n").expect("write");
            diff_support::set_mtime(&p, md.mtime());
        }),
    ];
    for (what, change) in changes {
        let sb = Sandbox::new();
        let before = sb.outside();
        change(&sb);
        assert_ne!(
            before,
            sb.outside(),
            "a {what} change outside the root went unnoticed"
        );
    }
}

/// A valid tar exercising pax records, links and devices, to mutate.
fn mutation_base() -> Vec<u8> {
    tar_of(&[
        Ent::dir("d/"),
        Ent::file("d/f", "data data data\n").xattr("user.k", b"v\n"),
        Ent::symlink("d/s", "../../escape"),
        Ent::hardlink("d/h", "d/f"),
        Ent::chardev("d/c", 1, 3),
        Ent::file(format!("long/{}", "n".repeat(150)), "long\n"),
        Ent::file("d/.wh.f", ""),
        Ent::file("d/.wh..wh..opq", ""),
    ])
}

/// Offsets of the header blocks of a well-formed tar.
fn header_offsets(tar: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 512 <= tar.len() && tar[at..at + 512].iter().any(|b| *b != 0) {
        out.push(at);
        let size_field = std::str::from_utf8(&tar[at + 124..at + 136]).expect("size field");
        let size = usize::from_str_radix(size_field.trim_matches(|c| c == '\0' || c == ' '), 8)
            .expect("size");
        at += 512 + size.div_ceil(512) * 512;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn corrupted_tars_never_panic_or_touch_the_outside(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
        fix_checksums in any::<bool>(),
    ) {
        if !need_root("corrupted_tars_never_panic_or_touch_the_outside") {
            return Ok(());
        }
        let mut tar = mutation_base();
        let headers = header_offsets(&tar);
        for (at, byte) in &flips {
            let i = at.index(tar.len());
            tar[i] = *byte;
        }
        if fix_checksums {
            // Let the mutation through the checksum so it reaches the parser.
            for h in headers {
                let block = &mut tar[h..h + 512];
                block[148..156].fill(b' ');
                let sum: u32 = block.iter().map(|b| u32::from(*b)).sum();
                block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
            }
        }
        if truncate {
            tar.truncate(cut.index(tar.len()));
        }
        let sb = Sandbox::new();
        plant_escape_symlinks(&sb);
        let before = sb.outside();
        let _ = apply_layer(&sb.root, &mut tar.as_slice(), &IdMappings::identity());
        prop_assert_eq!(before, sb.outside());
        prop_assert!(fs::remove_dir_all(&sb.root).is_ok());
    }
}
