//! `docker-rbd`: the plugin daemon (`serve`) and the tools around it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use docker_rbd::config::{RawSettings, Source};
use docker_rbd::plugin::RbdPlugin;
use graphdriver_api::{ServerConfig, SocketGroup};

mod cli;

/// Docker storage driver keeping container root filesystems on Ceph RBD.
#[derive(Parser)]
#[command(name = "docker-rbd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the graphdriver plugin for `dockerd --experimental -s rbd`.
    Serve(ServeArgs),
    /// Take over a container whose host died with it running: fence that
    /// host (blocklist its clients), break its lock on the container's
    /// layer, and make this host the container's owner.
    Takeover(TakeoverArgs),
    /// List the fleet's layers; -l adds size, parent, kind, users, hosts, lock.
    #[command(visible_alias = "list")]
    Ls(cli::layers::LsArgs),
    /// Show all that is known of a layer, image or container's layer.
    Info(cli::layers::InfoArgs),
    /// List the fleet's containers: id, name, image, state, owner, last host.
    Containers(cli::fleet::PlainArgs),
    /// List the fleet's hosts: id, address, alive, lease expiry, containers.
    Hosts(cli::fleet::PlainArgs),
    /// Locks on containers' read-write layers.
    #[command(subcommand)]
    Lock(LockCommand),
    /// The layer graph as a tree, image tags and container names at the tips.
    Tree(cli::layers::TreeArgs),
    /// List the layers cloned from a layer.
    Children(cli::fleet::ChildrenArgs),
    /// Provisioned and used bytes of layers, with a total row.
    #[command(visible_alias = "disk-usage")]
    Du(cli::fleet::DuArgs),
    /// Metadata for the Docker CLI, so `docker rbd ...` runs docker-rbd.
    #[command(name = "docker-cli-plugin-metadata", hide = true)]
    DockerCliPluginMetadata,
}

#[derive(Subcommand)]
enum LockCommand {
    /// The exclusive lock on a container's read-write layer.
    #[command(visible_alias = "list")]
    Ls(cli::fleet::LockLsArgs),
}

#[derive(Args)]
struct TakeoverArgs {
    #[command(flatten)]
    settings: SettingsArgs,
    /// Take it over even while the owner's lease is live. DANGEROUS: if
    /// that host is in fact running the container, it is fenced mid-write
    /// and the container dies with I/O errors there. See docs/fleet.md.
    #[arg(long)]
    force: bool,
    /// The container: id, unique id prefix, or name.
    container: String,
}

/// Ceph and driver settings; each also exists as `--storage-opt rbd.<key>`.
#[derive(Args, Default)]
pub struct SettingsArgs {
    /// ceph.conf path (rbd.conf).
    #[arg(short = 'c', long = "conf", value_name = "PATH")]
    conf: Option<PathBuf>,
    /// cephx client id, without `client.` (rbd.id).
    #[arg(long = "id", visible_alias = "user", value_name = "ID")]
    id: Option<String>,
    /// Keyring path (rbd.keyring).
    #[arg(short = 'k', long = "keyring", value_name = "PATH")]
    keyring: Option<PathBuf>,
    /// Cluster name (rbd.cluster).
    #[arg(long = "cluster")]
    cluster: Option<String>,
    /// Pool for layers and metadata (rbd.pool).
    #[arg(short = 'p', long = "pool")]
    pool: Option<String>,
    /// RADOS namespace: one namespace is one fleet (rbd.namespace).
    #[arg(long = "namespace")]
    namespace: Option<String>,
    /// Filesystem of layers: ext4 or xfs (rbd.fs).
    #[arg(long = "fs")]
    fs: Option<String>,
    /// Size of the base image, e.g. 10G (rbd.basesize).
    #[arg(long = "basesize", value_name = "SIZE")]
    basesize: Option<String>,
    /// auto, krbd, nbd or fuse (rbd.mapper).
    #[arg(long = "mapper")]
    mapper: Option<String>,
    /// Flatten layers with more ancestors than this (rbd.flattendepth).
    #[arg(long = "flatten-depth", value_name = "N")]
    flatten_depth: Option<String>,
    /// Prefix of every image and object name (rbd.imageprefix).
    #[arg(long = "image-prefix", value_name = "PREFIX")]
    image_prefix: Option<String>,
    /// Seconds to wait for the cluster (rbd.connecttimeout).
    #[arg(long = "connect-timeout", value_name = "SECONDS")]
    connect_timeout: Option<String>,
    /// This host's id in the fleet (rbd.hostid); default from /etc/machine-id.
    #[arg(long = "host-id", value_name = "ID")]
    host_id: Option<String>,
    /// Seconds a host's lease lasts unrenewed (rbd.leaseduration).
    #[arg(long = "lease-duration", value_name = "SECONDS")]
    lease_duration: Option<String>,
    /// Seconds between lease renewals (rbd.leaserenew).
    #[arg(long = "lease-renew", value_name = "SECONDS")]
    lease_renew: Option<String>,
    /// Take over containers whose host died when they are started (rbd.autotakeover).
    #[arg(long = "auto-takeover", value_name = "BOOL")]
    auto_takeover: Option<String>,
    /// Share one init layer per image layer among containers (rbd.sharedinit).
    #[arg(long = "shared-init", value_name = "BOOL")]
    shared_init: Option<String>,
    /// Config file of `key = value` lines, same keys as --storage-opt.
    #[arg(long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
}

