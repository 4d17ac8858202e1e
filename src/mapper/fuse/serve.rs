//! The FUSE server process: serves one image at one mountpoint until the
//! mount goes away.
//!
//! Started by [`FuseMapper`](super::FuseMapper) as
//! `<helper> --mountpoint M (--file F | --pool P --image I ...) --ready-fd N`,
//! in its own session, with stdout and stderr on a log file in the mapping's
//! state directory. It reports on descriptor N one JSON line,
//! `{"ok":true,"pid":..,"size":..}` once the mount is up or
//! `{"ok":false,"errno":..,"message":..}`, then closes it.
//!
//! # Standby
//!
//! Started as `<helper> --standby-fd S --standby-in DIR --conf C ...
//! --ready-fd N`, it connects to the cluster ahead of need and waits for
//! one JSON line on descriptor S, an [`Assignment`] (the image and a
//! mountpoint under DIR); then it serves that as above. The connection is
//! most of a server's start-up (process start and cluster connect, about
//! 40 of 50 ms), so the mapper keeps one standby ready and a mapping costs
//! only the image's open and the mount. End of file on S before a line
//! (the mapper dropped it, or its daemon died) makes the standby exit, as
//! SIGTERM does while it waits.
//!
//! It stops when its file system is unmounted (by the mapper, after the
//! loop device is detached). SIGTERM asks it to unmount itself, which the
//! kernel refuses while the loop device still holds the image file: a
//! polite stop never breaks a mounted container.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use serde::{Deserialize, Serialize};

use super::backend::{AnyBackend, BlockBackend, SparseFileBackend};
use super::fs::{FsOptions, ImageFs};

/// Command line of the FUSE server process.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "docker-rbd-fuse",
    about = "Serves one RBD image as a file through FUSE (started by docker-rbd's fuse mapper)"
)]
pub struct ServeArgs {
    /// Directory to mount the file system on.
    #[arg(long, required_unless_present = "standby_fd")]
    pub mountpoint: Option<PathBuf>,
    /// Serve read-only: writes fail with EROFS.
    #[arg(long)]
    pub read_only: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Largest FUSE read/write request in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_write: u32,
    /// Open the image file with FOPEN_DIRECT_IO (no page cache).
    #[arg(long)]
    pub direct_io: bool,
    /// Descriptor to report readiness on.
    #[arg(long)]
    pub ready_fd: Option<i32>,
    /// Serve this file instead of an RBD image (tests, benchmarks).
    #[arg(long, conflicts_with_all = ["pool", "image"])]
    pub file: Option<PathBuf>,
    /// RBD pool.
    #[arg(long, requires = "image")]
    pub pool: Option<String>,
    /// RADOS namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// RBD image.
    #[arg(long, requires = "pool")]
    pub image: Option<String>,
    /// Snapshot (read-only).
    #[arg(long)]
    pub snap: Option<String>,
    /// Take the exclusive lock and keep it.
    #[arg(long)]
    pub exclusive: bool,
    /// ceph.conf path.
    #[arg(long)]
    pub conf: Option<PathBuf>,
    /// cephx client id.
    #[arg(long)]
    pub id: Option<String>,
    /// Keyring path.
    #[arg(long)]
    pub keyring: Option<PathBuf>,
    /// Cluster name.
    #[arg(long)]
    pub cluster: Option<String>,
    /// Seconds to wait for the cluster when connecting.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout: u64,
    /// Standby: connect, then read the [`Assignment`] from this descriptor.
    #[arg(
        long,
        requires = "standby_in",
        conflicts_with_all = ["mountpoint", "file", "image", "snap", "namespace", "read_only", "exclusive"]
    )]
    pub standby_fd: Option<i32>,
    /// Standby: the directory the assigned mountpoint must lie under.
    #[arg(long, requires = "standby_fd")]
    pub standby_in: Option<PathBuf>,
}

impl ServeArgs {
    /// These arguments with a standby's assignment filled in.
    fn assigned(&self, a: Assignment) -> ServeArgs {
        ServeArgs {
            mountpoint: Some(a.mountpoint),
            pool: Some(a.pool),
            namespace: a.namespace,
            image: Some(a.image),
            snap: a.snap,
            read_only: a.read_only,
            exclusive: a.exclusive,
            standby_fd: None,
            ..self.clone()
        }
    }
}

