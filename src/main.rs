//! `docker-rbd`: the plugin daemon (`serve`) and the tools around it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use docker_rbd::config::{RawSettings, Source};
use docker_rbd::plugin::RbdPlugin;
use graphdriver_api::{ServerConfig, SocketGroup};

mod cli;

/// Docker storage driver keeping container root filesystems on Ceph RBD.
#[derive(Parser)]
#[command(name = "docker-rbd", version, about)]
struct Cli {
    /// The `rbd` tool's global options, also accepted after the command.
    #[command(flatten)]
    global: cli::Common,
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
    /// Check the fleet: images without records, records without images,
    /// dangling parents, stale leases, stuck layers; exits 1 on a problem.
    Fsck(cli::repair::FsckArgs),
    /// Remove what fsck finds safe to remove, checking each again first.
    Gc(cli::repair::GcArgs),
    /// Copy into a layer what it reads from its parent chain, so that it
    /// stands alone (not for sealed layers: flatten their clones).
    Flatten(cli::repair::FlattenArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion(CompletionArgs),
    /// Print the man page (roff), e.g. `docker-rbd man > docker-rbd.1`.
    Man,
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
struct CompletionArgs {
    /// The shell.
    shell: clap_complete::Shell,
}

impl Command {
    /// The global options of a command that takes them all.
    fn common_mut(&mut self) -> Option<&mut cli::Common> {
        Some(match self {
            Command::Takeover(a) => &mut a.common,
            Command::Ls(a) => &mut a.common,
            Command::Info(a) => &mut a.common,
            Command::Containers(a) | Command::Hosts(a) => &mut a.common,
            Command::Lock(LockCommand::Ls(a)) => &mut a.common,
            Command::Tree(a) => &mut a.common,
            Command::Children(a) => &mut a.common,
            Command::Du(a) => &mut a.common,
            Command::Fsck(a) => &mut a.common,
            Command::Gc(a) => &mut a.common,
            Command::Flatten(a) => &mut a.common,
            Command::Serve(_)
            | Command::Completion(_)
            | Command::Man
            | Command::DockerCliPluginMetadata => return None,
        })
    }
}

#[derive(Args)]
struct TakeoverArgs {
    #[command(flatten)]
    common: cli::Common,
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
    /// Seconds a read-only layer stays mounted after its last Put (rbd.mountlinger).
    #[arg(long = "mount-linger", value_name = "SECONDS")]
    mount_linger: Option<String>,
    /// Directory holding the layers' mount points, outside the data root (rbd.mountroot).
    #[arg(long = "mount-root", value_name = "DIR")]
    mount_root: Option<String>,
    /// RADOS object size of new layer images, 64K to 32M (rbd.objectsize).
    #[arg(long = "object-size", value_name = "SIZE")]
    object_size: Option<String>,
    /// New layer images keep an object map (rbd.objectmap).
    #[arg(long = "object-map", value_name = "BOOL")]
    object_map: Option<String>,
    /// Config file of `key = value` lines, same keys as --storage-opt.
    #[arg(long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
}

impl SettingsArgs {
    /// Takes each setting not given here from `outer` (the options given
    /// before the command's name).
    pub fn inherit(&mut self, outer: &SettingsArgs) {
        macro_rules! fill {
            ($($field:ident),*) => {$(
                if self.$field.is_none() {
                    self.$field.clone_from(&outer.$field);
                }
            )*};
        }
        fill!(
            conf,
            id,
            keyring,
            cluster,
            pool,
            namespace,
            fs,
            basesize,
            mapper,
            flatten_depth,
            image_prefix,
            connect_timeout,
            host_id,
            lease_duration,
            lease_renew,
            auto_takeover,
            shared_init,
            mount_linger,
            mount_root,
            object_size,
            object_map,
            config
        );
    }

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
            ("mountlinger", self.mount_linger.clone()),
            ("mountroot", self.mount_root.clone()),
            ("objectsize", self.object_size.clone()),
            ("objectmap", self.object_map.clone()),
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
    /// Connections served at once; more wait until one closes.
    #[arg(long = "max-connections", default_value_t = ServerConfig::DEFAULT_MAX_CONNECTIONS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    max_connections: usize,
    /// Seconds a connection may take to send a request header (an idle
    /// keep-alive connection is closed after as long).
    #[arg(long = "header-timeout", default_value_t = ServerConfig::DEFAULT_HEADER_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86400), value_name = "SECS")]
    header_timeout: u64,
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
    let mut cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ");
            usage_error(first)
        }
    };
    match cli.command.common_mut() {
        Some(common) => common.inherit(&cli.global),
        None if cli.global.has_cli_only() => {
            usage_error("-n/--name, -m/--mon_host and --format are not options of this command")
        }
        None => {}
    }
    let inspect = |action: &str, r: Result<()>| -> Result<()> {
        match r {
            Ok(()) => cli::exit_now(0),
            Err(e) => cli::fail(action, &e),
        }
    };
    match cli.command {
        Command::Serve(mut args) => {
            args.settings.inherit(&cli.global.settings);
            init_logging();
            serve(args)
        }
        Command::Takeover(args) => {
            init_logging();
            inspect("takeover", takeover(args))
        }
        Command::Ls(args) => inspect("ls", cli::layers::ls(&args)),
        Command::Info(args) => inspect("info", cli::layers::info(&args)),
        Command::Containers(args) => inspect("containers", cli::fleet::containers(&args)),
        Command::Hosts(args) => inspect("hosts", cli::fleet::hosts(&args)),
        Command::Lock(LockCommand::Ls(args)) => inspect("lock ls", cli::fleet::lock_ls(&args)),
        Command::Tree(args) => inspect("tree", cli::layers::tree(&args)),
        Command::Children(args) => inspect("children", cli::fleet::children(&args)),
        Command::Du(args) => inspect("du", cli::fleet::du(&args)),
        Command::Fsck(args) => inspect("fsck", cli::repair::fsck(&args)),
        Command::Gc(args) => inspect("gc", cli::repair::gc(&args)),
        Command::Flatten(args) => inspect("flatten", cli::repair::flatten(&args)),
        Command::Completion(args) => {
            let mut text = Vec::new();
            clap_complete::generate(args.shell, &mut Cli::command(), "docker-rbd", &mut text);
            inspect("completion", cli::emit(&String::from_utf8_lossy(&text)))
        }
        Command::Man => {
            let mut text = Vec::new();
            let rendered = clap_mangen::Man::new(Cli::command())
                .render(&mut text)
                .map_err(anyhow::Error::from)
                .and_then(|()| cli::emit(&String::from_utf8_lossy(&text)));
            inspect("man", rendered)
        }
        Command::DockerCliPluginMetadata => cli::emit(&format!(
            "{{\"SchemaVersion\":\"0.1.0\",\"Vendor\":\"docker-rbd\",\"Version\":\"{}\",\"ShortDescription\":\"Inspect the docker-rbd fleet on Ceph RBD\"}}\n",
            env!("CARGO_PKG_VERSION")
        )),
    }
}

