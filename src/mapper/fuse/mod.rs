//! The fuse mapper: an RBD image as a file on a FUSE mount, served by
//! librbd, with a loop device on that file.
//!
//! For kernels with neither rbd nor nbd (FUSE and loop are everywhere).
//!
//! # One server process per image
//!
//! Each mapped image is served by its own small process (the
//! `docker-rbd-fuse` binary, or `docker-rbd fuse-serve`; entry point
//! [`serve_main`]), not by the daemon. A FUSE mount dies with the process
//! that serves it, and a loop device on a dead FUSE file fails every I/O,
//! so if the daemon served the images itself, a crash or an upgrade restart
//! of the daemon would break the root file system of every running
//! container. The server process is started in its own session (so it does
//! not get the daemon's terminal signals) and keeps running when the daemon
//! dies; the restarted daemon [adopts](FuseMapper::adopt) the loop device
//! and mount from its state directory. Under systemd, the daemon's unit
//! needs `KillMode=process` (as `docker.service` has for its shims), or
//! stopping the daemon stops the servers too.
//!
//! The server marks itself `PR_SET_IO_FLUSHER` (it sits in a block
//! device's write-back path) and lowers its OOM score. If it dies anyway
//! the mapping cannot be revived: [`FuseMapper::adopt`] reports it
//! [stale](Error::Stale) and [`FuseMapper::unmap`] cleans it up.
//!
//! # Files
//!
//! Per mapping, under [`FuseConfig::run_dir`] (`/run/docker-rbd/fuse`), a
//! directory named after the image spec holds `mnt/` (the FUSE mount, whose
//! only file is `mnt/image`), `state.json` (what the daemon needs to find
//! the mapping again) and `server.log` (the server's log).
//!
//! # Map and unmap
//!
//! map: start the server, wait for its readiness line, attach a loop device
//! to `mnt/image` (`LOOP_CONFIGURE`, read-only for read-only requests,
//! direct I/O when configured, no autoclear), record it.
//!
//! Starting a server is mostly the process start and its cluster connect
//! (about 40 of its 50 ms), so the mapper keeps one *standby* server
//! connected ahead of need ([`FuseConfig::standby`]) and hands it the next
//! image ([`serve::Assignment`]): a map then costs the image's open, the
//! FUSE mount and the loop device. A new standby is started after each map
//! that took one, off the request's path; one that died or cannot take the
//! assignment is replaced by a fresh server, so a standby never makes a
//! map fail that would have worked without it. Its log is
//! `+standby.<daemon pid>.<n>.log` in the run directory until it is
//! assigned (then it moves into the mapping's directory); it exits when the
//! mapper is dropped or its daemon dies.
//!
//! unmap: detach the loop device (refused with [`Error::Busy`] while it is
//! mounted), unmount the FUSE file system (retried while the kernel drops
//! its last reference to the image file), wait for the server to exit (it
//! exits when its mount goes away, after flushing the image), remove the
//! state directory.
//!
//! # Speed
//!
//! The server runs several FUSE worker threads (8 by default), accepts
//! 1 MiB requests and asynchronous direct I/O, reuses one read buffer per
//! thread, and the loop device uses direct I/O on the image file so that
//! data is cached once (in the page cache of the file system on the loop
//! device), not twice; without it, buffered writes through FUSE ran at
//! about half the speed. `examples/fuse_mapper_bench.rs` compares the
//! mapper with `rbd bench` on the same cluster, in the same run, with 16
//! requests in flight. On a single-node memstore test cluster on a shared
//! two-core machine (1 GiB sequential, 64 MiB random, median of 3 rounds;
//! expect noise of ±30% between runs) it measured:
//!
//! | workload | `rbd bench` (librbd) | fuse + loop |
//! |---|---|---|
//! | sequential write, 4 MiB | 1266 MB/s | 846 MB/s |
//! | sequential read, 4 MiB | 1790 MB/s | 976 MB/s |
//! | random write, 4 KiB | 5299 IOPS | 4808 IOPS |
//! | random read, 4 KiB | 7447 IOPS | 6744 IOPS |
//!
//! 8 and 16 worker threads and `FOPEN_DIRECT_IO` made no difference beyond
//! that noise; the extra copy through the kernel is what sequential I/O
//! pays.
//!
//! # Limits
//!
//! The image file's size is read when the server starts: growing the
//! image while it is mapped is not seen until it is mapped again. A server
//! that dies (killed, crashed) takes its mapping with it; the kernel's FUSE
//! connection cannot be handed to a new process.

pub mod backend;
pub mod fs;
pub mod loopdev;
pub mod rbd;
pub mod serve;

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use self::backend::{AnyBackend, BlockBackend, SparseFileBackend};
pub use self::serve::{ServeArgs, serve_main};
use super::{
    CephConnection, Error, ImageSpec, MapRequest, MappedDevice, MapperKind, MappingHandle, Result,
    sys,
};

/// How the daemon starts a FUSE server process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperCommand {
    /// The program.
    pub program: PathBuf,
    /// Arguments before the server's own (e.g. `fuse-serve`).
    pub args: Vec<OsString>,
}

