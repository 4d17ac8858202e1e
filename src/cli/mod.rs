//! The inspection commands (`ls`, `info`, `containers`, `hosts`,
//! `lock ls`), following the `rbd` tool's conventions: `--format
//! plain|json` with `--pretty-format`, IEC sizes in plain output and bytes
//! in JSON, nothing (plain) or `[]` (JSON) for an empty result, and errors
//! as `docker-rbd: <action> failed: (<errno>) <strerror>` with the errno as
//! the exit status.

pub mod fleet;
pub mod layers;
pub mod repair;

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use metadata::{
    ContainerRecord, DockerImageRecord, DockerLayerRecord, DockerTagRecord, HostRecord,
    LayerRecord, Store,
};
use serde::Serialize;

use crate::SettingsArgs;

/// Output format, as `rbd --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    /// Columns for humans.
    #[default]
    Plain,
    /// JSON for programs.
    Json,
}

/// The options of the `rbd` tool every command takes, before or after
/// the command's name (`docker-rbd -p rbd ls` and `docker-rbd ls -p rbd`),
/// plus the output format.
#[derive(Args, Default)]
pub struct Common {
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// Full cephx name, `client.<id>` (the same as --id <id>).
    #[arg(short = 'n', long = "name", value_name = "client.ID")]
    pub client_name: Option<String>,
    /// Monitor address(es), overriding the conf file's mon_host.
    #[arg(
        short = 'm',
        long = "mon_host",
        visible_alias = "mon-host",
        value_name = "ADDR"
    )]
    pub mon_host: Option<String>,
    /// Output format [default: plain].
    #[arg(long = "format", value_enum)]
    pub format: Option<Format>,
    /// Indent JSON output (only with --format json).
    #[arg(long = "pretty-format")]
    pub pretty: bool,
}

impl Common {
    /// Takes what was given only before the command's name from `outer`
    /// (an option after the name wins).
    pub fn inherit(&mut self, outer: &Common) {
        self.settings.inherit(&outer.settings);
        if self.client_name.is_none() {
            self.client_name.clone_from(&outer.client_name);
        }
        if self.mon_host.is_none() {
            self.mon_host.clone_from(&outer.mon_host);
        }
        self.format = self.format.or(outer.format);
        self.pretty |= outer.pretty;
    }

    /// The output format.
    pub fn format(&self) -> Format {
        self.format.unwrap_or_default()
    }

    /// Whether anything but Ceph and driver settings was given (which a
    /// command without output or cephx name would ignore).
    pub fn has_cli_only(&self) -> bool {
        self.client_name.is_some()
            || self.mon_host.is_some()
            || self.format.is_some()
            || self.pretty
    }

    /// The settings in force, `-n client.<id>` as the id.
    pub fn resolve(&self) -> Result<docker_rbd::config::Settings> {
        if self.pretty && self.format() != Format::Json {
            return Err(CliError::Usage("--pretty-format needs --format json".into()).into());
        }
        let mut raw = self.settings.raw().context("invalid settings")?;
        if let Some(name) = &self.client_name {
            let id = name
                .strip_prefix("client.")
                .ok_or_else(|| CliError::Usage(format!("-n/--name {name:?} is not client.<id>")))?;
            // Given with --id too, the settings name the key twice.
            raw.set("id", id, docker_rbd::config::Source::Flag);
        }
        raw.resolve().context("invalid settings")
    }
}

/// An error the CLI names itself, with its errno.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A layer, image, container or host that does not exist.
    #[error("no {what} {name:?}")]
    NotFound {
        /// Layer, image, container, host.
        what: &'static str,
        /// What was asked for.
        name: String,
    },
    /// A reference matching more than one thing.
    #[error("{name:?} names more than one {what}: {candidates}")]
    Ambiguous {
        /// Layer, container.
        what: &'static str,
        /// What was asked for.
        name: String,
        /// What it matches.
        candidates: String,
    },
    /// Bad options.
    #[error("{0}")]
    Usage(String),
    /// A layer that cannot be flattened, and why.
    #[error("layer {layer} cannot be flattened: {reason}")]
    CannotFlatten {
        /// The layer.
        layer: String,
        /// Why.
        reason: String,
    },
}