/// The process name (`/proc/<pid>/comm`, what `ps` and `top` show) of a
/// standby while it waits for its assignment; once assigned it takes its
/// own name back.
pub const STANDBY_NAME: &str = "docker-rbd-idle";

/// What a standby server is to serve: one JSON line on its standby
/// descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// Directory to mount on, under the standby's `--standby-in`.
    pub mountpoint: PathBuf,
    /// RBD pool.
    pub pool: String,
    /// RADOS namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// RBD image.
    pub image: String,
    /// Snapshot (read-only).
    #[serde(default)]
    pub snap: Option<String>,
    /// Serve read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Take the exclusive lock and keep it.
    #[serde(default)]
    pub exclusive: bool,
}

/// The readiness report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// Whether the mount is up.
    pub ok: bool,
    /// The server's pid.
    #[serde(default)]
    pub pid: i32,
    /// The image size.
    #[serde(default)]
    pub size: u64,
    /// The errno of a failure.
    #[serde(default)]
    pub errno: Option<i32>,
    /// What failed.
    #[serde(default)]
    pub message: String,
}

/// Entry point of the FUSE server process (`docker-rbd-fuse`, or
/// `docker-rbd fuse-serve`). `args` includes the program name.
pub fn serve_main<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = match ServeArgs::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            // Help and usage errors go to the terminal as clap formats them.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DOCKER_RBD_LOG")
                // fuser warns when its own unmount-on-drop finds the mount
                // already gone, which is how every session here ends.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("info,fuser::session=error")
                }),
        )
        .try_init();
    let mut ready = args.ready_fd.map(|fd| {
        // SAFETY: the parent passed us this descriptor, open and meant for
        // us alone; nothing else in this process owns it.
        unsafe { File::from_raw_fd(fd) }
    });
    match serve(&args, &mut ready) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e.message, errno = ?e.errno, "FUSE server failed");
            report(
                &mut ready,
                &Ready {
                    ok: false,
                    pid: std::process::id() as i32,
                    size: 0,
                    errno: e.errno,
                    message: e.message,
                },
            );
            ExitCode::FAILURE
        }
    }
}

fn report(ready: &mut Option<File>, msg: &Ready) {
    if let Some(mut f) = ready.take() {
        let mut line = serde_json::to_string(msg).unwrap_or_else(|_| "{\"ok\":false}".into());
        line.push('\n');
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, "cannot report readiness (parent gone?)");
        }
    }
}

/// Why serving failed: an errno for the mapper to branch on, and words.
#[derive(Debug)]
struct Failure {
    errno: Option<i32>,
    message: String,
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure {
            errno: e.raw_os_error(),
            message: e.to_string(),
        }
    }
}

