//! Cost of creating a layer against what its parent holds.
//!
//! A layer is a clone of its parent's snapshot, so creating one should cost
//! the same whether the parent holds 1 MiB or 1 GiB. This measures it: the
//! baseline is `create` of children of a parent holding 1 MiB, the
//! contenders `create` of children of parents holding 100 MiB and 1 GiB
//! (written through the filesystem, then sealed by the first child), same
//! engine, same run. It
//! also times `get` (map + mount) of a fresh child of each, and prints the
//! medians side by side. Then the space a tiny layer costs, with
//! docker-rbd's image options beside RBD's defaults ([`space_per_layer`]).
//!
//! ```text
//! scripts/ceph-dev start /tmp/bench-ceph && source /tmp/bench-ceph/env
//! cargo build --release --bins --example create_bench
//! target/release/examples/create_bench [--big-mib 1024] [--rounds 10] [--tiny-layers 8] [--plot-dir DIR]
//! ```
//!
//! Needs root, /dev/fuse, /dev/loop-control and the cluster variables of
//! `scripts/ceph-dev`. Works in a namespace of its own, removed at the end.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use docker_rbd::config::{RawSettings, Source};
use docker_rbd::engine::{CreateOptions, Engine};
use docker_rbd::mapper::fuse::HelperCommand;
use metadata::LayerKind;
use testkit::bench::Stats;
use testkit::plot::{Series, bars};

fn id(n: u64) -> String {
    format!("{n:064x}")
}

fn median(v: Vec<Duration>) -> Duration {
    Stats::of(v).map_or(Duration::ZERO, |s| s.median)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Writes `mib` MiB of incompressible-ish data into the layer's root.
fn fill(engine: &Engine, layer: &str, mib: u64) -> Result<()> {
    let root = engine.get(layer, "")?;
    let mut file = std::fs::File::create(root.join("data")).context("create data file")?;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        for (j, b) in block.iter_mut().enumerate() {
            *b = (i as usize ^ j).wrapping_mul(31) as u8;
        }
        file.write_all(&block)?;
    }
    file.sync_all()?;
    drop(file);
    engine.put(layer)?;
    Ok(())
}

fn main() -> Result<()> {
    let mut big_mib = 1024u64;
    let mut rounds = 10usize;
    let mut tiny_layers = 8usize;
    let mut plot_dir = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next().with_context(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--big-mib" => big_mib = value.parse().context("--big-mib")?,
            "--rounds" => rounds = value.parse().context("--rounds")?,
            "--tiny-layers" => tiny_layers = value.parse().context("--tiny-layers")?,
            "--plot-dir" => plot_dir = Some(std::path::PathBuf::from(value)),
            other => bail!("unknown argument {other}"),
        }
    }
    if rounds < 2 {
        bail!("--rounds must be at least 2 (the first create is reported apart)");
    }
    let namespace = format!("create-bench-{}", std::process::id());
    let home = tempfile::tempdir()?;
    let basesize = format!("{}M", (big_mib + 512).max(1024));
    let engine = open_engine(&namespace, home.path(), &[("basesize", &basesize)])?;
    let image = CreateOptions {
        kind: LayerKind::Image,
        size: None,
        mount_label: String::new(),
    };

    // Parents holding 1 MiB (the baseline), 100 MiB and `big_mib`.
    let sizes = [1, 100.min(big_mib), big_mib];
    let parents: Vec<String> = (1..=sizes.len() as u64).map(id).collect();
    let started = Instant::now();
    for (parent, &mib) in parents.iter().zip(&sizes) {
        engine.create(parent, "", &image)?;
        fill(&engine, parent, mib)?;
    }
    println!(
        "parents filled: {sizes:?} MiB in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut results = Vec::new();
    let mut next = 100u64;
    for (parent, &mib) in parents.iter().zip(&sizes) {
        let (mut creates, mut gets) = (Vec::new(), Vec::new());
        let mut children = Vec::new();
        for _ in 0..rounds {
            let child = id(next);
            next += 1;
            let t = Instant::now();
            engine.create(&child, parent, &image)?;
            creates.push(t.elapsed());
            let t = Instant::now();
            engine.get(&child, "")?;
            gets.push(t.elapsed());
            engine.put(&child)?;
            children.push(child);
        }
        // The first create also seals the parent (one snapshot); report it apart.
        let first = creates.remove(0);
        results.push((mib, first, median(creates), median(gets)));
        for child in children {
            engine.remove(&child)?;
        }
    }
    for parent in &parents {
        engine.remove(parent)?;
    }

    println!(
        "\n{:<28} {:>22} {:>16} {:>16}",
        "", "first create (seals)", "create median", "get median"
    );
    for (mib, first, create, get) in &results {
        let label = if *mib == sizes[0] {
            format!("{mib} MiB parent (baseline)")
        } else {
            format!("{mib} MiB parent")
        };
        println!(
            "{label:<28} {:>22} {:>16} {:>16}",
            ms(*first),
            ms(*create),
            ms(*get)
        );
    }
    let base = results[0].2.as_secs_f64();
    for (mib, _, create, _) in &results[1..] {
        println!(
            "create on the {mib} MiB parent / on the 1 MiB parent: {:.2}x ({} rounds each)",
            create.as_secs_f64() / base,
            rounds - 1
        );
    }
    if let Some(dir) = &plot_dir {
        let millis = |pick: fn(&(u64, Duration, Duration, Duration)) -> Duration| {
            results
                .iter()
                .map(|r| pick(r).as_secs_f64() * 1000.0)
                .collect::<Vec<_>>()
        };
        let labels: Vec<String> = sizes
            .iter()
            .map(|m| format!("parent holds {m} MiB"))
            .collect();
        bars(
            &dir.join("create.png"),
            &format!(
                "Layer create and get against the parent's size (median of {})",
                rounds - 1
            ),
            "ms",
            &labels,
            &[
                Series::new("create (a clone)", millis(|r| r.2)),
                Series::new("get (map + mount)", millis(|r| r.3)),
            ],
        )
        .map_err(anyhow::Error::msg)?;
    }

    // The base image and the namespace go too.
    close(engine);
    cleanup_namespace(&namespace)?;

    space_per_layer(tiny_layers)?;
    Ok(())
}