impl HelperCommand {
    /// A dedicated server binary (e.g. `docker-rbd-fuse`).
    pub fn binary(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
        }
    }

    /// `docker-rbd-fuse` next to the running executable when it exists,
    /// else the running executable with the `fuse-serve` subcommand.
    pub fn locate() -> Self {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("docker-rbd"));
        if let Some(sibling) = exe.parent().map(|d| d.join("docker-rbd-fuse"))
            && sibling.is_file()
        {
            return Self::binary(sibling);
        }
        Self {
            program: exe,
            args: vec!["fuse-serve".into()],
        }
    }
}

/// Settings of the fuse mapper.
#[derive(Debug, Clone)]
pub struct FuseConfig {
    /// How to reach the cluster.
    pub ceph: CephConnection,
    /// Where per-mapping directories live.
    pub run_dir: PathBuf,
    /// The server process.
    pub helper: HelperCommand,
    /// FUSE worker threads per image.
    pub threads: usize,
    /// Largest FUSE request, bytes.
    pub max_write: u32,
    /// `FOPEN_DIRECT_IO` on the image file (bypass its page cache).
    pub fuse_direct_io: bool,
    /// Loop device direct I/O on the image file.
    pub loop_direct_io: bool,
    /// Bound on connecting to Ceph and mounting.
    pub start_timeout: Duration,
    /// Bound on each unmap step (loop detach, FUSE unmount, server exit).
    pub stop_timeout: Duration,
    /// Keep one server connected to the cluster ahead of need, for the
    /// next RBD image mapped (module docs, "Map and unmap").
    pub standby: bool,
}

impl FuseConfig {
    /// Defaults: `/run/docker-rbd/fuse`, [`HelperCommand::locate`], 8
    /// threads, 1 MiB requests, loop direct I/O.
    pub fn new(ceph: CephConnection) -> Self {
        Self {
            ceph,
            run_dir: PathBuf::from("/run/docker-rbd/fuse"),
            helper: HelperCommand::locate(),
            threads: 8,
            max_write: 1 << 20,
            fuse_direct_io: false,
            loop_direct_io: true,
            start_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(30),
            standby: true,
        }
    }
}

/// What the fuse mapper records about a mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuseHandle {
    /// N of `/dev/loopN`.
    pub loop_number: u32,
    /// The FUSE mount (its file `image` backs the loop device).
    pub mountpoint: PathBuf,
    /// The mapping's state directory.
    pub state_dir: PathBuf,
    /// The FUSE server process.
    pub server_pid: i32,
    /// When the server started ([`sys::start_time`]): with the pid, names
    /// the process for good. Absent in mappings made before it was kept;
    /// those are recognised by the mountpoint in the server's command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_start: Option<u64>,
}

impl FuseHandle {
    /// Whether the mapping's server still runs.
    pub fn server_alive(&self) -> bool {
        match self.server_start {
            Some(start) => sys::process_is(self.server_pid, start),
            None => sys::process_matches(self.server_pid, &self.mountpoint.display().to_string()),
        }
    }

    /// The image file the loop device is attached to.
    pub fn image_file(&self) -> PathBuf {
        self.mountpoint.join(fs::IMAGE_FILE)
    }
}

/// `state.json`: written once the server runs, completed once the loop
/// device is attached.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateFile {
    spec: ImageSpec,
    read_only: bool,
    server_pid: i32,
    #[serde(default)]
    server_start: Option<u64>,
    loop_number: Option<u32>,
}

const STATE_FILE: &str = "state.json";
/// Standby logs are `+standby.<daemon pid>.<n>.log` in the run directory:
/// `+` is escaped in every mapping's directory name ([`dir_name`]).
const STANDBY_PREFIX: &str = "+standby.";
const LOG_FILE: &str = "server.log";
const MOUNT_DIR: &str = "mnt";

/// What a FUSE server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Rbd { exclusive: bool },
    File(PathBuf),
}

/// Maps images as loop devices on FUSE files.
#[derive(Debug)]
pub struct FuseMapper {
    config: FuseConfig,
    /// Serialises map and unmap of one image within this process; different
    /// images map in parallel.
    locks: KeyLocks,
    /// The server started ahead of need, if any.
    standby: Mutex<Option<Standby>>,
    /// Numbers standby logs.
    standby_seq: std::sync::atomic::AtomicU64,
}

/// A server connected to the cluster and waiting for its image. Dropped,
/// `assign` closes (the server sees its end and exits) and its log goes.
#[derive(Debug)]
struct Standby {
    pid: i32,
    start: Option<u64>,
    /// Where its assignment is written.
    assign: File,
    /// Its readiness line, once assigned.
    ready: File,
    log: StandbyLog,
}

/// A standby's log in the run directory, removed on drop unless it was
/// moved into a mapping's directory (`None`).
#[derive(Debug)]
struct StandbyLog(Option<PathBuf>);

impl Drop for StandbyLog {
    fn drop(&mut self) {
        if let Some(log) = &self.0
            && let Err(e) = std::fs::remove_file(log)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::debug!(error = %e, log = %log.display(), "cannot remove a standby log");
        }
    }
}

