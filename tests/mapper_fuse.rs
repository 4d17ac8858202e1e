//! The fuse mapper for real: FUSE server process, loop device, ext4 on top.
//! Needs root, /dev/fuse, /dev/loop-control and mkfs.ext4; the RBD tests
//! also need the test cluster (scripts/ceph-dev).

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use docker_rbd::mapper::fuse::{FuseConfig, FuseHandle, FuseMapper, HelperCommand, loopdev};
use docker_rbd::mapper::{CephConnection, Error, MapRequest, MappedDevice, MappingHandle};

fn prerequisites(test: &str) -> bool {
    use testkit::require::{check, path, root};
    check(test, root())
        && check(test, path("/dev/fuse"))
        && check(test, path("/dev/loop-control"))
        && check(test, which("mkfs.ext4"))
}

fn which(program: &str) -> Option<String> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    (!found).then(|| format!("{program} is not installed"))
}

/// A fuse mapper with its run directory in a temporary directory, and
/// RAII cleanup of everything the test made, even when it fails.
struct Fixture {
    dir: tempfile::TempDir,
    mapper: Option<FuseMapper>,
    mounts: Vec<PathBuf>,
}

impl Fixture {
    fn new(ceph: CephConnection) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("mapper-fuse-")
            .tempdir()
            .expect("tempdir");
        let mapper = FuseMapper::new(Self::config(dir.path(), ceph)).expect("mapper");
        Self {
            dir,
            mapper: Some(mapper),
            mounts: Vec::new(),
        }
    }

    fn config(dir: &Path, ceph: CephConnection) -> FuseConfig {
        let mut config = FuseConfig::new(ceph);
        config.run_dir = dir.join("run");
        config.helper = HelperCommand::binary(env!("CARGO_BIN_EXE_docker-rbd-fuse"));
        config.stop_timeout = Duration::from_secs(10);
        config
    }

    fn mapper(&self) -> &FuseMapper {
        self.mapper.as_ref().expect("mapper")
    }

    /// A sparse backing file of `size` bytes.
    fn backing(&self, name: &str, size: u64) -> PathBuf {
        let path = self.dir.path().join(name);
        let f = std::fs::File::create(&path).expect("create backing");
        f.set_len(size).expect("size backing");
        path
    }

    fn mount(&mut self, dev: &Path, name: &str, options: &str) -> PathBuf {
        let target = self.dir.path().join(name);
        std::fs::create_dir_all(&target).expect("mountpoint");
        run(
            "mount",
            &[
                "-t",
                "ext4",
                "-o",
                options,
                &dev.display().to_string(),
                &target.display().to_string(),
            ],
        );
        self.mounts.push(target.clone());
        target
    }

    fn umount(&mut self, target: &Path) {
        // Retries while busy: a child that another test thread is forking
        // holds a copy of a just-closed file until it execs.
        docker_rbd::fs::umount(target).expect("umount");
        self.mounts.retain(|m| m != target);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for m in self.mounts.drain(..).rev() {
            if nix::mount::umount(&m).is_err() {
                let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if let Some(mapper) = self.mapper.take() {
            for dev in mapper.list().unwrap_or_default() {
                if let Err(e) = mapper.unmap(&dev) {
                    eprintln!("cleanup: unmap {}: {e}", dev.device.display());
                    force_cleanup(&dev);
                }
            }
        }
        // Whatever is left under our run directory (a failed map).
        let run = self.dir.path().join("run");
        for (n, _) in loopdev::backed_under(&run) {
            let _ = loopdev::detach(n, Duration::from_secs(5));
        }
        for m in mounts_under(&run) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn force_cleanup(dev: &MappedDevice) {
    if let MappingHandle::Fuse(h) = &dev.handle {
        let _ = loopdev::detach(h.loop_number, Duration::from_secs(5));
        let _ = nix::mount::umount2(&h.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        if h.server_pid > 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(h.server_pid),
                nix::sys::signal::SIGKILL,
            );
        }
    }
}

fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .filter(|m| m.starts_with(dir))
        .collect()
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fuse_handle(dev: &MappedDevice) -> &FuseHandle {
    match &dev.handle {
        MappingHandle::Fuse(h) => h,
        other => panic!("not a fuse mapping: {other:?}"),
    }
}

fn label(image: &str) -> MapRequest {
    MapRequest::new("test", None, image)
}

/// A deterministic, position-dependent pattern.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn ext4_on_a_sparse_file_reaches_the_backend() {
    if !prerequisites("ext4_on_a_sparse_file_reaches_the_backend") {
        return;
    }
    let mut fx = Fixture::new(CephConnection::default());
    let backing = fx.backing("disk.img", 256 << 20);
    let dev = fx.mapper().map_file(&backing, &label("ext4")).expect("map");
    assert!(
        dev.device.to_string_lossy().starts_with("/dev/loop"),
        "{}",
        dev.device.display()
    );
    assert!(!dev.read_only);
    let h = fuse_handle(&dev).clone();
    assert_eq!(loopdev::backing_file(h.loop_number), Some(h.image_file()));
    assert_eq!(
        std::fs::metadata(h.image_file()).expect("stat image").len(),
        256 << 20,
        "the FUSE file has the backend's size"
    );

    run(
        "mkfs.ext4",
        &["-q", "-F", &dev.device.display().to_string()],
    );
    let mnt = fx.mount(&dev.device, "m", "rw");
    let data = pattern(1, 3 << 20);
    let path = mnt.join("payload");
    {
        let mut f = std::fs::File::create(&path).expect("create payload");
        f.write_all(&data).expect("write payload");
        f.sync_all().expect("fsync payload");
    }
    fx.umount(&mnt);

    // Busy while mounted.
    let mnt = fx.mount(&dev.device, "m", "ro");
    match fx.mapper().unmap(&dev) {
        Err(e @ Error::Busy { .. }) => assert_eq!(e.errno(), Some(libc::EBUSY)),
        other => panic!("unmap of a mounted device: {other:?}"),
    }
    fx.umount(&mnt);
    fx.mapper().unmap(&dev).expect("unmap");
    // The loop number itself may already serve a test running alongside.
    assert!(
        loopdev::backed_under(&h.state_dir).is_empty(),
        "loop device detached"
    );
    assert!(mounts_under(&h.state_dir).is_empty(), "FUSE mount gone");
    assert!(!h.state_dir.exists(), "state directory removed");
    assert!(fx.mapper().list().expect("list").is_empty());

    // The bytes are in the backing file itself...
    let raw = std::fs::read(&backing).expect("read backing");
    assert!(
        contains(&raw, &data[..4096]),
        "payload start not found in the backing file"
    );
    assert!(
        contains(&raw, &data[data.len() - 4096..]),
        "payload end not found in the backing file"
    );
    // ...and a second mapping of it reads them back.
    let dev = fx
        .mapper()
        .map_file(&backing, &label("ext4"))
        .expect("map again");
    let mnt = fx.mount(&dev.device, "m2", "ro,noload");
    assert_eq!(std::fs::read(mnt.join("payload")).expect("read back"), data);
    fx.umount(&mnt);
    run("fsck.ext4", &["-fn", &dev.device.display().to_string()]);
    fx.mapper().unmap(&dev).expect("unmap again");
}

#[test]
fn read_only_mappings_refuse_writes() {
    if !prerequisites("read_only_mappings_refuse_writes") {
        return;
    }
    let fx = Fixture::new(CephConnection::default());
    let backing = fx.backing("ro.img", 16 << 20);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .and_then(|f| f.write_all_at(b"sealed layer", 4096))
        .expect("seed backing");
    let mut req = label("sealed");
    req.read_only = true;
    let dev = fx.mapper().map_file(&backing, &req).expect("map read-only");
    assert!(dev.read_only);
    let h = fuse_handle(&dev);
    assert!(
        loopdev::read_only(h.loop_number),
        "loop device is read-only"
    );
    let info = loopdev::status(h.loop_number)
        .expect("LOOP_GET_STATUS64")
        .expect("attached");
    assert_ne!(info.flags() & loopdev::LO_FLAGS_READ_ONLY, 0);
    assert!(fx.mapper().adopt(&dev).expect("adopt").read_only);

    // Reads work.
    let mut buf = [0u8; 12];
    std::fs::File::open(&dev.device)
        .and_then(|f| f.read_exact_at(&mut buf, 4096))
        .expect("read");
    assert_eq!(&buf, b"sealed layer");
    // Writes through the block device fail.
    let write = OpenOptions::new()
        .write(true)
        .open(&dev.device)
        .and_then(|f| f.write_all_at(b"x", 0));
    assert!(write.is_err(), "write to a read-only loop device succeeded");
    // Writes to the FUSE file fail with EROFS.
    let err = OpenOptions::new()
        .write(true)
        .open(h.image_file())
        .expect_err("open image rw");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    fx.mapper().unmap(&dev).expect("unmap");
    let raw = std::fs::read(&backing).expect("backing");
    assert_eq!(&raw[4096..4108], b"sealed layer");
}

#[test]
fn concurrent_direct_io_through_the_loop_device() {
    if !prerequisites("concurrent_direct_io_through_the_loop_device") {
        return;
    }
    let fx = Fixture::new(CephConnection::default());
    let backing = fx.backing("conc.img", 64 << 20);
    let dev = fx
        .mapper()
        .map_file(&backing, &label("concurrent"))
        .expect("map");
    const THREADS: u64 = 8;
    const CHUNK: usize = 1 << 20;
    const PER_THREAD: u64 = 4;
    let device = Arc::new(dev.device.clone());
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let device = device.clone();
            std::thread::spawn(move || {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(device.as_path())
                    .expect("open O_DIRECT");
                let mut aligned = AlignedBuf::new(CHUNK);
                for i in 0..PER_THREAD {
                    // Interleave threads: chunk index i * THREADS + t.
                    let off = (i * THREADS + t) * CHUNK as u64;
                    aligned.as_mut().copy_from_slice(&pattern(off, CHUNK));
                    f.write_all_at(aligned.as_ref(), off).expect("write");
                }
                f.sync_all().expect("fsync");
                for i in 0..PER_THREAD {
                    let off = (i * THREADS + t) * CHUNK as u64;
                    f.read_exact_at(aligned.as_mut(), off).expect("read");
                    assert!(
                        aligned.as_ref() == pattern(off, CHUNK).as_slice(),
                        "mismatch at {off}"
                    );
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker panicked");
    }
    fx.mapper().unmap(&dev).expect("unmap");
    let mut raw = std::fs::File::open(&backing).expect("open backing");
    let mut buf = vec![0u8; CHUNK];
    for idx in 0..THREADS * PER_THREAD {
        let off = idx * CHUNK as u64;
        raw.seek(SeekFrom::Start(off)).expect("seek");
        raw.read_exact(&mut buf).expect("read backing");
        assert!(buf == pattern(off, CHUNK), "backing file differs at {off}");
    }
}

/// A page-aligned buffer for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: non-zero size layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        Self { ptr, len }
    }
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

#[test]
fn a_restarted_daemon_adopts_and_a_dead_server_is_cleaned_up() {
    if !prerequisites("a_restarted_daemon_adopts_and_a_dead_server_is_cleaned_up") {
        return;
    }
    let mut fx = Fixture::new(CephConnection::default());
    let backing = fx.backing("adopt.img", 32 << 20);
    let dev = fx
        .mapper()
        .map_file(&backing, &label("adopt"))
        .expect("map");
    let h = fuse_handle(&dev).clone();
    // Mapping the same image twice is refused.
    match fx.mapper().map_file(&backing, &label("adopt")) {
        Err(Error::AlreadyMapped { device, .. }) => assert_eq!(device, dev.device),
        other => panic!("second map: {other:?}"),
    }

    // "Restart": a new mapper over the same run directory.
    let config = fx.mapper().config().clone();
    fx.mapper = Some(FuseMapper::new(config.clone()).expect("new mapper"));
    let listed = fx.mapper().list().expect("list");
    assert_eq!(listed, vec![dev.clone()]);
    let adopted = fx.mapper().adopt(&dev).expect("adopt");
    assert_eq!(adopted.device, dev.device);
    assert!(!adopted.read_only);
    // Still serving I/O.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev.device)
        .expect("open device");
    f.write_all_at(b"after restart", 0).expect("write");
    f.sync_all().expect("fsync");
    drop(f);

    // The server dies: the mapping is stale, and unmap cleans it up.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(h.server_pid),
        nix::sys::signal::SIGKILL,
    )
    .expect("kill server");
    let mut gone = false;
    for _ in 0..200 {
        if !Path::new(&format!("/proc/{}", h.server_pid)).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", h.server_pid))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true)
        {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(gone, "server did not die");
    match fx.mapper().adopt(&dev) {
        Err(e @ Error::Stale { .. }) => assert!(e.to_string().contains("FUSE server"), "{e}"),
        other => panic!("adopt after server death: {other:?}"),
    }
    fx.mapper().unmap(&dev).expect("unmap a dead mapping");
    // The loop number itself may already serve a test running alongside.
    assert!(
        loopdev::backed_under(&h.state_dir).is_empty(),
        "a loop device is still backed by this mapping's file"
    );
    assert!(mounts_under(&h.state_dir).is_empty());
    let raw = std::fs::read(&backing).expect("backing");
    assert_eq!(&raw[..13], b"after restart");
    fx.mounts.clear();
}

#[test]
fn a_failing_server_start_reports_why_and_leaves_nothing() {
    if !prerequisites("a_failing_server_start_reports_why_and_leaves_nothing") {
        return;
    }
    let fx = Fixture::new(CephConnection::default());
    let missing = fx.dir.path().join("missing.img");
    std::fs::write(&missing, b"").expect("touch");
    std::fs::remove_file(&missing).expect("rm");
    let err = fx
        .mapper()
        .map_file(&fx.backing("x.img", 1 << 20), &label("ok"))
        .and_then(|d| {
            fx.mapper().unmap(&d)?;
            // A path that canonicalises but the server cannot open: a directory.
            fx.mapper().map_file(fx.dir.path(), &label("dir"))
        });
    match err {
        Err(e @ Error::HelperStart { .. }) => {
            let text = e.to_string();
            assert!(text.contains("did not start"), "{text}");
        }
        other => panic!("map of a directory: {other:?}"),
    }
    let run = fx.mapper().config().run_dir.clone();
    assert!(loopdev::backed_under(&run).is_empty());
    assert!(mounts_under(&run).is_empty());
    assert_eq!(
        std::fs::read_dir(&run).expect("run dir").count(),
        0,
        "state directory left behind"
    );
}

// --- against a real RBD image -------------------------------------------------

/// An RBD image in a fresh namespace, removed (with the namespace) on drop.
struct RbdImage {
    env: testkit::ceph::CephEnv,
    namespace: String,
    ioctx: ceph_client::IoCtx,
    pool_ioctx: ceph_client::IoCtx,
    image: String,
}

impl RbdImage {
    fn create(test: &str, size: u64) -> Option<Self> {
        let env = testkit::ceph::require(test)?;
        let rados = ceph_client::Rados::connect(&env.connect_config()).expect("connect");
        let namespace = testkit::ceph::unique_namespace(test);
        let pool_ioctx = rados.ioctx(&env.pool, None).expect("pool ioctx");
        ceph_client::rbd::namespace_create(&pool_ioctx, &namespace).expect("namespace");
        let ioctx = rados.ioctx(&env.pool, Some(&namespace)).expect("ioctx");
        let opts = ceph_client::rbd::ImageOptions {
            // layering | exclusive-lock
            features: Some(1 | 4),
            order: None,
        };
        ceph_client::rbd::create(&ioctx, "img", size, &opts).expect("create image");
        Some(Self {
            env,
            namespace,
            ioctx,
            pool_ioctx,
            image: "img".into(),
        })
    }

    fn connection(&self) -> CephConnection {
        CephConnection {
            conf: Some(self.env.conf.clone()),
            id: Some(self.env.id.clone()),
            keyring: Some(self.env.keyring.clone()),
            cluster: None,
        }
    }

    fn request(&self) -> MapRequest {
        MapRequest::new(
            self.env.pool.clone(),
            Some(self.namespace.clone()),
            self.image.clone(),
        )
    }

    fn open(&self) -> ceph_client::rbd::Image {
        ceph_client::rbd::Image::open(&self.ioctx, &self.image, None).expect("open image")
    }
}

impl Drop for RbdImage {
    fn drop(&mut self) {
        if let Ok(img) = ceph_client::rbd::Image::open(&self.ioctx, &self.image, None) {
            for snap in img.snap_list().unwrap_or_default() {
                let _ = img.snap_remove(&snap.name);
            }
        }
        if let Err(e) = ceph_client::rbd::remove(&self.ioctx, &self.image) {
            eprintln!("cleanup: remove image: {e}");
        }
        if let Err(e) = ceph_client::rbd::namespace_remove(&self.pool_ioctx, &self.namespace) {
            eprintln!("cleanup: remove namespace: {e}");
        }
    }
}

#[test]
fn rbd_image_through_fuse_and_loop() {
    let test = "rbd_image_through_fuse_and_loop";
    if !prerequisites(test) {
        return;
    }
    let Some(img) = RbdImage::create(test, 128 << 20) else {
        return;
    };
    let mut fx = Fixture::new(img.connection());
    let dev = fx.mapper().map(&img.request()).expect("map rbd image");
    assert!(!dev.read_only);
    assert_eq!(dev.spec, img.request().spec());

    // Raw writes at known offsets, read back through librbd directly.
    let data = pattern(7, 1 << 20);
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev.device)
            .expect("open device");
        // After a first flush librbd's cache runs write-back: data must
        // still be visible to another client once fsync returns.
        // (`image_fs_semantics_flush_discard_and_bounds` checks that fsync
        // reaches the backend's flush.)
        let mut buf = AlignedBuf::new(data.len());
        f.write_all_at(buf.as_ref(), 0).expect("first write");
        f.sync_all().expect("first fsync");
        buf.as_mut().copy_from_slice(&data);
        f.write_all_at(buf.as_ref(), 100 << 20).expect("write");
        f.sync_all().expect("fsync");
    }
    let direct = img.open();
    let mut back = vec![0u8; data.len()];
    direct
        .read_exact_at(100 << 20, &mut back)
        .expect("librbd read");
    assert!(
        back == data,
        "librbd does not see what the loop device wrote"
    );
    drop(direct);

    // Discard through the loop device zeroes in RBD.
    run(
        "blkdiscard",
        &[
            "-o",
            &(100u64 << 20).to_string(),
            "-l",
            "65536",
            &dev.device.display().to_string(),
        ],
    );
    let direct = img.open();
    let mut back = vec![1u8; 65536 + 4096];
    direct
        .read_exact_at(100 << 20, &mut back)
        .expect("librbd read");
    assert!(
        back[..65536].iter().all(|&b| b == 0),
        "discarded range does not read as zeros"
    );
    assert_eq!(&back[65536..], &data[65536..65536 + 4096]);
    drop(direct);

    // A file system on it.
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "nodiscard",
            &dev.device.display().to_string(),
        ],
    );
    let mnt = fx.mount(&dev.device, "m", "rw");
    let payload = pattern(9, 2 << 20);
    {
        let mut f = std::fs::File::create(mnt.join("payload")).expect("create");
        f.write_all(&payload).expect("write");
        f.sync_all().expect("fsync");
    }
    fx.umount(&mnt);
    fx.mapper().unmap(&dev).expect("unmap");

    let direct =
        ceph_client::rbd::Image::open_read_only(&img.ioctx, &img.image, None).expect("open ro");
    let mut whole = vec![0u8; 128 << 20];
    direct.read_exact_at(0, &mut whole).expect("read image");
    assert!(
        contains(&whole, &payload[..4096]),
        "ext4 payload is not in the RBD image"
    );
    drop(direct);
}