impl SettingsArgs {
    pub fn raw(&self) -> Result<RawSettings> {
        let mut raw = match &self.config {
            Some(path) => RawSettings::from_file(path)?,
            None => RawSettings::default(),
        };
        let mut flags = RawSettings::default();
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        for (key, value) in [
            ("conf", path(&self.conf)),
            ("id", self.id.clone()),
            ("keyring", path(&self.keyring)),
            ("cluster", self.cluster.clone()),
            ("pool", self.pool.clone()),
            ("namespace", self.namespace.clone()),
            ("fs", self.fs.clone()),
            ("basesize", self.basesize.clone()),
            ("mapper", self.mapper.clone()),
            ("flattendepth", self.flatten_depth.clone()),
            ("imageprefix", self.image_prefix.clone()),
            ("connecttimeout", self.connect_timeout.clone()),
            ("hostid", self.host_id.clone()),
            ("leaseduration", self.lease_duration.clone()),
            ("leaserenew", self.lease_renew.clone()),
            ("autotakeover", self.auto_takeover.clone()),
            ("sharedinit", self.shared_init.clone()),
        ] {
            if let Some(value) = value {
                flags.set(key, &value, Source::Flag);
            }
        }
        raw = raw.overlay(flags);
        // Validate now so a bad flag fails at start, not at dockerd's Init.
        raw.clone().resolve()?;
        Ok(raw)
    }
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    settings: SettingsArgs,
    /// Plugin name: dockerd finds /run/docker/plugins/<name>.sock for `-s <name>`.
    #[arg(long = "name", default_value = "rbd")]
    name: String,
    /// Socket path (overrides --name's default path).
    #[arg(long = "socket", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Socket permission bits, octal.
    #[arg(long = "socket-mode", default_value = "600", value_parser = parse_octal)]
    socket_mode: u32,
    /// Group owning the socket (name or gid).
    #[arg(long = "socket-group", value_name = "GROUP")]
    socket_group: Option<String>,
    /// Where the plugin keeps what must survive its own restart but not a
    /// reboot (the accepted Init request). Use a tmpfs.
    #[arg(
        long = "run-dir",
        default_value = "/run/docker-rbd",
        value_name = "DIR"
    )]
    run_dir: PathBuf,
}

fn parse_octal(s: &str) -> std::result::Result<u32, String> {
    u32::from_str_radix(s, 8).map_err(|_| format!("{s:?} is not an octal mode"))
}