impl FuseMapper {
    /// A fuse mapper; creates `run_dir`.
    pub fn new(config: FuseConfig) -> Result<Self> {
        std::fs::create_dir_all(&config.run_dir)
            .map_err(|e| Error::io("create", &config.run_dir, e))?;
        remove_dead_standby_logs(&config.run_dir);
        Ok(Self {
            config,
            locks: KeyLocks::default(),
            standby: Mutex::new(None),
            standby_seq: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The settings.
    pub fn config(&self) -> &FuseConfig {
        &self.config
    }

    /// The state directory for `spec`.
    pub fn state_dir(&self, spec: &ImageSpec) -> PathBuf {
        self.config.run_dir.join(dir_name(spec))
    }

    /// Maps an RBD image.
    #[tracing::instrument(skip(self), fields(spec = %req.spec(), read_only = req.read_only))]
    pub fn map(&self, req: &MapRequest) -> Result<MappedDevice> {
        self.map_source(
            req,
            Source::Rbd {
                exclusive: req.exclusive,
            },
        )
    }

    /// Maps a regular file instead of an RBD image, under the name of
    /// `label`'s image (for tests and benchmarks without a cluster).
    #[tracing::instrument(skip(self), fields(spec = %label.spec(), path = %path.display()))]
    pub fn map_file(&self, path: &Path, label: &MapRequest) -> Result<MappedDevice> {
        let path = path
            .canonicalize()
            .map_err(|e| Error::io("resolve", path, e))?;
        self.map_source(label, Source::File(path))
    }

    fn map_source(&self, req: &MapRequest, source: Source) -> Result<MappedDevice> {
        let spec = req.spec();
        spec.validate()?;
        let read_only = req.effective_read_only();
        let dir = self.state_dir(&spec);
        let _guard = self.locks.lock(&dir);
        if dir.exists() {
            match read_state(&dir) {
                Ok(Some(state)) if state.loop_number.is_some() => {
                    let existing = state_to_device(&dir, &state);
                    match self.check_live(&existing) {
                        Ok(()) => {
                            return Err(Error::AlreadyMapped {
                                spec: spec.to_string(),
                                device: existing.device,
                            });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cleaning up a stale mapping before mapping again");
                        }
                    }
                }
                Ok(_) => tracing::warn!(dir = %dir.display(), "cleaning up an unfinished mapping"),
                Err(e) => tracing::warn!(error = %e, "cleaning up an unreadable mapping"),
            }
            self.teardown_dir(&dir, &spec)?;
        }
        let mountpoint = dir.join(MOUNT_DIR);
        std::fs::create_dir_all(&mountpoint).map_err(|e| Error::io("create", &mountpoint, e))?;

        let started = self.start_server(&dir, &spec, read_only, &source);
        if matches!(source, Source::Rbd { .. }) {
            self.replenish_standby();
        }
        let (server_pid, server_start) = match started {
            Ok(server) => server,
            Err(e) => {
                if let Err(cleanup) = self.teardown_dir(&dir, &spec) {
                    tracing::warn!(error = %cleanup, "cleanup after a failed start failed");
                }
                return Err(e);
            }
        };
        let mut state = StateFile {
            spec: spec.clone(),
            read_only,
            server_pid,
            server_start,
            loop_number: None,
        };
        let attached = write_state(&dir, &state).and_then(|()| {
            let image = mountpoint.join(fs::IMAGE_FILE);
            loopdev::attach(&image, read_only, self.config.loop_direct_io)
                .map_err(|e| loop_error(e, &image))
        });
        let attached = match attached.and_then(|a| {
            state.loop_number = Some(a.number);
            write_state(&dir, &state).map(|()| a)
        }) {
            Ok(a) => a,
            Err(e) => {
                if let Err(cleanup) = self.teardown_dir(&dir, &spec) {
                    tracing::warn!(error = %cleanup, "cleanup after a failed attach failed");
                }
                return Err(e);
            }
        };
        tracing::info!(device = %attached.device.display(), server_pid, direct_io = attached.direct_io, "mapped with fuse");
        Ok(state_to_device(&dir, &state))
    }

    fn server_args(
        &self,
        mountpoint: &Path,
        spec: &ImageSpec,
        read_only: bool,
        source: &Source,
    ) -> Vec<OsString> {
        let mut args: Vec<OsString> = self.config.helper.args.clone();
        let mut push = |k: &str, v: OsString| {
            args.push(k.into());
            args.push(v);
        };
        push("--mountpoint", mountpoint.into());
        match source {
            Source::File(path) => push("--file", path.into()),
            Source::Rbd { .. } => {
                push("--pool", spec.pool.clone().into());
                if let Some(ns) = &spec.namespace {
                    push("--namespace", ns.into());
                }
                push("--image", spec.image.clone().into());
                if let Some(snap) = &spec.snap {
                    push("--snap", snap.into());
                }
            }
        }
        if read_only {
            args.push("--read-only".into());
        }
        if matches!(source, Source::Rbd { exclusive: true }) {
            args.push("--exclusive".into());
        }
        self.push_common_args(&mut args, matches!(source, Source::Rbd { .. }));
        args
    }

    /// A standby's arguments, before `--ready-fd`.
    fn standby_args(&self, assign_fd: i32) -> Vec<OsString> {
        let mut args: Vec<OsString> = self.config.helper.args.clone();
        args.extend([
            "--standby-fd".into(),
            assign_fd.to_string().into(),
            "--standby-in".into(),
            self.config.run_dir.clone().into(),
        ]);
        self.push_common_args(&mut args, true);
        args
    }

    /// What every server gets: its tuning and, for RBD, the cluster.
    fn push_common_args(&self, args: &mut Vec<OsString>, rbd: bool) {
        let mut push = |k: &str, v: OsString| {
            args.push(k.into());
            args.push(v);
        };
        push("--threads", self.config.threads.to_string().into());
        push("--max-write", self.config.max_write.to_string().into());
        push(
            "--connect-timeout",
            // Leave the server time to report a Ceph timeout before our
            // own readiness wait gives up on it.
            (self.config.start_timeout.as_secs() * 3 / 4)
                .max(1)
                .to_string()
                .into(),
        );
        if rbd {
            let c = &self.config.ceph;
            if let Some(v) = &c.conf {
                push("--conf", v.into());
            }
            if let Some(v) = &c.id {
                push("--id", v.into());
            }
            if let Some(v) = &c.keyring {
                push("--keyring", v.into());
            }
            if let Some(v) = &c.cluster {
                push("--cluster", v.into());
            }
        }
        if self.config.fuse_direct_io {
            args.push("--direct-io".into());
        }
    }

    /// Spawns the server program with `args`, its output appended to
    /// `log_path`, in a session of its own, with descriptors `keep` (else
    /// close-on-exec) left open for it; a thread reaps it. Its pid and
    /// start time.
    fn spawn(
        &self,
        args: Vec<OsString>,
        log_path: &Path,
        keep: [i32; 2],
    ) -> Result<(i32, Option<u64>)> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|e| Error::io("open", log_path, e))?;
        let log_err = log.try_clone().map_err(|e| Error::io("dup", log_path, e))?;
        let mut cmd = Command::new(&self.config.helper.program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe calls (setsid, fcntl) on plain integers.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Let our pipe ends survive exec in this child only.
                for fd in keep.into_iter().filter(|&fd| fd >= 0) {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            command: format!("{} (FUSE server)", self.config.helper.program.display()),
            source,
        })?;
        let pid = child.id() as i32;
        let start = sys::start_time(pid);
        tracing::debug!(pid, "FUSE server started");
        // Reap the server when it exits while we run; if we die first, init does.
        let reaper = std::thread::Builder::new()
            .name(format!("reap-{pid}"))
            .spawn(move || {
                let _ = child.wait();
            });
        if let Err(e) = reaper {
            tracing::warn!(error = %e, pid, "cannot start a reaper thread; the server will stay a zombie after exit");
        }
        Ok((pid, start))
    }

    /// Starts a standby unless one is there (or standbys are off); a
    /// failure is logged: the next map starts its own server.
    fn replenish_standby(&self) {
        if !self.config.standby {
            return;
        }
        let mut slot = self.standby.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return;
        }
        match self.spawn_standby() {
            Ok(standby) => {
                tracing::debug!(pid = standby.pid, "standby FUSE server started");
                *slot = Some(standby);
            }
            Err(e) => tracing::warn!(error = %e, "cannot start a standby FUSE server"),
        }
    }

