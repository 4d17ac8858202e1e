//! Checks the hand-written declarations in `src/ffi.rs` against the
//! installed C headers: every function's signature (as a function-pointer
//! assignment that the C compiler must accept without a warning), the
//! layout of every struct and the value of every constant. Needs a C
//! compiler and the librados/librbd headers; skips (or fails under
//! `scripts/test`) without them. No cluster needed.

use std::fmt::Write as _;
use std::mem::{offset_of, size_of};
use std::process::Command;

use ceph_client::ffi;

/// Rust type text (as written in ffi.rs) to C type text.
fn c_type(rust: &str) -> String {
    let t = rust.trim();
    if let Some(inner) = t.strip_prefix("*const ") {
        return format!("{} *", c_const(inner));
    }
    if let Some(inner) = t.strip_prefix("*mut ") {
        return format!("{} *", c_type(inner));
    }
    match t {
        "c_char" => "char",
        "c_uchar" => "unsigned char",
        "c_int" => "int",
        "c_void" => "void",
        "u8" => "uint8_t",
        "u32" => "uint32_t",
        "u64" => "uint64_t",
        "i64" => "int64_t",
        "size_t" => "size_t",
        "ssize_t" => "ssize_t",
        "time_t" => "time_t",
        "bool" => "bool",
        "timeval" => "struct timeval",
        other => other,
    }
    .to_string()
}

/// The C text for a const-qualified pointee.
fn c_const(inner: &str) -> String {
    let inner = inner.trim();
    if inner.starts_with('*') {
        format!("{} const", c_type(inner))
    } else {
        format!("const {}", c_type(inner))
    }
}

/// A C type's name, its Rust size, and its fields' Rust offsets.
type Layout = (&'static str, usize, &'static [(&'static str, usize)]);

struct Decl {
    name: String,
    params: Vec<String>,
    ret: String,
}

/// The `pub fn` items inside the `unsafe extern "C"` blocks of ffi.rs.
fn parse_decls(src: &str) -> Vec<Decl> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(start) = rest.find("unsafe extern \"C\" {") {
        let body_start = start + "unsafe extern \"C\" {".len();
        let end = rest[body_start..].find("\n}").expect("extern block ends") + body_start;
        let body: String = rest[body_start..end]
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" ");
        for item in body.split(';') {
            let item = item.trim();
            let Some(sig) = item.strip_prefix("pub fn ") else {
                assert!(item.is_empty(), "unexpected item in extern block: {item}");
                continue;
            };
            let open = sig.find('(').unwrap();
            let close = sig.rfind(')').unwrap();
            let name = sig[..open].trim().to_string();
            let params = sig[open + 1..close]
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| c_type(p.split_once(':').expect("name: type").1))
                .collect();
            let ret = match sig[close + 1..].trim().strip_prefix("->") {
                Some(r) => c_type(r),
                None => "void".into(),
            };
            out.push(Decl { name, params, ret });
        }
        rest = &rest[end..];
    }
    out
}

/// `pub const NAME: T = VALUE;` lines of ffi.rs that name C constants.
fn parse_consts(src: &str) -> Vec<(String, String)> {
    src.lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let value = rest.split_once('=')?.1.trim().trim_end_matches(';');
            Some((name.trim().to_string(), value.to_string()))
        })
        .collect()
}

