//! docker-rbd at fleet scale: a namespace holding thousands of layers.
//!
//! Makes `--layers` (default 2,000) image layers, each a clone of the base
//! image as `docker load` makes a layer, then times, median of `--rounds`:
//!
//! - `docker-rbd ls` and `docker-rbd ls -l`, beside `rbd ls` and
//!   `rbd ls -l` of the same namespace (the baseline: what `rbd` itself
//!   takes to list and describe the images);
//! - the engine's part of a `Status` (every layer record and the local
//!   mounts);
//! - opening the engine over them (an `Init`: connect, lease, recovery of
//!   every record);
//! - a second, diskless host's `Init` with hydrate: the same layers as
//!   Docker's, in images of 10 layers with a tag each, written into a
//!   fresh dockerd root (every layer held by the new host, its layer
//!   database, image configs and tags);
//! - removing every layer (retire and purge, as `Remove` and the background
//!   purge do), reported per layer.
//!
//! ```text
//! scripts/ceph-dev start /tmp/bench-ceph && source /tmp/bench-ceph/env
//! cargo build --release --bins --example scale_bench
//! target/release/examples/scale_bench [--layers 2000] [--rounds 5] [--threads 8]
//! ```
//!
//! Needs root, /dev/fuse, /dev/loop-control and the cluster variables of
//! `scripts/ceph-dev`. Works in a namespace of its own, removed at the end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use docker_rbd::config::{RawSettings, Settings, Source};
use docker_rbd::engine::{CreateOptions, Engine};
use docker_rbd::mapper::fuse::HelperCommand;
use metadata::LayerKind;
use testkit::bench::Stats;

fn id(n: usize) -> String {
    format!("{n:064x}")
}

fn median(v: Vec<Duration>) -> Duration {
    Stats::of(v).map_or(Duration::ZERO, |s| s.median)
}

fn ms(d: Duration) -> String {
    format!("{} ms", testkit::bench::ms(d))
}

struct Cluster {
    conf: String,
    id: String,
    keyring: String,
    pool: String,
    namespace: String,
}

impl Cluster {
    fn from_env(namespace: String) -> Result<Self> {
        let var = |name: &str| {
            std::env::var(name)
                .with_context(|| format!("{name} is not set (source a scripts/ceph-dev env)"))
        };
        Ok(Self {
            conf: var("DOCKER_RBD_CEPH_CONF")?,
            id: var("DOCKER_RBD_CEPH_ID")?,
            keyring: var("DOCKER_RBD_CEPH_KEYRING")?,
            pool: var("DOCKER_RBD_POOL")?,
            namespace,
        })
    }

    fn settings(&self) -> Result<Settings> {
        let mut raw = RawSettings::default();
        for (k, v) in [
            ("conf", &self.conf),
            ("id", &self.id),
            ("keyring", &self.keyring),
            ("pool", &self.pool),
            ("namespace", &self.namespace),
            ("mapper", &"fuse".to_string()),
        ] {
            raw.set(k, v, Source::Flag);
        }
        Ok(raw.resolve()?)
    }

    /// `program args... --namespace NS` with this cluster's identity, timed;
    /// fails when the command does.
    fn timed(&self, program: &Path, args: &[&str]) -> Result<(Duration, usize)> {
        let started = Instant::now();
        let out = Command::new(program)
            .args(["-c", &self.conf, "--id", &self.id, "-k", &self.keyring])
            .args(["-p", &self.pool, "--namespace", &self.namespace])
            .args(args)
            .output()
            .with_context(|| format!("run {}", program.display()))?;
        let took = started.elapsed();
        if !out.status.success() {
            bail!(
                "{} {}: {}",
                program.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((took, String::from_utf8_lossy(&out.stdout).lines().count()))
    }
}

/// Runs `f(i)` for `0..n` on `threads` threads.
fn parallel(n: usize, threads: usize, f: impl Fn(usize) -> Result<()> + Sync) -> Result<()> {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        f(i)?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("worker panicked"))
    })
}

