//! Container lifecycle on docker-rbd against dockerd's built-in overlay2
//! and vfs, side by side in one run.
//!
//! Three private dockerd 20.10 (one on `docker-rbd serve` with the fuse
//! mapper, one on overlay2, one on vfs) get the same image (busybox plus
//! `--data-mib` of data, default 200). For each, after a warm-up, it times
//! `rounds` times (default 20):
//!
//! - `docker run --rm --network none IMG true` (the whole lifecycle);
//! - `docker run -d` until the container runs, then `docker rm -f`, apart;
//!
//! and prints median, min and max of each, with the ratio to overlay2;
//! then, for docker-rbd, where one `docker run --rm` spends its time in the
//! plugin: each graphdriver request's median from the plugin's own log.
//!
//! Deep images, on docker-rbd and overlay2: `docker load` of a 1-layer and
//! a 60-layer image (tiny layers: the per-layer cost), then `docker run
//! --rm` of each, `rounds` times after a warm-up; the 60-layer run against
//! the 1-layer one.
//!
//! Memory: the plugin's resident set idle, and its peak while dockerd
//! loads 10 images of one 64 MiB layer each at once (10 ApplyDiffs in
//! flight): a streaming ApplyDiff holds a buffer, not the layer.
//!
//! ```text
//! scripts/bench lifecycle      # or, by hand:
//! scripts/ceph-dev start /tmp/bench-ceph && source /tmp/bench-ceph/env
//! cargo build --release --bins --example lifecycle_bench
//! target/release/examples/lifecycle_bench [--rounds 20] [--data-mib 200] [--log FILE] [--plot-dir DIR]
//! ```
//!
//! `--plot-dir DIR` draws `lifecycle.png` and `deep-images.png` there.
//!
//! `--log FILE` saves the plugin's log of the breakdown runs, for a closer
//! look (with `DOCKER_RBD_LOG=debug` for every step's timestamp).
//!
//! Needs root, /dev/fuse, /dev/loop-control, dockerd and the cluster
//! variables of `scripts/ceph-dev`; works in a RADOS namespace of its own,
//! removed at the end.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testkit::bench::{Stats, docker, ms};
use testkit::dockerd::{Dockerd, DockerdConfig};
use testkit::fleet::Fleet;
use testkit::plot::{Series, bars};

const NAME: &str = "lifecycle_bench";

struct Args {
    rounds: usize,
    data_mib: u64,
    log: Option<PathBuf>,
    plot_dir: Option<PathBuf>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        rounds: 20,
        data_mib: 200,
        log: None,
        plot_dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rounds" => a.rounds = value.parse().context("--rounds")?,
            "--data-mib" => a.data_mib = value.parse().context("--data-mib")?,
            "--log" => a.log = Some(PathBuf::from(value)),
            "--plot-dir" => a.plot_dir = Some(PathBuf::from(value)),
            other => {
                bail!("unknown flag {other} (--rounds N, --data-mib N, --log FILE, --plot-dir DIR)")
            }
        }
    }
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    Ok(a)
}

/// How a table names the driver of `d`.
fn label(d: &Dockerd) -> String {
    match d.config().storage_driver.as_str() {
        "overlay2" | "vfs" => d.config().storage_driver.clone(),
        _ => "rbd (fuse)".to_string(),
    }
}

