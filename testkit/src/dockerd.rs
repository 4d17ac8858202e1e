//! A private dockerd per test: [`Dockerd::start`] with a [`DockerdConfig`].
//!
//! Each instance gets its own scratch directory under [`crate::scratch_root`]
//! holding `--data-root`, `--exec-root`, `--pidfile`, the API socket
//! (`-H unix://<dir>/docker.sock`), a private `daemon.json` (`--config-file`),
//! the engine key (`deprecated-key-path` in that daemon.json: dockerd 20.10
//! has no flag for it, but honours the config key, so several dockerds on one
//! machine no longer share `/etc/docker/key.json`), the docker CLI's config
//! directory and the log. It runs with `--iptables=false --ip-forward=false
//! --bridge=none --userland-proxy=false` and a unique `--cgroup-parent`, so
//! containers must use `--network none` (or `host`).
//!
//! containerd: dockerd 20.10 started without `--containerd` spawns a private
//! containerd of its own (`<exec-root>/containerd/containerd.toml`, socket
//! `<exec-root>/containerd/containerd.sock`, pid in
//! `<exec-root>/containerd/containerd.pid`) and stops it on a clean shutdown.
//! The pid is recorded here anyway, because after a SIGKILL of dockerd its
//! containerd lives on.
//!
//! Stopping (drop, [`Dockerd::shutdown`], [`Dockerd::stop`]): SIGTERM dockerd
//! and wait (bounded), SIGKILL if needed; then containerd by its recorded pid;
//! then any containerd shim started for this instance (found by its
//! `-address <exec-root>/containerd/containerd.sock` argument) and any process
//! left in its cgroup parent; then lazily unmount everything under the scratch
//! directory, newest first (dockerd bind-mounts its data root onto itself),
//! in the namespace it ran in; remove its cgroup directories, the plugin spec
//! files written for it, and the scratch directory. Nothing is ended by name.
//!
//! Graphdriver plugins: dockerd finds a plugin named `n` only at
//! `/run/docker/plugins/n.sock` (hard-coded, [`plugin_socket_path`]) or
//! through a spec file `/etc/docker/plugins/n.spec`
//! ([`DockerdConfig::plugin_specs`]). Tests that run in parallel must each
//! use a unique plugin name ([`crate::unique_name`]) or run in their own
//! [`Host`]. Start the plugin before dockerd and stop it after: declare the
//! plugin's guard before the `Dockerd`, so that it is dropped after it.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::host::Host;
use crate::images;
use crate::{mounts, process};

/// The docker CLI the tests use: Debian's 20.10, matching the daemon
/// (`/usr/local/bin/docker`, first on PATH, is 28.x).
pub const DOCKER_CLI: &str = "/usr/bin/docker";

/// Where dockerd looks for graphdriver plugin `name`'s socket.
pub fn plugin_socket_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/docker/plugins/{name}.sock"))
}

/// The dockerd binary: `$DOCKER_RBD_DOCKERD`, else `/usr/bin/dockerd`, else
/// `/usr/sbin/dockerd` (where Debian's docker.io puts it).
pub fn dockerd_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DOCKER_RBD_DOCKERD") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/dockerd", "/usr/sbin/dockerd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// What a test needs to start a private dockerd, or why it cannot.
pub fn missing() -> Option<String> {
    crate::require::root()
        .or_else(|| {
            dockerd_binary()
                .is_none()
                .then(|| "dockerd is not installed (docker.io)".to_string())
        })
        .or_else(|| crate::require::path(DOCKER_CLI))
        .or_else(|| crate::require::path("/usr/bin/containerd"))
        .or_else(|| crate::require::path("/bin/busybox"))
}

/// Whether test `test` may start a private dockerd (see [`crate::require`]).
pub fn require(test: &str) -> bool {
    crate::require::check(test, missing())
}