#[test]
fn rbd_snapshots_map_read_only_and_exclusive_maps_fence_other_writers() {
    let test = "rbd_snapshots_map_read_only_and_exclusive_maps_fence_other_writers";
    if !prerequisites(test) {
        return;
    }
    let Some(img) = RbdImage::create(test, 32 << 20) else {
        return;
    };
    let fx = Fixture::new(img.connection());
    {
        let direct = img.open();
        direct
            .write_all_at(0, b"before the snapshot")
            .expect("write");
        direct.flush().expect("flush");
        direct.snap_create("sealed").expect("snapshot");
        direct
            .write_all_at(0, b"AFTER  the snapshot")
            .expect("write");
        direct.flush().expect("flush");
    }

    let mut req = img.request();
    req.snap = Some("sealed".into());
    let snap_dev = fx.mapper().map(&req).expect("map snapshot");
    assert!(snap_dev.read_only, "a snapshot maps read-only");
    let mut buf = [0u8; 19];
    std::fs::File::open(&snap_dev.device)
        .and_then(|f| f.read_exact_at(&mut buf, 0))
        .expect("read snapshot");
    assert_eq!(&buf, b"before the snapshot");
    let err = OpenOptions::new()
        .write(true)
        .open(fuse_handle(&snap_dev).image_file())
        .expect_err("rw open");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));

    let mut req = img.request();
    req.exclusive = true;
    let dev = fx.mapper().map(&req).expect("map exclusive");
    std::fs::File::open(&dev.device)
        .and_then(|f| f.read_exact_at(&mut buf, 0))
        .expect("read head");
    assert_eq!(&buf, b"AFTER  the snapshot");
    let other = img.open();
    let err = other
        .write_at(0, b"intruder")
        .expect_err("write while another client holds the lock");
    assert_eq!(err.errno(), Some(libc::EROFS), "{err}");
    drop(other);
    fx.mapper().unmap(&dev).expect("unmap head");
    fx.mapper().unmap(&snap_dev).expect("unmap snapshot");
    // Once unmapped, the lock is released.
    img.open()
        .write_all_at(0, b"free again")
        .expect("write after unmap");
}