fn serve(args: &ServeArgs, ready: &mut Option<File>) -> Result<(), Failure> {
    // Signals are taken by one thread with sigwait; block them before any
    // other thread (librados', fuser's) exists so that they inherit the mask.
    let mut signals = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::SIGTERM,
        nix::sys::signal::SIGINT,
        nix::sys::signal::SIGHUP,
    ] {
        signals.add(s);
    }
    signals.thread_block().map_err(std::io::Error::from)?;
    harden_process();
    let phase = Arc::new(Phase::new(args.standby_fd.is_some()));
    {
        let phase = phase.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || wait_for_stop(&signals, &phase))?;
    }

    let (args, backend) = match args.standby_fd {
        Some(fd) => match stand_by(args, fd, &phase)? {
            Some(assigned) => assigned,
            None => return Ok(()),
        },
        None => (args.clone(), open_backend(args)?),
    };
    let Some(mountpoint) = args.mountpoint.clone() else {
        return Err(Failure {
            errno: Some(libc::EINVAL),
            message: "no mountpoint".into(),
        });
    };
    let size = backend.size();
    let read_only = args.read_only || args.snap.is_some();
    let options = FsOptions {
        read_only,
        max_write: args.max_write,
        direct_io: args.direct_io,
        ..FsOptions::default()
    };
    let fs = ImageFs::new(backend, options);
    let stats = fs.stats();
    let source = match (&args.file, &args.pool, &args.image) {
        (Some(f), _, _) => format!("docker-rbd:file:{}", f.display()),
        (_, Some(p), Some(i)) => {
            let ns = args
                .namespace
                .as_deref()
                .map(|n| format!("{n}/"))
                .unwrap_or_default();
            let snap = args
                .snap
                .as_deref()
                .map(|s| format!("@{s}"))
                .unwrap_or_default();
            format!("docker-rbd:{p}/{ns}{i}{snap}")
        }
        _ => "docker-rbd".to_string(),
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(source.replace([',', ' '], "_")),
        fuser::MountOption::Subtype("docker-rbd".to_string()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoExec,
        fuser::MountOption::NoAtime,
        if read_only {
            fuser::MountOption::RO
        } else {
            fuser::MountOption::RW
        },
    ];
    config.n_threads = Some(args.threads.clamp(1, 64));
    config.clone_fd = true;
    let session = fuser::Session::new(fs, &mountpoint, &config)?;
    phase.serving(&mountpoint);
    let pid = std::process::id() as i32;
    tracing::info!(mountpoint = %mountpoint.display(), %source, size, read_only, pid, "serving");
    report(
        ready,
        &Ready {
            ok: true,
            pid,
            size,
            errno: None,
            message: String::new(),
        },
    );
    session.run()?;
    tracing::info!(
        reads = stats.reads.load(std::sync::atomic::Ordering::Relaxed),
        read_bytes = stats.read_bytes.load(std::sync::atomic::Ordering::Relaxed),
        writes = stats.writes.load(std::sync::atomic::Ordering::Relaxed),
        written_bytes = stats
            .written_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        flushes = stats.flushes.load(std::sync::atomic::Ordering::Relaxed),
        discards = stats.discards.load(std::sync::atomic::Ordering::Relaxed),
        errors = stats.errors.load(std::sync::atomic::Ordering::Relaxed),
        "unmounted; stopping"
    );
    Ok(())
}

fn open_backend(args: &ServeArgs) -> Result<AnyBackend, Failure> {
    let read_only = args.read_only || args.snap.is_some();
    match (&args.file, &args.pool, &args.image) {
        (Some(path), _, _) => SparseFileBackend::open(path, read_only)
            .map(AnyBackend::File)
            .map_err(|e| Failure {
                errno: e.raw_os_error(),
                message: format!("{}: {e}", path.display()),
            }),
        (None, Some(_), Some(_)) => open_rbd(args, read_only),
        _ => Err(Failure {
            errno: Some(libc::EINVAL),
            message: "give --file, or --pool and --image".into(),
        }),
    }
}

/// The server sits in the I/O path of a block device: let the kernel treat
/// it as such under memory pressure (PR_SET_IO_FLUSHER), and make it a late
/// choice for the OOM killer, since killing it breaks a mounted file system.
fn harden_process() {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "PR_SET_IO_FLUSHER not set");
    }
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-800") {
        tracing::debug!(error = %e, "oom_score_adj not set");
    }
}

/// Where the server is in its life, for the signal thread.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    /// A standby waiting for its assignment: a signal ends it at once.
    Waiting,
    /// Opening the image and mounting: a signal waits for the mount.
    Starting,
    /// Serving at this mountpoint: a signal unmounts it.
    Serving(PathBuf),
}

struct Phase {
    stage: std::sync::Mutex<Stage>,
    changed: std::sync::Condvar,
}

impl Phase {
    fn new(standby: bool) -> Self {
        Phase {
            stage: std::sync::Mutex::new(if standby {
                Stage::Waiting
            } else {
                Stage::Starting
            }),
            changed: std::sync::Condvar::new(),
        }
    }

    fn set(&self, stage: Stage) {
        *self.stage.lock().unwrap_or_else(|p| p.into_inner()) = stage;
        self.changed.notify_all();
    }

    fn serving(&self, mountpoint: &Path) {
        self.set(Stage::Serving(mountpoint.to_path_buf()));
    }

