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
    #[arg(long)]
    pub mountpoint: PathBuf,
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

    let backend = open_backend(args)?;
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
    let session = fuser::Session::new(fs, &args.mountpoint, &config)?;
    let pid = std::process::id() as i32;
    tracing::info!(mountpoint = %args.mountpoint.display(), %source, size, read_only, pid, "serving");
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

    let mountpoint = args.mountpoint.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || wait_for_stop(&signals, &mountpoint))?;
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
        (None, Some(pool), Some(image)) => open_rbd(args, pool, image, read_only),
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

fn wait_for_stop(signals: &nix::sys::signal::SigSet, mountpoint: &Path) {
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
        match nix::mount::umount(mountpoint) {
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

fn open_rbd(
    args: &ServeArgs,
    pool: &str,
    image: &str,
    read_only: bool,
) -> Result<AnyBackend, Failure> {
    let conn = crate::mapper::CephConnection {
        conf: args.conf.clone(),
        id: args.id.clone(),
        keyring: args.keyring.clone(),
        cluster: args.cluster.clone(),
    };
    let spec = crate::mapper::ImageSpec {
        pool: pool.to_string(),
        namespace: args.namespace.clone(),
        image: image.to_string(),
        snap: args.snap.clone(),
    };
    let backend = super::rbd::RbdBackend::open(
        &conn,
        &spec,
        read_only,
        args.exclusive,
        std::time::Duration::from_secs(args.connect_timeout.max(1)),
    )
    .map_err(|e| Failure {
        errno: e.errno(),
        message: e.to_string(),
    })?;
    Ok(AnyBackend::Rbd(backend))
}
