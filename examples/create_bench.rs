//! Cost of creating a layer against what its parent holds.
//!
//! A layer is a clone of its parent's snapshot, so creating one should cost
//! the same whether the parent holds 1 MiB or 1 GiB. This measures it: the
//! baseline is `create` of children of a parent holding 1 MiB, the contender
//! `create` of children of a parent holding 1 GiB (written through the
//! filesystem, then sealed by the first child), same engine, same run. It
//! also times `get` (map + mount) of a fresh child of each, and prints the
//! medians side by side.
//!
//! ```text
//! scripts/ceph-dev start /tmp/bench-ceph && source /tmp/bench-ceph/env
//! cargo build --release --bins --example create_bench
//! target/release/examples/create_bench [--big-mib 1024] [--rounds 10]
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

fn id(n: u64) -> String {
    format!("{n:064x}")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
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
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next().with_context(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--big-mib" => big_mib = value.parse().context("--big-mib")?,
            "--rounds" => rounds = value.parse().context("--rounds")?,
            other => bail!("unknown argument {other}"),
        }
    }
    let var = |name: &str| {
        std::env::var(name)
            .with_context(|| format!("{name} is not set (source a scripts/ceph-dev env)"))
    };
    let namespace = format!("create-bench-{}", std::process::id());
    let mut raw = RawSettings::default();
    for (k, v) in [
        ("conf", var("DOCKER_RBD_CEPH_CONF")?),
        ("id", var("DOCKER_RBD_CEPH_ID")?),
        ("keyring", var("DOCKER_RBD_CEPH_KEYRING")?),
        ("pool", var("DOCKER_RBD_POOL")?),
        ("namespace", namespace.clone()),
        ("mapper", "fuse".into()),
        ("basesize", format!("{}M", (big_mib + 512).max(1024))),
    ] {
        raw.set(k, &v, Source::Flag);
    }
    let settings = raw.resolve()?;
    let home = tempfile::tempdir()?;
    let helper = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("docker-rbd-fuse"))
        .filter(|p| p.is_file())
        .map(HelperCommand::binary)
        .unwrap_or_else(HelperCommand::locate);
    let engine = Engine::open_with(settings, home.path(), helper)?;
    let image = CreateOptions {
        kind: LayerKind::Image,
        size: None,
        mount_label: String::new(),
    };

    let (small, big) = (id(1), id(2));
    engine.create(&small, "", &image)?;
    engine.create(&big, "", &image)?;
    let started = Instant::now();
    fill(&engine, &small, 1)?;
    fill(&engine, &big, big_mib)?;
    println!(
        "parents filled: 1 MiB and {big_mib} MiB in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut results = Vec::new();
    let mut next = 100u64;
    for (label, parent) in [
        ("1 MiB parent (baseline)", &small),
        (&*format!("{big_mib} MiB parent"), &big),
    ] {
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
        results.push((label.to_string(), first, median(creates), median(gets)));
        for child in children {
            engine.remove(&child)?;
        }
    }
    engine.remove(&small)?;
    engine.remove(&big)?;

    println!(
        "\n{:<28} {:>22} {:>16} {:>16}",
        "", "first create (seals)", "create median", "get median"
    );
    for (label, first, create, get) in &results {
        println!(
            "{label:<28} {:>22} {:>16} {:>16}",
            ms(*first),
            ms(*create),
            ms(*get)
        );
    }
    let ratio = results[1].2.as_secs_f64() / results[0].2.as_secs_f64();
    println!(
        "\ncreate on the {big_mib} MiB parent / on the 1 MiB parent: {ratio:.2}x ({} rounds each)",
        rounds - 1
    );

    // The base image and the namespace go too.
    drop(engine);
    cleanup_namespace(&namespace)?;
    Ok(())
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
