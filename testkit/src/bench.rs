//! What the benchmarks under `examples/` share: summaries of timed runs
//! and a docker command that returns its error instead of panicking.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::dockerd::Dockerd;

/// Median, min and max of a set of timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub median: Duration,
    pub min: Duration,
    pub max: Duration,
}

impl Stats {
    /// The summary of `v`; `None` when it is empty.
    pub fn of(mut v: Vec<Duration>) -> Option<Stats> {
        v.sort();
        Some(Stats {
            median: *v.get(v.len() / 2)?,
            min: *v.first()?,
            max: *v.last()?,
        })
    }
}

/// Milliseconds, rounded, as a table cell.
pub fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// A docker command that failed: the command, the driver and docker's
/// stderr.
#[derive(Debug)]
pub struct DockerFailed(pub String);

impl std::fmt::Display for DockerFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DockerFailed {}

/// `docker <args>` on `d`; its stdout.
pub fn docker(d: &Dockerd, args: &[&str]) -> Result<String, DockerFailed> {
    let out = d.docker(args);
    if !out.status.success() {
        return Err(DockerFailed(format!(
            "docker {args:?} on {}: {}",
            d.config().storage_driver,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a benchmark on dockerd starts from.
pub struct Start {
    /// The `docker-rbd` binary ([`plugin_binary`]).
    pub plugin: PathBuf,
    /// A scratch directory of the benchmark, removed on drop.
    pub scratch: tempfile::TempDir,
    /// A busybox rootfs tarball in it, for `docker import`.
    pub rootfs: PathBuf,
}

/// Makes missing prerequisites failures rather than skips (as
/// `scripts/test` does), finds the plugin binary and writes a busybox
/// rootfs into a scratch directory named after `name`. Call it first in
/// `main`, before any thread starts (it sets an environment variable).
pub fn start(name: &str) -> Result<Start, String> {
    // SAFETY: the caller calls this before any thread starts; testkit
    // reads the variable to fail instead of skip.
    unsafe { std::env::set_var("DOCKER_RBD_TEST_STRICT", "1") };
    let plugin = plugin_binary()?;
    let scratch = crate::scratch_dir(name)?;
    let rootfs = scratch.path().join("busybox-rootfs.tar");
    crate::images::write_busybox_rootfs_tar(&rootfs)?;
    Ok(Start {
        plugin,
        scratch,
        rootfs,
    })
}

/// The `docker-rbd` binary beside the running benchmark
/// (`target/<profile>/examples/<bench>` → `target/<profile>/docker-rbd`).
pub fn plugin_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let plugin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("docker-rbd"))
        .ok_or("locating the docker-rbd binary next to target/<profile>/examples")?;
    if !plugin.exists() {
        return Err(format!(
            "{} is missing: cargo build --release --bins",
            plugin.display()
        ));
    }
    Ok(plugin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_timings() {
        let d = Duration::from_millis;
        let s = Stats::of(vec![d(30), d(10), d(20), d(50)]).unwrap();
        assert_eq!((s.median, s.min, s.max), (d(30), d(10), d(50)));
        assert_eq!(Stats::of(Vec::new()), None);
        assert_eq!(ms(Duration::from_micros(1_499_600)), "1500");
    }
}
