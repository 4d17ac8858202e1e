//! Moving a stopped container from one host of the fleet to another,
//! against `docker export | docker import` of the same container.
//!
//! Two hosts ([`testkit::fleet`]: each its own mount namespace, data root,
//! `docker-rbd serve` and host id; one cluster and RADOS namespace). For
//! each data size (`--sizes`, MiB, default 10 and 1024), `rounds` times
//! (default 3):
//!
//! 1. on host a, a container writes that much random data and its
//!    checksum, and sleeps; it is stopped (`docker stop`);
//! 2. **move**, from `docker stop` returning on a until the container runs
//!    on b: wait until the fleet records it stopped with its final config
//!    (a's export), restart b's dockerd (dockerd reads its containers at
//!    its start only; its `Init` hydrates the fleet's), `docker start` on
//!    b. Then checked: the container on b verifies a's data against its
//!    checksum;
//! 3. **baseline**, from the container stopped on b: `docker export` of it
//!    on b, `docker import` of the tarball on a, `docker run -d` of the
//!    imported image on a until it runs.
//!
//! Prints the median, min and max of each, the move's phases, and the
//! move against the baseline.
//!
//! ```text
//! scripts/bench move      # or, by hand:
//! scripts/ceph-dev start /tmp/bench-ceph && source /tmp/bench-ceph/env
//! cargo build --release --bins --example move_bench
//! target/release/examples/move_bench [--rounds 3] [--sizes 10,1024] [--plot-dir DIR]
//! ```
//!
//! `--plot-dir DIR` draws `move.png` there.
//!
//! The cluster needs room for twice the largest size (the container's
//! layer and the imported image; each round removes both). Needs root,
//! /dev/fuse, /dev/loop-control, dockerd and the cluster variables of
//! `scripts/ceph-dev`; works in a RADOS namespace of its own, removed at
//! the end.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use metadata::{ContainerRecord, ContainerState, Store};
use testkit::bench::{Stats, docker, ms};
use testkit::dockerd::Dockerd;
use testkit::fleet::{Fleet, FleetHost};
use testkit::plot::{Series, bars};

const NAME: &str = "move_bench";

/// How long the fleet may take to record a stopped container.
const RECORD_WAIT: Duration = Duration::from_secs(60);

struct Args {
    rounds: usize,
    sizes: Vec<u64>,
    plot_dir: Option<PathBuf>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        rounds: 3,
        sizes: vec![10, 1024],
        plot_dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rounds" => a.rounds = value.parse().context("--rounds")?,
            "--sizes" => {
                a.sizes = value
                    .split(',')
                    .map(|s| s.trim().parse::<u64>())
                    .collect::<Result<_, _>>()
                    .context("--sizes: MiB, comma-separated")?
            }
            "--plot-dir" => a.plot_dir = Some(PathBuf::from(value)),
            other => bail!("unknown flag {other} (--rounds N, --sizes MIB,MIB, --plot-dir DIR)"),
        }
    }
    ensure!(a.rounds > 0, "--rounds must be at least 1");
    ensure!(
        !a.sizes.is_empty() && a.sizes.iter().all(|&s| s > 0),
        "--sizes must name at least one size above 0"
    );
    Ok(a)
}

/// The container's program: the first run writes `mib` MiB and its
/// checksum; every run checks the data, counts itself in `/data/runs`
/// and sleeps.
fn program(mib: u64) -> String {
    format!(
        "[ -f /data/sum ] || {{ mkdir -p /data && \
         dd if=/dev/urandom of=/data/blob bs=1M count={mib} conv=fsync 2>/dev/null && \
         sha256sum /data/blob > /data/sum; }}; \
         sha256sum -c /data/sum >/dev/null && echo ok >> /data/runs && sync -f /data && \
         exec sleep 600"
    )
}

