//! Block-device mappers: how an RBD image becomes `/dev/<something>` on this
//! host so that it can be mounted.
//!
//! # The mappers
//!
//! [`Mapper`] is a closed enum, chosen by configuration (`rbd.mapper`,
//! [`MapperKind`]) or by [`Mapper::probe`] with [`MapperKind::Auto`], which
//! takes the first that works here:
//!
//! | mapper | device | how | needs |
//! |---|---|---|---|
//! | [`krbd`] | `/dev/rbdN` | `rbd device map` (kernel client) | the `rbd` kernel module and the `rbd` tool |
//! | [`nbd`] | `/dev/nbdN` | `rbd-nbd map` (librbd in a daemon per image, kernel nbd) | the `nbd` module and `rbd-nbd` |
//! | [`fuse`] | `/dev/loopN` | a FUSE file per image served by librbd, with a loop device on it | `/dev/fuse`, `/dev/loop-control` |
//!
//! krbd is the production default where the kernel has it: no user-space
//! process sits in the I/O path. nbd serves hosts with nbd but no rbd
//! module. fuse works on kernels with neither; see [`fuse`] for how its
//! server process outlives the daemon.
//!
//! # Boundaries
//!
//! A mapper maps, unmaps, lists and adopts. It does not create, clone or
//! lock images, and it does not mount file systems: the driver mounts the
//! returned device. Every mapping is described by a [`MappedDevice`], which
//! is serde-serializable so that the driver can persist it in its local
//! state store and hand it back to [`Mapper::adopt`] after a restart; what
//! the host currently has mapped is [`Mapper::list`].
//!
//! The command-line mappers (krbd, nbd) run every program through one
//! [`runner::CommandRunner`], the choke point that tests replace with a
//! recording fake. The program names (`rbd`, `rbd-nbd`) are configurable.
//! The fuse mapper talks to Ceph through [`fuse::BlockBackend`], implemented
//! for librbd images and, for tests, sparse files.
//!
//! Read-only requests (sealed layers, snapshots) map read-only in every
//! mapper; `exclusive` asks for the RBD exclusive lock without automatic
//! transitions (`--exclusive`), so a second writer on another host fails
//! instead of silently taking the lock over.

mod error;
pub mod fuse;
pub mod krbd;
pub mod nbd;
pub mod runner;
pub(crate) mod sys;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use self::error::{Error, Result};
pub use self::fuse::{FuseConfig, FuseMapper};
pub use self::krbd::KrbdMapper;
pub use self::nbd::NbdMapper;
use self::runner::{CommandLine, CommandOutput, CommandRunner, RunError};

/// Which mapper to use: configuration value `auto|krbd|nbd|fuse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MapperKind {
    /// The first of krbd, nbd, fuse that works on this host.
    #[default]
    Auto,
    /// The kernel RBD client.
    Krbd,
    /// `rbd-nbd`.
    Nbd,
    /// FUSE file plus loop device.
    Fuse,
}

impl MapperKind {
    /// Every kind, in probing order after `Auto`.
    pub const ALL: [MapperKind; 4] = [
        MapperKind::Auto,
        MapperKind::Krbd,
        MapperKind::Nbd,
        MapperKind::Fuse,
    ];

    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MapperKind::Auto => "auto",
            MapperKind::Krbd => "krbd",
            MapperKind::Nbd => "nbd",
            MapperKind::Fuse => "fuse",
        }
    }
}

impl fmt::Display for MapperKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mapper name that is not `auto`, `krbd`, `nbd` or `fuse`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mapper {value:?}: expected one of auto, krbd, nbd, fuse")]
pub struct ParseMapperKindError {
    /// What was given.
    pub value: String,
}

impl From<ParseMapperKindError> for Error {
    fn from(e: ParseMapperKindError) -> Self {
        Error::UnknownKind { value: e.value }
    }
}

impl FromStr for MapperKind {
    type Err = ParseMapperKindError;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        MapperKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| ParseMapperKindError {
                value: s.to_string(),
            })
    }
}

/// How the command-line mappers and the fuse server reach the cluster,
/// named as the `rbd` tool names its options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CephConnection {
    /// `--conf`: ceph.conf path.
    pub conf: Option<PathBuf>,
    /// `--id`: cephx client id without `client.`.
    pub id: Option<String>,
    /// `--keyring`: keyring path.
    pub keyring: Option<PathBuf>,
    /// `--cluster`: cluster name.
    pub cluster: Option<String>,
}

impl CephConnection {
    /// The global options every Ceph tool understands, long spellings.
    pub fn cli_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(cluster) = &self.cluster {
            args.extend(["--cluster".to_string(), cluster.clone()]);
        }
        if let Some(id) = &self.id {
            args.extend(["--id".to_string(), id.clone()]);
        }
        if let Some(conf) = &self.conf {
            args.extend(["--conf".to_string(), conf.display().to_string()]);
        }
        if let Some(keyring) = &self.keyring {
            args.extend(["--keyring".to_string(), keyring.display().to_string()]);
        }
        args
    }
}

