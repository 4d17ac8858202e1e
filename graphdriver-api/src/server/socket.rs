//! The unix socket: where it lives, who may connect, binding over a stale
//! socket, and removing it at shutdown.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use tokio::net::UnixListener;

/// Where dockerd looks for legacy plugin sockets (hard-coded in dockerd).
pub const PLUGIN_SOCKET_DIR: &str = "/run/docker/plugins";

/// How long probing an existing socket may take before it counts as live.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The group given the socket, by id or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketGroup {
    /// A numeric group id.
    Id(u32),
    /// A group name, looked up in the group database when binding.
    Name(String),
}

impl FromStr for SocketGroup {
    type Err = std::convert::Infallible;

    /// All digits is a group id; anything else is a group name.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text.parse::<u32>() {
            Ok(gid) => SocketGroup::Id(gid),
            Err(_) => SocketGroup::Name(text.to_owned()),
        })
    }
}

/// How and where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Socket path; dockerd finds `/run/docker/plugins/<name>.sock` for
    /// `dockerd -s <name>`.
    pub socket: PathBuf,
    /// Permission bits of the socket file (default `0o600`: root only).
    pub mode: u32,
    /// Group of the socket file; `None` keeps the process's group.
    pub group: Option<SocketGroup>,
    /// After the shutdown signal, how long in-flight requests may take before
    /// the server stops waiting for them (`None`: wait for ever).
    pub shutdown_grace: Option<Duration>,
    /// How long a connection may take to send a request's header, counted
    /// from when the server starts waiting for it (so an idle keep-alive
    /// connection is closed after it too). A request's body and the
    /// driver's work have no limit.
    pub header_timeout: Duration,
    /// At most this many connections are served at once; more wait in the
    /// socket's backlog until one closes. At least 1.
    pub max_connections: usize,
}

impl ServerConfig {
    /// Default mode of the socket file.
    pub const DEFAULT_MODE: u32 = 0o600;
    /// Default [`ServerConfig::shutdown_grace`].
    pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(60);
    /// Default [`ServerConfig::header_timeout`].
    pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default [`ServerConfig::max_connections`]: dockerd keeps a few.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 128;

    /// The socket dockerd discovers for the plugin `name`:
    /// `/run/docker/plugins/<name>.sock`, mode 0600, no group change.
    pub fn for_plugin(name: &str) -> Self {
        Self::at(Path::new(PLUGIN_SOCKET_DIR).join(format!("{name}.sock")))
    }