/// Imports busybox and builds `bench:1` on it with `data_mib` of data.
fn prepare(d: &Dockerd, rootfs: &Path, data_mib: u64) -> Result<()> {
    docker(d, &["import", &rootfs.display().to_string(), "busy:1"])?;
    let dockerfile = format!(
        "FROM busy:1\nRUN dd if=/dev/urandom of=/data bs=1M count={data_mib} 2>/dev/null\n"
    );
    let out = d.docker_stdin(
        ["build", "--network", "none", "-q", "-t", "bench:1", "-"],
        Some(dockerfile.into_bytes()),
    );
    if !out.status.success() {
        bail!(
            "docker build on {}: {}",
            d.config().storage_driver,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The three measurements of one dockerd.
struct Row {
    driver: String,
    run_rm: Stats,
    start: Stats,
    rm: Stats,
}

fn measure(d: &Dockerd, rounds: usize) -> Result<Row> {
    let run_rm = ["run", "--rm", "--network", "none", "bench:1", "true"];
    for _ in 0..3 {
        docker(d, &run_rm)?;
    }
    let (mut runs, mut starts, mut rms) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        docker(d, &run_rm)?;
        runs.push(t.elapsed());
    }
    for _ in 0..rounds {
        let t = Instant::now();
        let id = docker(
            d,
            &["run", "-d", "--network", "none", "bench:1", "sleep", "600"],
        )?;
        starts.push(t.elapsed());
        let t = Instant::now();
        docker(d, &["rm", "-f", id.trim()])?;
        rms.push(t.elapsed());
    }
    Ok(Row {
        driver: label(d),
        run_rm: Stats::of(runs).context("no rounds")?,
        start: Stats::of(starts).context("no rounds")?,
        rm: Stats::of(rms).context("no rounds")?,
    })
}

/// Runs `docker run --rm` `rounds` times more on docker-rbd and prints,
/// per graphdriver request, how many one run makes and their median time,
/// from the plugin's `request done` log lines.
fn breakdown(host: &testkit::fleet::FleetHost, rounds: usize, save: Option<&Path>) -> Result<()> {
    let before = host.plugin_log().len();
    let t = Instant::now();
    for _ in 0..rounds {
        docker(
            host.dockerd(),
            &["run", "--rm", "--network", "none", "bench:1", "true"],
        )?;
    }
    let wall = t.elapsed().as_secs_f64() * 1000.0 / rounds as f64;
    let log = host.plugin_log();
    let log = log.get(before..).unwrap_or_default();
    if let Some(path) = save {
        std::fs::write(path, log).with_context(|| format!("write {}", path.display()))?;
    }
    println!("docker-rbd plugin time per `docker run --rm` ({rounds} runs, {wall:.0} ms each):");
    print_requests(log, rounds, "run");
    Ok(())
}

/// Prints, per graphdriver request in `log` (the plugin's `request done`
/// lines), how many there were per `unit` (`count` of them) and their
/// median and total time.
fn print_requests(log: &str, count: usize, unit: &str) {
    let mut by_method: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for line in log.lines() {
        if !line.contains("request done") {
            continue;
        }
        let field = |name: &str| {
            line.split(name)
                .nth(1)
                .and_then(|rest| rest.split([' ', '}', '"']).find(|s| !s.is_empty()))
                .map(str::to_string)
        };
        if let (Some(method), Some(ms)) = (field("method=GraphDriver."), field("elapsed_ms="))
            && let Ok(ms) = ms.parse::<f64>()
        {
            by_method.entry(method).or_default().push(ms);
        }
    }
    let per = format!("per {unit}");
    let total_per = format!("ms per {unit}");
    println!(
        "{:<18} {:>9} {:>10} {:>13}",
        "request", per, "median ms", total_per
    );
    let mut total = 0.0;
    for (method, mut times) in by_method {
        times.sort_by(f64::total_cmp);
        let n = times.len() as f64 / count as f64;
        let sum: f64 = times.iter().sum::<f64>() / count as f64;
        total += sum;
        println!(
            "{:<18} {:>9.1} {:>10.1} {:>13.1}",
            method,
            n,
            times[times.len() / 2],
            sum
        );
    }
    println!("{:<18} {:>9} {:>10} {:>13.1}", "all", "", "", total);
}

/// What [`deep`] measured on one daemon.
struct DeepRow {
    driver: String,
    per_layer: Duration,
    run_one: Duration,
    run_deep: Duration,
}

/// `docker load` of a 1-layer and a 60-layer image, then `run --rm` of
/// each, on every daemon in `daemons`.
fn deep(
    host: &testkit::fleet::FleetHost,
    daemons: &[&Dockerd],
    dir: &Path,
    rounds: usize,
) -> Result<Vec<DeepRow>> {
    const DEPTHS: [usize; 2] = [1, 60];
    let mut tars = Vec::new();
    for n in DEPTHS {
        let tag = format!("deep{n}:1");
        let tar = dir.join(format!("deep{n}.tar"));
        testkit::images::chain_image(&tag, n)
            .and_then(|image| image.write_save_tar(&tar))
            .map_err(anyhow::Error::msg)?;
        tars.push((n, tag, tar));
    }
    println!("deep images: docker load, and run --rm median of {rounds} after 3 warm-up runs (ms)");
    println!(
        "{:<12} {:>12} {:>13} {:>16} {:>14} {:>15} {:>10}",
        "driver",
        "load 1 layer",
        "load 60 layers",
        "per extra layer",
        "run --rm 1",
        "run --rm 60",
        "60 vs 1"
    );
    let mut breakdowns = Vec::new();
    let mut rows = Vec::new();
    for d in daemons {
        let mut loads = Vec::new();
        let mut runs = Vec::new();
        let mut load_log = String::new();
        for (n, tag, tar) in &tars {
            let before = host.plugin_log().len();
            let t = Instant::now();
            docker(d, &["load", "-q", "-i", &tar.display().to_string()])?;
            loads.push(t.elapsed());
            if *n == DEPTHS[1] && std::ptr::eq(*d, host.dockerd()) {
                load_log = host
                    .plugin_log()
                    .get(before..)
                    .unwrap_or_default()
                    .to_string();
            }
            let run = ["run", "--rm", "--network", "none", tag.as_str(), "true"];
            for _ in 0..3 {
                docker(d, &run)?;
            }
            let mut times = Vec::new();
            for _ in 0..rounds {
                let t = Instant::now();
                docker(d, &run)?;
                times.push(t.elapsed());
            }
            runs.push(Stats::of(times).context("no rounds")?.median);
        }
        let per_layer = loads[1].saturating_sub(loads[0]) / (DEPTHS[1] - DEPTHS[0]) as u32;
        let driver = label(d);
        println!(
            "{:<12} {:>12} {:>13} {:>16} {:>14} {:>15} {:>9.2}x",
            driver,
            ms(loads[0]),
            ms(loads[1]),
            ms(per_layer),
            ms(runs[0]),
            ms(runs[1]),
            runs[1].as_secs_f64() / runs[0].as_secs_f64().max(1e-9)
        );
        breakdowns.push(load_log);
        rows.push(DeepRow {
            driver,
            per_layer,
            run_one: runs[0],
            run_deep: runs[1],
        });
    }
    for log in breakdowns.iter().filter(|l| !l.is_empty()) {
        println!(
            "docker-rbd plugin time of the {}-layer `docker load`:",
            DEPTHS[1]
        );
        print_requests(log, DEPTHS[1], "layer");
    }
    Ok(rows)
}

/// `VmRSS` or `VmHWM` of `pid`, bytes.
fn vm(pid: i32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kib * 1024)
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1 << 20) as f64)
}

