//! Acceptance tests of the RBD driver under a real dockerd 20.10:
//! `docker-rbd serve` (fuse mapper, 1 GiB base image, a fresh RADOS
//! namespace per test) as the graphdriver plugin of a private
//! `dockerd --experimental -s <plugin>`, driven through the docker CLI, with
//! the results checked inside containers, in tarballs docker writes, and in
//! the cluster itself.
//!
//! Needs root, /dev/fuse, /dev/loop-control, dockerd and the test cluster
//! (`scripts/ceph-dev`); skipped when run bare without them, failed under
//! `scripts/test` (`DOCKER_RBD_TEST_STRICT=1`).
//!
//! Each test starts one plugin and one dockerd and runs a group of checks
//! on them, because a dockerd start-up takes seconds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ceph_client::rbd::{self, Image};
use ceph_client::{IoCtx, Rados};
use docker_rbd::crashpoint::{self, CrashPoint};
use docker_rbd::mapper::fuse::loopdev;
use docker_rbd::names::Naming;
use metadata::{LayerKind, LayerRecord, LayerState};
use testkit::ceph::CephEnv;
use testkit::daemon::Daemon;
use testkit::dockerd::{Dockerd, DockerdConfig};
use testkit::driver::serving_fuse_servers_under;
use testkit::images::{self, Layer};

const PLUGIN_BIN: &str = env!("CARGO_BIN_EXE_docker-rbd");

/// One test's world: a plugin daemon, a dockerd using it, a RADOS namespace,
/// and scratch space. Dropping it (also on panic) stops dockerd and the
/// plugin, then removes everything the driver left on this machine and in
/// the cluster.
struct Fixture {
    test: String,
    ceph: CephEnv,
    namespace: String,
    plugin_name: String,
    extra_flags: Vec<String>,
    /// The crash point the plugin dies at (`DOCKER_RBD_CRASH_AT`), until
    /// its first restart.
    crash_at: Option<CrashPoint>,
    /// `--run-dir` of the plugin (its saved Init), kept across restarts.
    run_dir: tempfile::TempDir,
    /// Tarballs and files for `docker cp`.
    scratch: tempfile::TempDir,
    plugin: Option<Daemon>,
    dockerd: Option<Dockerd>,
    naming: Naming,
    ioctx: Arc<IoCtx>,
    rados: Rados,
    started: Instant,
}

impl Fixture {
    /// Starts the plugin and dockerd for `test`, or `None` when a
    /// prerequisite is missing outside strict mode. `flags` are more
    /// `docker-rbd serve` flags.
    fn start(test: &str, flags: &[&str], command_timeout: Duration) -> Option<Fixture> {
        Self::start_armed(test, flags, command_timeout, None)
    }

    /// [`Fixture::start`] with a plugin that dies at `crash_at`.
    fn start_armed(
        test: &str,
        flags: &[&str],
        command_timeout: Duration,
        crash_at: Option<CrashPoint>,
    ) -> Option<Fixture> {
        let ceph = testkit::ceph::require(test)?;
        if !testkit::require::layer_mounts(test) {
            return None;
        }
        if !testkit::dockerd::require(test) {
            return None;
        }
        let namespace = testkit::ceph::unique_namespace(test);
        let rados = Rados::connect(&ceph.connect_config()).expect("connect to the test cluster");
        let ioctx = Arc::new(
            rados
                .ioctx(&ceph.pool, Some(&namespace))
                .expect("ioctx of the test namespace"),
        );
        let mut fx = Fixture {
            test: test.to_string(),
            plugin_name: testkit::unique_name("rbde2e"),
            extra_flags: flags.iter().map(|s| s.to_string()).collect(),
            crash_at,
            run_dir: testkit::scratch_dir("rbd-e2e-run").expect("run dir"),
            scratch: testkit::scratch_dir("rbd-e2e-files").expect("scratch dir"),
            plugin: None,
            dockerd: None,
            naming: Naming::new(Naming::DEFAULT_PREFIX).unwrap(),
            ceph,
            namespace,
            ioctx,
            rados,
            started: Instant::now(),
        };
        fx.start_plugin();
        let mut cfg = DockerdConfig::new(&fx.plugin_name);
        cfg.name = "rbd-e2e".to_string();
        cfg.command_timeout = command_timeout;
        match Dockerd::start(cfg) {
            Ok(d) => fx.dockerd = Some(d),
            Err(e) => panic!(
                "{test}: dockerd did not start on the plugin: {e}\n{}",
                fx.plugin_log_tail(60)
            ),
        }
        fx.phase("plugin and dockerd up");
        Some(fx)
    }

    fn phase(&self, what: &str) {
        eprintln!(
            "[{} +{:.1}s] {what}",
            self.test,
            self.started.elapsed().as_secs_f64()
        );
    }

    fn plugin_command(&self) -> Command {
        let mut cmd = Command::new(PLUGIN_BIN);
        cmd.arg("serve")
            .arg("-c")
            .arg(&self.ceph.conf)
            .args(["--id", &self.ceph.id])
            .arg("-k")
            .arg(&self.ceph.keyring)
            .args(["-p", &self.ceph.pool])
            .args(["--namespace", &self.namespace])
            .args(["--mapper", "fuse", "--basesize", "1G"])
            .args(["--name", &self.plugin_name])
            .arg("--run-dir")
            .arg(self.run_dir.path())
            .args(&self.extra_flags);
        cmd.env("DOCKER_RBD_LOG", "info").env("NO_COLOR", "1");
        match self.crash_at {
            Some(point) => cmd.env(crashpoint::ENV, point.name()),
            None => cmd.env_remove(crashpoint::ENV),
        };
        cmd
    }

