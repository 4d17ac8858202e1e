//! End-to-end smoke test of the Ceph bindings against a live cluster:
//! connect, create an image, write, snapshot, clone (v2), read the parent's
//! bytes through the clone, list, remove everything. Prints each step.
//!
//! Cluster coordinates come from the same variables as docker-rbd's tests
//! (`scripts/ceph-dev start DIR && . DIR/env`):
//! `DOCKER_RBD_CEPH_CONF`, `DOCKER_RBD_CEPH_ID`, `DOCKER_RBD_CEPH_KEYRING`,
//! `DOCKER_RBD_POOL` (default `rbd`), and optionally
//! `DOCKER_RBD_NAMESPACE` (default: the pool's default namespace).
//!
//! ```text
//! cargo run -p ceph-client --example smoke
//! ```

use std::process::ExitCode;
use std::time::{Duration, Instant};

use ceph_client::rbd::{self, Image, ImageOptions};
use ceph_client::{ConnectConfig, Rados};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn step(what: &str) {
    println!("==> {what}");
}

fn run(parent: &str, child: &str) -> Result<(), Box<dyn std::error::Error>> {
    let config = ConnectConfig {
        conf: env("DOCKER_RBD_CEPH_CONF").map(Into::into),
        id: env("DOCKER_RBD_CEPH_ID"),
        keyring: env("DOCKER_RBD_CEPH_KEYRING").map(Into::into),
        timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let pool = env("DOCKER_RBD_POOL").unwrap_or_else(|| "rbd".into());
    let namespace = env("DOCKER_RBD_NAMESPACE");

    let (major, minor, extra) = ceph_client::librados_version();
    let (rbd_major, rbd_minor, rbd_extra) = rbd::version();
    step(&format!(
        "connect as client.{} (librados {major}.{minor}.{extra}, librbd {rbd_major}.{rbd_minor}.{rbd_extra})",
        config.id.as_deref().unwrap_or("admin")
    ));
    let started = Instant::now();
    let rados = Rados::connect(&config)?;
    println!(
        "    connected in {:?}: instance {} at {}",
        started.elapsed(),
        rados.instance_id(),
        rados.client_addr()?
    );
    let io = rados.ioctx(&pool, namespace.as_deref())?;
    println!(
        "    pool {:?}, namespace {:?}",
        io.pool_name(),
        io.namespace().unwrap_or("")
    );

    let result = (|| -> Result<(), Box<dyn std::error::Error>> {
        let size = 64 << 20;
        step(&format!(
            "create image {parent} (64 MiB, layering + exclusive-lock)"
        ));
        rbd::create(
            &io,
            parent,
            size,
            &ImageOptions {
                features: Some(rbd::RBD_FEATURE_LAYERING | rbd::RBD_FEATURE_EXCLUSIVE_LOCK),
                order: Some(22),
            },
        )?;

        let payload = b"docker-rbd smoke: written to the parent before the snapshot";
        step(&format!("write {} bytes at offset 1 MiB", payload.len()));
        {
            let img = Image::open(&io, parent, None)?;
            img.write_all_at(1 << 20, payload)?;
            img.flush()?;
            step("snapshot parent@base");
            img.snap_create("base")?;
            println!(
                "    snapshots: {:?}",
                img.snap_list()?.iter().map(|s| &s.name).collect::<Vec<_>>()
            );
        }

        step(&format!(
            "clone {parent}@base -> {child} (clone format 2, unprotected snapshot)"
        ));
        rbd::clone(&io, parent, "base", &io, child, &ImageOptions::default())?;

        step("read the parent's bytes through the clone");
        let clone = Image::open(&io, child, None)?;
        let mut got = vec![0u8; payload.len()];
        clone.read_exact_at(1 << 20, &mut got)?;
        if got != payload {
            return Err(format!(
                "clone read {:?}, expected {:?}",
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(payload)
            )
            .into());
        }
        println!("    read back: {:?}", String::from_utf8_lossy(&got));
        if let Some(p) = clone.parent()? {
            println!(
                "    parent: {}/{}@{} (features {:#x})",
                p.pool_name,
                p.image_name,
                p.snap_name,
                clone.features()?
            );
        }
        drop(clone);

        step("list images");
        for spec in rbd::list(&io)? {
            println!("    {} (id {})", spec.name, spec.id);
        }
        Ok(())
    })();

    step("remove everything");
    let mut cleanup_failed = false;
    let mut report = |what: &str, r: ceph_client::Result<()>| match r {
        Ok(()) => println!("    removed {what}"),
        Err(e) if e.is_not_found() => {}
        Err(e) => {
            cleanup_failed = true;
            eprintln!("    could not remove {what}: {e}");
        }
    };
    report(child, rbd::remove(&io, child));
    match Image::open(&io, parent, None) {
        Ok(img) => {
            report(&format!("{parent}@base"), img.snap_remove("base"));
            drop(img);
            report(parent, rbd::remove(&io, parent));
        }
        Err(e) if e.is_not_found() => {}
        Err(e) => {
            cleanup_failed = true;
            eprintln!("    could not open {parent} to remove it: {e}");
        }
    }
    result?;
    if cleanup_failed {
        return Err("cleanup failed".into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let tag = format!(
        "{}-{}",
        std::process::id(),
        Instant::now().elapsed().subsec_nanos()
    );
    let parent = format!("smoke-parent-{tag}");
    let child = format!("smoke-child-{tag}");
    match run(&parent, &child) {
        Ok(()) => {
            println!("smoke OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("smoke FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