    /// The mountpoint once serving; `None` if the server is waiting as a
    /// standby (then it is to exit).
    fn mountpoint(&self) -> Option<PathBuf> {
        let mut stage = self.stage.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match &*stage {
                Stage::Waiting => return None,
                Stage::Serving(m) => return Some(m.clone()),
                Stage::Starting => {
                    stage = self.changed.wait(stage).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }
}

fn wait_for_stop(signals: &nix::sys::signal::SigSet, phase: &Phase) {
    loop {
        let sig = match signals.wait() {
            Ok(sig) => sig,
            Err(e) => {
                tracing::error!(error = %e, "sigwait failed; signals are ignored from now on");
                return;
            }
        };
        if sig == nix::sys::signal::SIGHUP {
            continue;
        }
        let Some(mountpoint) = phase.mountpoint() else {
            tracing::info!(signal = %sig, "standby stopped before it served anything");
            // Nothing is open or mounted; skip the exit handlers, which
            // would race librados' threads.
            // SAFETY: _exit takes a status and never returns.
            unsafe { libc::_exit(0) };
        };
        match nix::mount::umount(&mountpoint) {
            Ok(()) => {
                tracing::info!(signal = %sig, "unmounted on request");
                return;
            }
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return,
            Err(nix::errno::Errno::EBUSY) => {
                tracing::warn!(signal = %sig, "the image file is in use (loop device attached); not stopping");
            }
            Err(e) => tracing::warn!(signal = %sig, error = %e, "cannot unmount"),
        }
    }
}

/// A standby's life until its assignment: connects, reads the assignment
/// from descriptor `fd`, opens the image on that connection. `None` when
/// the descriptor reached its end first (not needed).
fn stand_by(
    args: &ServeArgs,
    fd: i32,
    phase: &Phase,
) -> Result<Option<(ServeArgs, AnyBackend)>, Failure> {
    use std::io::BufRead;
    // SAFETY: the parent passed us this descriptor, open and meant for us
    // alone; nothing else in this process owns it.
    let control = unsafe { File::from_raw_fd(fd) };
    let own_name = process_name();
    set_process_name(STANDBY_NAME);
    let rados = super::rbd::RbdBackend::connect(&connection(args), connect_timeout(args))
        .map_err(open_failure)?;
    tracing::info!("standby: connected to the cluster; waiting for an image to serve");
    let mut line = String::new();
    let n = std::io::BufReader::new(control)
        .read_line(&mut line)
        .map_err(|e| Failure {
            errno: e.raw_os_error(),
            message: format!("reading the assignment: {e}"),
        })?;
    if n == 0 {
        tracing::info!("standby: not needed any more (its mapper went away); exiting");
        return Ok(None);
    }
    phase.set(Stage::Starting);
    if let Some(name) = &own_name {
        set_process_name(name);
    }
    let assignment: Assignment = serde_json::from_str(line.trim_end()).map_err(|e| Failure {
        errno: Some(libc::EINVAL),
        message: format!("unreadable assignment {:?}: {e}", line.trim_end()),
    })?;
    check_assignment(args, &assignment)?;
    let args = args.assigned(assignment);
    let backend = super::rbd::RbdBackend::open_on(
        &rados,
        &image_spec(&args)?,
        args.read_only,
        args.exclusive,
    )
    .map_err(open_failure)?;
    Ok(Some((args, AnyBackend::Rbd(backend))))
}

/// This thread's name (the process's, on the main thread).
fn process_name() -> Option<String> {
    let mut buf = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into buf.
    if unsafe { libc::prctl(libc::PR_GET_NAME, buf.as_mut_ptr(), 0, 0, 0) } != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// Names this thread (the process, on the main thread); at most 15 bytes
/// are kept.
fn set_process_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes; buf is one.
    if unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr(), 0, 0, 0) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "PR_SET_NAME failed");
    }
}

/// An assignment must name a mountpoint under the standby's
/// `--standby-in`.
fn check_assignment(args: &ServeArgs, a: &Assignment) -> Result<(), Failure> {
    let invalid = |message: String| Failure {
        errno: Some(libc::EINVAL),
        message,
    };
    let under = args.standby_in.as_deref().unwrap_or(Path::new("/"));
    let clean = a.mountpoint.is_absolute()
        && a.mountpoint
            .components()
            .all(|c| !matches!(c, std::path::Component::ParentDir));
    if !clean || !a.mountpoint.starts_with(under) {
        return Err(invalid(format!(
            "assigned mountpoint {} is not under {}",
            a.mountpoint.display(),
            under.display()
        )));
    }
    Ok(())
}

