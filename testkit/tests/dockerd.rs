//! The testkit's dockerd support against a real dockerd 20.10 with the
//! built-in `vfs` driver: private instances, hosts side by side, image
//! tarballs, restart after a crash, and that nothing is left behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::dockerd::{Dockerd, DockerdConfig};
use testkit::host::Host;
use testkit::{images, mounts, process};

/// Processes, mounts and directories a stopped instance must not leave.
fn assert_nothing_left(dir: &Path, pids: &[i32]) {
    for &pid in pids {
        assert!(
            !process::is_live(pid),
            "pid {pid} ({:?}) still runs",
            process::cmdline(pid)
        );
    }
    let exec = dir.join("exec").display().to_string();
    assert_eq!(
        process::live_pids_with_cmdline(&exec),
        Vec::<i32>::new(),
        "processes naming {exec}"
    );
    let findmnt = std::process::Command::new("findmnt")
        .args(["-rn", "-o", "TARGET"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&findmnt.stdout);
    let prefix = dir.display().to_string();
    let left: Vec<&str> = table.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert!(left.is_empty(), "findmnt still lists {left:?}");
    assert!(!dir.exists(), "{} still exists", dir.display());
}

fn vfs(name: &str) -> DockerdConfig {
    let mut cfg = DockerdConfig::new("vfs");
    cfg.name = name.to_string();
    cfg
}

#[test]
fn vfs_dockerd_imports_loads_runs_and_leaves_nothing() {
    if !testkit::dockerd::require("vfs_dockerd_imports_loads_runs_and_leaves_nothing") {
        return;
    }
    let scratch = testkit::scratch_dir("tk-vfs").unwrap();
    let rootfs = scratch.path().join("rootfs.tar");
    images::write_busybox_rootfs_tar(&rootfs).unwrap();
    let tag = format!("{}:1", testkit::unique_name("special"));

    let d = Dockerd::start(vfs("tk-vfs")).unwrap();
    let dir = d.dir().to_path_buf();
    let dockerd_pid = d.pid().unwrap();
    let containerd_pid = d
        .containerd_pid()
        .expect("dockerd 20.10 starts its own containerd");
    assert!(
        process::cmdline(containerd_pid)
            .unwrap()
            .contains(&d.exec_root().display().to_string()),
        "containerd {containerd_pid} is not the private one"
    );
    // The data root is bind-mounted onto itself while dockerd runs.
    assert!(
        mounts::mounts_under(None, &dir)
            .unwrap()
            .contains(&d.data_root())
    );
    // The engine key is private.
    assert!(dir.join("key.json").exists());

    d.docker_ok([
        "import".as_ref(),
        rootfs.as_os_str(),
        "tk-busybox:1".as_ref(),
    ]);
    assert_eq!(
        d.run_sh("tk-busybox:1", "echo hi; ls /bin/cat"),
        "hi\n/bin/cat\n"
    );

    // Id, diff ids and every special entry, checked by load_special.
    d.load_special(&tag, scratch.path());
    assert_eq!(d.run_sh(&tag, "cat /x"), "layer3\n");

    // The exported filesystem keeps the xattr, devices, links and modes.
    d.docker_ok(["create", "--network", "none", "--name", "tk-exp", &tag]);
    images::check_special_export(&d.export("tk-exp", scratch.path())).unwrap();

    // A failing command reports itself.
    let failed = d.docker(["image", "inspect", "no-such-image:1"]);
    assert!(!failed.status.success());
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        d.docker_ok(["image", "inspect", "nope:1"])
    }));
    let msg = panic.unwrap_err().downcast::<String>().unwrap();
    assert!(
        msg.contains("image inspect nope:1") && msg.contains("No such image"),
        "{msg}"
    );
    assert!(msg.contains("dockerd log"), "{msg}");

    assert!(d.log().contains("API listen on"), "log: {}", d.log_tail(20));
    d.shutdown().unwrap();
    assert_nothing_left(&dir, &[dockerd_pid, containerd_pid]);
}

#[test]
fn chain_of_sixty_layers_loads() {
    if !testkit::dockerd::require("chain_of_sixty_layers_loads") {
        return;
    }
    let scratch = testkit::scratch_dir("tk-chain").unwrap();
    let path = scratch.path().join("chain.tar");
    let tag = format!("{}:60", testkit::unique_name("chain"));
    let saved = images::chain_image(&tag, 60)
        .unwrap()
        .write_save_tar(&path)
        .unwrap();
    assert_eq!(saved.diff_ids.len(), 60);
    let d = Dockerd::start(vfs("tk-chain")).unwrap();
    d.docker_ok(["load".as_ref(), "-i".as_ref(), path.as_os_str()]);
    let out = d.run_sh(&tag, "cat /depth; ls /chain");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("59"));
    assert_eq!(
        lines.map(str::to_string).collect::<Vec<_>>(),
        images::chain_expected(60)
    );
    let dir = d.dir().to_path_buf();
    d.shutdown().unwrap();
    assert_nothing_left(&dir, &[]);
}

