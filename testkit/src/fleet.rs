//! Several docker-rbd hosts on one machine sharing one Ceph cluster: the
//! setup of the tests that move containers between hosts.
//!
//! A [`Fleet`] is one RADOS namespace of the test cluster and one plugin
//! name (the same on every host: dockerd records the driver's name in its
//! files). Each [`FleetHost`] is a [`Host`] (its own mount namespace, `/run`
//! and `/etc/docker`) running its own `docker-rbd serve` and its own
//! private dockerd on it, with its own data root and plugin run directory.
//! A host can crash (everything SIGKILLed, as a power cut), boot again on
//! its disk, or boot a fresh "diskless" twin with an empty data root.
//!
//! Dropping a host (also on panic) stops its dockerd while its plugin still
//! serves, then the plugin, then ends what the driver left on this machine
//! ([`crate::driver`]); dropping the fleet removes everything in its RADOS
//! namespace. Declare the fleet before its hosts, so that the hosts go
//! first.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ceph_client::{IoCtx, Rados};

use crate::ceph::CephEnv;
use crate::daemon::Daemon;
use crate::dockerd::{Dockerd, DockerdConfig};
use crate::host::Host;

/// One test's fleet: a RADOS namespace and the plugin settings its hosts
/// share.
pub struct Fleet {
    test: String,
    ceph: CephEnv,
    namespace: String,
    plugin_name: String,
    plugin_bin: PathBuf,
    flags: Vec<String>,
    ioctx: Arc<IoCtx>,
    pool: IoCtx,
    _rados: Rados,
    started: Instant,
}

impl Fleet {
    /// A fleet for `test` whose hosts run `plugin_bin` (`docker-rbd`) with
    /// `flags` beyond the common ones (cluster, pool, namespace, fuse
    /// mapper, 1 GiB base unless `flags` name `--basesize`, plugin name,
    /// run dir). `None` when a
    /// prerequisite is missing outside strict mode (see [`crate::require`]).
    pub fn start(test: &str, plugin_bin: &Path, flags: &[&str]) -> Option<Fleet> {
        let ceph = crate::ceph::require(test)?;
        if !crate::require::layer_mounts(test) {
            return None;
        }
        if !crate::dockerd::require(test) {
            return None;
        }
        let namespace = crate::ceph::unique_namespace(test);
        let rados = Rados::connect(&ceph.connect_config()).expect("connect to the test cluster");
        let ioctx = Arc::new(
            rados
                .ioctx(&ceph.pool, Some(&namespace))
                .expect("ioctx of the fleet's namespace"),
        );
        let pool = rados.ioctx(&ceph.pool, None).expect("ioctx of the pool");
        Some(Fleet {
            test: test.to_string(),
            plugin_name: crate::unique_name("rbdfleet"),
            plugin_bin: plugin_bin.to_path_buf(),
            flags: flags.iter().map(|s| s.to_string()).collect(),
            ceph,
            namespace,
            ioctx,
            pool,
            _rados: rados,
            started: Instant::now(),
        })
    }

    /// The RADOS namespace (and RBD namespace) of the fleet.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// An I/O context on the fleet's namespace, for looking at records.
    pub fn ioctx(&self) -> &Arc<IoCtx> {
        &self.ioctx
    }

    /// The plugin (and storage driver) name every host uses.
    pub fn plugin_name(&self) -> &str {
        &self.plugin_name
    }

    /// Logs `what` with the time since the fleet started.
    pub fn phase(&self, what: &str) {
        eprintln!(
            "[{} +{:.1}s] {what}",
            self.test,
            self.started.elapsed().as_secs_f64()
        );
    }

    /// Boots host `name`, with `flags` for its `docker-rbd serve` beyond
    /// the fleet's (e.g. `--host-id a`), on an empty data root. Panics if
    /// it does not come up.
    pub fn host(&self, name: &str, flags: &[&str]) -> FleetHost {
        self.try_host(name, flags)
            .unwrap_or_else(|e| panic!("[{}] host {name} did not boot: {e}", self.test))
    }