    fn spawn_standby(&self) -> Result<Standby> {
        let n = self
            .standby_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self
            .config
            .run_dir
            .join(format!("{STANDBY_PREFIX}{}.{n}.log", std::process::id()));
        let pipe = || {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| Error::io("pipe", &self.config.run_dir, e.into()))
        };
        let (assign_rd, assign_wr) = pipe()?;
        let (ready_rd, ready_wr) = pipe()?;
        let mut args = self.standby_args(assign_rd.as_raw_fd());
        args.push("--ready-fd".into());
        args.push(ready_wr.as_raw_fd().to_string().into());
        let (pid, start) = self.spawn(args, &log, [assign_rd.as_raw_fd(), ready_wr.as_raw_fd()])?;
        Ok(Standby {
            pid,
            start,
            assign: File::from(assign_wr),
            ready: File::from(ready_rd),
            log: StandbyLog(Some(log)),
        })
    }

    /// Hands the standby, if there is a live one, the image; its pid, start
    /// time and readiness pipe. `None`: start a server of its own.
    fn assign_standby(
        &self,
        dir: &Path,
        spec: &ImageSpec,
        read_only: bool,
        source: &Source,
    ) -> Option<(i32, Option<u64>, File)> {
        use std::io::Write;
        let Source::Rbd { exclusive } = source else {
            return None;
        };
        let mut standby = self
            .standby
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        let alive = standby
            .start
            .is_some_and(|s| sys::process_is(standby.pid, s));
        if !alive {
            let log = standby.log.0.as_deref().map(|l| tail(l, 500));
            tracing::warn!(
                pid = standby.pid,
                log = log.unwrap_or_default(),
                "the standby FUSE server is gone; starting one for this image"
            );
            return None;
        }
        let assignment = serve::Assignment {
            mountpoint: dir.join(MOUNT_DIR),
            pool: spec.pool.clone(),
            namespace: spec.namespace.clone(),
            image: spec.image.clone(),
            snap: spec.snap.clone(),
            read_only,
            exclusive: *exclusive,
        };
        let handed = serde_json::to_string(&assignment)
            .map_err(std::io::Error::other)
            .and_then(|mut line| {
                if let Some(log) = &standby.log.0 {
                    std::fs::rename(log, dir.join(LOG_FILE))?;
                    // The mapping's log now: not removed with the standby.
                    standby.log.0 = None;
                }
                line.push('\n');
                standby.assign.write_all(line.as_bytes())
            });
        if let Err(e) = handed {
            tracing::warn!(pid = standby.pid, error = %e, "cannot hand the image to the standby FUSE server; starting one for it");
            return None;
        }
        tracing::debug!(pid = standby.pid, "image handed to the standby FUSE server");
        Some((standby.pid, standby.start, standby.ready))
    }

    /// Starts the server (the standby, if there is one) and waits for its
    /// readiness line; returns its pid and start time.
    fn start_server(
        &self,
        dir: &Path,
        spec: &ImageSpec,
        read_only: bool,
        source: &Source,
    ) -> Result<(i32, Option<u64>)> {
        let log_path = dir.join(LOG_FILE);
        let started = Instant::now();
        let (pid, start, ready_rd, standby) =
            match self.assign_standby(dir, spec, read_only, source) {
                Some((pid, start, ready)) => (pid, start, ready, true),
                None => {
                    let (ready_rd, ready_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                        .map_err(|e| Error::io("pipe", dir, e.into()))?;
                    let mut args = self.server_args(&dir.join(MOUNT_DIR), spec, read_only, source);
                    args.push("--ready-fd".into());
                    args.push(ready_wr.as_raw_fd().to_string().into());
                    let (pid, start) = self.spawn(args, &log_path, [ready_wr.as_raw_fd(), -1])?;
                    (pid, start, File::from(ready_rd), false)
                }
            };
        let line = read_line_with_timeout(ready_rd, self.config.start_timeout);
        let failed = |errno: Option<i32>, message: String| {
            let log = tail(&log_path, 2000);
            Error::HelperStart {
                spec: spec.to_string(),
                errno,
                message,
                log,
            }
        };
        let ready = match line {
            Ok(Some(line)) => serde_json::from_str::<serve::Ready>(&line)
                .map_err(|e| failed(None, format!("unreadable readiness line {line:?}: {e}")))?,
            Ok(None) => {
                sys::wait_exit(pid, Duration::from_secs(2));
                return Err(failed(None, "it exited without reporting".to_string()));
            }
            Err(timeout) => {
                tracing::error!(
                    pid,
                    ?timeout,
                    "FUSE server did not become ready; killing it"
                );
                // SAFETY: kill with a pid we started and a valid signal.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                sys::wait_exit(pid, Duration::from_secs(5));
                return Err(failed(
                    Some(libc::ETIMEDOUT),
                    format!("not ready within {timeout:?}"),
                ));
            }
        };
        if !ready.ok {
            sys::wait_exit(pid, Duration::from_secs(5));
            return Err(failed(ready.errno, ready.message));
        }
        tracing::info!(
            pid,
            standby,
            size = ready.size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "FUSE server ready"
        );
        Ok((pid, start))
    }

    /// Detaches, unmounts, stops the server and removes the state directory.
    /// [`Error::Busy`] while the loop device is mounted.
    #[tracing::instrument(skip(self, dev), fields(device = %dev.device.display(), spec = %dev.spec))]
    pub fn unmap(&self, dev: &MappedDevice) -> Result<()> {
        let MappingHandle::Fuse(handle) = &dev.handle else {
            return Err(Error::WrongMapper {
                expected: MapperKind::Fuse,
                found: dev.kind(),
            });
        };
        let _guard = self.locks.lock(&handle.state_dir);
        if !handle.state_dir.starts_with(&self.config.run_dir) {
            return Err(Error::InvalidRequest {
                field: "state_dir",
                value: handle.state_dir.display().to_string(),
                reason: "is not under this mapper's run directory",
            });
        }
        self.teardown(handle, &dev.spec)?;
        remove_dir(&handle.state_dir)
    }

    fn teardown_dir(&self, dir: &Path, spec: &ImageSpec) -> Result<()> {
        let state = read_state(dir).ok().flatten();
        let handle = FuseHandle {
            loop_number: state
                .as_ref()
                .and_then(|s| s.loop_number)
                .unwrap_or(u32::MAX),
            mountpoint: dir.join(MOUNT_DIR),
            state_dir: dir.to_path_buf(),
            server_pid: state.as_ref().map(|s| s.server_pid).unwrap_or(0),
            server_start: state.as_ref().and_then(|s| s.server_start),
        };
        self.teardown(&handle, spec)?;
        remove_dir(dir)
    }

    fn teardown(&self, handle: &FuseHandle, spec: &ImageSpec) -> Result<()> {
        let image = handle.image_file();
        let wait = self.config.stop_timeout;
        // 1. The loop device, if it is still ours.
        if handle.loop_number != u32::MAX
            && loopdev::backing_file(handle.loop_number).as_deref() == Some(image.as_path())
        {
            loopdev::detach(handle.loop_number, wait).map_err(|e| match e {
                loopdev::LoopError::Busy { path }
                | loopdev::LoopError::DetachTimeout { path, .. } => Error::Busy {
                    device: path,
                    detail: Some("mounted or held open".to_string()),
                },
                other => loop_error(other, &image),
            })?;
        }
        // Loop devices we lost track of (a crash between attach and record).
        for (number, backing) in loopdev::backed_under(&handle.state_dir) {
            tracing::warn!(loop_number = number, backing = %backing.display(), "detaching an unrecorded loop device");
            loopdev::detach(number, wait).map_err(|e| match e {
                loopdev::LoopError::Busy { path }
                | loopdev::LoopError::DetachTimeout { path, .. } => Error::Busy {
                    device: path,
                    detail: Some("unrecorded loop device in use".to_string()),
                },
                other => loop_error(other, &image),
            })?;
        }
        // 2. The FUSE mount. The kernel drops the loop device's reference to
        // the image file shortly after the detach; EBUSY until then.
        let server_alive = handle.server_alive();
        unmount(&handle.mountpoint, server_alive, wait)?;
        // 3. The server exits once its mount is gone.
        if server_alive && !sys::wait_exit(handle.server_pid, wait) {
            tracing::warn!(
                pid = handle.server_pid,
                "FUSE server still running after unmount; killing it"
            );
            // SAFETY: kill with a pid checked to be our server, valid signal.
            unsafe { libc::kill(handle.server_pid, libc::SIGKILL) };
            if !sys::wait_exit(handle.server_pid, Duration::from_secs(5)) {
                return Err(Error::HelperStuck {
                    spec: spec.to_string(),
                    pid: handle.server_pid,
                    waited: wait,
                });
            }
        }
        Ok(())
    }

    /// Every mapping with a state directory under `run_dir`.
    pub fn list(&self) -> Result<Vec<MappedDevice>> {
        let run_dir = &self.config.run_dir;
        let entries = match std::fs::read_dir(run_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("read", run_dir, e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read", run_dir, e))?;
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                // Standby logs.
                continue;
            }
            let dir = entry.path();
            match read_state(&dir) {
                Ok(Some(state)) if state.loop_number.is_some() => {
                    found.push(state_to_device(&dir, &state))
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, dir = %dir.display(), "unreadable fuse mapping state")
                }
            }
        }
        found.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(found)
    }

    /// Checks that the recorded mapping is intact: server running, FUSE
    /// mount present, loop device still on its image file.
    pub fn adopt(&self, dev: &MappedDevice) -> Result<MappedDevice> {
        if !matches!(dev.handle, MappingHandle::Fuse(_)) {
            return Err(Error::WrongMapper {
                expected: MapperKind::Fuse,
                found: dev.kind(),
            });
        }
        self.check_live(dev)?;
        let MappingHandle::Fuse(handle) = &dev.handle else {
            return Ok(dev.clone());
        };
        let mut current = dev.clone();
        // The kernel's own view of the device (LOOP_GET_STATUS64).
        current.read_only = match loopdev::status(handle.loop_number) {
            Ok(Some(info)) => info.flags() & loopdev::LO_FLAGS_READ_ONLY != 0,
            Ok(None) => {
                return Err(Error::Stale {
                    spec: dev.spec.to_string(),
                    device: dev.device.clone(),
                    reason: "the loop device was detached".to_string(),
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "LOOP_GET_STATUS64 failed; reading sysfs");
                loopdev::read_only(handle.loop_number)
            }
        };
        Ok(current)
    }

    fn check_live(&self, dev: &MappedDevice) -> Result<()> {
        let MappingHandle::Fuse(handle) = &dev.handle else {
            return Err(Error::WrongMapper {
                expected: MapperKind::Fuse,
                found: dev.kind(),
            });
        };
        let stale = |reason: String| Error::Stale {
            spec: dev.spec.to_string(),
            device: dev.device.clone(),
            reason,
        };
        if !handle.server_alive() {
            return Err(stale(format!(
                "its FUSE server (pid {}) is gone",
                handle.server_pid
            )));
        }
        match sys::mount_at(&handle.mountpoint) {
            Some(m) if m.fstype.starts_with("fuse") => {}
            Some(m) => {
                return Err(stale(format!(
                    "{} is a {} mount",
                    handle.mountpoint.display(),
                    m.fstype
                )));
            }
            None => {
                return Err(stale(format!(
                    "{} is not mounted",
                    handle.mountpoint.display()
                )));
            }
        }
        let image = handle.image_file();
        match loopdev::backing_file(handle.loop_number) {
            Some(b) if b == image => Ok(()),
            Some(b) => Err(stale(format!(
                "{} is now backed by {}",
                dev.device.display(),
                b.display()
            ))),
            None => Err(stale(format!("{} is not attached", dev.device.display()))),
        }
    }
}