#[test]
fn mapping_a_missing_rbd_image_fails_with_enoent() {
    let test = "mapping_a_missing_rbd_image_fails_with_enoent";
    if !prerequisites(test) {
        return;
    }
    let Some(img) = RbdImage::create(test, 1 << 20) else {
        return;
    };
    let fx = Fixture::new(img.connection());
    let mut req = img.request();
    req.image = "no-such-image".into();
    match fx.mapper().map(&req) {
        Err(e @ Error::HelperStart { .. }) => assert_eq!(e.errno(), Some(libc::ENOENT), "{e}"),
        other => panic!("map of a missing image: {other:?}"),
    }
    let run = fx.mapper().config().run_dir.clone();
    assert_eq!(entries_but_standby_logs(&run), Vec::<String>::new());
}

/// The names in `run` but the standby's log.
fn entries_but_standby_logs(run: &Path) -> Vec<String> {
    std::fs::read_dir(run)
        .expect("run dir")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("+standby."))
        .collect()
}

/// The mapper's standby server processes (waiting or since assigned).
fn standbys(run: &Path) -> Vec<i32> {
    testkit::process::live_pids_with_cmdline(&format!("--standby-in {}", run.display()))
}

fn process_name(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The one standby waiting for an image. It is started right after a map
/// and names itself once it runs: waits up to 10 s for that.
fn waiting_standby(run: &Path) -> i32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: Vec<i32> = standbys(run)
            .into_iter()
            .filter(|&pid| process_name(pid) == docker_rbd::mapper::fuse::serve::STANDBY_NAME)
            .collect();
        if waiting.len() == 1 || std::time::Instant::now() >= deadline {
            assert_eq!(waiting.len(), 1, "waiting standbys: {waiting:?}");
            return waiting[0];
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_standby_server_serves_the_next_image_and_goes_with_its_mapper() {
    let test = "a_standby_server_serves_the_next_image_and_goes_with_its_mapper";
    if !prerequisites(test) {
        return;
    }
    let Some(img) = RbdImage::create(test, 32 << 20) else {
        return;
    };
    {
        let direct = img.open();
        direct.write_all_at(0, b"sealed data").expect("write");
        direct.flush().expect("flush");
        direct.snap_create("s").expect("snapshot");
    }
    let mut fx = Fixture::new(img.connection());
    let run = fx.mapper().config().run_dir.clone();
    assert!(standbys(&run).is_empty(), "a standby before any map");

    // The first map starts a server of its own, then a standby.
    let head = fx.mapper().map(&img.request()).expect("map head");
    let standby = waiting_standby(&run);
    assert_ne!(fuse_handle(&head).server_pid, standby);

    // The next image goes to the standby, which takes its own name back;
    // a new standby replaces it.
    let mut req = img.request();
    req.snap = Some("s".into());
    let snap = fx.mapper().map(&req).expect("map the snapshot");
    let h = fuse_handle(&snap).clone();
    assert_eq!(
        h.server_pid, standby,
        "the snapshot was not served by the standby"
    );
    assert!(h.server_start.is_some());
    assert_eq!(process_name(standby), "docker-rbd-fuse");
    let mut buf = [0u8; 11];
    std::fs::File::open(&snap.device)
        .and_then(|f| f.read_exact_at(&mut buf, 0))
        .expect("read through the standby");
    assert_eq!(&buf, b"sealed data");
    let log = std::fs::read_to_string(h.state_dir.join("server.log")).expect("server.log");
    assert!(log.contains("waiting for an image"), "{log}");
    let next = waiting_standby(&run);
    assert_ne!(next, standby);

    // A restarted daemon recognises a standby-served mapping by its pid and
    // start time (its command line names no mountpoint); the old mapper's
    // standby exits with it, its log removed.
    let config = fx.mapper().config().clone();
    fx.mapper = Some(FuseMapper::new(config).expect("new mapper"));
    assert!(
        testkit::process::wait_dead(next, Duration::from_secs(10)),
        "the dropped mapper's standby runs on"
    );
    let listed = fx.mapper().list().expect("list");
    assert_eq!(listed.len(), 2, "{listed:?}");
    fx.mapper()
        .adopt(&snap)
        .expect("adopt the standby-served mapping");
    assert_eq!(entries_but_standby_logs(&run).len(), 2);
    assert!(
        !std::fs::read_dir(&run).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("+standby.")),
        "a standby log was left"
    );

    // A dead standby costs nothing but its speed: the map starts a server.
    fx.mapper().unmap(&head).expect("unmap head");
    let head = fx.mapper().map(&img.request()).expect("map head again");
    let standby = waiting_standby(&run);
    testkit::process::signal(standby, nix::sys::signal::Signal::SIGKILL).unwrap();
    assert!(testkit::process::wait_dead(
        standby,
        Duration::from_secs(10)
    ));
    fx.mapper().unmap(&head).expect("unmap head");
    let head = fx
        .mapper()
        .map(&img.request())
        .expect("map with a dead standby");
    assert_ne!(fuse_handle(&head).server_pid, standby);
    std::fs::File::open(&head.device)
        .and_then(|f| f.read_exact_at(&mut buf, 0))
        .expect("read head");
    assert_eq!(&buf, b"sealed data");

    // A standby that cannot open its image reports why, as a fresh server
    // would, and leaves nothing.
    waiting_standby(&run);
    let mut missing = img.request();
    missing.image = "no-such-image".into();
    match fx.mapper().map(&missing) {
        Err(e @ Error::HelperStart { .. }) => assert_eq!(e.errno(), Some(libc::ENOENT), "{e}"),
        other => panic!("map of a missing image: {other:?}"),
    }
    assert_eq!(entries_but_standby_logs(&run).len(), 2);

    fx.mapper().unmap(&head).expect("unmap head");
    fx.mapper().unmap(&snap).expect("unmap the snapshot");
    let last = waiting_standby(&run);
    fx.mapper = None;
    assert!(
        testkit::process::wait_dead(last, Duration::from_secs(10)),
        "the standby outlived its mapper"
    );
    assert_eq!(
        std::fs::read_dir(&run).unwrap().count(),
        0,
        "left in the run directory"
    );
}

#[test]
fn several_images_map_and_unmap_in_parallel() {
    if !prerequisites("several_images_map_and_unmap_in_parallel") {
        return;
    }
    let fx = Fixture::new(CephConnection::default());
    let backings: Vec<PathBuf> = (0..4)
        .map(|i| fx.backing(&format!("p{i}.img"), 8 << 20))
        .collect();
    std::thread::scope(|s| {
        for (i, backing) in backings.iter().enumerate() {
            let mapper = fx.mapper();
            s.spawn(move || {
                let dev = mapper
                    .map_file(backing, &label(&format!("par-{i}")))
                    .expect("map");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&dev.device)
                    .expect("open");
                f.write_all_at(format!("image {i}").as_bytes(), 512)
                    .expect("write");
                f.sync_all().expect("fsync");
                drop(f);
                mapper.unmap(&dev).expect("unmap");
            });
        }
    });
    for (i, backing) in backings.iter().enumerate() {
        let raw = std::fs::read(backing).expect("backing");
        assert_eq!(&raw[512..519], format!("image {i}").as_bytes());
    }
    assert!(fx.mapper().list().expect("list").is_empty());
}