    /// Like [`Fleet::host`], returning why the host did not boot.
    pub fn try_host(&self, name: &str, flags: &[&str]) -> Result<FleetHost, String> {
        let host = Host::new(name)?;
        let run_dir = crate::scratch_dir(&format!("fleet-{name}-run"))?;
        // The settings every docker-rbd command of this host takes.
        let mut settings: Vec<OsString> = vec!["-c".into(), self.ceph.conf.clone().into()];
        let given = |flag: &str| {
            self.flags
                .iter()
                .map(String::as_str)
                .chain(flags.iter().copied())
                .any(|f| f == flag)
        };
        for (flag, value) in [
            ("--id", self.ceph.id.as_str()),
            ("-p", self.ceph.pool.as_str()),
            ("--namespace", self.namespace.as_str()),
            ("--mapper", "fuse"),
            ("--basesize", "1G"),
        ] {
            // A base size of the caller's replaces the 1 GiB default.
            if flag == "--basesize" && given(flag) {
                continue;
            }
            settings.push(flag.into());
            settings.push(value.into());
        }
        settings.push("-k".into());
        settings.push(self.ceph.keyring.clone().into());
        settings.extend(self.flags.iter().map(OsString::from));
        settings.extend(flags.iter().map(OsString::from));
        let mut args: Vec<OsString> = vec!["serve".into()];
        args.extend(settings.iter().cloned());
        args.extend(["--name".into(), self.plugin_name.clone().into()]);
        args.push("--run-dir".into());
        args.push(run_dir.path().into());
        let mut cfg = DockerdConfig::new(&self.plugin_name).in_host(&host);
        cfg.name = format!("fleet-{name}");
        let mut h = FleetHost {
            test: self.test.clone(),
            name: name.to_string(),
            bin: self.plugin_bin.clone(),
            args,
            settings,
            host,
            run_dir,
            plugin: None,
            past_logs: String::new(),
            dockerd: None,
            cfg,
        };
        h.try_start_plugin()?;
        match Dockerd::start(h.cfg.clone()) {
            Ok(d) => h.dockerd = Some(d),
            Err(e) => return Err(format!("dockerd: {e}\n{}", h.plugin_log_tail(40))),
        }
        Ok(h)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        crate::driver::remove_namespace(&self.test, &self.ioctx, &self.pool, &self.namespace);
    }
}

/// One host of a [`Fleet`]: a mount namespace, its plugin daemon and its
/// dockerd.
pub struct FleetHost {
    test: String,
    name: String,
    bin: PathBuf,
    args: Vec<OsString>,
    settings: Vec<OsString>,
    host: Host,
    run_dir: tempfile::TempDir,
    plugin: Option<Daemon>,
    past_logs: String,
    dockerd: Option<Dockerd>,
    cfg: DockerdConfig,
}

impl FleetHost {
    /// The host's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's mount namespace.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The pid of its `docker-rbd serve` while it runs.
    pub fn plugin_pid(&self) -> Option<i32> {
        self.plugin.as_ref().and_then(Daemon::pid)
    }

    /// Its dockerd (panics while it is down).
    pub fn dockerd(&self) -> &Dockerd {
        self.dockerd.as_ref().expect("the host's dockerd runs")
    }

    /// The driver's Home: `<data root>/<plugin name>`.
    pub fn driver_home(&self) -> PathBuf {
        self.dockerd().driver_home()
    }

    /// Its dockerd's data root.
    pub fn data_root(&self) -> PathBuf {
        self.dockerd().data_root()
    }

