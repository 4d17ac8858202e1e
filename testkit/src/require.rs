//! Prerequisite checks for tests: skip when run bare, fail under `scripts/test`.

/// Whether missing prerequisites must fail tests (set by `scripts/test`).
pub fn strict() -> bool {
    std::env::var_os("DOCKER_RBD_TEST_STRICT").is_some_and(|v| v == "1")
}

/// Returns `true` when the test may proceed. When `missing` names a missing
/// prerequisite, prints a skip line and returns `false`, or panics in strict
/// mode so that `scripts/test` never silently skips.
pub fn check(test: &str, missing: Option<String>) -> bool {
    match missing {
        None => true,
        Some(what) if strict() => {
            panic!("{test}: prerequisite missing under scripts/test: {what}")
        }
        Some(what) => {
            eprintln!("SKIP {test}: {what} (run scripts/test for the full suite)");
            false
        }
    }
}

/// `Some(reason)` unless the process runs as root.
pub fn root() -> Option<String> {
    (!nix::unistd::Uid::effective().is_root()).then(|| "needs root".to_string())
}

/// `Some(reason)` unless `path` exists.
pub fn path(path: &str) -> Option<String> {
    (!std::path::Path::new(path).exists()).then(|| format!("{path} is missing"))
}

/// Whether test `test` may mount layers with the fuse mapper (root,
/// `/dev/fuse`, loop devices), as [`check`] decides for each.
pub fn layer_mounts(test: &str) -> bool {
    [root(), path("/dev/fuse"), path("/dev/loop-control")]
        .into_iter()
        .all(|missing| check(test, missing))
}