#[test]
fn two_hosts_side_by_side() {
    if !testkit::dockerd::require("two_hosts_side_by_side") {
        return;
    }
    let scratch = testkit::scratch_dir("tk-hosts").unwrap();
    let rootfs = scratch.path().join("rootfs.tar");
    images::write_busybox_rootfs_tar(&rootfs).unwrap();

    let a = Host::new("a").unwrap();
    let b = Host::new("b").unwrap();
    let (holder_a, holder_b) = (a.pid(), b.pid());

    // /run and /etc/docker are private to each host.
    std::fs::write(a.path("/run/docker/plugins/only-a"), "a").unwrap();
    std::fs::write(a.path("/etc/docker/only-a"), "a").unwrap();
    assert!(!b.path("/run/docker/plugins/only-a").exists());
    assert!(!b.path("/etc/docker/only-a").exists());
    assert!(!Path::new("/run/docker/plugins/only-a").exists());
    assert!(!Path::new("/etc/docker/only-a").exists());
    let listed = a.run_ok("ls", &["/run/docker/plugins"]).unwrap();
    assert_eq!(listed, "only-a\n");
    // A mount made inside one host is seen by neither the other nor us.
    let probe = testkit::scratch_dir("tk-probe").unwrap();
    a.run_ok(
        "mount",
        &["-t", "tmpfs", "probe", &probe.path().display().to_string()],
    )
    .unwrap();
    assert_eq!(
        mounts::mounts_under(Some(a.pid()), probe.path()).unwrap(),
        vec![probe.path().to_path_buf()]
    );
    assert!(
        mounts::mounts_under(Some(b.pid()), probe.path())
            .unwrap()
            .is_empty()
    );
    assert!(mounts::mounts_under(None, probe.path()).unwrap().is_empty());
    mounts::unmount_under(Some(&a), probe.path()).unwrap();
    assert!(
        mounts::mounts_under(Some(a.pid()), probe.path())
            .unwrap()
            .is_empty()
    );

    let da = Dockerd::start(vfs("tk-host-a").in_host(&a)).unwrap();
    let db = Dockerd::start(vfs("tk-host-b").in_host(&b)).unwrap();
    // dockerd runs inside its host, and its mounts stay there.
    let ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_eq!(ns(da.pid().unwrap()), ns(a.pid()));
    assert_eq!(ns(db.pid().unwrap()), ns(b.pid()));
    assert_ne!(ns(da.pid().unwrap()), ns(std::process::id() as i32));
    assert!(
        mounts::mounts_under(Some(a.pid()), &da.data_root())
            .unwrap()
            .contains(&da.data_root())
    );
    assert!(
        mounts::mounts_under(None, &da.data_root())
            .unwrap()
            .is_empty()
    );
    assert!(
        mounts::mounts_under(Some(b.pid()), &da.data_root())
            .unwrap()
            .is_empty()
    );

    let id_a = da.docker_ok(["info", "-f", "{{.ID}}"]);
    let id_b = db.docker_ok(["info", "-f", "{{.ID}}"]);
    assert_ne!(id_a, id_b, "two hosts share an engine id");
    for d in [&da, &db] {
        d.docker_ok([
            "import".as_ref(),
            rootfs.as_os_str(),
            "tk-busybox:1".as_ref(),
        ]);
        let out = d.docker_ok([
            "run",
            "--rm",
            "--network",
            "none",
            "tk-busybox:1",
            "cat",
            "/etc/passwd",
        ]);
        assert!(out.starts_with("root:x:0:0"), "{out}");
    }
    // A container running in a only: b does not see it.
    da.docker_ok([
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "sleeper",
        "tk-busybox:1",
        "sleep",
        "1000",
    ]);
    assert_eq!(db.docker_ok(["ps", "-q"]), "");
    assert_ne!(da.docker_ok(["ps", "-q"]), "");

    let (dir_a, dir_b) = (da.dir().to_path_buf(), db.dir().to_path_buf());
    let pids: Vec<i32> = [da.pid(), da.containerd_pid(), db.pid(), db.containerd_pid()]
        .into_iter()
        .flatten()
        .collect();
    // Stopped with a container still running.
    da.shutdown().unwrap();
    db.shutdown().unwrap();
    assert_nothing_left(&dir_a, &pids);
    assert_nothing_left(&dir_b, &pids);
    assert_eq!(a.processes(), Vec::<i32>::new());
    assert_eq!(b.processes(), Vec::<i32>::new());
    drop((a, b));
    assert!(process::wait_dead(holder_a, Duration::from_secs(5)));
    assert!(process::wait_dead(holder_b, Duration::from_secs(5)));
}