/// Per-key mutual exclusion: one map or unmap per state directory at a time.
#[derive(Debug, Default)]
struct KeyLocks {
    busy: Mutex<HashSet<PathBuf>>,
    released: Condvar,
}

struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    key: PathBuf,
}

impl KeyLocks {
    fn lock(&self, key: &Path) -> KeyGuard<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while busy.contains(key) {
            busy = self.released.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        busy.insert(key.to_path_buf());
        KeyGuard {
            locks: self,
            key: key.to_path_buf(),
        }
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.locks.busy.lock().unwrap_or_else(|p| p.into_inner());
        busy.remove(&self.key);
        self.locks.released.notify_all();
    }
}

fn loop_error(e: loopdev::LoopError, image: &Path) -> Error {
    match e {
        loopdev::LoopError::Io { op, path, source } => Error::Io { op, path, source },
        loopdev::LoopError::Busy { path } => Error::Busy {
            device: path,
            detail: None,
        },
        other => Error::Io {
            op: "attach a loop device to",
            path: image.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::ResourceBusy, other.to_string()),
        },
    }
}

/// Unmounts the FUSE file system at `mountpoint`: retried on EBUSY for up
/// to `wait`; a dead server's mount is detached lazily.
fn unmount(mountpoint: &Path, server_alive: bool, wait: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        match sys::mount_at(mountpoint) {
            Some(m) if m.fstype.starts_with("fuse") => {}
            Some(m) => {
                return Err(Error::Busy {
                    device: mountpoint.to_path_buf(),
                    detail: Some(format!(
                        "a {} file system is mounted over the FUSE mount",
                        m.fstype
                    )),
                });
            }
            None => return Ok(()),
        }
        let flags = if server_alive {
            nix::mount::MntFlags::empty()
        } else {
            nix::mount::MntFlags::MNT_DETACH
        };
        match nix::mount::umount2(mountpoint, flags) {
            Ok(()) => {
                tracing::debug!(mountpoint = %mountpoint.display(), "FUSE file system unmounted");
                return Ok(());
            }
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) if started.elapsed() < wait => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(nix::errno::Errno::EBUSY) => {
                return Err(Error::Busy {
                    device: mountpoint.to_path_buf(),
                    detail: Some("the image file is still open".to_string()),
                });
            }
            Err(e) => return Err(Error::io("unmount", mountpoint, e.into())),
        }
    }
}