/// The errno an error stands for: the first Ceph errno in its chain, the
/// CLI's own, `EINVAL` for settings, else `EIO`.
pub fn errno_of(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        let ceph = cause.downcast_ref::<ceph_client::Error>().or_else(|| {
            cause
                .downcast_ref::<Box<ceph_client::Error>>()
                .map(|b| &**b)
        });
        if let Some(n) = ceph.and_then(|e| e.errno()) {
            return n;
        }
        if let Some(e) = cause.downcast_ref::<CliError>() {
            return match e {
                CliError::NotFound { .. } => libc::ENOENT,
                CliError::Ambiguous { .. }
                | CliError::Usage(_)
                | CliError::CannotFlatten { .. } => libc::EINVAL,
            };
        }
        if let Some(e) = cause.downcast_ref::<docker_rbd::fleet::FleetError>() {
            use docker_rbd::fleet::FleetError as F;
            match e {
                F::NoSuchContainer { .. } => return libc::ENOENT,
                F::AmbiguousContainer { .. } => return libc::EINVAL,
                F::OwnerAlive { .. } => return libc::EBUSY,
                _ => {}
            }
        }
        if let Some(e) = cause.downcast_ref::<docker_rbd::engine::EngineError>() {
            use docker_rbd::engine::EngineError as E;
            match e {
                E::NotFound { .. } | E::NoNamespace { .. } => return libc::ENOENT,
                E::Conflict { .. } => return libc::EBUSY,
                _ => {}
            }
        }
        if let Some(n) = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|e| e.raw_os_error())
        {
            return n;
        }
        if cause
            .downcast_ref::<docker_rbd::config::ConfigError>()
            .is_some()
        {
            return libc::EINVAL;
        }
    }
    libc::EIO
}

/// Prints `docker-rbd: <action> failed: (<errno>) <strerror>: <what>` and
/// exits with the errno.
pub fn fail(action: &str, err: &anyhow::Error) -> ! {
    let errno = errno_of(err);
    let detail = err
        .chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    eprintln!(
        "docker-rbd: {action} failed: ({errno}) {}: {detail}",
        strerror(errno)
    );
    exit_now(errno);
}

/// Ends an inspection command with `code`, output flushed, without the
/// process's exit handlers: librados' and librbd's C++ static destructors
/// race with their own threads at exit (seen as `terminate called after
/// throwing an instance of 'std::system_error'`, or a bare SIGSEGV, after
/// the command's work was done), the more so with a connection still open.
pub fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit takes an int and does not return; nothing of this
    // process is used after it.
    unsafe { libc::_exit(code) }
}

/// Writes `text` to stdout; a closed pipe (`| head`) is not an error.
pub fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write to stdout"),
    }
}

/// Prints `rows` as JSON or, plain, through `plain` (nothing when empty).
pub fn output<T: Serialize>(
    common: &Common,
    rows: &T,
    is_empty: bool,
    plain: impl FnOnce() -> String,
) -> Result<()> {
    let text = match common.format() {
        Format::Json => {
            let mut s = if common.pretty {
                serde_json::to_string_pretty(rows)
            } else {
                serde_json::to_string(rows)
            }
            .context("cannot encode JSON")?;
            s.push('\n');
            s
        }
        Format::Plain if is_empty => String::new(),
        Format::Plain => plain(),
    };
    emit(&text)
}

/// Lays out rows as left-aligned columns under upper-case headers, the
/// way `rbd ls -l` does.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        let last = cells.len().saturating_sub(1);
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// A dash for nothing, as `rbd` prints.
pub fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

/// The cluster connection of a command.
pub struct Conn {
    /// The connection. Never shut down: every command ends in
    /// [`exit_now`], and `rados_shutdown` while librbd's threads still
    /// finish an operation (a removal's, say) can abort the process
    /// (`pthread_mutex_lock: Assertion ... failed`) after the work is done.
    pub rados: std::mem::ManuallyDrop<ceph_client::Rados>,
    /// The fleet's records.
    pub store: Store,
    /// The settings in force.
    pub settings: docker_rbd::config::Settings,
}

impl Conn {
    /// Connects with the command's settings.
    pub fn open(common: &Common) -> Result<Conn> {
        let settings = common.resolve()?;
        let extra = common
            .mon_host
            .iter()
            .map(|m| ("mon_host".to_string(), m.clone()))
            .collect();
        let (rados, ioctx) = docker_rbd::engine::connect_with(&settings, extra, false)?;
        let store = Store::new(ioctx, settings.naming.metadata_prefix());
        Ok(Conn {
            rados: std::mem::ManuallyDrop::new(rados),
            store,
            settings,
        })
    }
}

/// Every record of the fleet, read once.
pub struct Snapshot {
    /// Layers by id.
    pub layers: BTreeMap<String, LayerRecord>,
    /// Hosts by id.
    pub hosts: BTreeMap<String, HostRecord>,
    /// Containers by id.
    pub containers: BTreeMap<String, ContainerRecord>,
    /// dockerd's layers by chain id.
    pub docker_layers: BTreeMap<String, DockerLayerRecord>,
    /// dockerd's images by id.
    pub images: BTreeMap<String, DockerImageRecord>,
    /// Tags by reference.
    pub tags: BTreeMap<String, DockerTagRecord>,
}