#[test]
fn restart_after_crash_keeps_images() {
    if !testkit::dockerd::require("restart_after_crash_keeps_images") {
        return;
    }
    let scratch = testkit::scratch_dir("tk-crash").unwrap();
    let rootfs = scratch.path().join("rootfs.tar");
    images::write_busybox_rootfs_tar(&rootfs).unwrap();
    let mut d = Dockerd::start(vfs("tk-crash")).unwrap();
    d.docker_ok([
        "import".as_ref(),
        rootfs.as_os_str(),
        "tk-busybox:1".as_ref(),
    ]);
    d.docker_ok([
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "running",
        "tk-busybox:1",
        "sleep",
        "1000",
    ]);
    let (old_dockerd, old_containerd) = (d.pid().unwrap(), d.containerd_pid().unwrap());
    d.crash().unwrap();
    assert!(!process::is_live(old_dockerd));
    assert!(!process::is_live(old_containerd));
    assert!(!d.pidfile().exists());
    assert!(mounts::mounts_under(None, d.dir()).unwrap().is_empty());
    // A pidfile naming a zombie or a dead process must not stop a restart.
    std::fs::write(d.pidfile(), format!("{old_dockerd}\n")).unwrap();
    d.restart().unwrap();
    assert_ne!(d.pid(), Some(old_dockerd));
    let images = d.docker_ok(["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert!(images.contains("tk-busybox:1"), "{images}");
    let out = d.docker_ok([
        "run",
        "--rm",
        "--network",
        "none",
        "tk-busybox:1",
        "echo",
        "again",
    ]);
    assert_eq!(out, "again\n");
    d.stop().unwrap();
    d.restart().unwrap();
    let dir = d.dir().to_path_buf();
    d.shutdown().unwrap();
    assert_nothing_left(&dir, &[old_dockerd, old_containerd]);
}

#[test]
fn panicking_test_still_stops_dockerd() {
    if !testkit::dockerd::require("panicking_test_still_stops_dockerd") {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel::<(PathBuf, Vec<i32>)>();
    let result = std::thread::spawn(move || {
        let d = Dockerd::start(vfs("tk-panic")).unwrap();
        tx.send((
            d.dir().to_path_buf(),
            [d.pid(), d.containerd_pid()]
                .into_iter()
                .flatten()
                .collect(),
        ))
        .unwrap();
        panic!("deliberate failure while dockerd runs");
    })
    .join();
    assert!(result.is_err());
    let (dir, pids) = rx.recv().unwrap();
    assert_eq!(pids.len(), 2);
    assert_nothing_left(&dir, &pids);
}

/// Run by `orphans_of_a_killed_test_process_are_swept` in a child process:
/// starts a dockerd, reports it, and waits to be killed.
#[test]
fn orphan_helper() {
    let Some(out) = std::env::var_os("TESTKIT_ORPHAN_HELPER_OUT") else {
        return;
    };
    let d = Dockerd::start(vfs("tk-orphan")).unwrap();
    d.docker_ok(["info"]);
    let report = format!(
        "{}\n{}\n{}\n",
        d.dir().display(),
        d.pid().unwrap(),
        d.containerd_pid().unwrap()
    );
    std::fs::write(&out, report).unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn orphans_of_a_killed_test_process_are_swept() {
    if !testkit::dockerd::require("orphans_of_a_killed_test_process_are_swept") {
        return;
    }
    let scratch = testkit::scratch_dir("tk-orphan-report").unwrap();
    let report = scratch.path().join("report");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "orphan_helper",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("TESTKIT_ORPHAN_HELPER_OUT", &report)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !std::fs::read_to_string(&report).is_ok_and(|r| r.lines().count() == 3) {
        if std::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = process::kill_child(&mut child);
            panic!("the helper did not report a running dockerd");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&report).unwrap();
    let mut lines = text.lines();
    let dir = PathBuf::from(lines.next().unwrap());
    let pids: Vec<i32> = lines.map(|l| l.parse().unwrap()).collect();
    assert!(
        pids.iter().all(|&p| process::is_live(p)),
        "no dockerd running"
    );
    // The test process dies without dropping its Dockerd; dockerd lives on
    // until swept (here, or by another test's Dockerd::start).
    process::kill_child(&mut child).unwrap();
    let errors = testkit::sweep_orphans();
    assert!(errors.is_empty(), "{errors:?}");
    assert_nothing_left(&dir, &pids);
}