/// Which image (or snapshot) a mapping is of.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageSpec {
    /// Pool name.
    pub pool: String,
    /// RADOS namespace; `None` is the pool's default namespace.
    pub namespace: Option<String>,
    /// Image name.
    pub image: String,
    /// Snapshot name; `None` is the image head.
    pub snap: Option<String>,
}

impl ImageSpec {
    /// Checks that every part can be written into an `rbd` spec and a
    /// sysfs `add` string: non-empty, no `/`, `@`, whitespace, control
    /// characters, and no leading `-`.
    pub fn validate(&self) -> Result<()> {
        validate_name("pool", &self.pool)?;
        if let Some(ns) = &self.namespace {
            validate_name("namespace", ns)?;
        }
        validate_name("image", &self.image)?;
        if let Some(snap) = &self.snap {
            validate_name("snap", snap)?;
        }
        Ok(())
    }

    /// The namespace, empty for the default one (as Ceph tools print it).
    pub fn namespace_str(&self) -> &str {
        self.namespace.as_deref().unwrap_or("")
    }
}

impl fmt::Display for ImageSpec {
    /// `pool/[namespace/]image[@snap]`, the `rbd` tool's spelling.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/", self.pool)?;
        if let Some(ns) = &self.namespace {
            write!(f, "{ns}/")?;
        }
        f.write_str(&self.image)?;
        if let Some(snap) = &self.snap {
            write!(f, "@{snap}")?;
        }
        Ok(())
    }
}

fn validate_name(field: &'static str, value: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidRequest {
            field,
            value: value.to_string(),
            reason,
        })
    };
    if value.is_empty() {
        return bad("must not be empty");
    }
    if value.len() > 4096 {
        return bad("is too long");
    }
    if value.starts_with('-') {
        return bad("must not start with '-'");
    }
    if value.chars().any(|c| c == '/' || c == '@') {
        return bad("must not contain '/' or '@'");
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("must not contain whitespace or control characters");
    }
    Ok(())
}

/// What to map, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRequest {
    /// Pool name.
    pub pool: String,
    /// RADOS namespace; `None` for the pool's default.
    pub namespace: Option<String>,
    /// Image name.
    pub image: String,
    /// Snapshot to map (always read-only); `None` for the head.
    pub snap: Option<String>,
    /// Map read-only: writes fail with `EROFS`.
    pub read_only: bool,
    /// Take the exclusive lock and keep it (no automatic transitions).
    pub exclusive: bool,
}

impl MapRequest {
    /// A read-write, non-exclusive request for an image head.
    pub fn new(
        pool: impl Into<String>,
        namespace: Option<String>,
        image: impl Into<String>,
    ) -> Self {
        Self {
            pool: pool.into(),
            namespace,
            image: image.into(),
            snap: None,
            read_only: false,
            exclusive: false,
        }
    }

    /// The image this request is about.
    pub fn spec(&self) -> ImageSpec {
        ImageSpec {
            pool: self.pool.clone(),
            namespace: self.namespace.clone(),
            image: self.image.clone(),
            snap: self.snap.clone(),
        }
    }

    /// Validates the names; a snapshot mapping is read-only whatever
    /// `read_only` says.
    pub fn effective_read_only(&self) -> bool {
        self.read_only || self.snap.is_some()
    }
}

/// One mapped image: the device to mount and what a restarted daemon needs
/// to find the mapping again. Persist it as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappedDevice {
    /// The block device, e.g. `/dev/rbd0`, `/dev/nbd1`, `/dev/loop3`.
    pub device: PathBuf,
    /// The image.
    pub spec: ImageSpec,
    /// Whether it is mapped read-only.
    pub read_only: bool,
    /// Mapper-specific handle.
    pub handle: MappingHandle,
}

impl MappedDevice {
    /// The mapper that made this mapping.
    pub fn kind(&self) -> MapperKind {
        self.handle.kind()
    }
}

/// What each mapper needs to recognise its mapping later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mapper", rename_all = "lowercase")]
pub enum MappingHandle {
    /// A krbd device.
    Krbd {
        /// The kernel's device id (`/sys/bus/rbd/devices/<id>`).
        id: String,
    },
    /// An rbd-nbd device.
    Nbd {
        /// The pid of the `rbd-nbd` process serving it, when known.
        pid: Option<i64>,
    },
    /// A loop device on a FUSE file.
    Fuse(fuse::FuseHandle),
}

impl MappingHandle {
    /// The mapper this handle belongs to.
    pub fn kind(&self) -> MapperKind {
        match self {
            MappingHandle::Krbd { .. } => MapperKind::Krbd,
            MappingHandle::Nbd { .. } => MapperKind::Nbd,
            MappingHandle::Fuse(_) => MapperKind::Fuse,
        }
    }
}