#[test]
fn ffi_declarations_match_installed_headers() {
    let headers = ["/usr/include/rados/librados.h", "/usr/include/rbd/librbd.h"];
    let missing = headers
        .iter()
        .find(|h| !std::path::Path::new(h).exists())
        .map(|h| format!("{h} is missing"));
    if !testkit::require::check("ffi_declarations_match_installed_headers", missing) {
        return;
    }
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/ffi.rs")).unwrap();
    let decls = parse_decls(&src);
    assert!(decls.len() > 80, "parsed only {} declarations", decls.len());
    let consts = parse_consts(&src);

    let mut c = String::from(
        "#include <stdbool.h>\n#include <stddef.h>\n#include <stdint.h>\n#include <sys/types.h>\n\
         #include <sys/time.h>\n#include <rados/librados.h>\n#include <rbd/librbd.h>\n\
         typedef int (*rbd_diff_iterate_cb_t)(uint64_t, size_t, int, void *);\n",
    );
    for d in &decls {
        let params = if d.params.is_empty() {
            "void".to_string()
        } else {
            d.params.join(", ")
        };
        writeln!(
            c,
            "{} (*const check_{})({}) = {};",
            d.ret, d.name, params, d.name
        )
        .unwrap();
    }
    for (name, value) in &consts {
        writeln!(c, "_Static_assert(({name}) == ({value}), \"{name}\");").unwrap();
    }
    let layouts: &[Layout] = &[
        (
            "rbd_image_spec_t",
            size_of::<ffi::rbd_image_spec_t>(),
            &[
                ("id", offset_of!(ffi::rbd_image_spec_t, id)),
                ("name", offset_of!(ffi::rbd_image_spec_t, name)),
            ],
        ),
        (
            "rbd_linked_image_spec_t",
            size_of::<ffi::rbd_linked_image_spec_t>(),
            &[
                ("pool_id", offset_of!(ffi::rbd_linked_image_spec_t, pool_id)),
                (
                    "pool_name",
                    offset_of!(ffi::rbd_linked_image_spec_t, pool_name),
                ),
                (
                    "pool_namespace",
                    offset_of!(ffi::rbd_linked_image_spec_t, pool_namespace),
                ),
                (
                    "image_id",
                    offset_of!(ffi::rbd_linked_image_spec_t, image_id),
                ),
                (
                    "image_name",
                    offset_of!(ffi::rbd_linked_image_spec_t, image_name),
                ),
                ("trash", offset_of!(ffi::rbd_linked_image_spec_t, trash)),
            ],
        ),
        (
            "rbd_snap_spec_t",
            size_of::<ffi::rbd_snap_spec_t>(),
            &[
                ("id", offset_of!(ffi::rbd_snap_spec_t, id)),
                (
                    "namespace_type",
                    offset_of!(ffi::rbd_snap_spec_t, namespace_type),
                ),
                ("name", offset_of!(ffi::rbd_snap_spec_t, name)),
            ],
        ),
        (
            "rbd_snap_info_t",
            size_of::<ffi::rbd_snap_info_t>(),
            &[
                ("id", offset_of!(ffi::rbd_snap_info_t, id)),
                ("size", offset_of!(ffi::rbd_snap_info_t, size)),
                ("name", offset_of!(ffi::rbd_snap_info_t, name)),
            ],
        ),
        ("rbd_lock_mode_t", size_of::<ffi::rbd_lock_mode_t>(), &[]),
        (
            "rbd_snap_namespace_type_t",
            size_of::<ffi::rbd_snap_namespace_type_t>(),
            &[],
        ),
        ("struct timeval", size_of::<libc::timeval>(), &[]),
        ("time_t", size_of::<libc::time_t>(), &[]),
    ];
    for (ty, size, fields) in layouts {
        writeln!(
            c,
            "_Static_assert(sizeof({ty}) == {size}, \"size of {ty}\");"
        )
        .unwrap();
        for (field, off) in *fields {
            writeln!(
                c,
                "_Static_assert(offsetof({ty}, {field}) == {off}, \"{ty}.{field}\");"
            )
            .unwrap();
        }
    }
    // The callback typedefs of the headers, spelled as ffi.rs declares them.
    c.push_str(
        "void cb_watch(void *a, uint64_t b, uint64_t c, uint64_t d, void *e, size_t f);\n\
         rados_watchcb2_t check_watchcb = cb_watch;\n\
         void cb_err(void *a, uint64_t b, int c);\n\
         rados_watcherrcb_t check_errcb = cb_err;\n\
         int cb_progress(uint64_t a, uint64_t b, void *c);\n\
         librbd_progress_fn_t check_progress = cb_progress;\n",
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("check.c");
    std::fs::write(&file, &c).unwrap();
    let out = match Command::new(&cc)
        .args([
            "-std=gnu11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wno-unused-variable",
            "-c",
            "-o",
        ])
        .arg(dir.path().join("check.o"))
        .arg(&file)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            testkit::require::check(
                "ffi_declarations_match_installed_headers",
                Some(format!("no C compiler ({cc}): {e}")),
            );
            return;
        }
    };
    assert!(
        out.status.success(),
        "ffi.rs disagrees with the headers:\n{}\n--- generated C ---\n{c}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "checked {} functions, {} constants, {} layouts",
        decls.len(),
        consts.len(),
        layouts.len()
    );
}

#[test]
fn type_mapping() {
    assert_eq!(c_type("*const c_char"), "const char *");
    assert_eq!(c_type("*mut *mut c_char"), "char * *");
    assert_eq!(c_type("*const *const c_char"), "const char * const *");
    assert_eq!(c_type("*mut *const c_char"), "const char * *");
    assert_eq!(c_type("*mut timeval"), "struct timeval *");
}