/// Removes the logs of standbys whose daemon is gone (a standby exits with
/// its daemon; its log stays for whoever looks, until the next start).
fn remove_dead_standby_logs(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix(STANDBY_PREFIX))
            .and_then(|rest| rest.split('.').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if sys::start_time(owner).is_none() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", dir, e)),
    }
}

fn state_to_device(dir: &Path, state: &StateFile) -> MappedDevice {
    let loop_number = state.loop_number.unwrap_or(u32::MAX);
    MappedDevice {
        device: loopdev::device_path(loop_number),
        spec: state.spec.clone(),
        read_only: state.read_only,
        handle: MappingHandle::Fuse(FuseHandle {
            loop_number,
            mountpoint: dir.join(MOUNT_DIR),
            state_dir: dir.to_path_buf(),
            server_pid: state.server_pid,
            server_start: state.server_start,
        }),
    }
}

fn read_state(dir: &Path) -> Result<Option<StateFile>> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(raw) => serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| Error::Parse {
                command: path.display().to_string(),
                reason: e.to_string(),
                output: String::from_utf8_lossy(&raw).chars().take(500).collect(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", path, e)),
    }
}

/// Writes `state.json` atomically (temporary file, fsync, rename).
fn write_state(dir: &Path, state: &StateFile) -> Result<()> {
    use std::io::Write;
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(".state.json.tmp");
    let raw = serde_json::to_vec_pretty(state).map_err(|e| Error::io("encode", &path, e.into()))?;
    let mut f = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
    f.write_all(&raw)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io("rename", &path, e))
}