/// Everything [`Mapper::probe`] needs to build any mapper.
#[derive(Debug, Clone)]
pub struct MapperConfig {
    /// How to reach the cluster.
    pub ceph: CephConnection,
    /// Runs `rbd`, `rbd-nbd`, `modprobe`.
    pub runner: Arc<dyn CommandRunner>,
    /// The `rbd` program.
    pub rbd_program: String,
    /// The `rbd-nbd` program.
    pub rbd_nbd_program: String,
    /// Extra `-o` options for `rbd device map` (e.g. `noudev` in containers
    /// without udev).
    pub krbd_map_options: Vec<String>,
    /// Bound on one `map`/`unmap`/`list` command.
    pub command_timeout: Duration,
    /// Where `/sys` and `/dev` are looked for (`/`; tests point elsewhere).
    pub host_root: PathBuf,
    /// The fuse mapper's settings.
    pub fuse: FuseConfig,
}

impl MapperConfig {
    /// Defaults: real commands, `rbd` and `rbd-nbd` from `PATH`, a two
    /// minute command timeout, the fuse mapper's state under
    /// `/run/docker-rbd/fuse`.
    pub fn new(ceph: CephConnection) -> Self {
        Self {
            fuse: FuseConfig::new(ceph.clone()),
            ceph,
            runner: Arc::new(runner::SystemRunner),
            rbd_program: "rbd".to_string(),
            rbd_nbd_program: "rbd-nbd".to_string(),
            krbd_map_options: Vec::new(),
            command_timeout: Duration::from_secs(120),
            host_root: PathBuf::from("/"),
        }
    }

    fn host_path(&self, abs: &str) -> PathBuf {
        self.host_root.join(abs.trim_start_matches('/'))
    }
}

/// The block-device mapper in use: a closed set.
#[derive(Debug)]
pub enum Mapper {
    /// Kernel RBD.
    Krbd(KrbdMapper),
    /// rbd-nbd.
    Nbd(NbdMapper),
    /// FUSE file plus loop device.
    Fuse(FuseMapper),
}

impl Mapper {
    /// Builds the mapper `kind` names, after checking that it can work on
    /// this host; `Auto` takes the first of krbd, nbd and fuse that can.
    #[tracing::instrument(skip(config), fields(kind = %kind))]
    pub fn probe(kind: MapperKind, config: &MapperConfig) -> Result<Mapper> {
        let build = |kind: MapperKind| -> Result<Mapper> {
            match kind {
                MapperKind::Krbd => Ok(Mapper::Krbd(KrbdMapper::from_config(config))),
                MapperKind::Nbd => Ok(Mapper::Nbd(NbdMapper::from_config(config))),
                MapperKind::Fuse => Ok(Mapper::Fuse(FuseMapper::new(config.fuse.clone())?)),
                MapperKind::Auto => Err(Error::UnknownKind {
                    value: "auto".to_string(),
                }),
            }
        };
        match kind {
            MapperKind::Auto => {
                let mut reasons = Vec::new();
                for candidate in [MapperKind::Krbd, MapperKind::Nbd, MapperKind::Fuse] {
                    match availability(candidate, config) {
                        Ok(()) => {
                            tracing::info!(mapper = %candidate, "block-device mapper chosen");
                            return build(candidate);
                        }
                        Err(reason) => {
                            tracing::debug!(mapper = %candidate, %reason, "mapper unavailable");
                            reasons.push(format!("{candidate}: {reason}"));
                        }
                    }
                }
                Err(Error::NoneAvailable { reasons })
            }
            explicit => {
                availability(explicit, config).map_err(|reason| Error::Unavailable {
                    kind: explicit,
                    reason,
                })?;
                build(explicit)
            }
        }
    }

    /// The concrete kind (never `Auto`).
    pub fn kind(&self) -> MapperKind {
        match self {
            Mapper::Krbd(_) => MapperKind::Krbd,
            Mapper::Nbd(_) => MapperKind::Nbd,
            Mapper::Fuse(_) => MapperKind::Fuse,
        }
    }

    /// Maps an image; returns the device to mount.
    pub fn map(&self, req: &MapRequest) -> Result<MappedDevice> {
        match self {
            Mapper::Krbd(m) => m.map(req),
            Mapper::Nbd(m) => m.map(req),
            Mapper::Fuse(m) => m.map(req),
        }
    }

    /// Unmaps a device this mapper mapped. Fails with [`Error::Busy`] while
    /// it is mounted or open.
    pub fn unmap(&self, dev: &MappedDevice) -> Result<()> {
        match self {
            Mapper::Krbd(m) => m.unmap(dev),
            Mapper::Nbd(m) => m.unmap(dev),
            Mapper::Fuse(m) => m.unmap(dev),
        }
    }

