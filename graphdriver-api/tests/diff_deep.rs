//! Trees deeper than the walks allow: comparing them, whiting them out and
//! making them opaque fail with an error naming the depth, on a thread with
//! the stack of the runtime's request threads, instead of exhausting the
//! stack (which would abort the whole daemon). A deep tree within the limit
//! still works. Such a tree cannot be named by one path (the kernel stops at
//! 4096 bytes), so it is built one level at a time, as a tar chaining
//! entries through symlinks would build it.

mod diff_support;

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use diff_support::{Ent, error_chain, tar_of};
use graphdriver_api::diff::{
    ApplyError, ChangesError, IdMappings, MAX_TREE_DEPTH, WALK_STACK_SIZE, apply_layer,
    changes_dirs,
};
use graphdriver_api::types::ChangeKind;
use nix::fcntl::{OFlag, open, openat};
use nix::sys::stat::{Mode, mkdirat};

/// The stack of the threads the plugin serves requests on.
const REQUEST_THREAD_STACK: usize = WALK_STACK_SIZE;

/// A temporary directory holding `name`, a tree `levels` deep
/// ([`deep_tree`]); the directory goes when the first value is dropped.
fn deep_tree_in(name: &str, levels: usize) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join(name);
    std::fs::create_dir(&root).unwrap();
    deep_tree(&root, levels);
    (tmp, root)
}

/// Makes `root/d/d/.../d`, `levels` directories, holding a file at the
/// bottom.
fn deep_tree(root: &Path, levels: usize) {
    let name = CString::new("d").unwrap();
    let mut dir: OwnedFd =
        open(root, OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).unwrap();
    for _ in 0..levels {
        mkdirat(
            dir.as_fd(),
            name.as_c_str(),
            Mode::from_bits_truncate(0o755),
        )
        .unwrap();
        dir = openat(
            dir.as_fd(),
            name.as_c_str(),
            OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
    }
    let file = CString::new("bottom").unwrap();
    openat(
        dir.as_fd(),
        file.as_c_str(),
        OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .unwrap();
}

/// Runs `f` on a thread with the request threads' stack.
fn on_request_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(REQUEST_THREAD_STACK)
        .spawn(f)
        .unwrap()
        .join()
        .expect("the walk overflowed or panicked")
}

/// Whether the descriptor limit lets a walk hold one directory per level
/// (two when comparing): raised to the hard limit if it must be.
fn enough_descriptors(levels: usize) -> bool {
    let want = (2 * levels + 256) as libc::rlim_t;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write one rlimit we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur >= want {
            return true;
        }
        if lim.rlim_max < want {
            eprintln!(
                "skipping: RLIMIT_NOFILE hard limit {} < {want}",
                lim.rlim_max
            );
            return false;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0
    }
}

#[test]
fn comparing_a_tree_deeper_than_the_limit_is_an_error() {
    let levels = MAX_TREE_DEPTH + 20;
    if !enough_descriptors(levels) {
        return;
    }
    let (_tmp, layer) = deep_tree_in("layer", levels);
    let result = on_request_stack(move || changes_dirs(&layer, None));
    match result {
        Err(ChangesError::TooDeep { limit, path }) => {
            assert_eq!(limit, MAX_TREE_DEPTH);
            assert!(path.starts_with("/d/d/"), "{path}");
        }
        other => panic!("expected TooDeep, got {other:?}"),
    }
}

#[test]
fn comparing_a_deep_tree_within_the_limit_lists_every_level() {
    let levels = 1000;
    if !enough_descriptors(levels) {
        return;
    }
    let (_tmp, layer) = deep_tree_in("layer", levels);
    let changes = on_request_stack(move || changes_dirs(&layer, None)).unwrap();
    assert_eq!(changes.len(), levels + 1);
    assert!(changes.iter().all(|c| c.kind == ChangeKind::Add));
    assert!(changes.last().unwrap().path.ends_with("d/bottom"));
}

fn apply_on_request_stack(root: &Path, tar: Vec<u8>) -> Result<u64, ApplyError> {
    let root = root.to_path_buf();
    on_request_stack(move || apply_layer(&root, &mut tar.as_slice(), &IdMappings::identity()))
}

#[test]
fn whiting_out_or_replacing_a_tree_deeper_than_the_limit_is_an_error() {
    let levels = MAX_TREE_DEPTH + 20;
    if !enough_descriptors(levels) {
        return;
    }
    let cases: [(&str, Vec<u8>); 3] = [
        ("whiteout", tar_of(&[Ent::file(".wh.d", "")])),
        ("opaque", tar_of(&[Ent::file(".wh..wh..opq", "")])),
        (
            "replaced by a file",
            tar_of(&[Ent::file("d", "now a file")]),
        ),
    ];
    for (case, tar) in cases {
        let (_tmp, root) = deep_tree_in("root", levels);
        let err = apply_on_request_stack(&root, tar).expect_err(case);
        let msg = error_chain(&err);
        assert!(
            matches!(err, ApplyError::TooDeep { limit, .. } if limit == MAX_TREE_DEPTH),
            "{case}: {msg}"
        );
        assert!(
            msg.contains(&format!("more than {MAX_TREE_DEPTH} directories deep")),
            "{case}: {msg}"
        );
        // Nothing above the limit was lost: the top of the tree is there.
        assert!(root.join("d/d/d").is_dir(), "{case}");
    }
}

#[test]
fn whiting_out_a_deep_tree_within_the_limit_removes_it() {
    let levels = 1000;
    if !enough_descriptors(levels) {
        return;
    }
    let (_tmp, root) = deep_tree_in("root", levels);
    apply_on_request_stack(&root, tar_of(&[Ent::file(".wh.d", "")])).unwrap();
    assert!(!root.join("d").exists());
}