/// The plugin's RSS idle, then its peak during 10 concurrent `docker load`s
/// of one 64 MiB layer each.
fn memory(host: &testkit::fleet::FleetHost, dir: &Path) -> Result<()> {
    const LOADS: usize = 10;
    const LAYER: usize = 64 << 20;
    let pid = host.plugin_pid().context("the plugin runs")?;
    let mut tars = Vec::new();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..LOADS {
        // Incompressible, and different per image (no shared layer).
        let data: Vec<u8> = (0..LAYER / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        let layer = testkit::images::Layer::busybox()
            .map_err(anyhow::Error::msg)?
            .file("data", data, 0o644);
        let tar = dir.join(format!("mem{i}.tar"));
        testkit::images::Image::new(&format!("mem{i}:1"), vec![layer])
            .write_save_tar(&tar)
            .map_err(anyhow::Error::msg)?;
        tars.push(tar);
    }
    // Settle, then reset the peak (clear_refs 5) so it covers the loads.
    std::thread::sleep(Duration::from_secs(2));
    let idle = vm(pid, "VmRSS")?;
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").context("reset VmHWM")?;
    let mut loads = Vec::new();
    for tar in &tars {
        let mut cmd = host.dockerd().docker_command();
        cmd.args([
            "load".as_ref(),
            "-q".as_ref(),
            "-i".as_ref(),
            tar.as_os_str(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
        loads.push(cmd.spawn().context("spawn docker load")?);
    }
    let t = Instant::now();
    let mut sampled = 0;
    while loads.iter_mut().any(|c| matches!(c.try_wait(), Ok(None))) {
        sampled = sampled.max(vm(pid, "VmRSS")?);
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = t.elapsed();
    for c in loads {
        let out = c.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "docker load: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let peak = vm(pid, "VmHWM")?.max(sampled);
    println!(
        "docker-rbd memory (MiB): idle RSS {}; peak RSS during {LOADS} concurrent docker loads of a {} MiB layer each ({} MiB in all, {:.1} s): {}",
        mib(idle),
        LAYER >> 20,
        (LAYER * LOADS) >> 20,
        wall.as_secs_f64(),
        mib(peak)
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = args()?;
    let testkit::bench::Start {
        plugin,
        scratch,
        rootfs,
    } = testkit::bench::start("lifecycle-bench").map_err(anyhow::Error::msg)?;

    let fleet = Fleet::start(NAME, &plugin, &[]).context("the rbd host could not start")?;
    let rbd = fleet.host("bench", &["--host-id", "bench"]);
    let overlay = Dockerd::start(DockerdConfig::new("overlay2")).map_err(anyhow::Error::msg)?;
    let vfs = Dockerd::start(DockerdConfig::new("vfs")).map_err(anyhow::Error::msg)?;
    let daemons = [rbd.dockerd(), &overlay, &vfs];
    for d in daemons {
        prepare(d, &rootfs, args.data_mib)?;
    }
    println!(
        "container lifecycle, busybox + {} MiB, {} rounds each after 3 warm-up runs (ms)",
        args.data_mib, args.rounds
    );
    let rows: Vec<Row> = daemons
        .iter()
        .map(|d| measure(d, args.rounds))
        .collect::<Result<_>>()?;
    let base = rows
        .iter()
        .find(|r| r.driver == "overlay2")
        .map(|r| (r.run_rm.median, r.start.median, r.rm.median))
        .expect("overlay2 was measured");
    let ratio = |d: Duration, b: Duration| d.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!(
        "{:<22} {:>22} {:>22} {:>22}",
        "driver", "run --rm (med min max)", "run -d (med min max)", "rm -f (med min max)"
    );
    for r in &rows {
        let cell = |s: &Stats, b: Duration| {
            format!(
                "{} {} {} x{:.1}",
                ms(s.median),
                ms(s.min),
                ms(s.max),
                ratio(s.median, b)
            )
        };
        println!(
            "{:<22} {:>22} {:>22} {:>22}",
            r.driver,
            cell(&r.run_rm, base.0),
            cell(&r.start, base.1),
            cell(&r.rm, base.2)
        );
    }
    println!("(xN: median against overlay2's in the same run)");
    breakdown(&rbd, args.rounds, args.log.as_deref())?;
    let deep_rows = deep(
        &rbd,
        &[rbd.dockerd(), &overlay],
        scratch.path(),
        args.rounds,
    )?;
    if let Some(dir) = &args.plot_dir {
        let millis = |d: Duration| d.as_secs_f64() * 1000.0;
        let lifecycle: Vec<Series> = rows
            .iter()
            .map(|r| {
                let v = [r.run_rm.median, r.start.median, r.rm.median];
                Series::new(&r.driver, v.into_iter().map(millis).collect())
            })
            .collect();
        bars(
            &dir.join("lifecycle.png"),
            &format!(
                "Container lifecycle, busybox + {} MiB (median of {})",
                args.data_mib, args.rounds
            ),
            "ms",
            &["run --rm IMG true", "run -d, to running", "rm -f"],
            &lifecycle,
        )
        .map_err(anyhow::Error::msg)?;
        let deep_series: Vec<Series> = deep_rows
            .iter()
            .map(|r| {
                let v = [r.per_layer, r.run_one, r.run_deep];
                Series::new(&r.driver, v.into_iter().map(millis).collect())
            })
            .collect();
        bars(
            &dir.join("deep-images.png"),
            "Deep images: docker load and run --rm (median)",
            "ms",
            &[
                "load, per extra layer",
                "run --rm, 1 layer",
                "run --rm, 60 layers",
            ],
            &deep_series,
        )
        .map_err(anyhow::Error::msg)?;
        println!("plots: {}", dir.display());
    }
    memory(&rbd, scratch.path())?;
    drop(rbd);
    drop(fleet);
    Ok(())
}