    /// Starts `docker-rbd serve` (again, after a crash: same arguments,
    /// same run directory).
    fn start_plugin(&mut self) {
        assert!(self.plugin.is_none(), "the plugin runs already");
        let socket = testkit::dockerd::plugin_socket_path(&self.plugin_name);
        let mut daemon = Daemon::start(
            &self.plugin_name,
            self.plugin_command(),
            &socket,
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{}: docker-rbd serve did not start: {e}", self.test));
        daemon.set_stop_timeout(Duration::from_secs(30));
        self.plugin = Some(daemon);
    }

    /// SIGKILLs the plugin, as a crash would.
    fn kill_plugin(&mut self) {
        let mut daemon = self.plugin.take().expect("the plugin runs");
        let log = daemon.log();
        daemon.kill().expect("SIGKILL docker-rbd serve");
        eprintln!(
            "[{}] plugin log before the kill (last lines):\n{}",
            self.test,
            tail(&log, 15)
        );
    }

    fn plugin_log_tail(&self, lines: usize) -> String {
        match &self.plugin {
            Some(p) if p.is_running() => {
                format!("--- plugin log ---\n{}", tail(&p.log(), lines))
            }
            Some(p) => format!(
                "--- the plugin has EXITED; its log ---\n{}",
                tail(&p.log(), lines)
            ),
            None => "--- plugin not running ---".to_string(),
        }
    }

    /// Whether the plugin runs, and how it ended if it does not: the first
    /// thing to know about a failed request.
    fn plugin_state(&self) -> String {
        match &self.plugin {
            Some(p) if p.is_running() => "running".to_string(),
            Some(p) => match p.exit_status() {
                Some(status) => format!("EXITED: {status}"),
                None => "EXITED".to_string(),
            },
            None => "stopped by the test".to_string(),
        }
    }

    fn d(&self) -> &Dockerd {
        self.dockerd.as_ref().expect("dockerd runs")
    }

    /// `docker <args>`, which must succeed; its stdout. On failure the
    /// message holds the plugin's log too.
    fn ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.d().docker(&args);
        if !out.status.success() {
            // The plugin's state and last lines first: CI summaries show
            // the first lines of a panic.
            panic!(
                "{}: docker {:?} failed: {} (plugin {})\nstderr: {}\n{}\nstdout: {}\n--- dockerd log ---\n{}\n{}",
                self.test,
                args,
                out.status,
                self.plugin_state(),
                String::from_utf8_lossy(&out.stderr).trim(),
                self.plugin_log_tail(12),
                String::from_utf8_lossy(&out.stdout),
                self.d().log_tail(40),
                self.plugin_log_tail(60)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `docker <args>`, which must fail; its stderr.
    fn fails<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.d().docker(&args);
        assert!(
            !out.status.success(),
            "{}: docker {:?} succeeded but must fail; stdout: {}",
            self.test,
            args,
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `docker run --rm --network none <image> sh -c <script>`; its stdout.
    fn run_sh(&self, image: &str, script: &str) -> String {
        self.d().run_sh(image, script)
    }

    /// `docker export` of container `name`, as a tarball.
    fn export(&self, name: &str) -> Vec<u8> {
        self.d().export(name, self.scratch.path())
    }

    fn driver_home(&self) -> PathBuf {
        self.d().driver_home()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    /// Imports the busybox rootfs as `tag`.
    fn import_busybox(&self, tag: &str) {
        let rootfs = self.path("busybox-rootfs.tar");
        if !rootfs.exists() {
            images::write_busybox_rootfs_tar(&rootfs).unwrap();
        }
        self.ok(["import".as_ref(), rootfs.as_os_str(), tag.as_ref()]);
    }

    /// `docker info`'s DriverStatus as a map.
    fn driver_status(&self) -> BTreeMap<String, String> {
        let json = self.ok(["info", "--format", "{{json .DriverStatus}}"]);
        let pairs: Vec<(String, String)> = serde_json::from_str(json.trim())
            .unwrap_or_else(|e| panic!("DriverStatus {json:?}: {e}"));
        pairs.into_iter().collect()
    }

    /// `docker inspect`'s GraphDriver of a container or image.
    fn graph_driver(&self, what: &str) -> (String, BTreeMap<String, String>) {
        let json = self.ok(["inspect", "-f", "{{json .GraphDriver}}", what]);
        #[derive(serde::Deserialize)]
        struct GraphDriver {
            #[serde(rename = "Name")]
            name: String,
            #[serde(rename = "Data")]
            data: Option<BTreeMap<String, String>>,
        }
        let g: GraphDriver =
            serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{json:?}: {e}"));
        (g.name, g.data.unwrap_or_default())
    }

    /// RBD images in the test's namespace.
    fn rbd_images(&self) -> BTreeSet<String> {
        rbd::list(&self.ioctx)
            .expect("list RBD images")
            .into_iter()
            .map(|i| i.name)
            .collect()
    }

    /// The layer records of the metadata store.
    fn layer_records(&self) -> BTreeMap<String, LayerRecord> {
        let store = metadata::Store::new(self.ioctx.clone(), self.naming.metadata_prefix());
        store
            .layers()
            .list()
            .expect("list layer records")
            .into_iter()
            .map(|(k, v)| (k, v.expect("readable layer record").value))
            .collect()
    }

    /// The layer records once the plugin's background purges are done:
    /// none is `Removing`, or `Retired` (a parent kept only for a child
    /// being purged). Gives up after a minute and returns what is there.
    /// Shared init layers, which live as long as their parent, are left
    /// out, after checking that each one's parent is there.
    fn purged_layer_records(&self) -> BTreeMap<String, LayerRecord> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let records = self.layer_records();
            let pending = records
                .values()
                .any(|r| matches!(r.state, LayerState::Removing | LayerState::Retired));
            if !pending || std::time::Instant::now() > deadline {
                for (id, r) in &records {
                    if r.kind == LayerKind::SharedInit {
                        let parent = r.parent.as_deref().unwrap_or_default();
                        assert!(
                            records.contains_key(parent),
                            "shared init layer {id} outlived its parent {parent}: {records:?}"
                        );
                    }
                }
                return records
                    .into_iter()
                    .filter(|(_, r)| r.kind != LayerKind::SharedInit)
                    .collect();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Number of ancestors of RBD image `name` (parents of parents ...).
    fn ancestors(&self, name: &str) -> usize {
        let mut n = 0;
        let mut current = name.to_string();
        loop {
            let img = Image::open_read_only(&self.ioctx, &current, None)
                .unwrap_or_else(|e| panic!("open {current}: {e}"));
            match img.parent().expect("parent of an image") {
                Some(p) => {
                    assert_eq!(
                        p.pool_namespace, self.namespace,
                        "{current}'s parent is in another namespace"
                    );
                    n += 1;
                    current = p.image_name;
                }
                None => return n,
            }
        }
    }

    /// After `docker rm` and `docker rmi` of everything: the namespace holds
    /// the base image and nothing else, no layer is recorded, and nothing of
    /// the driver is left mounted, attached or running on this machine.
    fn assert_everything_removed(&self) {
        assert_eq!(self.ok(["ps", "-aq"]), "", "containers left");
        assert_eq!(self.ok(["images", "-aq"]), "", "images left");
        self.purged_layer_records();
        let images = self.rbd_images();
        let (base, other): (Vec<&String>, Vec<&String>) =
            images.iter().partition(|i| self.naming.is_base_image(i));
        assert!(
            other.is_empty(),
            "RBD images left besides the base: {other:?}"
        );
        assert_eq!(base.len(), 1, "base images: {base:?}");
        let records = self.layer_records();
        assert!(
            records.is_empty(),
            "layer records left in the layers omap: {:?}",
            records.keys().collect::<Vec<_>>()
        );
        let status = self.driver_status();
        assert_eq!(
            status.get("Layers").map(String::as_str),
            Some("0"),
            "{status:?}"
        );
        assert_eq!(
            status.get("Mounted Layers").map(String::as_str),
            Some("0"),
            "{status:?}"
        );
        let home = self.driver_home();
        // The Home itself stays a private mount of its own.
        assert_eq!(
            docker_rbd::fs::is_private_mount(&home),
            Some(true),
            "the Home is a private mount"
        );
        let mounts: Vec<_> = testkit::mounts::mounts_under(None, &home)
            .unwrap()
            .into_iter()
            .filter(|m| Some(m) != home.canonicalize().ok().as_ref())
            .collect();
        assert!(
            mounts.is_empty(),
            "mounts left under the driver home: {mounts:?}"
        );
        let loops = loopdev::backed_under(&home);
        assert!(loops.is_empty(), "loop devices left: {loops:?}");
        // The plugin runs: its standby server may wait for an image.
        let servers = serving_fuse_servers_under(&home);
        assert!(servers.is_empty(), "FUSE servers left: {servers:?}");
    }
}

/// The Dockerfile of [`Fixture::build`], on the imported `rbd-busybox:1`.
const DOCKERFILE: &str = "FROM rbd-busybox:1
RUN echo a > /a && mkdir /d && echo b > /d/b
RUN rm /bin/ls && rm -r /d && echo c >> /a
COPY f /f
CMD [\"cat\", \"/a\", \"/f\"]
";
/// What the built image's CMD prints.
const BUILD_OUTPUT: &str = "a\nc\ncopied\n";
/// Checks the RUN step that removed files.
const BUILD_CHECK: &str = "[ -e /bin/ls ] || echo no-ls; [ -e /d ] || echo no-d; cat /a /f";
const BUILD_CHECK_EXPECTED: &str = "no-ls\nno-d\na\nc\ncopied\n";

impl Fixture {
    /// `docker build --network none -t tag` of [`DOCKERFILE`], with BuildKit
    /// or the classic builder; its output (stdout and stderr).
    fn build(&self, tag: &str, buildkit: bool) -> String {
        let ctx = self.path(&format!(
            "build-{}",
            if buildkit { "bk" } else { "classic" }
        ));
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(ctx.join("f"), b"copied\n").unwrap();
        std::fs::write(ctx.join("Dockerfile"), DOCKERFILE).unwrap();
        let mut cmd = self.d().docker_command();
        cmd.env("DOCKER_BUILDKIT", if buildkit { "1" } else { "0" })
            .args(["build", "--network", "none", "-t", tag])
            .arg(&ctx);
        let out = testkit::process::run_with_timeout(cmd, None, Duration::from_secs(300))
            .unwrap_or_else(|e| panic!("docker build: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{}: docker build (BuildKit: {buildkit}) failed: {}\n{text}\n{}",
            self.test,
            out.status,
            self.plugin_log_tail(40)
        );
        text
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("[{}] failed; {}", self.test, self.plugin_log_tail(80));
            // The whole log, for a failure the tail does not explain.
            if let (Ok(dir), Some(p)) = (std::env::var("DOCKER_RBD_TEST_LOG_DIR"), &self.plugin) {
                let to = std::path::Path::new(&dir).join(format!("{}.plugin.log", self.test));
                if std::fs::write(&to, p.log()).is_ok() {
                    eprintln!("[{}] plugin log saved to {}", self.test, to.display());
                }
            }
            if let Some(d) = &self.dockerd {
                eprintln!("--- dockerd log ---\n{}", d.log_tail(60));
            }
        }
        let home = self.dockerd.as_ref().map(Dockerd::driver_home);
        // dockerd first, gracefully, while the plugin still serves: it stops
        // its containers and Puts their layers. Its guard unmounts lazily
        // whatever is left under its directory, which would leave loop
        // devices on unreachable FUSE files; so signal it here and clean up
        // the driver's leftovers before the guard runs.
        if let Some(pid) = self.dockerd.as_ref().and_then(Dockerd::pid)
            && let Err(e) = testkit::process::terminate(pid, Duration::from_secs(60))
        {
            eprintln!("[{}] cleanup: dockerd: {e}", self.test);
        }
        if let Some(mut p) = self.plugin.take()
            && let Err(e) = p.stop()
        {
            eprintln!("[{}] cleanup: plugin: {e}", self.test);
        }
        let left = home
            .as_ref()
            .map(|home| testkit::driver::cleanup_home(&self.test, home, None));
        drop(self.dockerd.take());
        // What a container of a dead dockerd still held: the guard ended the
        // container processes, so the loop devices detach on their last
        // close, and then their FUSE servers exit.
        if let Some(left) = left {
            let _ = left.finish();
        }
        self.remove_namespace();
    }
}

impl Fixture {
    /// Removes every RBD image, every object and the RBD namespace.
    fn remove_namespace(&self) {
        match self.rados.ioctx(&self.ceph.pool, None) {
            Ok(pool) => {
                testkit::driver::remove_namespace(&self.test, &self.ioctx, &pool, &self.namespace)
            }
            Err(e) => eprintln!("[{}] cleanup: pool: {e}", self.test),
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn lines_sorted(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text.lines().map(str::to_string).collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// Tarballs: a small reader for what docker writes (export, save) and a raw
// writer for layers the tar crate refuses to write (`..` in names).

/// One entry of a tarball.
#[derive(Debug, Clone)]
struct TarEntry {
    path: String,
    kind: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    link: String,
    data: Vec<u8>,
}

fn octal(field: &[u8]) -> u64 {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // base-256
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            v = (v << 8) | u64::from(*b);
        }
        return v;
    }
    let text: String = field
        .iter()
        .take_while(|b| **b != 0)
        .map(|b| *b as char)
        .collect();
    u64::from_str_radix(text.trim(), 8).unwrap_or(0)
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Reads a tarball (ustar, GNU long names, PAX path/linkpath/size).
fn read_tar(bytes: &[u8]) -> Vec<TarEntry> {
    let mut out = Vec::new();
    let mut off = 0usize;
    let mut long_name: Option<String> = None;
    let mut long_link: Option<String> = None;
    let mut pax: BTreeMap<String, String> = BTreeMap::new();
    while off + 512 <= bytes.len() {
        let h = &bytes[off..off + 512];
        if h.iter().all(|b| *b == 0) {
            break;
        }
        let mut size = octal(&h[124..136]) as usize;
        if let Some(s) = pax.get("size") {
            size = s.parse().expect("PAX size");
        }
        let kind = h[156];
        let data_start = off + 512;
        let data = bytes[data_start..data_start + size].to_vec();
        off = data_start + size.div_ceil(512) * 512;
        match kind {
            b'L' => {
                long_name = Some(cstr(&data));
                continue;
            }
            b'K' => {
                long_link = Some(cstr(&data));
                continue;
            }
            b'x' => {
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let sp = rest.iter().position(|b| *b == b' ').expect("PAX record");
                    let len: usize = std::str::from_utf8(&rest[..sp]).unwrap().parse().unwrap();
                    let rec = &rest[sp + 1..len - 1];
                    let eq = rec.iter().position(|b| *b == b'=').expect("PAX key");
                    pax.insert(
                        String::from_utf8_lossy(&rec[..eq]).into_owned(),
                        String::from_utf8_lossy(&rec[eq + 1..]).into_owned(),
                    );
                    rest = &rest[len..];
                }
                continue;
            }
            b'g' => continue,
            _ => {}
        }
        let mut path = cstr(&h[0..100]);
        if &h[257..262] == b"ustar" {
            let prefix = cstr(&h[345..500]);
            if !prefix.is_empty() && &h[257..263] == b"ustar\0" {
                path = format!("{prefix}/{path}");
            }
        }
        if let Some(p) = long_name.take() {
            path = p;
        }
        if let Some(p) = pax.remove("path") {
            path = p;
        }
        let mut link = cstr(&h[157..257]);
        if let Some(l) = long_link.take() {
            link = l;
        }
        if let Some(l) = pax.remove("linkpath") {
            link = l;
        }
        out.push(TarEntry {
            path: path
                .trim_start_matches("./")
                .trim_end_matches('/')
                .to_string(),
            kind,
            mode: (octal(&h[100..108]) & 0o7777) as u32,
            uid: octal(&h[108..116]),
            gid: octal(&h[116..124]),
            link,
            data,
        });
        pax.clear();
    }
    out
}

fn tar_map(bytes: &[u8]) -> BTreeMap<String, TarEntry> {
    read_tar(bytes)
        .into_iter()
        .map(|e| (e.path.clone(), e))
        .collect()
}

/// A tar entry written byte by byte, whatever its name.
fn raw_header(name: &[u8], kind: u8, mode: u32, size: usize, link: &[u8]) -> [u8; 512] {
    assert!(name.len() < 100 && link.len() < 100);
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    h[100..108].copy_from_slice(format!("{mode:07o}\0").as_bytes());
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(format!("{:011o}\0", images::DEFAULT_MTIME).as_bytes());
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// Appends an entry named `name` (GNU long name when needed).
fn raw_entry(out: &mut Vec<u8>, name: &str, kind: u8, mode: u32, data: &[u8], link: &str) {
    let pad = |out: &mut Vec<u8>| {
        let rem = out.len() % 512;
        if rem != 0 {
            out.resize(out.len() + 512 - rem, 0);
        }
    };
    let short: &[u8] = if name.len() >= 100 {
        let mut long = name.as_bytes().to_vec();
        long.push(0);
        out.extend_from_slice(&raw_header(b"././@LongLink", b'L', 0o644, long.len(), b""));
        out.extend_from_slice(&long);
        pad(out);
        &name.as_bytes()[..99]
    } else {
        name.as_bytes()
    };
    out.extend_from_slice(&raw_header(short, kind, mode, data.len(), link.as_bytes()));
    out.extend_from_slice(data);
    pad(out);
}

fn raw_finish(mut out: Vec<u8>) -> Vec<u8> {
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// A `docker save`-format tarball of raw layer tars (manifest, config with
/// the diff ids; no v1 metadata, which `docker load` does not need).
fn save_tar(repo_tag: &str, layers: &[Vec<u8>]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", testkit::sha256::hex_digest(l)))
        .collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_name = format!("{}.json", testkit::sha256::hex_digest(&config));
    let mut out = Vec::new();
    let mut paths = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let dir = format!("l{i}");
        raw_entry(&mut out, &format!("{dir}/"), b'5', 0o755, &[], "");
        raw_entry(&mut out, &format!("{dir}/layer.tar"), b'0', 0o644, l, "");
        paths.push(format!("{dir}/layer.tar"));
    }
    raw_entry(&mut out, &config_name, b'0', 0o644, &config, "");
    let manifest =
        serde_json::json!([{"Config": config_name, "RepoTags": [repo_tag], "Layers": paths}]);
    raw_entry(
        &mut out,
        "manifest.json",
        b'0',
        0o644,
        &serde_json::to_vec(&manifest).unwrap(),
        "",
    );
    raw_finish(out)
}

/// The first size figure of `docker ps -s` ("300kB (virtual 2.1MB)").
fn ps_size(fx: &Fixture, name: &str) -> String {
    fx.ok([
        "ps",
        "-a",
        "-s",
        "--filter",
        &format!("name=^{name}$"),
        "--format",
        "{{.Size}}",
    ])
    .trim()
    .to_string()
}

/// A deterministic, incompressible-looking file body.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------

/// Images in and out of the driver: import, docker build (classic and
/// BuildKit), load of a layered image with every special entry, run, diff,
/// ps -s, export, cp both ways, commit, save and load round trip, docker
/// info and inspect; and nothing left in the cluster after rm and rmi.
#[test]
fn images_containers_and_diffs_through_dockerd() {
    let test = "images_containers_and_diffs_through_dockerd";
    let Some(fx) = Fixture::start(test, &[], Duration::from_secs(300)) else {
        return;
    };
    assert_eq!(
        fx.ok(["info", "--format", "{{.Driver}}"]).trim(),
        fx.plugin_name
    );

    // docker import: one layer, cloned from the base image.
    let busybox = "rbd-busybox:1";
    fx.import_busybox(busybox);
    fx.phase("imported busybox");
    let status = fx.driver_status();
    for (key, want) in [
        ("Pool", fx.ceph.pool.as_str()),
        ("Namespace", fx.namespace.as_str()),
        ("Mapper", "fuse"),
        ("Layers", "1"),
        ("Base Size", "1 GiB"),
        ("Filesystem", "ext4"),
    ] {
        assert_eq!(
            status.get(key).map(String::as_str),
            Some(want),
            "docker info status {key}: {status:?}"
        );
    }
    let records = fx.layer_records();
    assert_eq!(records.len(), 1, "{records:?}");
    let (import_id, import_rec) = records.iter().next().unwrap();
    assert_eq!(import_rec.parent, None);
    assert!(fx.rbd_images().contains(&import_rec.image));
    let (name, data) = fx.graph_driver(busybox);
    assert_eq!(name, fx.plugin_name);
    assert_eq!(
        data.get("Image"),
        Some(&format!(
            "{}/{}/{}",
            fx.ceph.pool, fx.namespace, import_rec.image
        )),
        "image GraphDriver.Data {data:?} (layer {import_id})"
    );
    assert_eq!(
        fx.run_sh(busybox, "echo hi; ls /bin/sh; cat /etc/group"),
        "hi\n/bin/sh\nroot:x:0:\nnogroup:x:65534:\n"
    );
    // The root is the layer's rootfs directory: 0755 root, no lost+found of
    // the filesystem underneath.
    assert_eq!(
        fx.run_sh(busybox, "stat -c '%a %u:%g' /; ls -a /"),
        "755 0:0\n.\n..\n.dockerenv\nbin\ndev\netc\nproc\nroot\nsys\ntmp\n"
    );
    fx.phase("ran busybox");

    // docker build (the classic builder): a container per RUN step,
    // committed into a new layer; COPY applies a diff.
    let built = format!("{}:1", testkit::unique_name("built"));
    let out = fx.build(&built, false);
    assert!(out.contains("Successfully built"), "{out}");
    assert_eq!(
        fx.ok(["run", "--rm", "--network", "none", &built]),
        BUILD_OUTPUT
    );
    assert_eq!(fx.run_sh(&built, BUILD_CHECK), BUILD_CHECK_EXPECTED);
    assert_eq!(
        fx.ok(["image", "inspect", "-f", "{{len .RootFS.Layers}}", &built])
            .trim(),
        "4"
    );
    fx.ok(["rmi", &built]);
    assert_eq!(
        fx.purged_layer_records().len(),
        1,
        "layers left by the build: {:?}",
        fx.layer_records()
    );
    fx.phase("docker build");

    // DOCKER_BUILDKIT=1 docker build: BuildKit in dockerd makes its build
    // snapshots through the driver with ids of its own (Create with its
    // 25-character base-36 keys), keeps them as the cache ids of the layers
    // it registers, and mounts them writable while it works.
    let bk = format!("{}:1", testkit::unique_name("bk"));
    let out = fx.build(&bk, true);
    assert!(out.contains("naming to docker.io/library/"), "{out}");
    assert_eq!(
        fx.ok(["run", "--rm", "--network", "none", &bk]),
        BUILD_OUTPUT
    );
    assert_eq!(fx.run_sh(&bk, BUILD_CHECK), BUILD_CHECK_EXPECTED);
    // Built again: every step from BuildKit's cache.
    let again = fx.build(&format!("{bk}-again"), true);
    assert!(again.contains("CACHED"), "{again}");
    fx.ok(["rmi", &bk, &format!("{bk}-again")]);
    fx.ok(["builder", "prune", "-af"]);
    assert_eq!(
        fx.purged_layer_records().len(),
        1,
        "layers left by BuildKit after rmi and builder prune: {:?}",
        fx.layer_records()
    );
    fx.phase("BuildKit build");

    // docker load: three layers with whiteouts, an opaque directory,
    // hardlinks, a device node, setuid, a security.capability xattr.
    let special = format!("{}:1", testkit::unique_name("special"));
    // Id, diff ids and every special entry, checked by load_special.
    fx.d().load_special(&special, fx.scratch.path());
    assert_eq!(
        fx.purged_layer_records().len(),
        4,
        "busybox + three special layers"
    );
    fx.phase("loaded and checked the special image");

    // A fresh container: export holds every special entry, diff is empty.
    fx.ok(["create", "--network", "none", "--name", "fresh", &special]);
    let export = fx.export("fresh");
    images::check_special_export(&export).unwrap();
    assert_eq!(fx.ok(["diff", "fresh"]), "");
    let (_, data) = fx.graph_driver("fresh");
    let rw_image = data
        .get("Image")
        .and_then(|i| i.rsplit('/').next())
        .unwrap_or_else(|| panic!("GraphDriver.Data of fresh: {data:?}"))
        .to_string();
    assert!(
        fx.rbd_images().contains(&rw_image),
        "{rw_image} is not in the namespace"
    );
    let rw_id = rw_image.rsplit('.').next().unwrap();
    let recs = fx.layer_records();
    let init = &recs[&format!("{rw_id}-init")];
    assert_eq!(
        recs[rw_id].parent.as_deref(),
        Some(&*format!("{rw_id}-init"))
    );
    assert_eq!(init.kind, metadata::LayerKind::Init);
    assert_eq!(recs[rw_id].kind, metadata::LayerKind::ReadWrite);
    // Its init layer is served by the image's shared init layer, which the
    // container's own layer is a clone of.
    let shared = init
        .shared_init()
        .unwrap_or_else(|| panic!("init layer of fresh is not shared: {init:?}"));
    assert_eq!(recs[shared].kind, metadata::LayerKind::SharedInit);
    assert_eq!(init.image, recs[shared].image);
    let rw_parent = Image::open_read_only(&fx.ioctx, &rw_image, None)
        .unwrap()
        .parent()
        .unwrap()
        .expect("the container layer is a clone");
    assert_eq!(rw_parent.image_name, recs[shared].image);
    fx.phase("exported a fresh container");

    // docker diff: the exact changes of a script.
    fx.ok([
        "run",
        "--network",
        "none",
        "--name",
        "changed",
        &special,
        "sh",
        "-c",
        "echo changed > /data/keep && rm /data/added && rm -r /data/opq && chmod 700 /data/owned \
         && mkdir /newdir && echo a > /newdir/f && head -c 300000 /dev/zero > /newdir/big",
    ]);
    let diff = fx.ok(["diff", "changed"]);
    assert_eq!(
        lines_sorted(&diff),
        vec![
            "A /newdir",
            "A /newdir/big",
            "A /newdir/f",
            "C /data",
            "C /data/keep",
            "C /data/owned",
            "D /data/added",
            "D /data/opq"
        ],
        "docker diff printed:\n{diff}"
    );
    // DiffSize: the bytes of the added and changed files (8 + 6 + 2 + 300000).
    assert_eq!(
        fx.ok(["inspect", "-s", "-f", "{{.SizeRw}}", "changed"])
            .trim(),
        "300016"
    );
    let size = ps_size(&fx, "changed");
    assert!(
        size.starts_with("300kB (virtual "),
        "docker ps -s size {size:?}"
    );
    fx.phase("diff and size");

    // Two running containers over the image share its init layer; each
    // one's diff is its own, and removing one leaves the other running.
    let shared = shared.to_string();
    let shared_init_of = |name: &str| {
        let (_, data) = fx.graph_driver(name);
        let rw = data["Image"].rsplit('.').next().unwrap().to_string();
        let recs = fx.layer_records();
        let init = &recs[&format!("{rw}-init")];
        init.shared_init()
            .unwrap_or_else(|| panic!("init layer of {name} is not shared: {init:?}"))
            .to_string()
    };
    for name in ["s1", "s2"] {
        fx.ok([
            "run",
            "-d",
            "--network",
            "none",
            "--name",
            name,
            &special,
            "sleep",
            "600",
        ]);
        assert_eq!(shared_init_of(name), shared, "{name}");
    }
    assert_eq!(shared_init_of("changed"), shared, "changed");
    fx.ok(["exec", "s1", "sh", "-c", "echo one > /one"]);
    assert_eq!(fx.ok(["diff", "s1"]), "A /one\n");
    assert_eq!(fx.ok(["diff", "s2"]), "");
    fx.ok(["rm", "-f", "s1"]);
    assert_eq!(
        fx.ok(["inspect", "-f", "{{.State.Running}}", "s2"]).trim(),
        "true"
    );
    fx.ok(["exec", "s2", "sh", "-c", "echo two > /two && cat /two"]);
    assert_eq!(fx.ok(["diff", "s2"]), "A /two\n");
    assert_eq!(shared_init_of("s2"), shared);
    fx.ok(["rm", "-f", "s2"]);
    assert!(
        fx.layer_records().contains_key(&shared),
        "a shared init layer lives as long as its image layer"
    );
    fx.phase("two containers sharing an init layer");

    // docker export: what the script wrote.
    let export = fx.export("changed");
    let files = tar_map(&export);
    assert_eq!(files["data/keep"].data, b"changed\n");
    assert_eq!(files["newdir/f"].data, b"a\n");
    assert_eq!(files["newdir/big"].data, vec![0u8; 300_000]);
    assert_eq!(files["x"].data, b"layer3\n");
    let owned = &files["data/owned"];
    assert_eq!((owned.mode, owned.uid, owned.gid), (0o700, 1000, 1000));
    assert_eq!(
        files["data/hard2"].kind, b'1',
        "hardlink kept: {:?}",
        files["data/hard2"]
    );
    assert_eq!(files["data/link"].link, "keep");
    for gone in ["data/added", "data/opq", "data/opq/new", "data/gone"] {
        assert!(!files.contains_key(gone), "{gone} in the export");
    }

    // docker cp both ways, on the stopped container.
    let into = pattern(100_000, 7);
    std::fs::write(fx.path("fromhost"), &into).unwrap();
    fx.ok([
        "cp".as_ref(),
        fx.path("fromhost").as_os_str(),
        "changed:/newdir/fromhost".as_ref(),
    ]);
    let out_dir = fx.path("cp-out");
    std::fs::create_dir(&out_dir).unwrap();
    fx.ok([
        "cp".as_ref(),
        "changed:/data/keep".as_ref(),
        out_dir.as_os_str(),
    ]);
    fx.ok([
        "cp".as_ref(),
        "changed:/newdir".as_ref(),
        out_dir.as_os_str(),
    ]);
    assert_eq!(std::fs::read(out_dir.join("keep")).unwrap(), b"changed\n");
    assert_eq!(std::fs::read(out_dir.join("newdir/f")).unwrap(), b"a\n");
    assert_eq!(
        std::fs::read(out_dir.join("newdir/fromhost")).unwrap(),
        into
    );
    assert_eq!(
        std::fs::read(out_dir.join("newdir/big")).unwrap(),
        vec![0u8; 300_000]
    );
    assert!(lines_sorted(&fx.ok(["diff", "changed"])).contains(&"A /newdir/fromhost".to_string()));
    fx.phase("export and cp");

    // docker commit: the container layer becomes an image layer.
    let committed = format!("{}:1", testkit::unique_name("committed"));
    fx.ok(["commit", "changed", &committed]);
    assert_eq!(
        fx.ok([
            "image",
            "inspect",
            "-f",
            "{{len .RootFS.Layers}}",
            &committed
        ])
        .trim(),
        "4"
    );
    let committed_check = "cat /data/keep /newdir/f; ls /data; stat -c '%a %u:%g' /data/owned; \
                           cat /x; sha256sum /newdir/fromhost | cut -d' ' -f1; \
                           wc -c < /newdir/big";
    let committed_expected = format!(
        "changed\na\ncap\nfifo\nhard1\nhard2\nkeep\nlink\nnull\nowned\nsetuid\n700 1000:1000\n\
         layer3\n{}\n300000\n",
        testkit::sha256::hex_digest(&into)
    );
    assert_eq!(fx.run_sh(&committed, committed_check), committed_expected);
    let save = fx.path("committed.tar");
    fx.ok([
        "save".as_ref(),
        "-o".as_ref(),
        save.as_os_str(),
        committed.as_ref(),
        special.as_ref(),
    ]);
    let save_bytes = std::fs::read(&save).unwrap();
    let manifest_files = tar_map(&save_bytes);
    let manifest: serde_json::Value =
        serde_json::from_slice(&manifest_files["manifest.json"].data).unwrap();
    let committed_manifest = manifest
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["RepoTags"][0] == committed.as_str())
        .expect("committed image in the save manifest");
    let top = committed_manifest["Layers"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_str()
        .unwrap();
    let mut top_names: Vec<String> = read_tar(&manifest_files[top].data)
        .into_iter()
        .map(|e| e.path)
        .collect();
    top_names.sort();
    assert_eq!(
        top_names,
        vec![
            "data",
            "data/.wh.added",
            "data/.wh.opq",
            "data/keep",
            "data/owned",
            "newdir",
            "newdir/big",
            "newdir/f",
            "newdir/fromhost"
        ],
        "top layer of the committed image"
    );
    fx.phase("commit and save");

    // docker rmi then docker load of the saved images: same ids, same data.
    let committed_id = fx.ok(["image", "inspect", "-f", "{{.Id}}", &committed]);
    fx.ok(["rm", "fresh", "changed"]);
    fx.ok(["rmi", &committed, &special]);
    let left = fx.purged_layer_records();
    assert_eq!(
        left.keys().collect::<Vec<_>>(),
        vec![import_id],
        "only the imported layer is left after rmi"
    );
    // The imported layer's image, and those of the shared init layers over
    // it (which live as long as it does), and nothing else.
    let images_now = fx.rbd_images();
    let recorded: BTreeSet<String> = fx
        .layer_records()
        .into_values()
        .filter(|r| r.owns_image())
        .map(|r| r.image)
        .collect();
    assert!(recorded.contains(&import_rec.image));
    assert_eq!(
        images_now
            .iter()
            .filter(|i| !fx.naming.is_base_image(i))
            .cloned()
            .collect::<BTreeSet<_>>(),
        recorded,
        "RBD images after rmi: {images_now:?}"
    );
    let loaded = fx.ok(["load".as_ref(), "-i".as_ref(), save.as_os_str()]);
    assert!(
        loaded.contains(&committed) && loaded.contains(&special),
        "{loaded}"
    );
    assert_eq!(
        fx.ok(["image", "inspect", "-f", "{{.Id}}", &committed]),
        committed_id
    );
    assert_eq!(fx.run_sh(&committed, committed_check), committed_expected);
    assert_eq!(
        fx.run_sh(&special, images::SPECIAL_CHECK_SCRIPT),
        images::SPECIAL_CHECK_EXPECTED
    );
    fx.phase("save, rmi, load round trip");

    // docker rmi of everything: only the base image is left.
    fx.ok(["rmi", &committed, &special, busybox]);
    fx.assert_everything_removed();
    fx.phase("everything removed");
}

/// Containers keep their data across run and start; exec and cp work on a
/// running container; inspect shows the device; a SIGKILLed plugin,
/// restarted with the same arguments, adopts the running container's
/// mount, and stop, start and rm work afterwards.
#[test]
fn containers_persist_and_survive_a_plugin_crash() {
    let test = "containers_persist_and_survive_a_plugin_crash";
    let Some(mut fx) = Fixture::start(test, &[], Duration::from_secs(300)) else {
        return;
    };
    let busybox = "rbd-busybox:1";
    fx.import_busybox(busybox);

    // docker run writes, exits; docker start runs it again on the same data.
    let script = "echo run >> /log; cat /log";
    assert_eq!(
        fx.ok([
            "run",
            "--network",
            "none",
            "--name",
            "persist",
            busybox,
            "sh",
            "-c",
            script
        ]),
        "run\n"
    );
    assert_eq!(fx.ok(["start", "-a", "persist"]), "run\nrun\n");
    assert_eq!(fx.ok(["start", "-a", "persist"]), "run\nrun\nrun\n");
    fx.ok(["rm", "persist"]);
    fx.phase("run and start");

    // Three containers at once on a freshly loaded image: their init layers
    // race to seal the same parent, which must end with one snapshot.
    let fan = format!("{}:1", testkit::unique_name("fan"));
    let fan_tar = fx.path("fan.tar");
    images::Image::new(
        &fan,
        vec![
            Layer::busybox().unwrap(),
            Layer::new().file("fan", "out\n", 0o644),
        ],
    )
    .write_save_tar(&fan_tar)
    .unwrap();
    fx.ok(["load".as_ref(), "-i".as_ref(), fan_tar.as_os_str()]);
    let (_, fan_data) = fx.graph_driver(&fan);
    let fan_image = fan_data["Image"].rsplit('/').next().unwrap().to_string();
    let d = fx.d();
    let outputs: Vec<std::process::Output> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..3)
            .map(|i| {
                let fan = &fan;
                s.spawn(move || {
                    d.docker([
                        "run",
                        "--rm",
                        "--network",
                        "none",
                        fan.as_str(),
                        "sh",
                        "-c",
                        &format!("cat /fan; echo {i} > /mine; cat /mine"),
                    ])
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (i, out) in outputs.iter().enumerate() {
        assert!(
            out.status.success(),
            "concurrent run {i} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            fx.plugin_log_tail(40)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("out\n{i}\n"));
    }
    let snaps = Image::open_read_only(&fx.ioctx, &fan_image, None)
        .unwrap()
        .snap_list()
        .unwrap();
    assert_eq!(
        snaps.len(),
        1,
        "{fan_image} has snapshots {:?}",
        snaps.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    assert_eq!(
        fx.purged_layer_records().len(),
        2,
        "the busybox layer (shared by the import and the fan image, same diff id) \
         and the fan layer after the --rm runs: {:?}",
        fx.layer_records()
    );
    fx.ok(["rmi", &fan]);
    fx.phase("three concurrent runs on an unsealed parent");

    // A running container: exec, cp both ways, inspect.
    fx.ok([
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "runner",
        busybox,
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo $i >> /grow; sleep 0.1; done",
    ]);
    let count = |fx: &Fixture| -> u64 {
        let out = fx.ok(["exec", "runner", "sh", "-c", "wc -l < /grow"]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("wc -l: {out:?}"))
    };
    let grows_past = |fx: &Fixture, n: u64| -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let c = count(fx);
            if c > n {
                return c;
            }
            assert!(Instant::now() < deadline, "/grow stuck at {c} lines");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    grows_past(&fx, 2);
    assert_eq!(
        fx.ok([
            "exec",
            "runner",
            "sh",
            "-c",
            "echo from-exec > /exec.txt; cat /exec.txt"
        ]),
        "from-exec\n"
    );
    let body = pattern(3 << 20, 11);
    std::fs::write(fx.path("copied.bin"), &body).unwrap();
    fx.ok([
        "cp".as_ref(),
        fx.path("copied.bin").as_os_str(),
        "runner:/copied.bin".as_ref(),
    ]);
    assert_eq!(
        fx.ok([
            "exec",
            "runner",
            "sh",
            "-c",
            "sha256sum /copied.bin | cut -d' ' -f1"
        ])
        .trim(),
        testkit::sha256::hex_digest(&body)
    );
    fx.ok([
        "cp".as_ref(),
        "runner:/exec.txt".as_ref(),
        fx.path("exec.out").as_os_str(),
    ]);
    assert_eq!(std::fs::read(fx.path("exec.out")).unwrap(), b"from-exec\n");

    let (name, data) = fx.graph_driver("runner");
    assert_eq!(name, fx.plugin_name);
    let image = data
        .get("Image")
        .unwrap_or_else(|| panic!("no Image in {data:?}"))
        .clone();
    let image_name = image.rsplit('/').next().unwrap().to_string();
    assert_eq!(
        image,
        format!("{}/{}/{image_name}", fx.ceph.pool, fx.namespace)
    );
    assert!(fx.rbd_images().contains(&image_name));
    let device = data
        .get("Device")
        .unwrap_or_else(|| panic!("no Device in {data:?} of a running container"))
        .clone();
    let loop_number: u32 = device
        .strip_prefix("/dev/loop")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("Device {device:?} is not a loop device"));
    let home = fx.driver_home();
    let backing = loopdev::backing_file(loop_number).expect("the loop device is attached");
    assert!(
        backing.starts_with(home.join("fuse")),
        "{device} is backed by {}",
        backing.display()
    );
    let layer_id = image_name.rsplit('.').next().unwrap().to_string();
    let mountpoint = testkit::driver::mount_dir(&home).join(&layer_id);
    assert_eq!(
        data.get("MountPoint"),
        Some(&mountpoint.display().to_string())
    );
    assert!(docker_rbd::fs::is_mounted(&mountpoint));
    let status = fx.driver_status();
    assert_eq!(
        status.get("Mounted Layers").map(String::as_str),
        Some("1"),
        "{status:?}"
    );
    // The container's layer has one FUSE server (the image's layer may
    // have another, idle since the container was made).
    let run_dir = fx.driver_home().join("fuse");
    let servers_of_layer = || testkit::driver::fuse_servers_of_image(&run_dir, &image_name);
    let servers_before = servers_of_layer();
    assert_eq!(servers_before.len(), 1, "FUSE servers: {servers_before:?}");
    fx.phase("exec, cp and inspect on a running container");

    // commit, export and diff of the running container (Get while it is
    // mounted: reference counted).
    let snapshot = format!("{}:1", testkit::unique_name("running"));
    let at_commit = count(&fx);
    fx.ok(["commit", "runner", &snapshot]);
    let out = fx.run_sh(&snapshot, "cat /exec.txt; wc -l < /grow; ls /copied.bin");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], "from-exec");
    assert!(
        lines[1].parse::<u64>().unwrap() >= at_commit,
        "the commit has {} lines of /grow, the container had {at_commit} before",
        lines[1]
    );
    assert_eq!(lines[2], "/copied.bin");
    fx.ok(["rmi", &snapshot]);
    let export = fx.export("runner");
    let files = tar_map(&export);
    assert_eq!(files["exec.txt"].data, b"from-exec\n");
    assert_eq!(files["copied.bin"].data, body);
    assert_eq!(
        lines_sorted(&fx.ok(["diff", "runner"])),
        vec!["A /copied.bin", "A /exec.txt", "A /grow"]
    );
    assert!(docker_rbd::fs::is_mounted(&mountpoint), "still mounted");
    let status = fx.driver_status();
    assert_eq!(
        status.get("Mounted Layers").map(String::as_str),
        Some("1"),
        "{status:?}"
    );
    fx.phase("commit, export and diff of the running container");

    // The plugin crashes under the running container. dockerd cannot
    // inspect or exec meanwhile (it asks the plugin for GetMetadata), so
    // watch the container's file through the layer's mount.
    let rootfs = mountpoint.join("rootfs");
    let host_count = || -> u64 {
        std::fs::read_to_string(rootfs.join("grow"))
            .map(|t| t.lines().count() as u64)
            .unwrap_or_else(|e| panic!("read the container's /grow from the host: {e}"))
    };
    let before = count(&fx);
    assert!(host_count() >= before);
    fx.kill_plugin();
    let deadline = Instant::now() + Duration::from_secs(30);
    let during = loop {
        let c = host_count();
        if c > before + 5 {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "/grow stuck at {c} lines after the plugin died"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        std::fs::read(rootfs.join("exec.txt")).unwrap(),
        b"from-exec\n"
    );
    fx.phase(&format!(
        "plugin killed; /grow went from {before} to {during} lines"
    ));
    fx.start_plugin();
    let after = grows_past(&fx, during + 5);
    let log = fx.plugin.as_ref().unwrap().log();
    assert!(
        log.contains("resuming the Init of the previous run"),
        "the restarted plugin did not resume:\n{}",
        tail(&log, 30)
    );
    let status = fx.driver_status();
    assert_eq!(
        status.get("Mounted Layers").map(String::as_str),
        Some("1"),
        "{status:?}"
    );
    assert_eq!(
        status.get("Layers").map(String::as_str),
        Some("3"),
        "{status:?}"
    );
    assert_eq!(
        servers_of_layer(),
        servers_before,
        "the restarted plugin adopted the FUSE server"
    );
    assert_eq!(loopdev::backing_file(loop_number), Some(backing.clone()));
    fx.phase(&format!("plugin restarted; /grow at {after} lines"));

    // Get and Put pairs on the adopted mount (cp, diff) leave it mounted
    // under the running container.
    std::fs::write(fx.path("after-restart"), b"after restart\n").unwrap();
    fx.ok([
        "cp".as_ref(),
        fx.path("after-restart").as_os_str(),
        "runner:/after-restart".as_ref(),
    ]);
    assert_eq!(
        lines_sorted(&fx.ok(["diff", "runner"])),
        vec![
            "A /after-restart",
            "A /copied.bin",
            "A /exec.txt",
            "A /grow"
        ]
    );
    assert!(
        docker_rbd::fs::is_mounted(&mountpoint),
        "a Put after the restart unmounted the running container's layer"
    );
    let after = grows_past(&fx, after + 3);
    assert_eq!(
        fx.ok(["exec", "runner", "cat", "/after-restart"]),
        "after restart\n"
    );

    // stop (Put through the restarted plugin), start, rm.
    fx.ok(["stop", "-t", "1", "runner"]);
    assert!(
        !docker_rbd::fs::is_mounted(&mountpoint),
        "unmounted on stop"
    );
    // Detached (another test may have attached the same number since).
    let reattached = loopdev::backing_file(loop_number);
    assert!(
        reattached.as_ref().is_none_or(|b| !b.starts_with(&home)),
        "loop{loop_number} still backed by {reattached:?} after stop"
    );
    assert!(servers_of_layer().is_empty(), "FUSE server left after stop");
    let stopped_at = {
        fx.ok(["start", "runner"]);
        count(&fx)
    };
    assert!(stopped_at >= after, "lost lines: {stopped_at} < {after}");
    grows_past(&fx, stopped_at + 3);
    assert_eq!(fx.ok(["exec", "runner", "cat", "/exec.txt"]), "from-exec\n");
    assert_eq!(
        fx.ok([
            "exec",
            "runner",
            "sh",
            "-c",
            "sha256sum /copied.bin | cut -d' ' -f1"
        ])
        .trim(),
        testkit::sha256::hex_digest(&body)
    );
    fx.ok(["stop", "-t", "1", "runner"]);
    fx.ok(["rm", "runner"]);
    fx.phase("stop, start and rm after the crash");

    // dockerd restarts on the running plugin (Init again, same settings);
    // a stopped container keeps its data.
    fx.ok([
        "run",
        "--network",
        "none",
        "--name",
        "keeper",
        busybox,
        "sh",
        "-c",
        "echo kept >> /kept; cat /kept",
    ]);
    fx.dockerd
        .as_mut()
        .unwrap()
        .restart()
        .unwrap_or_else(|e| panic!("dockerd restart: {e}\n{}", fx.plugin_log_tail(40)));
    assert_eq!(fx.ok(["start", "-a", "keeper"]), "kept\nkept\n");
    fx.ok(["rm", "keeper"]);
    fx.phase("dockerd restarted");

    fx.ok(["rmi", busybox]);
    fx.assert_everything_removed();
    fx.phase("everything removed");
}

/// `--storage-opt size=`: above the base size the filesystem grows, below
/// it writes stop with ENOSPC, and a malformed or unknown option is an error
/// naming it.
#[test]
fn storage_opt_size_grows_limits_and_rejects() {
    storage_opt_size("storage_opt_size_grows_limits_and_rejects", "ext4");
}

/// `--storage-opt size=` with xfs layers: above the base size the image and
/// the filesystem grow (xfs_growfs), below it a project quota limits the
/// container's root.
#[test]
fn storage_opt_size_on_xfs() {
    storage_opt_size("storage_opt_size_on_xfs", "xfs");
}

fn storage_opt_size(test: &str, fs: &str) {
    let Some(fx) = Fixture::start(test, &["--fs", fs], Duration::from_secs(300)) else {
        return;
    };
    assert_eq!(
        fx.driver_status().get("Filesystem").map(String::as_str),
        Some(fs)
    );
    let busybox = "rbd-busybox:1";
    fx.import_busybox(busybox);
    let df_total_kib = |args: &[&str]| -> u64 {
        let mut all = vec!["run", "--rm", "--network", "none"];
        all.extend_from_slice(args);
        all.extend_from_slice(&[busybox, "df", "-P", "-k", "/"]);
        let out = fx.ok(&all);
        let line = out.lines().last().unwrap_or_default().to_string();
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("df output {out:?}"))
    };
    let gib = 1u64 << 20; // KiB
    let plain = df_total_kib(&[]);
    assert!(
        (gib * 9 / 10..=gib).contains(&plain),
        "a container on the 1G base sees {plain} KiB"
    );
    let big = df_total_kib(&["--storage-opt", "size=2G"]);
    assert!(
        (2 * gib * 9 / 10..=2 * gib).contains(&big),
        "a size=2G container sees {big} KiB"
    );
    fx.phase(&format!("df: {plain} KiB plain, {big} KiB with size=2G"));
    // A grown container layer works as any other: diff, start again.
    let grown_script = "df -P -k / | tail -n 1 | tr -s ' ' | cut -d' ' -f2; echo big >> /f; cat /f";
    fx.ok([
        "run",
        "--network",
        "none",
        "--name",
        "grown",
        "--storage-opt",
        "size=2G",
        busybox,
        "sh",
        "-c",
        grown_script,
    ]);
    assert_eq!(lines_sorted(&fx.ok(["diff", "grown"])), vec!["A /f"]);
    assert_eq!(
        fx.ok(["start", "-a", "grown"]),
        format!("{big}\nbig\nbig\n")
    );
    let sizes: Vec<(metadata::LayerKind, u64)> = fx
        .purged_layer_records()
        .values()
        .filter(|r| r.kind == metadata::LayerKind::ReadWrite)
        .map(|r| (r.kind, r.size))
        .collect();
    // The init layer is a shared one's (the image's size): only the
    // container's own layer has the size asked for.
    assert_eq!(sizes.len(), 1, "container layer of grown: {sizes:?}");
    assert!(
        sizes.iter().all(|(_, size)| *size == 2 << 30),
        "layer sizes of a size=2G container: {sizes:?}"
    );
    fx.ok(["rm", "grown"]);

    if fs == "xfs" && docker_rbd::fs::xfs_quota_missing() {
        // This kernel cannot limit an xfs layer below its parent's size: a
        // clear refusal, nothing created.
        let err = fx.fails([
            "run",
            "--rm",
            "--network",
            "none",
            "--storage-opt",
            "size=64M",
            busybox,
            "true",
        ]);
        assert!(
            err.contains("size=\"64 MiB\"") && err.contains("CONFIG_XFS_QUOTA"),
            "size=64M on xfs without kernel quota support: {err}"
        );
        eprintln!("[{test}] size=64M on xfs: {}", err.trim());
        assert_eq!(fx.ok(["ps", "-aq"]), "", "the refused run left a container");
        assert_eq!(
            fx.purged_layer_records().len(),
            1,
            "the refused run left layers"
        );
    } else {
        // Below the base size: writes stop with ENOSPC, and the full layer still
        // starts again.
        let fill = "dd if=/dev/zero of=/fill bs=1M count=256 conv=fsync 2>&1; echo rc=$?; \
                    stat -c %s /fill; df -P -k / | tail -n 1";
        let check_full = |out: &str| -> u64 {
            assert!(
                out.contains("No space left on device")
                    || (fs == "xfs" && out.contains("Disk quota exceeded")),
                "dd did not hit ENOSPC (or EDQUOT on xfs):\n{out}"
            );
            let lines: Vec<&str> = out.lines().collect();
            let rc = lines
                .iter()
                .find_map(|l| l.strip_prefix("rc="))
                .unwrap_or_else(|| panic!("{out}"));
            assert_ne!(rc, "0", "dd succeeded past the limit:\n{out}");
            let written: u64 = lines[lines.len() - 2]
                .parse()
                .unwrap_or_else(|_| panic!("{out}"));
            assert!(
                (16 << 20..=64 << 20).contains(&written),
                "wrote {written} bytes under size=64M:\n{out}"
            );
            let total: u64 = lines[lines.len() - 1]
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{out}"));
            assert!(total <= 64 << 10, "a size=64M container sees {total} KiB");
            written
        };
        let written = check_full(&fx.ok([
            "run",
            "--network",
            "none",
            "--name",
            "small",
            "--storage-opt",
            "size=64M",
            busybox,
            "sh",
            "-c",
            fill,
        ]));
        assert_eq!(lines_sorted(&fx.ok(["diff", "small"])), vec!["A /fill"]);
        let again = check_full(&fx.ok(["start", "-a", "small"]));
        // ext4 shrinks the filesystem and the image; xfs, which cannot shrink,
        // limits the layer's root with a project quota.
        let limits: Vec<(u64, Option<u64>)> = fx
            .purged_layer_records()
            .values()
            .filter(|r| r.kind == metadata::LayerKind::ReadWrite)
            .map(|r| (r.size, r.quota))
            .collect();
        let want = if fs == "xfs" {
            (1 << 30, Some(64 << 20))
        } else {
            (64 << 20, None)
        };
        assert_eq!(limits, vec![want], "container layer");
        fx.ok(["rm", "small"]);
        fx.phase(&format!(
            "size=64M: dd stopped after {written} bytes, {again} bytes on the second start"
        ));
    }

    let err = fx.fails([
        "run",
        "--rm",
        "--network",
        "none",
        "--storage-opt",
        "size=lots",
        busybox,
        "true",
    ]);
    assert!(
        err.contains("size=\"lots\"") || err.contains("size=lots"),
        "the error does not name the value: {err}"
    );
    eprintln!("[{test}] size=lots: {}", err.trim());
    let err = fx.fails([
        "run",
        "--rm",
        "--network",
        "none",
        "--storage-opt",
        "colour=blue",
        busybox,
        "true",
    ]);
    assert!(
        err.contains("colour"),
        "the error does not name the option: {err}"
    );
    eprintln!("[{test}] colour=blue: {}", err.trim());
    assert_eq!(fx.ok(["ps", "-aq"]), "", "failed runs left containers");
    assert_eq!(
        fx.purged_layer_records().len(),
        1,
        "failed creates left layers: {:?}",
        fx.layer_records().keys().collect::<Vec<_>>()
    );
    fx.phase("bad options refused");

    fx.ok(["rmi", busybox]);
    fx.assert_everything_removed();
}

/// A 60-layer image loads and runs (chains flattened at depth 8); hostile
/// layers are refused or confined and never write outside the layer.
#[test]
fn deep_chains_and_hostile_layers() {
    let test = "deep_chains_and_hostile_layers";
    let Some(mut fx) = Fixture::start(test, &["--flatten-depth", "8"], Duration::from_secs(900))
    else {
        return;
    };

    // 60 layers.
    let n = 60;
    let chain = format!("{}:1", testkit::unique_name("chain"));
    let chain_tar = fx.path("chain.tar");
    images::chain_image(&chain, n)
        .unwrap()
        .write_save_tar(&chain_tar)
        .unwrap();
    // The plugin is SIGKILLed in the middle of the load and restarted: the
    // load fails or completes; loading again completes it, and no layer of
    // the interrupted attempt is left behind (checked below).
    let mut load = fx.d().docker_command();
    load.args(["load".as_ref(), "-i".as_ref(), chain_tar.as_os_str()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut load = load.spawn().expect("spawn docker load");
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut seen = 0;
    while seen < 20 {
        assert!(
            load.try_wait().unwrap().is_none(),
            "docker load ended before 20 layers were recorded"
        );
        assert!(Instant::now() < deadline, "only {seen} layers after 300 s");
        std::thread::sleep(Duration::from_millis(100));
        seen = fx.layer_records().len();
    }
    fx.kill_plugin();
    fx.phase(&format!(
        "plugin killed during docker load, {seen} layers recorded"
    ));
    std::thread::sleep(Duration::from_secs(1));
    fx.start_plugin();
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(status) = load.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = load.kill();
            panic!("docker load did not end within 600 s of the plugin restart");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = load.wait_with_output().unwrap();
    eprintln!(
        "[{test}] interrupted docker load: {status}; stdout {:?}; stderr {:?}",
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let loaded = fx.ok(["load".as_ref(), "-i".as_ref(), chain_tar.as_os_str()]);
    assert!(loaded.contains(&chain), "{loaded}");
    assert_eq!(
        fx.purged_layer_records().len(),
        n,
        "layers recorded after the interrupted and the repeated load"
    );
    fx.phase("loaded the 60-layer image");
    let out = fx.run_sh(&chain, "ls /chain; cat /depth");
    let mut want = images::chain_expected(n).join("\n");
    want.push_str(&format!("\n{}\n", n - 1));
    assert_eq!(out, want);
    // The layers: none deeper than the threshold, in the records and in RBD.
    fx.ok(["create", "--network", "none", "--name", "deep", &chain]);
    let records = fx.purged_layer_records();
    assert_eq!(
        records.len(),
        n + 2,
        "60 image layers, an init and a container layer"
    );
    let mut flattened = 0;
    for (id, rec) in &records {
        assert!(rec.depth <= 8, "layer {id} has depth {}", rec.depth);
        let ancestors = fx.ancestors(&rec.image);
        // The layers of its chain plus the base image.
        assert!(
            ancestors <= rec.depth as usize + 1,
            "{} has {ancestors} ancestors at depth {}",
            rec.image,
            rec.depth
        );
        if rec.parent.is_some() && ancestors == 0 {
            flattened += 1;
        }
    }
    assert!(flattened >= 6, "only {flattened} layers were flattened");
    let recorded: BTreeSet<String> = records.values().map(|r| r.image.clone()).collect();
    let in_rbd: BTreeSet<String> = fx
        .rbd_images()
        .into_iter()
        .filter(|i| !fx.naming.is_base_image(i))
        .collect();
    assert_eq!(in_rbd, recorded, "RBD images and layer records differ");
    assert_eq!(
        fx.ok(["start", "-a", "deep"]),
        "",
        "the image's CMD is sh without a terminal"
    );
    fx.ok(["rm", "deep"]);
    fx.phase(&format!("chain checked; {flattened} layers flattened"));

    // Hostile layers over a busybox layer, aimed at a canary on the host.
    let canary = fx.path("canary");
    std::fs::create_dir(&canary).unwrap();
    std::fs::write(canary.join("sentinel"), b"original\n").unwrap();
    let canary_rel = canary
        .display()
        .to_string()
        .trim_start_matches('/')
        .to_string();
    let base = Layer::busybox().unwrap().to_tar().unwrap();
    let climbs = "../".repeat(24);

    // 1. `..` in entry names.
    for (tag, name) in [
        ("escape-rel", "../escape".to_string()),
        ("escape-canary", format!("{climbs}{canary_rel}/sentinel")),
        ("escape-new", format!("{climbs}{canary_rel}/new")),
    ] {
        let mut layer = Vec::new();
        raw_entry(&mut layer, "ok", b'0', 0o644, b"fine\n", "");
        raw_entry(&mut layer, &name, b'0', 0o644, b"pwned\n", "");
        let layer = raw_finish(layer);
        let repo = format!("{}:1", testkit::unique_name(tag));
        let path = fx.path(&format!("{tag}.tar"));
        std::fs::write(&path, save_tar(&repo, &[base.clone(), layer])).unwrap();
        let out = fx
            .d()
            .docker(["load".as_ref(), "-i".as_ref(), path.as_os_str()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "docker load accepted a layer entry {name:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        eprintln!("[{test}] {tag}: docker load refused it: {}", stderr.trim());
        assert_eq!(
            fx.ok(["images", "-q", &repo]),
            "",
            "{repo} exists after a refused load"
        );
    }
    // 2. An absolute symlink to the canary, then entries written through it:
    //    once with the target absent from the layer, once with the layer
    //    holding the same directories as the host.
    let mut present = Layer::new();
    let mut prefix = String::new();
    for comp in canary_rel.split('/') {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(comp);
        present = if prefix == "tmp" {
            present.dir(&prefix, 0o1777)
        } else {
            present.dir(&prefix, 0o755)
        };
    }
    for (tag, lead) in [
        ("symlink-dangling", Layer::new()),
        ("symlink-present", present),
    ] {
        let mut layer = lead.symlink("evil", &format!("/{canary_rel}"));
        layer = layer
            .file("evil/sentinel", "pwned\n", 0o644)
            .file("evil/new", "pwned\n", 0o644);
        let repo = format!("{}:1", testkit::unique_name(tag));
        let path = fx.path(&format!("{tag}.tar"));
        std::fs::write(
            &path,
            save_tar(&repo, &[base.clone(), layer.to_tar().unwrap()]),
        )
        .unwrap();
        let out = fx
            .d()
            .docker(["load".as_ref(), "-i".as_ref(), path.as_os_str()]);
        if out.status.success() {
            // Confined: the symlink resolves inside the layer, as in a chroot.
            let inside = fx.run_sh(
                &repo,
                &format!(
                    "readlink /evil; cat /{canary_rel}/sentinel /{canary_rel}/new; ls /{canary_rel}"
                ),
            );
            assert_eq!(
                inside,
                format!("/{canary_rel}\npwned\npwned\nnew\nsentinel\n"),
                "{tag}: the entries went inside the layer"
            );
            eprintln!("[{test}] {tag}: loaded, confined to the layer");
            fx.ok(["rmi", &repo]);
        } else {
            eprintln!(
                "[{test}] {tag}: docker load refused it: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            assert_eq!(
                fx.ok(["images", "-q", &repo]),
                "",
                "{repo} exists after a refused load"
            );
        }
    }
    let mut canary_files: Vec<String> = std::fs::read_dir(&canary)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    canary_files.sort();
    assert_eq!(
        canary_files,
        vec!["sentinel"],
        "files appeared in the canary"
    );
    assert_eq!(
        std::fs::read(canary.join("sentinel")).unwrap(),
        b"original\n"
    );
    fx.phase("hostile layers");

    fx.ok(["rmi", &chain]);
    let images_left = fx.ok(["images", "-aq"]);
    if !images_left.is_empty() {
        // Busybox layers of refused loads are never tagged; nothing should be
        // left, but say what it is if it is.
        panic!("images left: {images_left}\n{}", fx.ok(["images", "-a"]));
    }
    fx.assert_everything_removed();
}

/// One docker command of [`CRASH_SCENARIO`], and what to run instead when
/// it failed because the plugin died under it.
struct Step {
    args: &'static [&'static str],
    /// Run (errors ignored) before the step is tried again.
    undo: &'static [&'static str],
    /// A retry may fail with this instead (what the crashed try did).
    done_if: Option<&'static str>,
}

/// The life of an image and a container, reaching every crash point:
/// import (base image, create, clone, map, mount, unmount), a container's
/// create (seal, shared init layer) and two starts, a size-limited run
/// (an offline resize on ext4, an online grow on xfs), removal (purge).
const CRASH_SCENARIO: &[Step] = &[
    Step {
        args: &["import", "@rootfs", "crash:1"],
        undo: &[],
        done_if: None,
    },
    Step {
        args: &[
            "create",
            "--name",
            "box",
            "--network",
            "none",
            // dockerd makes the working directory at create.
            "-w",
            "/work",
            "crash:1",
            "sh",
            "-c",
            "cat /f 2>/dev/null; echo x >> /f; sync",
        ],
        undo: &["rm", "-f", "box"],
        done_if: None,
    },
    Step {
        args: &["start", "-a", "box"],
        undo: &[],
        done_if: None,
    },
    Step {
        args: &[
            "run",
            "--rm",
            "--name",
            "once",
            "--network",
            "none",
            "--storage-opt",
            "size=2G",
            "crash:1",
            "true",
        ],
        // A crash inside its removal leaves the container, as a failed
        // removal does on any driver: its user removes it.
        undo: &["rm", "-f", "once"],
        done_if: None,
    },
    Step {
        args: &["start", "-a", "box"],
        undo: &[],
        done_if: None,
    },
    Step {
        args: &["rm", "box"],
        undo: &[],
        done_if: Some("No such container"),
    },
    Step {
        args: &["rmi", "crash:1"],
        undo: &[],
        done_if: Some("No such image"),
    },
];

/// How the scenario went for one crash point.
struct CrashOutcome {
    /// The step during which the plugin died.
    step: String,
    /// What brought the step through: dockerd's own retry of the request
    /// against the restarted plugin, or the test's retry of the command.
    through: &'static str,
}

impl Fixture {
    /// Runs `docker <args>` while watching the plugin; when the plugin
    /// dies (at the armed crash point, as its log must say), restarts it
    /// unarmed and waits for the command. Returns the command's output
    /// and whether the plugin crashed meanwhile.
    fn docker_watching_plugin(&mut self, args: &[String]) -> (std::process::Output, bool) {
        let mut cmd = self.d().docker_command();
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let child = cmd.spawn().expect("spawn docker");
        let pid = child.id() as i32;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let mut crashed = false;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(out) => {
                    let out = out.expect("wait for docker");
                    return (out, self.plugin_crashed() || crashed);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(e) => panic!("{}: docker {args:?}: {e}", self.test),
            }
            if self.plugin_crashed() {
                crashed = true;
            }
            if Instant::now() > deadline {
                let _ = testkit::process::terminate(pid, Duration::from_secs(5));
                panic!("{}: docker {args:?} did not end within 300 s", self.test);
            }
        }
    }

    /// If the plugin has died: checks that the armed crash point killed
    /// it, disarms it and starts it again. Returns whether it had died.
    fn plugin_crashed(&mut self) -> bool {
        let Some(plugin) = self.plugin.as_mut() else {
            return false;
        };
        if plugin.check_running().is_ok() {
            return false;
        }
        let log = plugin.log();
        let point = self.crash_at.take().unwrap_or_else(|| {
            panic!(
                "{}: the plugin died a second time, unarmed:\n{}",
                self.test,
                tail(&log, 60)
            )
        });
        assert!(
            log.contains(&format!("crash point {point} reached")),
            "{}: the plugin died, but not at {point}:\n{}",
            self.test,
            tail(&log, 60)
        );
        drop(self.plugin.take());
        self.start_plugin();
        true
    }

    /// Runs [`CRASH_SCENARIO`] with the plugin armed at `point`; every
    /// step must come through, the crash happen once, and everything be
    /// removed at the end.
    fn crash_scenario(&mut self, point: CrashPoint) -> CrashOutcome {
        let rootfs = self.path("busybox-rootfs.tar");
        images::write_busybox_rootfs_tar(&rootfs).unwrap();
        let expand = |args: &[&str]| -> Vec<String> {
            args.iter()
                .map(|a| match *a {
                    "@rootfs" => rootfs.display().to_string(),
                    a => a.to_string(),
                })
                .collect()
        };
        let mut outcome = None;
        let mut last_start = String::new();
        for step in CRASH_SCENARIO {
            let args = expand(step.args);
            let (out, crashed) = self.docker_watching_plugin(&args);
            let mut stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            if crashed {
                let mut through = "dockerd's retry";
                if !out.status.success() {
                    through = "the command's retry";
                    eprintln!(
                        "[{}] {point}: docker {args:?} failed under the crash: {}",
                        self.test,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    if !step.undo.is_empty() {
                        let _ = self.d().docker(expand(step.undo));
                    }
                    let again = self.d().docker(&args);
                    let stderr = String::from_utf8_lossy(&again.stderr);
                    assert!(
                        again.status.success()
                            || step.done_if.is_some_and(|done| stderr.contains(done)),
                        "{}: {point}: docker {args:?} after the restart failed: {stderr}\n{}",
                        self.test,
                        self.plugin_log_tail(60)
                    );
                    stdout = String::from_utf8_lossy(&again.stdout).into_owned();
                }
                outcome = Some(CrashOutcome {
                    step: step.args[0].to_string(),
                    through,
                });
            } else {
                assert!(
                    out.status.success(),
                    "{}: {point}: docker {args:?} failed: {}\n{}",
                    self.test,
                    String::from_utf8_lossy(&out.stderr),
                    self.plugin_log_tail(60)
                );
            }
            if step.args[0] == "start" {
                last_start = stdout;
            }
        }
        // A purge runs after `docker rmi` returned.
        let deadline = Instant::now() + Duration::from_secs(10);
        while outcome.is_none() && Instant::now() < deadline {
            if self.plugin_crashed() {
                outcome = Some(CrashOutcome {
                    step: "(after rmi) purge".into(),
                    through: "recovery at start",
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let outcome = outcome.unwrap_or_else(|| {
            panic!(
                "{}: the scenario never reached crash point {point}",
                self.test
            )
        });
        // The second start saw what the first one wrote (and synced).
        let lines: Vec<&str> = last_start.lines().collect();
        assert!(
            !lines.is_empty() && lines.iter().all(|l| *l == "x"),
            "{}: {point}: the second start printed {last_start:?}",
            self.test
        );
        // The driver still works, then holds nothing.
        self.import_busybox("after:1");
        assert_eq!(
            self.run_sh("after:1", "echo works"),
            "works\n",
            "{}: {point}",
            self.test
        );
        self.ok(["rmi", "after:1"]);
        self.assert_everything_removed();
        outcome
    }
}

/// For every crash point of the engine (`docker_rbd::crashpoint`), one
/// plugin dies there under a real dockerd, is restarted, and the image
/// and container lifecycle carries on: each docker command comes through
/// (dockerd retries a request its plugin dropped), the container keeps
/// what it wrote, and at the end no RBD image, record, mapping, mount,
/// loop device or FUSE server is left that nothing claims. Prints the
/// matrix of points covered. `CRASH_POINTS=a,b` runs only those (for
/// working on one).
#[test]
fn a_crash_at_every_point_is_recovered_by_a_restart() {
    let only: Option<Vec<String>> = std::env::var("CRASH_POINTS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    let points: Vec<CrashPoint> = CrashPoint::ALL
        .iter()
        .copied()
        .filter(|p| {
            only.as_ref()
                .is_none_or(|o| o.iter().any(|n| n == p.name()))
        })
        .collect();
    let mut matrix = Vec::new();
    for &point in &points {
        let test = format!("crash_at_{}", point.name().replace('-', "_"));
        // The scenario's `size=2G` on the 1 GiB base grows the layer: ext4
        // offline (resize-mapped), xfs online, mounted (create-mounted).
        let flags: &[&str] = match point {
            CrashPoint::CreateMounted => &["--fs", "xfs"],
            _ => &[],
        };
        let Some(mut fx) =
            Fixture::start_armed(&test, flags, Duration::from_secs(300), Some(point))
        else {
            return;
        };
        let outcome = fx.crash_scenario(point);
        fx.phase(&format!("{point}: recovered"));
        matrix.push((point, outcome));
    }
    eprintln!("crash point          died during          came through by");
    for (point, o) in &matrix {
        eprintln!("{:<20} {:<20} {}", point.name(), o.step, o.through);
    }
    assert_eq!(matrix.len(), points.len());
}