/// Prints `docker-rbd: invalid arguments: (22) ...: <what>` and exits 22.
fn usage_error(what: &str) -> ! {
    eprintln!(
        "docker-rbd: invalid arguments: ({}) {}: {what}",
        libc::EINVAL,
        cli::strerror(libc::EINVAL)
    );
    cli::exit_now(libc::EINVAL);
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DOCKER_RBD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// What `takeover` did, as printed with `--format json`.
#[derive(serde::Serialize)]
struct TakeoverRow {
    container: String,
    name: String,
    from: Option<String>,
    to: String,
    fenced: Vec<String>,
}

fn takeover(args: TakeoverArgs) -> Result<()> {
    let conn = cli::Conn::open(&args.common)?;
    let me = docker_rbd::engine::host_id_of(&conn.settings);
    if args.force {
        eprintln!(
            "WARNING: --force takes the container over even if its host is alive. If that host \
             runs it, it is fenced mid-write and the container dies there with I/O errors."
        );
    }
    let cluster = docker_rbd::fleet::takeover::Cluster {
        rados: &conn.rados,
        store: &conn.store,
        naming: &conn.settings.naming,
    };
    let done = docker_rbd::fleet::takeover::takeover(&cluster, &me, &args.container, args.force)
        .with_context(|| format!("takeover of container {:?}", args.container))?;
    let row = TakeoverRow {
        container: done.container,
        name: done.name,
        from: done.from,
        to: me,
        fenced: done.fenced,
    };
    cli::output(&args.common, &row, false, || {
        let first = match &row.from {
            Some(from) => format!(
                "took over container {} ({}) from host {from} for host {}; fenced: {}",
                row.container,
                row.name,
                row.to,
                if row.fenced.is_empty() {
                    "nothing held its lock".to_string()
                } else {
                    row.fenced.join(", ")
                }
            ),
            None => format!(
                "container {} ({}) is not in use on another host: nothing to take over",
                row.container, row.name
            ),
        };
        format!(
            "{first}\nstart it here with `docker start {}` (restart dockerd first if it does not list it)\n",
            row.name
        )
    })
}

fn serve(args: ServeArgs) -> Result<()> {
    let raw = args.settings.raw().context("invalid settings")?;
    let mut config = match &args.socket {
        Some(path) => ServerConfig::at(path),
        None => ServerConfig::for_plugin(&args.name),
    };
    config.mode = args.socket_mode;
    config.max_connections = args.max_connections;
    config.header_timeout = std::time::Duration::from_secs(args.header_timeout);
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
        // Requests run on the blocking pool's threads; layer tree walks
        // recurse, one frame per directory level, up to a bounded depth.
        .thread_stack_size(graphdriver_api::diff::WALK_STACK_SIZE)
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