/// Counts what reaches the backend.
struct Counting {
    inner: docker_rbd::mapper::fuse::SparseFileBackend,
    flushes: Arc<std::sync::atomic::AtomicU64>,
    discards: Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
}

impl docker_rbd::mapper::fuse::BlockBackend for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write_at(off, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.flush()
    }
    fn discard(&self, off: u64, len: u64) -> std::io::Result<()> {
        self.discards.lock().expect("lock").push((off, len));
        self.inner.discard(off, len)
    }
}

#[test]
fn image_fs_semantics_flush_discard_and_bounds() {
    use docker_rbd::mapper::fuse::fs::{FsOptions, ImageFs};
    if !prerequisites("image_fs_semantics_flush_discard_and_bounds") {
        return;
    }
    let fx = Fixture::new(CephConnection::default());
    let backing = fx.backing("sem.img", 4 << 20);
    let flushes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let discards = Arc::new(std::sync::Mutex::new(Vec::new()));
    let backend = Counting {
        inner: docker_rbd::mapper::fuse::SparseFileBackend::open(&backing, false).expect("open"),
        flushes: flushes.clone(),
        discards: discards.clone(),
    };
    let mnt = fx.dir.path().join("fusemnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let mut config = fuser::Config::default();
    config.n_threads = Some(2);
    let session = fuser::spawn_mount(ImageFs::new(backend, FsOptions::default()), &mnt, &config)
        .expect("mount");
    // Unmount even when an assertion below fails.
    struct Unmount(Option<fuser::BackgroundSession>, PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            if let Some(s) = self.0.take()
                && s.umount_and_join().is_err()
            {
                let _ = nix::mount::umount2(&self.1, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
    let guard = Unmount(Some(session), mnt.clone());
    let image = mnt.join("image");

    let names: Vec<String> = std::fs::read_dir(&mnt)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["image"]);
    assert_eq!(std::fs::metadata(&image).expect("stat").len(), 4 << 20);

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .expect("open image");
    f.write_all_at(b"hello", 1000).expect("write");
    let before = flushes.load(std::sync::atomic::Ordering::SeqCst);
    f.sync_all().expect("fsync");
    assert!(
        flushes.load(std::sync::atomic::Ordering::SeqCst) > before,
        "fsync did not reach the backend's flush"
    );
    // Writes past the end fail; the size cannot change.
    let err = f
        .write_all_at(b"x", 4 << 20)
        .expect_err("write past the end");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(f.set_len(1 << 20).is_err(), "truncate succeeded");
    // Hole punching reaches discard and reads back as zeros.
    // SAFETY: fallocate on an open descriptor with integer arguments.
    let rc = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            8192,
        )
    };
    assert_eq!(rc, 0, "punch hole: {}", std::io::Error::last_os_error());
    assert_eq!(discards.lock().expect("lock").as_slice(), &[(0, 8192)]);
    drop(f);
    let raw = std::fs::read(&backing).expect("backing");
    assert!(
        raw[..8192].iter().all(|&b| b == 0),
        "punched range is not zero"
    );
    // Nothing else can be created.
    assert!(std::fs::File::create(mnt.join("other")).is_err());
    let before = flushes.load(std::sync::atomic::Ordering::SeqCst);
    // close() sends FLUSH too.
    let f = OpenOptions::new().write(true).open(&image).expect("reopen");
    f.write_all_at(b"bye", 0).expect("write");
    drop(f);
    assert!(
        flushes.load(std::sync::atomic::Ordering::SeqCst) > before,
        "close did not flush"
    );
    drop(guard);
    assert!(mounts_under(&mnt).is_empty());
}