fn main() -> Result<()> {
    // The fuse mapper's server process, when no docker-rbd-fuse binary is
    // installed beside this one (see docker_rbd::mapper::fuse).
    let mut args = std::env::args_os();
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "fuse-serve")
    {
        let program = args.next().unwrap_or_default();
        let rest = args.skip(1);
        let code = docker_rbd::mapper::fuse::serve_main(std::iter::once(program).chain(rest));
        std::process::exit(if code == std::process::ExitCode::SUCCESS {
            0
        } else {
            1
        });
    }
    // As a Docker CLI plugin (`docker rbd ls`), argv[1] is `rbd`.
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "rbd") {
        argv.remove(1);
    }
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ");
            eprintln!(
                "docker-rbd: invalid arguments: ({}) {}: {first}",
                libc::EINVAL,
                cli::strerror(libc::EINVAL)
            );
            std::process::exit(libc::EINVAL);
        }
    };
    let inspect = |action: &str, r: Result<()>| -> Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(e) => cli::fail(action, &e),
        }
    };
    match cli.command {
        Command::Serve(args) => {
            init_logging();
            serve(args)
        }
        Command::Takeover(args) => {
            init_logging();
            takeover(args)
        }
        Command::Ls(args) => inspect("ls", cli::layers::ls(&args)),
        Command::Info(args) => inspect("info", cli::layers::info(&args)),
        Command::Containers(args) => inspect("containers", cli::fleet::containers(&args)),
        Command::Hosts(args) => inspect("hosts", cli::fleet::hosts(&args)),
        Command::Lock(LockCommand::Ls(args)) => inspect("lock ls", cli::fleet::lock_ls(&args)),
        Command::Tree(args) => inspect("tree", cli::layers::tree(&args)),
        Command::Children(args) => inspect("children", cli::fleet::children(&args)),
        Command::Du(args) => inspect("du", cli::fleet::du(&args)),
        Command::DockerCliPluginMetadata => cli::emit(&format!(
            "{{\"SchemaVersion\":\"0.1.0\",\"Vendor\":\"docker-rbd\",\"Version\":\"{}\",\"ShortDescription\":\"Inspect the docker-rbd fleet on Ceph RBD\"}}\n",
            env!("CARGO_PKG_VERSION")
        )),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DOCKER_RBD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn takeover(args: TakeoverArgs) -> Result<()> {
    let settings = args
        .settings
        .raw()
        .context("invalid settings")?
        .resolve()
        .context("invalid settings")?;
    let (rados, ioctx) = docker_rbd::engine::connect(&settings)?;
    let store = metadata::Store::new(ioctx, settings.naming.metadata_prefix());
    let me = docker_rbd::engine::host_id_of(&settings);
    if args.force {
        eprintln!(
            "WARNING: --force takes the container over even if its host is alive. If that host \
             runs it, it is fenced mid-write and the container dies there with I/O errors."
        );
    }
    let cluster = docker_rbd::fleet::takeover::Cluster {
        rados: &rados,
        store: &store,
        naming: &settings.naming,
    };
    let done = docker_rbd::fleet::takeover::takeover(&cluster, &me, &args.container, args.force)
        .with_context(|| format!("takeover of container {:?} failed", args.container))?;
    match &done.from {
        Some(from) => println!(
            "took over container {} ({}) from host {from} for host {me}; fenced: {}",
            done.container,
            done.name,
            if done.fenced.is_empty() {
                "nothing held its lock".to_string()
            } else {
                done.fenced.join(", ")
            }
        ),
        None => println!(
            "container {} ({}) is not in use on another host: nothing to take over",
            done.container, done.name
        ),
    }
    println!(
        "start it here with `docker start {}` (restart dockerd first if it does not list it)",
        done.name
    );
    Ok(())
}

fn serve(args: ServeArgs) -> Result<()> {
    let raw = args.settings.raw().context("invalid settings")?;
    let mut config = match &args.socket {
        Some(path) => ServerConfig::at(path),
        None => ServerConfig::for_plugin(&args.name),
    };
    config.mode = args.socket_mode;
    config.group = args.socket_group.as_deref().map(|g| {
        g.parse::<SocketGroup>()
            .unwrap_or_else(|never| match never {})
    });
    let saved_init = args.run_dir.join(format!("{}.init.json", args.name));
    let plugin = Arc::new(RbdPlugin::new(raw, Some(saved_init)));
    // Restarted under a running dockerd, which will not call Init again.
    match plugin.resume() {
        Ok(true) => tracing::info!("resumed the previous run's Init"),
        Ok(false) => {}
        Err(e) => {
            tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "cannot resume the previous run's Init; waiting for dockerd's")
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let shutdown = graphdriver_api::shutdown_signal().context("cannot install signal handlers")?;
        tracing::info!(socket = %config.socket.display(), version = env!("CARGO_PKG_VERSION"), "docker-rbd serving");
        graphdriver_api::serve(plugin, config, shutdown)
            .await
            .context("plugin server failed")
    })
}
