//! Hosts (private mount namespaces) and daemons run inside them.

use std::path::Path;
use std::time::Duration;

use testkit::daemon::Daemon;
use testkit::host::Host;
use testkit::process;

const LISTENER: &str = "import socket, sys, os\n\
s = socket.socket(socket.AF_UNIX)\n\
s.bind(sys.argv[1])\n\
s.listen(8)\n\
print('listening', flush=True)\n\
while True:\n    c, _ = s.accept(); c.close()\n";

#[test]
fn daemon_in_host_listens_on_the_hosts_run() {
    let missing = testkit::require::root().or_else(|| testkit::require::path("/usr/bin/python3"));
    if !testkit::require::check("daemon_in_host_listens_on_the_hosts_run", missing) {
        return;
    }
    let host = Host::new("listener").unwrap();
    let name = testkit::unique_name("tkd");
    let inside = host.plugin_socket(&name);
    assert_eq!(
        inside,
        Path::new(&format!("/run/docker/plugins/{name}.sock"))
    );
    let mut cmd = host.command("/usr/bin/python3");
    cmd.args(["-c", LISTENER]).arg(&inside);
    let mut d = Daemon::start(
        "listener",
        cmd,
        &host.path(&inside),
        Duration::from_secs(20),
    )
    .unwrap();
    let pid = d.pid().unwrap();
    // The daemon's pid is the program's own, inside the host.
    assert!(process::cmdline(pid).unwrap().contains("python3"));
    assert_eq!(host.processes(), vec![pid]);
    assert!(!inside.exists(), "the socket leaked into the test's /run");
    d.check_running().unwrap();
    assert!(d.log().contains("listening"));
    drop(d);
    assert!(!process::is_live(pid));
    assert_eq!(host.processes(), Vec::<i32>::new());
    let holder = host.pid();
    drop(host);
    assert!(process::wait_dead(holder, Duration::from_secs(5)));
}

#[test]
fn daemon_that_exits_reports_its_log() {
    let scratch = testkit::scratch_dir("tk-exit").unwrap();
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.args(["-c", "echo cannot start >&2; exit 7"]);
    let err = Daemon::start(
        "failing",
        cmd,
        &scratch.path().join("none.sock"),
        Duration::from_secs(10),
    )
    .unwrap_err();
    assert!(
        err.contains("exit status: 7") && err.contains("cannot start"),
        "{err}"
    );
}

/// Run by `orphaned_daemon_is_swept` in a child process: starts a daemon,
/// reports its pid, and waits to be killed.
#[test]
fn orphan_daemon_helper() {
    let Some(out) = std::env::var_os("TESTKIT_ORPHAN_DAEMON_OUT") else {
        return;
    };
    let scratch = testkit::scratch_dir("tk-orphan-sock").unwrap();
    let socket = scratch.path().join("l.sock");
    let mut cmd = std::process::Command::new("/usr/bin/python3");
    cmd.args(["-c", LISTENER]).arg(&socket);
    let d = Daemon::start("orphan", cmd, &socket, Duration::from_secs(20)).unwrap();
    std::fs::write(&out, format!("{}\n", d.pid().unwrap())).unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn orphaned_daemon_is_swept() {
    let missing = testkit::require::root().or_else(|| testkit::require::path("/usr/bin/python3"));
    if !testkit::require::check("orphaned_daemon_is_swept", missing) {
        return;
    }
    let scratch = testkit::scratch_dir("tk-orphan-daemon").unwrap();
    let report = scratch.path().join("report");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "orphan_daemon_helper", "--nocapture"])
        .env("TESTKIT_ORPHAN_DAEMON_OUT", &report)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let pid: i32 = loop {
        if let Ok(text) = std::fs::read_to_string(&report)
            && let Ok(pid) = text.trim().parse()
        {
            break pid;
        }
        if std::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = process::kill_child(&mut child);
            panic!("the helper did not report its daemon");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(process::is_live(pid));
    process::kill_child(&mut child).unwrap();
    assert_eq!(testkit::sweep_orphans(), Vec::<String>::new());
    assert!(
        process::wait_dead(pid, Duration::from_secs(5)),
        "daemon {pid} survived the sweep"
    );
}