    fn try_start_plugin(&mut self) -> Result<(), String> {
        let mut cmd = self.host.command(&self.bin);
        // The test's own DOCKER_RBD_LOG (e.g. debug, to follow a failure),
        // else info.
        let log = std::env::var("DOCKER_RBD_LOG").unwrap_or_else(|_| "info".to_string());
        cmd.args(&self.args)
            .env("DOCKER_RBD_LOG", log)
            .env("NO_COLOR", "1");
        let socket = self
            .host
            .path(crate::dockerd::plugin_socket_path(&self.cfg.storage_driver));
        let mut daemon = Daemon::start(
            &format!("{}-{}", self.cfg.storage_driver, self.name),
            cmd,
            &socket,
            Duration::from_secs(60),
        )?;
        daemon.set_stop_timeout(Duration::from_secs(30));
        self.plugin = Some(daemon);
        Ok(())
    }

    /// Starts the host's plugin daemon (again), with the same flags and run
    /// directory.
    pub fn start_plugin(&mut self) {
        assert!(
            self.plugin.is_none(),
            "the plugin of {} runs already",
            self.name
        );
        if let Err(e) = self.try_start_plugin() {
            panic!(
                "[{}] host {}: docker-rbd serve did not start: {e}",
                self.test, self.name
            );
        }
    }

    fn retire_plugin(&mut self, kill: bool) {
        if let Some(mut p) = self.plugin.take() {
            self.past_logs.push_str(&p.log());
            let result = if kill { p.kill() } else { p.stop() };
            if let Err(e) = result {
                eprintln!(
                    "[{}] host {}: stopping the plugin: {e}",
                    self.test, self.name
                );
            }
        }
    }

    /// SIGKILLs the plugin daemon (its FUSE servers keep serving).
    pub fn kill_plugin(&mut self) {
        self.retire_plugin(true);
    }

    /// The plugin's log, across its restarts.
    pub fn plugin_log(&self) -> String {
        let mut log = self.past_logs.clone();
        if let Some(p) = &self.plugin {
            log.push_str(&p.log());
        }
        log
    }

