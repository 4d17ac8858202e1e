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
