//! Throughput of the fuse mapper against librbd itself, on the same cluster
//! in the same run.
//!
//! For each workload the baseline is `rbd bench` (librbd, no kernel in the
//! path) and the contender is O_DIRECT I/O on the `/dev/loopN` the fuse
//! mapper returns (loop → FUSE → docker-rbd-fuse → librbd), with the same
//! request size and the same number of requests in flight. Each side gets
//! its own fresh image, so both pay the same first-write cost.
//!
//! ```text
//! scripts/ceph-dev start /tmp/bench-ceph && source /tmp/bench-ceph/env
//! cargo build --release --bin docker-rbd-fuse --example fuse_mapper_bench
//! sudo -E target/release/examples/fuse_mapper_bench [--total-mib 1024] [--rand-mib 64]
//!     [--threads 16] [--fuse-threads 8] [--rounds 3] [--no-loop-dio] [--fuse-direct-io]
//!     [--plot-dir DIR]
//! ```
//!
//! `--plot-dir DIR` draws `fuse.png` there: each workload through the
//! mapper as a percentage of `rbd bench`.
//!
//! Needs root, /dev/fuse, /dev/loop-control, the `rbd` tool, and the
//! cluster variables of `scripts/ceph-dev` (`DOCKER_RBD_CEPH_CONF`,
//! `DOCKER_RBD_CEPH_ID`, `DOCKER_RBD_CEPH_KEYRING`, `DOCKER_RBD_POOL`).

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use docker_rbd::mapper::fuse::{FuseConfig, FuseMapper, HelperCommand};
use docker_rbd::mapper::{CephConnection, MapRequest};
use testkit::plot::{Series, bars};