fn connection(args: &ServeArgs) -> crate::mapper::CephConnection {
    crate::mapper::CephConnection {
        conf: args.conf.clone(),
        id: args.id.clone(),
        keyring: args.keyring.clone(),
        cluster: args.cluster.clone(),
    }
}

fn connect_timeout(args: &ServeArgs) -> std::time::Duration {
    std::time::Duration::from_secs(args.connect_timeout.max(1))
}

fn image_spec(args: &ServeArgs) -> Result<crate::mapper::ImageSpec, Failure> {
    match (&args.pool, &args.image) {
        (Some(pool), Some(image)) => Ok(crate::mapper::ImageSpec {
            pool: pool.clone(),
            namespace: args.namespace.clone(),
            image: image.clone(),
            snap: args.snap.clone(),
        }),
        _ => Err(Failure {
            errno: Some(libc::EINVAL),
            message: "give --file, or --pool and --image".into(),
        }),
    }
}

fn open_failure(e: super::rbd::OpenError) -> Failure {
    Failure {
        errno: e.errno(),
        message: e.to_string(),
    }
}

fn open_rbd(args: &ServeArgs, read_only: bool) -> Result<AnyBackend, Failure> {
    let backend = super::rbd::RbdBackend::open(
        &connection(args),
        &image_spec(args)?,
        read_only,
        args.exclusive,
        connect_timeout(args),
    )
    .map_err(open_failure)?;
    Ok(AnyBackend::Rbd(backend))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standby_args() -> ServeArgs {
        ServeArgs::try_parse_from([
            "x",
            "--standby-fd",
            "5",
            "--standby-in",
            "/run/f",
            "--id",
            "u",
        ])
        .unwrap()
    }

    fn assignment(mountpoint: &str) -> Assignment {
        Assignment {
            mountpoint: mountpoint.into(),
            pool: "rbd".into(),
            namespace: Some("ns".into()),
            image: "img".into(),
            snap: None,
            read_only: false,
            exclusive: true,
        }
    }

    #[test]
    fn an_assignment_fills_in_the_image_and_keeps_the_rest() {
        let args = standby_args();
        let a = assignment("/run/f/rbd%2Fimg/mnt");
        check_assignment(&args, &a).unwrap();
        let assigned = args.assigned(a);
        assert_eq!(
            assigned.mountpoint.as_deref(),
            Some(Path::new("/run/f/rbd%2Fimg/mnt"))
        );
        assert_eq!(assigned.image.as_deref(), Some("img"));
        assert_eq!(assigned.namespace.as_deref(), Some("ns"));
        assert!(assigned.exclusive);
        assert_eq!(assigned.standby_fd, None);
        assert_eq!(assigned.id.as_deref(), Some("u"));
        assert_eq!(image_spec(&assigned).unwrap().to_string(), "rbd/ns/img");
    }

    #[test]
    fn assignments_outside_the_run_directory_are_refused() {
        let args = standby_args();
        for bad in ["/elsewhere/mnt", "relative/mnt", "/run/f/../../etc"] {
            let e = check_assignment(&args, &assignment(bad)).unwrap_err();
            assert_eq!(e.errno, Some(libc::EINVAL), "{bad}");
            assert!(e.message.contains("is not under /run/f"), "{}", e.message);
        }
    }

    #[test]
    fn assignment_lines_are_strict_json() {
        let line = serde_json::to_string(&assignment("/run/f/x/mnt")).unwrap();
        assert!(!line.contains('\n'));
        let back: Assignment = serde_json::from_str(&line).unwrap();
        assert_eq!(back, assignment("/run/f/x/mnt"));
        assert!(
            serde_json::from_str::<Assignment>(
                r#"{"mountpoint":"/m","pool":"p","image":"i","extra":1}"#
            )
            .is_err()
        );
        assert!(serde_json::from_str::<Assignment>(r#"{"mountpoint":"/m"}"#).is_err());
    }

    #[test]
    fn the_process_name_can_be_set_and_read_back() {
        // On a thread of its own: the test harness's threads keep theirs.
        std::thread::spawn(|| {
            set_process_name(STANDBY_NAME);
            assert_eq!(process_name().as_deref(), Some(STANDBY_NAME));
            set_process_name("a-name-longer-than-fifteen-bytes");
            assert_eq!(process_name().as_deref(), Some("a-name-longer-t"));
        })
        .join()
        .unwrap();
    }
}