/// An engine on its own Home and namespace, with the cluster of the
/// environment and `extra` settings.
fn open_engine(namespace: &str, home: &Path, extra: &[(&str, &str)]) -> Result<Engine> {
    let var = |name: &str| {
        std::env::var(name)
            .with_context(|| format!("{name} is not set (source a scripts/ceph-dev env)"))
    };
    let mut raw = RawSettings::default();
    for (k, v) in [
        ("conf", var("DOCKER_RBD_CEPH_CONF")?),
        ("id", var("DOCKER_RBD_CEPH_ID")?),
        ("keyring", var("DOCKER_RBD_CEPH_KEYRING")?),
        ("pool", var("DOCKER_RBD_POOL")?),
        ("namespace", namespace.to_string()),
        ("mapper", "fuse".into()),
    ] {
        raw.set(k, &v, Source::Flag);
    }
    for (k, v) in extra {
        raw.set(k, v, Source::Flag);
    }
    let settings = raw.resolve()?;
    let helper = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("docker-rbd-fuse"))
        .filter(|p| p.is_file())
        .map(HelperCommand::binary)
        .unwrap_or_else(HelperCommand::locate);
    Ok(Engine::open_with(settings, home, helper)?)
}

/// Space per tiny layer: a chain of `count` image layers (as a Dockerfile
/// makes them), each adding three files of a few bytes over a 10 GiB base,
/// with docker-rbd's image options beside RBD's defaults (4 MiB objects, no
/// object map) as the baseline. Per layer: the RADOS data it holds (each
/// object at its logical size), what `rbd du` says it uses, and the time
/// to remove it.
fn space_per_layer(count: usize) -> Result<()> {
    println!(
        "\nspace per tiny layer: a chain of {count} layers of three tiny files each, 10 GiB base"
    );
    println!(
        "{:<40} {:>14} {:>14} {:>16}",
        "", "RADOS data", "rbd du used", "remove median"
    );
    for (label, extra) in [
        (
            "4 MiB objects, no object map (baseline)",
            &[("objectsize", "4M"), ("objectmap", "false")][..],
        ),
        ("docker-rbd defaults (256 KiB, object map)", &[][..]),
    ] {
        let namespace = format!("space-bench-{}", std::process::id());
        let home = tempfile::tempdir()?;
        let mut settings = vec![("basesize", "10G"), ("flattendepth", "15")];
        settings.extend_from_slice(extra);
        let engine = open_engine(&namespace, home.path(), &settings)?;
        let image = CreateOptions {
            kind: LayerKind::Image,
            size: None,
            mount_label: String::new(),
        };
        let layers: Vec<String> = (1..=count as u64).map(id).collect();
        let mut parent = String::new();
        for layer in &layers {
            engine.create(layer, &parent, &image)?;
            let root = engine.get(layer, "")?;
            for name in ["a", "b", "c"] {
                std::fs::write(root.join(format!("{layer}-{name}")), name)?;
            }
            engine.put(layer)?;
            engine.release_idle_mounts(true);
            parent = layer.clone();
        }
        let ioctx = engine.store().ioctx().clone();
        let objects = ioctx.list_objects()?;
        let (mut data, mut used) = (0u64, 0u64);
        for layer in &layers {
            let name = engine.info(layer)?.record.image;
            let img = ceph_client::rbd::Image::open_read_only(&ioctx, &name, None)?;
            let prefix = format!("rbd_data.{}.", img.id()?);
            for o in objects.iter().filter(|o| o.starts_with(&prefix)) {
                data += ioctx.stat(o)?.0;
            }
            used += rbd_du_used(&namespace, &name)?;
        }
        let mut removes = Vec::new();
        for layer in layers.iter().rev() {
            let t = Instant::now();
            engine.remove(layer)?;
            removes.push(t.elapsed());
        }
        let per = |bytes: u64| {
            format!(
                "{:.2} MiB",
                bytes as f64 / count as f64 / f64::from(1 << 20)
            )
        };
        println!(
            "{label:<40} {:>14} {:>14} {:>16}",
            per(data),
            per(used),
            ms(median(removes))
        );
        close(engine);
        cleanup_namespace(&namespace)?;
    }
    Ok(())
}