#[derive(Debug, Clone)]
struct Options {
    total: u64,
    rand_total: u64,
    threads: usize,
    fuse_threads: usize,
    loop_dio: bool,
    fuse_direct_io: bool,
    rounds: usize,
    plot_dir: Option<PathBuf>,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        total: 1 << 30,
        rand_total: 64 << 20,
        threads: 16,
        fuse_threads: 8,
        loop_dio: true,
        fuse_direct_io: false,
        rounds: 3,
        plot_dir: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<u64> {
            args.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("bad {name}"))
        };
        match a.as_str() {
            "--total-mib" => o.total = value(&a)? << 20,
            "--rand-mib" => o.rand_total = value(&a)? << 20,
            "--threads" => o.threads = value(&a)?.clamp(1, 256) as usize,
            "--fuse-threads" => o.fuse_threads = value(&a)?.clamp(1, 64) as usize,
            "--no-loop-dio" => o.loop_dio = false,
            "--fuse-direct-io" => o.fuse_direct_io = true,
            "--rounds" => o.rounds = value(&a)?.clamp(1, 50) as usize,
            "--plot-dir" => {
                o.plot_dir = Some(PathBuf::from(
                    args.next().context("--plot-dir needs a value")?,
                ))
            }
            "-h" | "--help" => {
                println!("see the doc comment of examples/fuse_mapper_bench.rs");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(o)
}

struct Cluster {
    conn: CephConnection,
    pool: String,
    namespace: String,
    rados: ceph_client::Rados,
}

impl Cluster {
    fn from_env() -> Result<Self> {
        let var = |n: &str| {
            std::env::var(n)
                .with_context(|| format!("{n} is not set (source a scripts/ceph-dev env)"))
        };
        let conn = CephConnection {
            conf: Some(var("DOCKER_RBD_CEPH_CONF")?.into()),
            id: Some(var("DOCKER_RBD_CEPH_ID")?),
            keyring: Some(var("DOCKER_RBD_CEPH_KEYRING")?.into()),
            cluster: None,
        };
        let rados = ceph_client::Rados::connect(&ceph_client::ConnectConfig {
            conf: conn.conf.clone(),
            id: conn.id.clone(),
            keyring: conn.keyring.clone(),
            ..Default::default()
        })?;
        let pool = var("DOCKER_RBD_POOL")?;
        let namespace = format!("bench-{}", std::process::id());
        ceph_client::rbd::namespace_create(&rados.ioctx(&pool, None)?, &namespace)?;
        Ok(Self {
            conn,
            pool,
            namespace,
            rados,
        })
    }

    fn create(&self, name: &str, size: u64) -> Result<()> {
        let io = self.rados.ioctx(&self.pool, Some(&self.namespace))?;
        let opts = ceph_client::rbd::ImageOptions {
            features: Some(1 | 4),
            order: None,
        };
        ceph_client::rbd::create(&io, name, size, &opts)?;
        Ok(())
    }

    fn spec(&self, image: &str) -> String {
        format!("{}/{}/{image}", self.pool, self.namespace)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Ok(io) = self.rados.ioctx(&self.pool, Some(&self.namespace)) {
            for img in ceph_client::rbd::list(&io).unwrap_or_default() {
                let _ = ceph_client::rbd::remove(&io, &img.name);
            }
        }
        if let Ok(io) = self.rados.ioctx(&self.pool, None) {
            let _ = ceph_client::rbd::namespace_remove(&io, &self.namespace);
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    io_size: u64,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "seq write 4M",
        write: true,
        random: false,
        io_size: 4 << 20,
    },
    Workload {
        name: "seq read 4M",
        write: false,
        random: false,
        io_size: 4 << 20,
    },
    Workload {
        name: "rand write 4K",
        write: true,
        random: true,
        io_size: 4096,
    },
    Workload {
        name: "rand read 4K",
        write: false,
        random: true,
        io_size: 4096,
    },
];

#[derive(Debug, Clone, Copy)]
struct Result_ {
    ops_per_sec: f64,
    bytes_per_sec: f64,
}

/// `rbd bench`, parsing its `elapsed: .. ops: .. ops/sec: ..` line.
fn rbd_bench(c: &Cluster, image: &str, w: Workload, total: u64, threads: usize) -> Result<Result_> {
    let mut cmd = Command::new("rbd");
    cmd.args(c.conn.cli_args())
        .args(["bench", "--io-type", if w.write { "write" } else { "read" }])
        .args(["--io-size", &w.io_size.to_string()])
        .args(["--io-threads", &threads.to_string()])
        .args(["--io-total", &total.to_string()])
        .args(["--io-pattern", if w.random { "rand" } else { "seq" }])
        .arg(c.spec(image));
    let out = cmd.output().context("run rbd bench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "rbd bench failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("elapsed:"))
        .with_context(|| format!("no summary in {text:?}"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let ops_per_sec: f64 = fields
        .iter()
        .position(|f| *f == "ops/sec:")
        .and_then(|i| fields.get(i + 1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no ops/sec in {line:?}"))?;
    Ok(Result_ {
        ops_per_sec,
        bytes_per_sec: ops_per_sec * w.io_size as f64,
    })
}

/// The same workload with O_DIRECT on a block device, `threads` requests
/// in flight.
fn device_bench(
    device: &Path,
    size: u64,
    w: Workload,
    total: u64,
    threads: usize,
) -> Result<Result_> {
    let ops = total / w.io_size;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let device = device.to_path_buf();
            let next = next.clone();
            std::thread::spawn(move || -> Result<()> {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(w.write)
                    .custom_flags(libc::O_DIRECT)
                    .open(&device)?;
                let mut buf = Aligned::new(w.io_size as usize);
                buf.fill(t as u8 + 1);
                let slots = size / w.io_size;
                let mut rng = 0x2545_F491_4F6C_DD1Du64 ^ ((t as u64 + 1) << 32);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= ops {
                        return Ok(());
                    }
                    let slot = if w.random {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng % slots
                    } else {
                        i % slots
                    };
                    let off = slot * w.io_size;
                    if w.write {
                        f.write_all_at(buf.get(), off)?;
                    } else {
                        f.read_exact_at(buf.get_mut(), off)?;
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
    }
    if w.write {
        // Durability counts: a write benchmark ends with a flush, as rbd bench's does.
        std::fs::OpenOptions::new()
            .write(true)
            .open(device)?
            .sync_all()?;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(Result_ {
        ops_per_sec: ops as f64 / secs,
        bytes_per_sec: (ops * w.io_size) as f64 / secs,
    })
}

fn median(mut v: Vec<Result_>) -> Result_ {
    v.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
    v[v.len() / 2]
}

struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: non-zero layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Self { ptr, len }
    }
    fn fill(&mut self, v: u8) {
        self.get_mut().fill(v);
    }
    fn get(&self) -> &[u8] {
        // SAFETY: live allocation of `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn get_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; unique through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

fn helper() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("DOCKER_RBD_FUSE_HELPER") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/<this> → target/<profile>/docker-rbd-fuse
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("docker-rbd-fuse"));
    match candidate {
        Some(p) if p.is_file() => Ok(p),
        _ => bail!(
            "docker-rbd-fuse not found: cargo build --release --bin docker-rbd-fuse, or set DOCKER_RBD_FUSE_HELPER"
        ),
    }
}

fn main() -> Result<()> {
    let o = parse_args()?;
    let cluster = Cluster::from_env()?;
    let size = o.total.max(o.rand_total).max(64 << 20);
    cluster.create("baseline", size)?;
    cluster.create("fuse", size)?;

    let run_dir = tempfile::Builder::new().prefix("fuse-bench-").tempdir()?;
    let mut config = FuseConfig::new(cluster.conn.clone());
    config.run_dir = run_dir.path().join("run");
    config.helper = HelperCommand::binary(helper()?);
    config.threads = o.fuse_threads;
    config.loop_direct_io = o.loop_dio;
    config.fuse_direct_io = o.fuse_direct_io;
    let mapper = FuseMapper::new(config)?;
    let dev = mapper.map(&MapRequest::new(
        cluster.pool.clone(),
        Some(cluster.namespace.clone()),
        "fuse",
    ))?;
    let dio = std::fs::read_to_string(format!(
        "/sys/block/{}/loop/dio",
        dev.device
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ))
    .unwrap_or_default();

    println!(
        "fuse mapper vs librbd: image {} MiB, median of {} rounds, {} requests in flight, fuse threads {}, loop direct I/O {} (kernel says {}), FUSE direct_io {}",
        size >> 20,
        o.rounds,
        o.threads,
        o.fuse_threads,
        o.loop_dio,
        dio.trim(),
        o.fuse_direct_io
    );
    println!(
        "{:<14} {:>16} {:>16} {:>8}",
        "workload", "rbd bench", "fuse+loop", "ratio"
    );
    let mut percent = Vec::new();
    let mut outcome = (|| -> Result<()> {
        for w in WORKLOADS {
            let total = if w.random { o.rand_total } else { o.total };
            // Interleaved rounds, median of each side: the machine may be
            // shared, and a burst of other load should hit both sides alike.
            let mut base = Vec::new();
            let mut fuse = Vec::new();
            for _ in 0..o.rounds {
                base.push(rbd_bench(&cluster, "baseline", w, total, o.threads)?);
                fuse.push(device_bench(&dev.device, size, w, total, o.threads)?);
            }
            let (base, fuse) = (median(base), median(fuse));
            let show = |r: Result_| {
                if w.random {
                    format!("{:.0} IOPS", r.ops_per_sec)
                } else {
                    format!("{:.1} MB/s", r.bytes_per_sec / 1e6)
                }
            };
            println!(
                "{:<14} {:>16} {:>16} {:>7.0}%",
                w.name,
                show(base),
                show(fuse),
                100.0 * fuse.ops_per_sec / base.ops_per_sec
            );
            percent.push(100.0 * fuse.ops_per_sec / base.ops_per_sec);
        }
        Ok(())
    })();
    if let (Ok(()), Some(dir)) = (&outcome, &o.plot_dir) {
        let names: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
        outcome = bars(
            &dir.join("fuse.png"),
            "The fuse mapper (loop, FUSE, librbd) against rbd bench",
            "% of rbd bench (throughput or IOPS)",
            &names,
            &[Series::new("fuse mapper", percent)],
        )
        .map_err(anyhow::Error::msg);
    }
    let unmapped = mapper.unmap(&dev);
    outcome?;
    unmapped?;
    Ok(())
}