fn table_of<T: metadata::Record>(t: metadata::Table<T>) -> Result<BTreeMap<String, T>> {
    let object = t.object().to_string();
    let mut out = BTreeMap::new();
    for (key, value) in t.list().with_context(|| format!("cannot list {object}"))? {
        // An unreadable record is fsck's business; the listing goes on.
        if let Ok(v) = value {
            out.insert(key, v.value);
        }
    }
    Ok(out)
}

impl Snapshot {
    /// Reads all tables.
    pub fn read(store: &Store) -> Result<Snapshot> {
        Ok(Snapshot {
            layers: table_of(store.layers())?,
            hosts: table_of(store.hosts())?,
            containers: table_of(store.containers())?,
            docker_layers: table_of(store.docker_layers())?,
            images: table_of(store.docker_images())?,
            tags: table_of(store.docker_tags())?,
        })
    }

    /// Tags and container names using each layer at its tip: the tags of
    /// images whose top layer it is, and the names of containers whose
    /// read-write or init layer it is.
    pub fn used_by(&self) -> BTreeMap<String, Vec<String>> {
        let mut top_of_image: BTreeMap<&str, &str> = BTreeMap::new();
        for (id, image) in &self.images {
            if let Some(layer) =
                image_top_chain(&image.config).and_then(|c| self.docker_layers.get(&c))
            {
                top_of_image.insert(id.as_str(), layer.cache_id.as_str());
            }
        }
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (reference, tag) in &self.tags {
            if let Some(layer) = top_of_image.get(tag.image.as_str()) {
                out.entry(layer.to_string())
                    .or_default()
                    .push(reference.clone());
            }
        }
        for c in self.containers.values() {
            let name = c.name.trim_start_matches('/').to_string();
            out.entry(c.mount_id.clone())
                .or_default()
                .push(name.clone());
            if let Some(init) = &c.init_id {
                out.entry(init.clone()).or_default().push(name);
            }
        }
        out
    }

    /// Finds a layer by id, unique id prefix (4 or more), image tag or
    /// image id, or container (its read-write layer).
    pub fn resolve_layer(&self, reference: &str) -> Result<String, CliError> {
        if self.layers.contains_key(reference) {
            return Ok(reference.to_string());
        }
        if let Some(l) = self
            .tags
            .get(reference)
            .or_else(|| self.tags.get(&format!("{reference}:latest")))
            .and_then(|tag| self.image_top_layer(&tag.image))
        {
            return Ok(l);
        }
        let image_id = if reference.starts_with("sha256:") {
            reference.to_string()
        } else {
            format!("sha256:{reference}")
        };
        if let Some(l) = self.image_top_layer(&image_id) {
            return Ok(l);
        }
        let name = format!("/{}", reference.trim_start_matches('/'));
        let mut hits: Vec<String> = self
            .containers
            .iter()
            .filter(|(id, c)| {
                *id == reference
                    || c.name == name
                    || (reference.len() >= 4 && id.starts_with(reference))
            })
            .map(|(_, c)| c.mount_id.clone())
            .collect();
        if reference.len() >= 4 {
            hits.extend(
                self.layers
                    .keys()
                    .filter(|id| id.starts_with(reference))
                    .cloned(),
            );
        }
        hits.sort();
        hits.dedup();
        match hits.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(CliError::NotFound {
                what: "layer, image or container",
                name: reference.to_string(),
            }),
            many => Err(CliError::Ambiguous {
                what: "layer",
                name: reference.to_string(),
                candidates: many.join(", "),
            }),
        }
    }

    fn image_top_layer(&self, image_id: &str) -> Option<String> {
        let image = self.images.get(image_id)?;
        let chain = image_top_chain(&image.config)?;
        Some(self.docker_layers.get(&chain)?.cache_id.clone())
    }
}

/// The chain id of an image config's top layer.
pub fn image_top_chain(config: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    #[derive(serde::Deserialize)]
    struct RootFs {
        diff_ids: Vec<String>,
    }
    let c: Config = serde_json::from_str(config).ok()?;
    let ids: Vec<&str> = c.rootfs.diff_ids.iter().map(String::as_str).collect();
    docker_rbd::fleet::hydrate::chain_id(&ids)
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The text of an errno, without std's " (os error N)" suffix.
pub fn strerror(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}