/// Stops `engine` and removes its (empty) mount directory.
fn close(engine: Engine) {
    let mount_dir = engine.mount_dir().to_path_buf();
    drop(engine);
    let _ = std::fs::remove_dir(mount_dir);
}

/// `rbd du`'s used bytes of one image of the namespace.
fn rbd_du_used(namespace: &str, image: &str) -> Result<u64> {
    let var = |n: &str| std::env::var(n).with_context(|| format!("{n} is not set"));
    let out = std::process::Command::new("rbd")
        .args(["-c", &var("DOCKER_RBD_CEPH_CONF")?])
        .args(["--id", &var("DOCKER_RBD_CEPH_ID")?])
        .args(["--keyring", &var("DOCKER_RBD_CEPH_KEYRING")?])
        .args(["-p", &var("DOCKER_RBD_POOL")?, "--namespace", namespace])
        .args(["du", "--format", "json", image])
        .output()
        .context("running rbd du")?;
    if !out.status.success() {
        bail!("rbd du {image}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("rbd du output")?;
    // The image itself, not its snapshots: the entry without "snapshot".
    let used = json["images"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i.get("snapshot").is_none())
        .filter_map(|i| i["used_size"].as_u64())
        .sum();
    Ok(used)
}

/// Removes what is left in the namespace (the base image, the metadata
/// objects) and the namespace.
fn cleanup_namespace(namespace: &str) -> Result<()> {
    let var = |n: &str| std::env::var(n).with_context(|| format!("{n} is not set"));
    let rados = ceph_client::Rados::connect(&ceph_client::ConnectConfig {
        conf: Some(var("DOCKER_RBD_CEPH_CONF")?.into()),
        id: Some(var("DOCKER_RBD_CEPH_ID")?),
        keyring: Some(var("DOCKER_RBD_CEPH_KEYRING")?.into()),
        ..Default::default()
    })?;
    let pool_name = var("DOCKER_RBD_POOL")?;
    let pool = rados.ioctx(&pool_name, None)?;
    let ioctx = rados.ioctx(&pool_name, Some(namespace))?;
    testkit::driver::remove_namespace("create_bench", &ioctx, &pool, namespace);
    if ceph_client::rbd::namespace_exists(&pool, namespace)? {
        bail!("namespace {namespace} is left; see above");
    }
    Ok(())
}