/// Waits until the container has counted `runs` checked runs; fails at
/// once if it stopped.
fn wait_runs(d: &Dockerd, name: &str, runs: usize, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let out = d.docker(["exec", name, "sh", "-c", "wc -l < /data/runs"]);
        let seen = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<usize>()
            .ok();
        if seen == Some(runs) {
            return Ok(());
        }
        let running = d.docker(["inspect", "-f", "{{.State.Running}}", name]);
        if String::from_utf8_lossy(&running.stdout).trim() == "false" {
            let logs = d.docker(["logs", "--tail", "5", name]);
            bail!(
                "container {name} stopped before its run {runs} was checked: {}{}",
                String::from_utf8_lossy(&logs.stdout).trim(),
                String::from_utf8_lossy(&logs.stderr).trim()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "container {name}: {runs} checked run(s) expected within {within:?}, saw {seen:?} ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_stopped(store: &Store, id: &str) -> Result<()> {
    let stopped = |r: &ContainerRecord| {
        let config: serde_json::Value = serde_json::from_str(&r.config).unwrap_or_default();
        r.state == ContainerState::Stopped
            && r.active_on.is_none()
            && config["State"]["Running"].as_bool() == Some(false)
    };
    let deadline = Instant::now() + RECORD_WAIT;
    loop {
        if let Some(r) = store.containers().get(id)?
            && stopped(&r.value)
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("container {id}: not recorded stopped within {RECORD_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One round's timings.
struct Round {
    record: Duration,
    restart: Duration,
    start: Duration,
    moved: Duration,
    export: Duration,
    import: Duration,
    run: Duration,
    baseline: Duration,
}

fn round(
    store: &Store,
    a: &mut FleetHost,
    b: &mut FleetHost,
    mib: u64,
    n: usize,
    dir: &Path,
) -> Result<Round> {
    let name = format!("mover-{mib}-{n}");
    let id = docker(
        a.dockerd(),
        &[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "none",
            "busy:1",
            "sh",
            "-c",
            &program(mib),
        ],
    )
    .map_err(|e| anyhow!(e))?;
    let id = id.trim().to_string();
    eprintln!("[{NAME}] {name}: writing {mib} MiB on host a");
    wait_runs(a.dockerd(), &name, 1, Duration::from_secs(60 + mib))?;
    docker(a.dockerd(), &["stop", "-t", "1", &name]).map_err(|e| anyhow!(e))?;

    // The move.
    eprintln!("[{NAME}] {name}: stopped on host a; moving it to host b");
    let t0 = Instant::now();
    wait_stopped(store, &id)?;
    let record = t0.elapsed();
    b.restart_dockerd();
    let restart = t0.elapsed() - record;
    docker(b.dockerd(), &["start", &name]).map_err(|e| anyhow!(e))?;
    let moved = t0.elapsed();
    let start = moved - record - restart;
    wait_runs(b.dockerd(), &name, 2, Duration::from_secs(600))
        .context("the moved container checks a's data on b")?;
    docker(b.dockerd(), &["stop", "-t", "1", &name]).map_err(|e| anyhow!(e))?;

    // The baseline: the same container, exported from b, imported on a.
    eprintln!("[{NAME}] {name}: moved in {} ms; the baseline", ms(moved));
    let tar = dir.join(format!("{name}.tar"));
    let tar_arg = tar.display().to_string();
    let image = format!("exported-{mib}-{n}:1");
    let copy = format!("{name}-copy");
    let t0 = Instant::now();
    docker(b.dockerd(), &["export", "-o", &tar_arg, &name]).map_err(|e| anyhow!(e))?;
    let export = t0.elapsed();
    docker(a.dockerd(), &["import", &tar_arg, &image]).map_err(|e| anyhow!(e))?;
    let import = t0.elapsed() - export;
    docker(
        a.dockerd(),
        &[
            "run",
            "-d",
            "--name",
            &copy,
            "--network",
            "none",
            &image,
            "sh",
            "-c",
            &program(mib),
        ],
    )
    .map_err(|e| anyhow!(e))?;
    let baseline = t0.elapsed();
    let run = baseline - export - import;
    // Its files hold the two runs on a and b; its own makes three.
    wait_runs(a.dockerd(), &copy, 3, Duration::from_secs(600))
        .context("the imported container checks the data on a")?;

    // Room for the next round: the container goes on b, which owns it, and
    // from a's list; the copy and its image on a.
    std::fs::remove_file(&tar).with_context(|| format!("remove {}", tar.display()))?;
    docker(b.dockerd(), &["rm", "-f", &name]).map_err(|e| anyhow!(e))?;
    if let Err(e) = docker(a.dockerd(), &["rm", "-f", &name]) {
        eprintln!("[{NAME}] removing a's stale view of {name}: {e}");
    }
    docker(a.dockerd(), &["rm", "-f", &copy]).map_err(|e| anyhow!(e))?;
    docker(a.dockerd(), &["rmi", &image]).map_err(|e| anyhow!(e))?;
    Ok(Round {
        record,
        restart,
        start,
        moved,
        export,
        import,
        run,
        baseline,
    })
}

fn cell(v: Vec<Duration>) -> String {
    match Stats::of(v) {
        Some(s) => format!("{} {} {}", ms(s.median), ms(s.min), ms(s.max)),
        None => "-".into(),
    }
}

fn main() -> Result<()> {
    let args = args()?;
    let testkit::bench::Start {
        plugin,
        scratch,
        rootfs,
    } = testkit::bench::start("move-bench").map_err(anyhow::Error::msg)?;

    // Room in a container's filesystem for the largest size and more.
    let basesize = format!(
        "{}M",
        args.sizes.iter().max().copied().unwrap_or(0) * 2 + 1024
    );
    let fleet = Fleet::start(NAME, &plugin, &["--basesize", &basesize])
        .context("the fleet could not start")?;
    let store = Store::new(fleet.ioctx().clone(), "docker-rbd.");
    let mut a = fleet.host("a", &["--host-id", "move-a"]);
    docker(
        a.dockerd(),
        &["import", &rootfs.display().to_string(), "busy:1"],
    )
    .map_err(|e| anyhow!(e))?;
    // b boots with an empty data root and gets busy:1 from the fleet.
    let mut b = fleet.host("b", &["--host-id", "move-b"]);

    println!(
        "moving a stopped container from host a to host b, {} rounds per size (ms: median min max)",
        args.rounds
    );
    println!(
        "{:>9}  {:>18} {:>16} {:>16} {:>16}  {:>18} {:>8}",
        "data MiB",
        "move",
        "fleet record",
        "dockerd restart",
        "docker start",
        "export|import|run",
        "ratio"
    );
    let (mut moves, mut baselines) = (Vec::new(), Vec::new());
    for &mib in &args.sizes {
        let rounds: Vec<Round> = (0..args.rounds)
            .map(|n| round(&store, &mut a, &mut b, mib, n, scratch.path()))
            .collect::<Result<_>>()?;
        let pick = |f: fn(&Round) -> Duration| rounds.iter().map(f).collect::<Vec<_>>();
        let moved = Stats::of(pick(|r| r.moved)).expect("rounds > 0");
        let baseline = Stats::of(pick(|r| r.baseline)).expect("rounds > 0");
        println!(
            "{:>9}  {:>18} {:>16} {:>16} {:>16}  {:>18} {:>7.2}x",
            mib,
            cell(pick(|r| r.moved)),
            cell(pick(|r| r.record)),
            cell(pick(|r| r.restart)),
            cell(pick(|r| r.start)),
            cell(pick(|r| r.baseline)),
            moved.median.as_secs_f64() / baseline.median.as_secs_f64().max(1e-9)
        );
        moves.push(moved.median.as_secs_f64());
        baselines.push(baseline.median.as_secs_f64());
        println!(
            "{:>9}  baseline phases: export {}, import {}, run {}",
            "",
            cell(pick(|r| r.export)),
            cell(pick(|r| r.import)),
            cell(pick(|r| r.run))
        );
    }
    println!("(ratio: the move's median against the baseline's)");
    if let Some(dir) = &args.plot_dir {
        let labels: Vec<String> = args
            .sizes
            .iter()
            .map(|m| format!("{m} MiB written"))
            .collect();
        bars(
            &dir.join("move.png"),
            &format!(
                "A stopped container from host a to running on host b (median of {})",
                args.rounds
            ),
            "s",
            &labels,
            &[
                Series::new("docker-rbd fleet", moves),
                Series::new("docker export | import | run", baselines),
            ],
        )
        .map_err(anyhow::Error::msg)?;
    }
    Ok(())
}