    /// The logs (`server.log`) of the host's FUSE servers that are mapped
    /// now (a mapping's directory goes with its unmap).
    pub fn fuse_server_logs(&self) -> String {
        let mut out = String::new();
        let mut dirs = vec![self.driver_home().join("fuse")];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.filter_map(Result::ok) {
                let path = e.path();
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(path);
                } else if e.file_name() == "server.log" {
                    out.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
                }
            }
        }
        out
    }

    fn plugin_log_tail(&self, lines: usize) -> String {
        format!(
            "--- plugin log of {} ---\n{}",
            self.name,
            tail(&self.plugin_log(), lines)
        )
    }

    /// Stops dockerd gracefully and starts it again on the same data root:
    /// dockerd calls `Init` afresh and reads its files again.
    pub fn restart_dockerd(&mut self) {
        let d = self.dockerd.as_mut().expect("dockerd runs");
        if let Err(e) = d.restart() {
            panic!(
                "[{}] host {}: dockerd restart: {e}\n{}",
                self.test,
                self.name,
                self.plugin_log_tail(40)
            );
        }
    }

    /// A power cut: SIGKILL of the plugin, dockerd, containerd, the shims
    /// and the containers; then what the dead host left on this machine
    /// (mounts, loop devices, FUSE servers) is ended, as its reboot would.
    /// Its lease in RADOS is left to lapse. Boot it with
    /// [`FleetHost::start_again`].
    pub fn crash(&mut self) {
        let home = self.driver_home();
        // Once the FUSE servers are dead and their mounts gone, a loop
        // device on one names its file as "/image", no longer under the
        // Home: note them while they still do.
        let loops = crate::driver::loops_under(&home);
        for server in crate::driver::fuse_servers_under(&home) {
            let _ = crate::process::signal(server, nix::sys::signal::Signal::SIGKILL);
        }
        self.retire_plugin(true);
        if let Some(d) = self.dockerd.as_mut()
            && let Err(e) = d.crash()
        {
            eprintln!("[{}] host {}: crash: {e}", self.test, self.name);
        }
        let left = crate::driver::cleanup_home(&self.test, &home, Some(&self.host));
        let _ = left.finish();
        crate::driver::clear_loops(&self.test, &loops);
    }

    /// Boots the host again on its disk (same data root, run dir and
    /// flags): plugin first, then dockerd.
    pub fn start_again(&mut self) {
        if self.plugin.is_none() {
            self.start_plugin();
        }
        let d = self.dockerd.as_mut().expect("the host has a dockerd");
        if let Err(e) = d.restart() {
            panic!(
                "[{}] host {}: dockerd did not boot again: {e}\n{}",
                self.test,
                self.name,
                self.plugin_log_tail(40)
            );
        }
    }

    /// `docker <args>`, which must succeed; its stdout. On failure the
    /// panic shows docker's output and both daemons' logs.
    pub fn ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.dockerd().docker(&args);
        if !out.status.success() {
            panic!(
                "[{}] host {}: docker {:?} failed: {}\nstdout: {}\nstderr: {}\n--- dockerd log ---\n{}\n{}",
                self.test,
                self.name,
                args,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.dockerd().log_tail(40),
                self.plugin_log_tail(60)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `docker <args>`, which must fail; its stderr.
    pub fn fails<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.dockerd().docker(&args);
        assert!(
            !out.status.success(),
            "[{}] host {}: docker {:?} succeeded but must fail; stdout: {}",
            self.test,
            self.name,
            args,
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Runs `docker-rbd <command> <this host's settings flags> <args>`
    /// inside the host (e.g. `takeover`), bounded by two minutes.
    pub fn docker_rbd(&self, command: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = self.host.command(&self.bin);
        cmd.arg(command)
            .args(&self.settings)
            .args(args)
            .env("NO_COLOR", "1");
        crate::process::run_with_timeout(cmd, None, Duration::from_secs(120)).unwrap_or_else(|e| {
            panic!(
                "[{}] host {}: docker-rbd {command}: {e}",
                self.test, self.name
            )
        })
    }

    /// Freezes the host's docker-rbd: SIGSTOP to the plugin daemon and
    /// its FUSE servers, as a host that hangs (or is cut off) would.
    pub fn freeze(&self) {
        self.signal_driver(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Resumes what [`FleetHost::freeze`] stopped.
    pub fn thaw(&self) {
        self.signal_driver(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal_driver(&self, sig: nix::sys::signal::Signal) {
        let pids = self
            .plugin
            .as_ref()
            .and_then(Daemon::pid)
            .into_iter()
            .chain(crate::driver::fuse_servers_under(&self.driver_home()));
        for pid in pids {
            if let Err(e) = crate::process::signal(pid, sig) {
                eprintln!("[{}] host {}: {sig} to {pid}: {e}", self.test, self.name);
            }
        }
    }

    /// The run directory given to `docker-rbd serve --run-dir`.
    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }
}

impl Drop for FleetHost {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("[{}] failed; {}", self.test, self.plugin_log_tail(60));
            if let Some(d) = &self.dockerd {
                eprintln!("--- dockerd log of {} ---\n{}", self.name, d.log_tail(40));
            }
        }
        let home = self.dockerd.as_ref().map(Dockerd::driver_home);
        // dockerd first, gracefully, while the plugin still serves: it
        // stops its containers and Puts their layers.
        if let Some(pid) = self.dockerd.as_ref().and_then(Dockerd::pid)
            && let Err(e) = crate::process::terminate(pid, Duration::from_secs(60))
        {
            eprintln!("[{}] host {}: cleanup: dockerd: {e}", self.test, self.name);
        }
        self.retire_plugin(false);
        let left = home
            .as_ref()
            .map(|home| crate::driver::cleanup_home(&self.test, home, Some(&self.host)));
        drop(self.dockerd.take());
        if let Some(left) = left {
            let _ = left.finish();
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