/// The state directory name of `spec`: its `pool/ns/image@snap` spelling
/// with everything but `[A-Za-z0-9._-]` percent-escaped; long names are
/// cut and suffixed with a hash to stay within NAME_MAX.
pub fn dir_name(spec: &ImageSpec) -> String {
    let text = spec.to_string();
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() > 200 {
        // FNV-1a: stable across builds, unlike the std hasher.
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        out.truncate(180);
        out.push_str(&format!("~{hash:016x}"));
    }
    out
}

/// Reads one line from `f`, up to `timeout`. `Ok(None)` on EOF without a
/// line; `Err(timeout)` when time ran out.
fn read_line_with_timeout(
    mut f: File,
    timeout: Duration,
) -> std::result::Result<Option<String>, Duration> {
    let started = Instant::now();
    let mut buf = Vec::new();
    loop {
        if let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            return Ok(Some(String::from_utf8_lossy(&buf[..nl]).into_owned()));
        }
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(timeout);
        }
        let mut pfd = [nix::poll::PollFd::new(
            f.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return Ok(None),
        }
        let mut chunk = [0u8; 4096];
        match f.read(&mut chunk) {
            Ok(0) => {
                return Ok((!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).into_owned()));
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(None),
        }
    }
}

/// The last `max` bytes of a file, for error messages.
fn tail(path: &Path, max: usize) -> String {
    let Ok(raw) = std::fs::read(path) else {
        return String::new();
    };
    let start = raw.len().saturating_sub(max);
    String::from_utf8_lossy(&raw[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn spec(image: &str, ns: Option<&str>, snap: Option<&str>) -> ImageSpec {
        ImageSpec {
            pool: "rbd".into(),
            namespace: ns.map(Into::into),
            image: image.into(),
            snap: snap.map(Into::into),
        }
    }

    #[test]
    fn dir_names_are_unique_and_safe() {
        assert_eq!(dir_name(&spec("img", None, None)), "rbd%2Fimg");
        assert_eq!(
            dir_name(&spec("img", Some("ns"), Some("s"))),
            "rbd%2Fns%2Fimg%40s"
        );
        assert_ne!(
            dir_name(&spec("a", Some("b"), None)),
            dir_name(&spec("b", Some("a"), None))
        );
        let long = dir_name(&spec(&"x".repeat(300), None, None));
        assert!(long.len() <= 200, "{}", long.len());
        assert_ne!(long, dir_name(&spec(&"x".repeat(301), None, None)));
    }

    #[test]
    fn server_arguments() {
        let ceph = CephConnection {
            conf: Some("/c".into()),
            id: Some("u".into()),
            keyring: Some("/k".into()),
            cluster: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut config = FuseConfig::new(ceph);
        config.run_dir = dir.path().to_path_buf();
        config.helper = HelperCommand {
            program: "/bin/x".into(),
            args: vec!["fuse-serve".into()],
        };
        let m = FuseMapper::new(config).unwrap();
        let args = m.server_args(
            Path::new("/m"),
            &spec("img", Some("ns"), Some("s")),
            true,
            &Source::Rbd { exclusive: false },
        );
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            "fuse-serve --mountpoint /m --pool rbd --namespace ns --image img --snap s --read-only --threads 8 --max-write 1048576 --connect-timeout 45 --conf /c --id u --keyring /k"
        );
        let args = m.server_args(
            Path::new("/m"),
            &spec("img", None, None),
            false,
            &Source::File("/f".into()),
        );
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            "fuse-serve --mountpoint /m --file /f --threads 8 --max-write 1048576 --connect-timeout 45"
        );
        // clap accepts what we generate
        let parsed = ServeArgs::try_parse_from(
            std::iter::once("x".to_string()).chain(args.into_iter().skip(1)),
        )
        .unwrap();
        assert_eq!(parsed.file.as_deref(), Some(Path::new("/f")));

        // A standby: the cluster, no image.
        let args: Vec<String> = m
            .standby_args(7)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            format!(
                "fuse-serve --standby-fd 7 --standby-in {} --threads 8 --max-write 1048576 --connect-timeout 45 --conf /c --id u --keyring /k",
                dir.path().display()
            )
        );
        let parsed = ServeArgs::try_parse_from(
            std::iter::once("x".to_string()).chain(args.into_iter().skip(1)),
        )
        .unwrap();
        assert_eq!(parsed.standby_fd, Some(7));
        assert_eq!(parsed.mountpoint, None);
        // clap refuses a standby that also names an image, and a server
        // with neither a mountpoint nor a standby descriptor.
        for bad in [
            &[
                "x",
                "--standby-fd",
                "7",
                "--standby-in",
                "/r",
                "--pool",
                "p",
                "--image",
                "i",
            ][..],
            &[
                "x",
                "--standby-fd",
                "7",
                "--standby-in",
                "/r",
                "--mountpoint",
                "/m",
            ],
            &["x", "--standby-fd", "7"],
            &["x", "--pool", "p", "--image", "i"],
        ] {
            assert!(ServeArgs::try_parse_from(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn standby_logs_never_look_like_mappings() {
        // Every mapping directory escapes '+', so a standby log cannot
        // take an image's place.
        for image in ["+standby.1.0.log", "a+b"] {
            assert!(!dir_name(&spec(image, None, None)).contains('+'));
        }
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join(format!("{STANDBY_PREFIX}0.3.log"));
        let mine = dir
            .path()
            .join(format!("{STANDBY_PREFIX}{}.4.log", std::process::id()));
        std::fs::write(&dead, "").unwrap();
        std::fs::write(&mine, "").unwrap();
        remove_dead_standby_logs(dir.path());
        assert!(!dead.exists(), "the log of a dead daemon's standby stays");
        assert!(mine.exists(), "a live daemon's standby log was removed");
    }

    #[test]
    fn key_locks_exclude_per_key_only() {
        let locks = std::sync::Arc::new(KeyLocks::default());
        let a = locks.lock(Path::new("/a"));
        // Another key is free.
        drop(locks.lock(Path::new("/b")));
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = locks.clone();
        let t = std::thread::spawn(move || {
            let _g = l2.lock(Path::new("/a"));
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "second lock of /a got in"
        );
        drop(a);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("second lock of /a after release");
        t.join().unwrap();
    }

    #[test]
    fn readiness_line_timeout_and_eof() {
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let started = Instant::now();
        assert!(read_line_with_timeout(File::from(rd), Duration::from_millis(100)).is_err());
        assert!(started.elapsed() >= Duration::from_millis(100));
        drop(wr);
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut wr = File::from(wr);
        std::io::Write::write_all(&mut wr, b"{\"ok\":true}\nrest").unwrap();
        assert_eq!(
            read_line_with_timeout(File::from(rd), Duration::from_secs(1))
                .unwrap()
                .as_deref(),
            Some("{\"ok\":true}")
        );
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        drop(wr);
        assert_eq!(
            read_line_with_timeout(File::from(rd), Duration::from_secs(1)).unwrap(),
            None
        );
    }
}