    /// A socket at `socket`, with the other settings at their defaults.
    pub fn at(socket: impl Into<PathBuf>) -> Self {
        ServerConfig {
            socket: socket.into(),
            mode: Self::DEFAULT_MODE,
            group: None,
            shutdown_grace: Some(Self::DEFAULT_SHUTDOWN_GRACE),
            header_timeout: Self::DEFAULT_HEADER_TIMEOUT,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Why the server could not start, or could not shut down cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket path has no file name or no parent directory.
    #[error("socket path {path} must name a file in a directory")]
    InvalidPath {
        /// The configured path.
        path: PathBuf,
    },
    /// The connection limit is zero.
    #[error("the connection limit must be at least 1")]
    NoConnections,
    /// The mode has bits beyond the permission bits.
    #[error("socket mode {mode:o} is not a permission mode (at most 7777 octal)")]
    InvalidMode {
        /// The configured mode.
        mode: u32,
    },
    /// The socket's directory could not be created.
    #[error("creating socket directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The existing file at the socket path could not be examined.
    #[error("inspecting {path}")]
    Inspect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Something other than a socket is at the socket path.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// A server is listening on the socket path.
    #[error("{path} is in use: a server is listening on it")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Connecting to the existing socket failed other than with "refused".
    #[error("probing the existing socket {path}")]
    Probe {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The private directory the socket is bound in could not be prepared.
    #[error("preparing the private bind directory {path}")]
    BindDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `bind(2)` failed.
    #[error("binding a socket at {path}")]
    Bind {
        /// Where it was bound.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `chmod(2)` of the socket failed.
    #[error("setting mode {mode:o} on {path}")]
    SetMode {
        /// The socket file.
        path: PathBuf,
        /// The mode.
        mode: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The configured group name does not exist.
    #[error("group {name:?} does not exist")]
    UnknownGroup {
        /// The group name.
        name: String,
    },
    /// The group database could not be read.
    #[error("looking up group {name:?}")]
    LookupGroup {
        /// The group name.
        name: String,
        /// The error from `getgrnam_r`.
        #[source]
        source: nix::errno::Errno,
    },
    /// `chown(2)` of the socket failed.
    #[error("setting group {gid} on {path}")]
    SetGroup {
        /// The socket file.
        path: PathBuf,
        /// The group id.
        gid: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Moving the bound socket to its final path failed.
    #[error("moving the socket from {from} to {to}")]
    Rename {
        /// The private path it was bound at.
        from: PathBuf,
        /// The configured path.
        to: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The socket file could not be removed at shutdown.
    #[error("removing socket {path}")]
    RemoveSocket {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A signal handler could not be installed.
    #[error("installing the {signal} handler")]
    Signal {
        /// `SIGTERM` or `SIGINT`.
        signal: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// [`shutdown_signal`] was called outside a Tokio runtime.
    #[error("signal handlers need a running Tokio runtime")]
    NoRuntime,
}

/// The socket file a server bound, identified so that shutdown removes this
/// socket and not one a later server put at the same path.
#[derive(Debug)]
pub(crate) struct SocketFile {
    pub(crate) path: PathBuf,
    dev: u64,
    ino: u64,
}

/// Binds `config.socket`: creates its directory, refuses a live socket or a
/// non-socket file, replaces a stale socket, and sets mode and group.
///
/// The socket is bound inside a fresh 0700 directory next to the final path,
/// given its mode and group there, then renamed into place, so it is never
/// reachable with looser permissions than configured.
pub(crate) async fn bind(config: &ServerConfig) -> Result<(UnixListener, SocketFile), ServerError> {
    let path = config.socket.clone();
    if config.mode > 0o7777 {
        return Err(ServerError::InvalidMode { mode: config.mode });
    }
    if config.max_connections == 0 {
        return Err(ServerError::NoConnections);
    }
    let (dir, file_name) = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => (
            if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            },
            name.to_owned(),
        ),
        _ => return Err(ServerError::InvalidPath { path }),
    };
    std::fs::create_dir_all(dir).map_err(|source| ServerError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    check_existing(&path).await?;
    let gid = match &config.group {
        None => None,
        Some(group) => Some(resolve_group(group)?),
    };

    let mut private_name = std::ffi::OsString::from(".");
    private_name.push(&file_name);
    private_name.push(format!(".bind-{}", std::process::id()));
    let private_dir = dir.join(private_name);
    let private_socket = private_dir.join("s");
    let result = bind_private(&private_dir, &private_socket, &path, config.mode, gid);
    // The directory is empty once the socket moved; on failure it may still
    // hold the socket. Either way it must go.
    if let Err(err) = std::fs::remove_dir_all(&private_dir)
        && err.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %private_dir.display(), error = %err, "could not remove the bind directory");
    }
    let listener = result?;
    let meta = std::fs::symlink_metadata(&path).map_err(|source| ServerError::Inspect {
        path: path.clone(),
        source,
    })?;
    tracing::info!(socket = %path.display(), mode = format_args!("{:o}", config.mode), gid, "listening");
    let file = SocketFile {
        path,
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Ok((listener, file))
}

fn bind_private(
    private_dir: &Path,
    private_socket: &Path,
    path: &Path,
    mode: u32,
    gid: Option<u32>,
) -> Result<UnixListener, ServerError> {
    let bind_dir_err = |source| ServerError::BindDir {
        path: private_dir.to_owned(),
        source,
    };
    // A leftover from a crashed start with the same pid.
    match std::fs::remove_dir_all(private_dir) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(bind_dir_err(err)),
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(private_dir)
            .map_err(bind_dir_err)?;
    }
    let listener = UnixListener::bind(private_socket).map_err(|source| ServerError::Bind {
        path: private_socket.to_owned(),
        source,
    })?;
    std::fs::set_permissions(private_socket, std::fs::Permissions::from_mode(mode)).map_err(
        |source| ServerError::SetMode {
            path: private_socket.to_owned(),
            mode,
            source,
        },
    )?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(private_socket, None, Some(gid)).map_err(|source| {
            ServerError::SetGroup {
                path: private_socket.to_owned(),
                gid,
                source,
            }
        })?;
    }
    std::fs::rename(private_socket, path).map_err(|source| ServerError::Rename {
        from: private_socket.to_owned(),
        to: path.to_owned(),
        source,
    })?;
    Ok(listener)
}

/// Fails if `path` is a live socket or not a socket; a stale socket (connect
/// refused) is left for the rename to replace.
async fn check_existing(path: &Path) -> Result<(), ServerError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::Inspect {
                path: path.to_owned(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket {
            path: path.to_owned(),
        });
    }
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::UnixStream::connect(path)).await {
        Ok(Ok(_live)) => Err(ServerError::InUse {
            path: path.to_owned(),
        }),
        // Something is there but does not accept promptly: not ours to take.
        Err(_elapsed) => Err(ServerError::InUse {
            path: path.to_owned(),
        }),
        Ok(Err(err)) if err.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %path.display(), "replacing a stale socket from an earlier run");
            Ok(())
        }
        Ok(Err(err)) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Ok(Err(source)) => Err(ServerError::Probe {
            path: path.to_owned(),
            source,
        }),
    }
}

fn resolve_group(group: &SocketGroup) -> Result<u32, ServerError> {
    match group {
        SocketGroup::Id(gid) => Ok(*gid),
        SocketGroup::Name(name) => match nix::unistd::Group::from_name(name) {
            Ok(Some(group)) => Ok(group.gid.as_raw()),
            Ok(None) => Err(ServerError::UnknownGroup { name: name.clone() }),
            Err(source) => Err(ServerError::LookupGroup {
                name: name.clone(),
                source,
            }),
        },
    }
}

impl SocketFile {
    /// Removes the socket file if it is still the one this server bound.
    ///
    /// Called once the listener is closed. The file is ours if its device
    /// and inode are the ones bound and nothing answers on it (a socket
    /// recreated at the path can reuse the freed inode; if it answers, it
    /// belongs to another server and stays).
    pub(crate) async fn remove(&self) -> Result<(), ServerError> {
        let path = &self.path;
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(ServerError::RemoveSocket {
                    path: path.clone(),
                    source,
                });
            }
        };
        let same_inode = meta.dev() == self.dev && meta.ino() == self.ino;
        let answered = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, tokio::net::UnixStream::connect(path)).await,
            Ok(Ok(_)) | Err(_)
        );
        if !same_inode || answered {
            tracing::warn!(socket = %path.display(), "socket path now belongs to another server; leaving it");
            return Ok(());
        }
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ServerError::RemoveSocket {
                path: path.clone(),
                source,
            }),
        }
    }
}

/// Installs SIGTERM and SIGINT handlers now and returns a future that
/// completes on the first of them, for [`serve`](super::serve)'s `shutdown`.
///
/// Installing up front reports failures before serving starts, and a signal
/// arriving before the future is polled is not lost.
pub fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static, ServerError> {
    use tokio::signal::unix::{SignalKind, signal};
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(ServerError::NoRuntime);
    }
    let mut term = signal(SignalKind::terminate()).map_err(|source| ServerError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| ServerError::Signal {
        signal: "SIGINT",
        source,
    })?;
    Ok(async move {
        let signal = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal, "shutdown requested");
    })
}