/// How to start a private dockerd.
#[derive(Debug, Clone)]
pub struct DockerdConfig {
    /// `-s`: a built-in driver (`vfs`) or a plugin name.
    pub storage_driver: String,
    /// `--experimental` (required for graphdriver plugins).
    pub experimental: bool,
    /// `--storage-opt` values, e.g. `rbd.pool=x`.
    pub storage_opts: Vec<String>,
    /// Run dockerd inside this host's mount namespace.
    pub host: Option<Host>,
    /// Plugin spec files to write before start and remove at the end:
    /// `(name, address)` becomes `/etc/docker/plugins/<name>.spec` holding
    /// `address` (e.g. `unix:///tmp/x/plugin.sock`), in the host when there
    /// is one, else on the machine. Lets a plugin listen anywhere.
    pub plugin_specs: Vec<(String, String)>,
    /// More dockerd arguments.
    pub extra_args: Vec<String>,
    /// More daemon.json keys. A key must not repeat a flag given on the
    /// command line (dockerd refuses that).
    pub daemon_json: Map<String, Value>,
    /// More environment variables for dockerd.
    pub env: Vec<(String, String)>,
    /// Prefix of the scratch directory, for people reading `ps` and logs.
    pub name: String,
    /// How long to wait for `docker info` to answer.
    pub start_timeout: Duration,
    /// How long dockerd gets after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// Bound on each docker CLI call.
    pub command_timeout: Duration,
}

impl DockerdConfig {
    /// Defaults for `storage_driver`: experimental on (plugins need it),
    /// 60 s to start (dockerd retries a missing plugin for about 30 s),
    /// 30 s to stop, 300 s per docker command.
    pub fn new(storage_driver: &str) -> Self {
        DockerdConfig {
            storage_driver: storage_driver.to_string(),
            experimental: true,
            storage_opts: Vec::new(),
            host: None,
            plugin_specs: Vec::new(),
            extra_args: Vec::new(),
            daemon_json: Map::new(),
            env: Vec::new(),
            name: "dockerd".to_string(),
            start_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
        }
    }

    /// Runs dockerd inside `host`.
    pub fn in_host(mut self, host: &Host) -> Self {
        self.host = Some(host.clone());
        self
    }
}

/// A running private dockerd. Dropping it stops it and removes everything
/// it left (see the module doc); [`Dockerd::shutdown`] does the same and
/// reports anything left over.
pub struct Dockerd {
    cfg: DockerdConfig,
    dir: PathBuf,
    child: Option<Child>,
    containerd_pid: Option<i32>,
    cgroup_parent: String,
    spec_files: Vec<PathBuf>,
    cleaned: bool,
}

impl std::fmt::Debug for Dockerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dockerd")
            .field("dir", &self.dir)
            .field("pid", &self.pid())
            .field("containerd_pid", &self.containerd_pid)
            .field("driver", &self.cfg.storage_driver)
            .finish()
    }
}

impl Dockerd {
    /// Starts dockerd and waits until `docker info` answers with the
    /// configured storage driver. On failure everything is cleaned up and
    /// the error includes dockerd's log.
    pub fn start(cfg: DockerdConfig) -> Result<Dockerd, String> {
        for e in crate::sweep_orphans() {
            eprintln!("testkit dockerd: {e}");
        }
        let dir = crate::scratch_dir(&cfg.name)?.keep();
        let mut d = Dockerd {
            cgroup_parent: cgroup_parent_for(&dir),
            cfg,
            dir,
            child: None,
            containerd_pid: None,
            spec_files: Vec::new(),
            cleaned: false,
        };
        // From here on, Drop cleans up whatever fails.
        d.prepare()?;
        d.launch()?;
        Ok(d)
    }