fn main() -> Result<()> {
    let (mut layers, mut rounds, mut threads) = (2000usize, 5usize, 8usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next().with_context(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--layers" => layers = value.parse().context("--layers")?,
            "--rounds" => rounds = value.parse().context("--rounds")?,
            "--threads" => threads = value.parse().context("--threads")?,
            other => bail!("unknown argument {other}"),
        }
    }
    let bin_dir: PathBuf = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .context("the example's directory")?
        .to_path_buf();
    let cli = bin_dir.join("docker-rbd");
    if !cli.is_file() {
        bail!("{} is missing: cargo build --release --bins", cli.display());
    }
    let helper = HelperCommand::binary(bin_dir.join("docker-rbd-fuse"));
    let cluster = Cluster::from_env(format!("scale-bench-{}", std::process::id()))?;
    let home = tempfile::tempdir()?;
    let engine = Engine::open_with(cluster.settings()?, home.path(), helper.clone())?;
    let image = CreateOptions {
        kind: LayerKind::Image,
        size: None,
        mount_label: String::new(),
    };

    let started = Instant::now();
    parallel(layers, threads, |i| {
        engine
            .create(&id(i + 1), "", &image)
            .with_context(|| format!("create layer {i}"))
            .map(|_| ())
    })?;
    let made = started.elapsed();
    println!(
        "{layers} layers made in {:.1} s ({:.1} ms each, {threads} threads)",
        made.as_secs_f64(),
        made.as_secs_f64() * 1000.0 / layers as f64
    );

    let mut rows: Vec<(String, Duration, String)> = Vec::new();
    let rbd = PathBuf::from("rbd");
    for (label, program, args, baseline) in [
        ("docker-rbd ls", &cli, &["ls"][..], "rbd ls"),
        ("docker-rbd ls -l", &cli, &["ls", "-l"][..], "rbd ls -l"),
    ] {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        let base_args: Vec<&str> = baseline.split(' ').skip(1).collect();
        for _ in 0..rounds {
            let (took, lines) = cluster.timed(program, args)?;
            if lines < layers {
                bail!("{label} listed {lines} lines for {layers} layers");
            }
            ours.push(took);
            theirs.push(cluster.timed(&rbd, &base_args)?.0);
        }
        rows.push((label.to_string(), median(ours), String::new()));
        rows.push((baseline.to_string(), median(theirs), "baseline".into()));
    }

    let mut status = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let listed = engine.list()?.len();
        engine.mounts()?;
        status.push(t.elapsed());
        if listed != layers {
            bail!("the engine lists {listed} layers, not {layers}");
        }
    }
    rows.push((
        "Status (engine: records and mounts)".into(),
        median(status),
        String::new(),
    ));

    drop(engine);
    let t = Instant::now();
    let engine = Engine::open_with(cluster.settings()?, home.path(), helper.clone())?;
    rows.push((
        "Init (open, lease, recovery)".into(),
        t.elapsed(),
        "once".into(),
    ));

    // Docker's records of the layers: images of 10 layers, a tag each.
    let per_image = 10;
    let diff = |i: usize| format!("sha256:{:064x}", i + 0xd1ff_0000);
    let chain = |i: usize| {
        let start = i - i % per_image;
        let diffs: Vec<String> = (start..=i).map(diff).collect();
        let refs: Vec<&str> = diffs.iter().map(String::as_str).collect();
        docker_rbd::fleet::hydrate::chain_id(&refs).expect("a chain")
    };
    let store = engine.store();
    let me = std::collections::BTreeSet::from([engine.host_id().to_string()]);
    parallel(layers, threads, |i| {
        let rec = metadata::DockerLayerRecord {
            diff_id: diff(i),
            size: 0,
            cache_id: id(i + 1),
            parent: (i % per_image != 0).then(|| chain(i - 1)),
            descriptor: None,
            tar_split: None,
            holders: me.clone(),
        };
        store.docker_layers().create(&chain(i), &rec)?;
        if i % per_image == per_image - 1 || i == layers - 1 {
            let start = i - i % per_image;
            let diffs: Vec<String> = (start..=i).map(|d| format!("\"{}\"", diff(d))).collect();
            let config = format!(
                r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
                diffs.join(",")
            );
            let image_id = docker_rbd::digest::docker_digest(config.as_bytes());
            store.docker_images().create(
                &image_id,
                &metadata::DockerImageRecord {
                    config,
                    parent: None,
                    last_updated: None,
                    holders: me.clone(),
                },
            )?;
            let repo = format!("scale{}", i / per_image);
            store.docker_tags().create(
                &format!("{repo}:latest"),
                &metadata::DockerTagRecord {
                    repository: repo,
                    image: image_id,
                    holders: me.clone(),
                },
            )?;
        }
        Ok(())
    })?;
    let images = layers.div_ceil(per_image);
    let diskless = tempfile::tempdir()?;
    let home2 = diskless.path().join("docker").join("rbd");
    std::fs::create_dir_all(&home2)?;
    let mut settings2 = cluster.settings()?;
    settings2.host_id = Some("scale-bench-diskless".into());
    let t = Instant::now();
    let engine2 = std::sync::Arc::new(Engine::open_with(settings2, &home2, helper.clone())?);
    let fleet = docker_rbd::fleet::Fleet::start(engine2.clone(), true)?;
    let hydrated = t.elapsed();
    let report = fleet.hydrate_report();
    if report.layers != layers || report.images != images || !report.skipped.is_empty() {
        bail!(
            "hydrate wrote {} layers and {} images of {layers} and {images}; skipped: {:?}",
            report.layers,
            report.images,
            report.skipped.iter().take(3).collect::<Vec<_>>()
        );
    }
    rows.push((
        format!("Init with hydrate ({layers} layers, {images} images)"),
        hydrated,
        "once, a fresh host".into(),
    ));
    drop(fleet);
    let mount_dir2 = engine2.mount_dir().to_path_buf();
    // The diskless host lets go of every layer again.
    parallel(layers, threads, |i| {
        engine2
            .remove(&id(i + 1))
            .with_context(|| format!("release layer {i} on the second host"))
    })?;
    drop(engine2);
    let _ = std::fs::remove_dir(mount_dir2);

    let t = Instant::now();
    parallel(layers, threads, |i| {
        engine
            .remove(&id(i + 1))
            .with_context(|| format!("remove layer {i}"))
    })?;
    let removed = t.elapsed();

    println!(
        "\n{:<40} {:>10}",
        format!("{layers} layers, median of {rounds}"),
        ""
    );
    for (label, took, note) in &rows {
        println!("{label:<40} {:>10}  {note}", ms(*took));
    }
    println!(
        "\nremoving {layers} layers (retire and purge, {threads} threads): {:.1} s, {:.1} ms per layer",
        removed.as_secs_f64(),
        removed.as_secs_f64() * 1000.0 / layers as f64
    );

    let mount_dir = engine.mount_dir().to_path_buf();
    drop(engine);
    // Its (empty) directory under rbd.mountroot.
    let _ = std::fs::remove_dir(mount_dir);
    cleanup_namespace(&cluster)
}

/// Removes what is left in the namespace (the base image, the metadata
/// objects) and the namespace.
fn cleanup_namespace(cluster: &Cluster) -> Result<()> {
    let rados = ceph_client::Rados::connect(&ceph_client::ConnectConfig {
        conf: Some(cluster.conf.clone().into()),
        id: Some(cluster.id.clone()),
        keyring: Some(cluster.keyring.clone().into()),
        ..Default::default()
    })?;
    let pool = rados.ioctx(&cluster.pool, None)?;
    let ioctx = rados.ioctx(&cluster.pool, Some(&cluster.namespace))?;
    testkit::driver::remove_namespace("scale_bench", &ioctx, &pool, &cluster.namespace);
    if ceph_client::rbd::namespace_exists(&pool, &cluster.namespace)? {
        bail!("namespace {} is left; see above", cluster.namespace);
    }
    Ok(())
}