    /// Everything this mapper has mapped on this host right now.
    pub fn list(&self) -> Result<Vec<MappedDevice>> {
        match self {
            Mapper::Krbd(m) => m.list(),
            Mapper::Nbd(m) => m.list(),
            Mapper::Fuse(m) => m.list(),
        }
    }

    /// Re-attaches to a mapping a previous daemon left: checks that it is
    /// still there and still of the same image, and returns its current
    /// description. [`Error::Stale`] when it is gone.
    pub fn adopt(&self, dev: &MappedDevice) -> Result<MappedDevice> {
        match self {
            Mapper::Krbd(m) => m.adopt(dev),
            Mapper::Nbd(m) => m.adopt(dev),
            Mapper::Fuse(m) => m.adopt(dev),
        }
    }
}

/// `Ok` when `kind` can work on this host, else why not.
pub fn availability(kind: MapperKind, config: &MapperConfig) -> std::result::Result<(), String> {
    match kind {
        MapperKind::Auto => Ok(()),
        MapperKind::Krbd => {
            if !program_exists(&config.rbd_program) {
                return Err(format!(
                    "the `{}` program is not installed",
                    config.rbd_program
                ));
            }
            if config.host_path("/sys/bus/rbd").exists() {
                return Ok(());
            }
            module_loadable(config, "rbd").map_err(|why| format!("no /sys/bus/rbd and {why}"))
        }
        MapperKind::Nbd => {
            if !program_exists(&config.rbd_nbd_program) {
                return Err(format!(
                    "the `{}` program is not installed",
                    config.rbd_nbd_program
                ));
            }
            if config.host_path("/sys/module/nbd").exists()
                || config.host_path("/dev/nbd0").exists()
            {
                return Ok(());
            }
            module_loadable(config, "nbd")
                .map_err(|why| format!("no /sys/module/nbd, no /dev/nbd0 and {why}"))
        }
        MapperKind::Fuse => {
            for dev in ["/dev/fuse", "/dev/loop-control"] {
                if !config.host_path(dev).exists() {
                    return Err(format!("{dev} is missing"));
                }
            }
            let helper = &config.fuse.helper.program;
            if !program_exists(&helper.to_string_lossy()) {
                return Err(format!(
                    "its server program {} is missing",
                    helper.display()
                ));
            }
            Ok(())
        }
    }
}

/// `modprobe --dry-run --quiet <module>`: would loading the module work?
fn module_loadable(config: &MapperConfig, module: &str) -> std::result::Result<(), String> {
    let cmd = CommandLine::new("modprobe")
        .args(["--dry-run", "--quiet", module])
        .timeout(Duration::from_secs(10));
    match config.runner.run(&cmd) {
        Ok(out) if out.success() => Ok(()),
        Ok(_) => Err(format!("`modprobe -n {module}` finds no {module} module")),
        Err(e) => Err(format!("`modprobe -n {module}` could not run ({e})")),
    }
}

/// Whether `program` names an executable (a path, or a name found in `PATH`).
fn program_exists(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        return executable(Path::new(program));
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| executable(&dir.join(program))))
        .unwrap_or(false)
}

/// Runs a command of a command-line mapper and turns a failure into an
/// [`Error`]: `EBUSY` becomes [`Error::Busy`] on `busy_device`.
pub(crate) fn run_checked(
    runner: &dyn CommandRunner,
    cmd: &CommandLine,
    busy_device: Option<&Path>,
) -> Result<CommandOutput> {
    let out = runner.run(cmd).map_err(|e| match e {
        RunError::Spawn { command, source } => Error::Spawn { command, source },
        RunError::Timeout {
            command,
            timeout,
            stderr,
        } => Error::CommandTimeout {
            command,
            timeout,
            stderr,
        },
    })?;
    if out.success() {
        return Ok(out);
    }
    let errno = out.errno();
    if let (Some(libc::EBUSY), Some(device)) = (errno, busy_device) {
        return Err(Error::Busy {
            device: device.to_path_buf(),
            detail: Some(out.stderr.trim().to_string()),
        });
    }
    tracing::warn!(command = %cmd, code = ?out.code, ?errno, stderr = %out.stderr.trim(), "command failed");
    Err(Error::CommandFailed {
        command: cmd.to_string(),
        code: out.code,
        errno,
        stderr: out.stderr,
    })
}

/// The error for a command whose output does not say what it should.
pub(crate) fn parse_error(cmd: &CommandLine, stdout: &str, reason: impl Into<String>) -> Error {
    Error::Parse {
        command: cmd.to_string(),
        reason: reason.into(),
        output: truncate_for_error(stdout),
    }
}

fn truncate_for_error(s: &str) -> String {
    const MAX: usize = 2000;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests;