    fn prepare(&mut self) -> Result<(), String> {
        for sub in ["data", "exec", "cli"] {
            std::fs::create_dir_all(self.dir.join(sub)).map_err(|e| format!("mkdir: {e}"))?;
        }
        let mut json = Map::new();
        json.insert(
            "deprecated-key-path".into(),
            Value::String(self.dir.join("key.json").display().to_string()),
        );
        json.insert("shutdown-timeout".into(), Value::from(5));
        for (k, v) in &self.cfg.daemon_json {
            json.insert(k.clone(), v.clone());
        }
        let text = serde_json::to_string_pretty(&Value::Object(json)).map_err(|e| e.to_string())?;
        std::fs::write(self.config_file(), text).map_err(|e| format!("write daemon.json: {e}"))?;
        for (name, addr) in self.cfg.plugin_specs.clone() {
            let inside = PathBuf::from(format!("/etc/docker/plugins/{name}.spec"));
            let path = match &self.cfg.host {
                Some(h) => h.path(&inside),
                None => inside,
            };
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
            }
            std::fs::write(&path, format!("{addr}\n"))
                .map_err(|e| format!("write {}: {e}", path.display()))?;
            self.spec_files.push(path);
        }
        Ok(())
    }

    /// Spawns dockerd on the existing directories and waits for it.
    fn launch(&mut self) -> Result<(), String> {
        let bin = dockerd_binary().ok_or("dockerd is not installed")?;
        // A previous run killed here may have left pidfiles naming zombies
        // or dead processes: dockerd would take them for running daemons.
        process::remove_stale_pidfile(&self.pidfile())?;
        process::remove_stale_pidfile(&self.exec_root().join("containerd/containerd.pid"))?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("open {}: {e}", self.log_path().display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = match &self.cfg.host {
            Some(h) => h.command(&bin),
            None => Command::new(&bin),
        };
        cmd.arg("--data-root")
            .arg(self.data_root())
            .arg("--exec-root")
            .arg(self.exec_root())
            .arg("--pidfile")
            .arg(self.pidfile())
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .arg("--config-file")
            .arg(self.config_file())
            .args([
                "--iptables=false",
                "--ip-forward=false",
                "--bridge=none",
                "--userland-proxy=false",
            ])
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .arg("-s")
            .arg(&self.cfg.storage_driver);
        if self.cfg.experimental {
            cmd.arg("--experimental");
        }
        for opt in &self.cfg.storage_opts {
            cmd.arg("--storage-opt").arg(opt);
        }
        cmd.args(&self.cfg.extra_args);
        for var in [
            "DOCKER_HOST",
            "DOCKER_CONTEXT",
            "DOCKER_TLS_VERIFY",
            "DOCKER_CERT_PATH",
            "NOTIFY_SOCKET",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(self.cfg.env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        let shown = format!("{cmd:?}");
        let child = cmd.spawn().map_err(|e| format!("spawn {shown}: {e}"))?;
        self.child = Some(child);
        self.containerd_pid = None;
        self.wait_ready()
            .map_err(|e| format!("{e}\ncommand: {shown}\n{}", self.log_excerpt()))?;
        self.containerd_pid = self.find_containerd();
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + self.cfg.start_timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().map_err(|e| e.to_string())?
            {
                self.child = None;
                return Err(format!("dockerd exited during start-up: {status}"));
            }
            let mut cmd = self.docker_command();
            cmd.args(["info", "--format", "{{.Driver}}"]);
            let last = match process::run_with_timeout(cmd, None, Duration::from_secs(15)) {
                Ok(out) if out.status.success() => {
                    let driver = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    if driver == self.cfg.storage_driver {
                        return Ok(());
                    }
                    return Err(format!(
                        "dockerd runs storage driver {driver:?}, not {:?}",
                        self.cfg.storage_driver
                    ));
                }
                Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "dockerd did not answer `docker info` within {:?}; last: {last}",
                    self.cfg.start_timeout
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn find_containerd(&self) -> Option<i32> {
        let pidfile = self.exec_root().join("containerd/containerd.pid");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(pid) = process::read_pidfile(&pidfile)
                && self.is_ours(pid)
            {
                return Some(pid);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether `pid` is live and was started for this instance (its command
    /// line names our exec root), so it may be signalled.
    fn is_ours(&self, pid: i32) -> bool {
        started_for(&self.dir, pid)
    }

    /// The scratch directory holding everything of this instance.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `--data-root`.
    pub fn data_root(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `--exec-root`.
    pub fn exec_root(&self) -> PathBuf {
        self.dir.join("exec")
    }

    /// The storage driver's home, `<data-root>/<driver>` (what a plugin gets
    /// as `Init.Home`).
    pub fn driver_home(&self) -> PathBuf {
        self.data_root().join(&self.cfg.storage_driver)
    }

    /// `--pidfile`.
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("docker.pid")
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// `-H` value for a docker CLI: `unix://<socket>`.
    pub fn host_uri(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// The private daemon.json.
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("daemon.json")
    }

    /// dockerd's stdout and stderr, across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("dockerd.log")
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn log_excerpt(&self) -> String {
        format!(
            "--- dockerd log ({}), last 80 lines ---\n{}",
            self.log_path().display(),
            self.log_tail(80)
        )
    }

    /// dockerd's pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// The pid of the containerd dockerd started, while known.
    pub fn containerd_pid(&self) -> Option<i32> {
        self.containerd_pid
    }

    /// `--cgroup-parent`.
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// The host dockerd runs in, if any.
    pub fn host(&self) -> Option<&Host> {
        self.cfg.host.as_ref()
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &DockerdConfig {
        &self.cfg
    }

    /// A `/usr/bin/docker -H unix://<socket>` command with a private CLI
    /// config directory and no `DOCKER_*` variables from the environment.
    pub fn docker_command(&self) -> Command {
        let mut cmd = Command::new(DOCKER_CLI);
        cmd.arg("-H").arg(self.host_uri());
        for var in [
            "DOCKER_HOST",
            "DOCKER_CONTEXT",
            "DOCKER_TLS_VERIFY",
            "DOCKER_CERT_PATH",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("DOCKER_CONFIG", self.dir.join("cli"));
        cmd
    }

    /// Runs `docker <args>` (bounded by the command timeout) and returns its
    /// output whatever the exit status. Panics only when it cannot run or
    /// times out, with dockerd's log in the message.
    pub fn docker<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.docker_stdin(args, None)
    }

    /// Like [`Dockerd::docker`], feeding `stdin` to the command.
    pub fn docker_stdin<I, S>(&self, args: I, stdin: Option<Vec<u8>>) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        match self.try_docker(args, stdin) {
            Ok(out) => out,
            Err(e) => panic!("{e}\n{}", self.log_excerpt()),
        }
    }

    /// Runs `docker <args>`; `Err` when it cannot run or times out.
    pub fn try_docker<I, S>(&self, args: I, stdin: Option<Vec<u8>>) -> Result<Output, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.docker_command();
        cmd.args(args);
        process::run_with_timeout(cmd, stdin, self.cfg.command_timeout)
    }

    /// Runs `docker <args>`, panics unless it exits 0 (the message holds the
    /// command, status, stdout, stderr and the end of dockerd's log), and
    /// returns its stdout.
    pub fn docker_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.docker(&args);
        self.check_ok(&args, &out)
    }

    /// Runs `sh -c script` in a throw-away container of `image` without a
    /// network, and returns its stdout.
    pub fn run_sh(&self, image: &str, script: &str) -> String {
        self.docker_ok([
            "run",
            "--rm",
            "--network",
            "none",
            image,
            "sh",
            "-c",
            script,
        ])
    }

    /// `docker load`s [`images::special_image`]`(tag)`, from a save
    /// tarball written into `dir`, and checks what dockerd made of it: the
    /// image id, the layer diff ids, and every special entry from inside a
    /// container ([`images::SPECIAL_CHECK_SCRIPT`]). Returns the saved image.
    pub fn load_special(&self, tag: &str, dir: &Path) -> images::SavedImage {
        let tar = dir.join("special.tar");
        let saved = images::special_image(tag)
            .and_then(|image| image.write_save_tar(&tar))
            .unwrap_or_else(|e| panic!("writing the special image {tag}: {e}"));
        let loaded = self.docker_ok(["load".as_ref(), "-i".as_ref(), tar.as_os_str()]);
        assert!(loaded.contains(&format!("Loaded image: {tag}")), "{loaded}");
        assert_eq!(
            self.docker_ok(["image", "inspect", "-f", "{{.Id}}", tag])
                .trim(),
            saved.id
        );
        let layers = self.docker_ok(["image", "inspect", "-f", "{{json .RootFS.Layers}}", tag]);
        let layers: Vec<String> = serde_json::from_str(&layers)
            .unwrap_or_else(|e| panic!("RootFS.Layers of {tag}: {e}: {layers}"));
        assert_eq!(layers, saved.diff_ids);
        assert_eq!(
            self.run_sh(tag, images::SPECIAL_CHECK_SCRIPT),
            images::SPECIAL_CHECK_EXPECTED
        );
        saved
    }

    /// `docker export`s container `name` into `dir/<name>.tar` and returns
    /// the tarball.
    pub fn export(&self, name: &str, dir: &Path) -> Vec<u8> {
        let tar = dir.join(format!("{name}.tar"));
        self.docker_ok([
            "export".as_ref(),
            "-o".as_ref(),
            tar.as_os_str(),
            name.as_ref(),
        ]);
        std::fs::read(&tar).unwrap_or_else(|e| panic!("reading {}: {e}", tar.display()))
    }

    /// Like [`Dockerd::docker_ok`] with `stdin` fed to the command.
    pub fn docker_ok_stdin<I, S>(&self, args: I, stdin: Vec<u8>) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.docker_stdin(&args, Some(stdin));
        self.check_ok(&args, &out)
    }

    fn check_ok(&self, args: &[std::ffi::OsString], out: &Output) -> String {
        if !out.status.success() {
            let shown: Vec<String> = args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            panic!(
                "{}\n{}",
                process::describe_output(
                    &format!("{DOCKER_CLI} -H {} {}", self.host_uri(), shown.join(" ")),
                    out
                ),
                self.log_excerpt()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops dockerd gracefully (and everything it started), keeping its
    /// directories for [`Dockerd::restart`].
    pub fn stop(&mut self) -> Result<(), String> {
        let errors = self.stop_processes(true);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }

    /// Kills dockerd, its containerd and shims with SIGKILL, as a machine
    /// crash would, and unmounts what they left; keeps the directories.
    pub fn crash(&mut self) -> Result<(), String> {
        let errors = self.stop_processes(false);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }

    /// Starts dockerd again on the same directories (stopping it first when
    /// it runs), after removing pidfiles of dead or zombie processes.
    pub fn restart(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            self.stop()?;
        }
        self.launch()
    }

    /// Stops everything, cleans up, and checks that nothing is left: no
    /// process of this instance, no mount under its directory (in its
    /// namespace or ours), no cgroup directory, no scratch directory.
    pub fn shutdown(mut self) -> Result<(), String> {
        let mut errors = self.cleanup();
        errors.extend(self.leftovers());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }

    /// What is left of this instance: live processes, mounts, directories.
    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        if let Some(pid) = self.pid()
            && process::is_live(pid)
        {
            left.push(format!("dockerd {pid} still runs"));
        }
        let exec = self.exec_root().display().to_string();
        let pids = process::live_pids_with_cmdline(&exec);
        if !pids.is_empty() {
            left.push(format!("processes naming {exec} still run: {pids:?}"));
        }
        match mounts::mounts_under(None, &self.dir) {
            Ok(m) if !m.is_empty() => left.push(format!("mounts left: {m:?}")),
            Ok(_) => {}
            Err(e) => left.push(e),
        }
        if let Some(h) = &self.cfg.host {
            match mounts::mounts_under(Some(h.pid()), &self.dir) {
                Ok(m) if !m.is_empty() => {
                    left.push(format!("mounts left in host {}: {m:?}", h.name()))
                }
                Ok(_) => {}
                Err(e) => left.push(e),
            }
        }
        if self.dir.exists() {
            left.push(format!("{} still exists", self.dir.display()));
        }
        for dir in cgroup_dirs(&self.cgroup_parent) {
            if dir.exists() {
                left.push(format!("cgroup {} still exists", dir.display()));
            }
        }
        for spec in &self.spec_files {
            if spec.exists() {
                left.push(format!("{} still exists", spec.display()));
            }
        }
        left
    }

    /// Ends dockerd, containerd, shims and container processes of this
    /// instance, then unmounts everything under its directory. Returns what
    /// went wrong.
    fn stop_processes(&mut self, graceful: bool) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(mut child) = self.child.take() {
            let result = if graceful {
                process::terminate_child(&mut child, self.cfg.stop_timeout)
            } else {
                process::kill_child(&mut child)
            };
            if let Err(e) = result {
                errors.push(format!("dockerd: {e}"));
            }
        }
        let containerd = self.containerd_pid.take();
        errors.extend(reap(
            &self.dir,
            containerd,
            &self.cgroup_parent,
            self.cfg.host.as_ref(),
            graceful,
        ));
        errors
    }

    /// Stops everything and removes what this instance made. Idempotent.
    fn cleanup(&mut self) -> Vec<String> {
        if self.cleaned {
            return Vec::new();
        }
        self.cleaned = true;
        let mut errors = self.stop_processes(true);
        for dir in cgroup_dirs(&self.cgroup_parent) {
            if let Err(e) = remove_cgroup_tree(&dir) {
                errors.push(e);
            }
        }
        for spec in std::mem::take(&mut self.spec_files) {
            match std::fs::remove_file(&spec) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errors.push(format!("remove {}: {e}", spec.display())),
            }
        }
        if errors.iter().all(|e| !e.contains("still mounted")) {
            if let Err(e) = remove_tree(&self.dir) {
                errors.push(e);
            }
        } else {
            errors.push(format!(
                "left {} in place: mounts remain under it",
                self.dir.display()
            ));
        }
        errors
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        for e in self.cleanup() {
            eprintln!("testkit dockerd {}: cleanup: {e}", self.dir.display());
        }
    }
}

/// Whether `pid` is live and was started for the instance in `dir` (its
/// command line names the instance's exec root), so it may be signalled.
fn started_for(dir: &Path, pid: i32) -> bool {
    let exec = dir.join("exec").display().to_string();
    process::is_live(pid) && process::cmdline(pid).is_some_and(|c| c.contains(&exec))
}

/// Ends what the instance in `dir` started besides dockerd's own child
/// handle: a dockerd named by its pidfile (an orphan's), its containerd
/// (`containerd`, else the pidfile), the shims, container processes in its
/// cgroup parent; then unmounts everything under `dir` in `host`'s
/// namespace and ours and removes pidfiles of dead processes.
fn reap(
    dir: &Path,
    containerd: Option<i32>,
    cgroup_parent: &str,
    host: Option<&Host>,
    graceful: bool,
) -> Vec<String> {
    let mut errors = Vec::new();
    let grace = |secs| {
        if graceful {
            Duration::from_secs(secs)
        } else {
            Duration::ZERO
        }
    };
    let exec = dir.join("exec");
    let containerd_pidfile = exec.join("containerd/containerd.pid");
    if let Some(pid) =
        process::read_pidfile(&dir.join("docker.pid")).filter(|&p| started_for(dir, p))
        && let Err(e) = process::terminate(pid, grace(30))
    {
        errors.push(format!("dockerd: {e}"));
    }
    let containerd = containerd.or_else(|| process::read_pidfile(&containerd_pidfile));
    if let Some(pid) = containerd.filter(|&p| started_for(dir, p))
        && let Err(e) = process::terminate(pid, grace(10))
    {
        errors.push(format!("containerd: {e}"));
    }
    // Shims (and anything else started with our containerd's address).
    let address = exec
        .join("containerd/containerd.sock")
        .display()
        .to_string();
    for pid in process::live_pids_with_cmdline(&address) {
        if let Err(e) = process::terminate(pid, grace(5)) {
            errors.push(format!("shim: {e}"));
        }
    }
    // Container processes left in our cgroup parent.
    for cg in cgroup_dirs(cgroup_parent) {
        for pid in cgroup_procs(&cg) {
            if let Err(e) = process::terminate(pid, Duration::ZERO) {
                errors.push(format!("container process: {e}"));
            }
        }
    }
    if let Some(h) = host
        && let Err(e) = mounts::unmount_under(Some(h), dir)
    {
        errors.push(e);
    }
    if let Err(e) = mounts::unmount_under(None, dir) {
        errors.push(e);
    }
    for pidfile in [dir.join("docker.pid"), containerd_pidfile] {
        if let Err(e) = process::remove_stale_pidfile(&pidfile) {
            errors.push(e);
        }
    }
    errors
}

/// Whether `dir` is the directory of a dockerd instance.
pub(crate) fn is_instance_dir(dir: &Path) -> bool {
    dir.join("daemon.json").is_file() && dir.join("exec").is_dir()
}

/// Ends and unmounts what an orphaned instance left ([`crate::sweep_orphans`])
/// and removes its cgroups; the caller removes the directory.
pub(crate) fn reap_orphan(dir: &Path) -> Vec<String> {
    let parent = cgroup_parent_for(dir);
    let mut errors = reap(dir, None, &parent, None, false);
    for cg in cgroup_dirs(&parent) {
        if let Err(e) = remove_cgroup_tree(&cg) {
            errors.push(e);
        }
    }
    errors
}

/// `--cgroup-parent` of the instance in `dir`.
fn cgroup_parent_for(dir: &Path) -> String {
    let base = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("/docker-rbd-testkit-{base}")
}

/// Removes a directory tree, first clearing the immutable and append-only
/// flags nothing here sets but a test of a driver might.
fn remove_tree(dir: &Path) -> Result<(), String> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("remove {}: {e}", dir.display())),
    }
}

/// `<hierarchy>/<parent>` for every cgroup hierarchy mounted here.
fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    let rel = parent.trim_start_matches('/');
    let Ok(mounts) = mounts::mounts_of(None) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = mounts
        .into_iter()
        .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
        .map(|m| m.target.join(rel))
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Pids in a cgroup directory and its descendants.
fn cgroup_procs(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(cgroup_procs(&e.path()));
            }
        }
    }
    pids
}

/// Removes a cgroup directory and its sub-cgroups (children first). Retries
/// briefly while the kernel still counts exiting tasks.
fn remove_cgroup_tree(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("rmdir {}: {e}", dir.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
