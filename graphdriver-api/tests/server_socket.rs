//! Binding, permissions and shutdown of the plugin socket.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use common::{Conn, FakeDriver, Settings, TestServer, WAIT, dockerd_json_request};
use graphdriver_api::{ServerConfig, ServerError, SocketGroup};

fn mode_of(path: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Runs `serve` and expects it to fail at start.
async fn start_error(config: ServerConfig) -> ServerError {
    let result = tokio::time::timeout(
        WAIT,
        graphdriver_api::serve(FakeDriver::new(), config, std::future::pending()),
    )
    .await
    .expect("serve should fail at once");
    match result {
        Err(err) => err,
        Ok(()) => panic!("serve succeeded"),
    }
}

#[test]
fn default_config_is_where_dockerd_looks() {
    let config = ServerConfig::for_plugin("rbd");
    assert_eq!(
        config.socket,
        std::path::Path::new("/run/docker/plugins/rbd.sock")
    );
    assert_eq!(config.mode, 0o600);
    assert_eq!(config.group, None);
    assert_eq!("0".parse(), Ok(SocketGroup::Id(0)));
    assert_eq!("docker".parse(), Ok(SocketGroup::Name("docker".into())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_the_directory_and_a_0600_socket() {
    let server = TestServer::start(FakeDriver::new()).await;
    let meta = std::fs::symlink_metadata(&server.socket).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
    assert_eq!(mode_of(&server.socket), 0o600);
    // Nothing left behind next to it.
    let entries: Vec<_> = std::fs::read_dir(server.socket.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("rbd.sock")]);
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_and_group_are_applied() {
    let gid = nix::unistd::getegid().as_raw();
    let group_name = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name);
    let mut groups = vec![SocketGroup::Id(gid)];
    groups.extend(group_name.map(SocketGroup::Name));
    for group in groups {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::at(dir.path().join("p.sock"));
        config.mode = 0o660;
        config.group = Some(group.clone());
        let server = TestServer::start_with(FakeDriver::new(), dir, config).await;
        let meta = std::fs::symlink_metadata(&server.socket).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o660, "{group:?}");
        assert_eq!(meta.gid(), gid, "{group:?}");
        server.stop().await.expect("clean stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mode_and_unknown_group_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::at(dir.path().join("p.sock"));
    config.mode = 0o170600;
    assert!(matches!(
        start_error(config).await,
        ServerError::InvalidMode { mode: 0o170600 }
    ));
    let mut config = ServerConfig::at(dir.path().join("p.sock"));
    config.group = Some(SocketGroup::Name("no-such-group-docker-rbd".into()));
    let err = start_error(config).await;
    assert!(
        matches!(&err, ServerError::UnknownGroup { name } if name == "no-such-group-docker-rbd"),
        "{err:?}"
    );
    assert!(!dir.path().join("p.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_from_a_crashed_run_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rbd.sock");
    // A socket whose listener is gone: connecting is refused.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let config = ServerConfig::at(&path);
    let server = TestServer::start_with(FakeDriver::new(), dir, config).await;
    let response = server.connect().await.call("Plugin.Activate", "").await;
    assert_eq!(response.status, 200);
    server.stop().await.expect("clean stop");
    assert!(!path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_socket_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rbd.sock");
    let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let err = start_error(ServerConfig::at(&path)).await;
    assert!(
        matches!(&err, ServerError::InUse { path: p } if *p == path),
        "{err:?}"
    );
    assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
    // The other server still owns its socket.
    std::os::unix::net::UnixStream::connect(&path).expect("still live");
    drop(live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rbd.sock");
    std::fs::write(&path, b"precious").unwrap();
    let err = start_error(ServerConfig::at(&path)).await;
    assert!(
        matches!(&err, ServerError::NotASocket { path: p } if *p == path),
        "{err:?}"
    );
    assert!(err.to_string().contains(path.to_str().unwrap()));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");

    let sub = dir.path().join("adir");
    std::fs::create_dir(&sub).unwrap();
    let err = start_error(ServerConfig::at(&sub)).await;
    assert!(matches!(err, ServerError::NotASocket { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_an_in_flight_request_then_removes_the_socket() {
    let driver = FakeDriver::with(Settings {
        delay: Duration::from_millis(700),
        ..Settings::default()
    });
    let mut server = TestServer::start(driver).await;
    let socket = server.socket.clone();
    let mut idle = server.connect().await;
    assert_eq!(idle.call("Plugin.Activate", "").await.status, 200);
    let mut busy = server.connect().await;
    busy.send(&dockerd_json_request(
        "GraphDriver.Get",
        "{\"ID\":\"slow\"}\n",
    ))
    .await
    .unwrap();
    server
        .driver
        .wait_for_call(|c| matches!(c, common::Call::Get { .. }))
        .await;
    server.signal_stop();
    let response = busy.response().await;
    assert_eq!(response.status, 200);
    assert_eq!(
        response.json(),
        serde_json::json!({"Dir": "/var/lib/docker/rbd/mnt/slow/rootfs"})
    );
    server.stop().await.expect("clean stop");
    assert!(!socket.exists(), "socket file removed");
    assert!(idle.is_closed().await, "idle keep-alive connection closed");
    assert!(tokio::net::UnixStream::connect(&socket).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_waiting_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::at(dir.path().join("rbd.sock"));
    config.shutdown_grace = Some(Duration::from_millis(200));
    let gate = common::Gate::default();
    let driver = FakeDriver::with(Settings {
        gate: Some(gate.clone()),
        ..Settings::default()
    });
    let mut server = TestServer::start_with(driver, dir, config).await;
    let socket = server.socket.clone();
    let mut busy = server.connect().await;
    busy.send(&dockerd_json_request("GraphDriver.Put", "{\"ID\":\"x\"}\n"))
        .await
        .unwrap();
    server
        .driver
        .wait_for_call(|c| matches!(c, common::Call::Put(_)))
        .await;
    let started = Instant::now();
    server.signal_stop();
    server.stop().await.expect("stop");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(!socket.exists());
    // The held call was still in the driver when serve returned.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), busy.read_response())
            .await
            .is_err()
    );
    gate.open();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_a_socket_path_taken_over_by_someone_else() {
    let server = TestServer::start(FakeDriver::new()).await;
    let socket = server.socket.clone();
    std::fs::remove_file(&socket).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let (stopped, _dir) = server.stop_keeping_dir().await;
    stopped.expect("clean stop");
    assert!(socket.exists(), "the other server's socket must stay");
    let mut conn = Conn::connect(&socket).await;
    drop(other);
    drop(conn.send(b"x").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_signal_completes_on_sigterm_and_stops_the_server() {
    let signal = graphdriver_api::shutdown_signal().expect("handlers");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("rbd.sock");
    let task = tokio::spawn(graphdriver_api::serve(
        FakeDriver::new(),
        ServerConfig::at(&socket),
        signal,
    ));
    let mut conn = loop {
        if let Ok(stream) = tokio::net::UnixStream::connect(&socket).await {
            drop(stream);
            break Conn::connect(&socket).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(conn.call("Plugin.Activate", "").await.status, 200);
    // The handler is installed, so SIGTERM no longer kills the process.
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("server stopped on SIGTERM")
        .expect("task")
        .expect("clean stop");
    assert!(!socket.exists());
}

#[test]
fn shutdown_signal_needs_a_runtime() {
    assert!(matches!(
        graphdriver_api::shutdown_signal().map(|_| ()),
        Err(ServerError::NoRuntime)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_no_header_in_time_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::at(dir.path().join("rbd.sock"));
    config.header_timeout = Duration::from_millis(300);
    let server = TestServer::start_with(FakeDriver::new(), dir, config).await;
    // Half a header, then nothing: the slow client goes.
    let mut slow = server.connect().await;
    slow.send(b"POST /Plugin.Activate HTTP/1.1\r\nHost: plugin\r\n")
        .await
        .unwrap();
    assert!(slow.is_closed().await, "closed after the header timeout");
    // Nothing at all after a request: an idle connection goes too.
    let mut idle = server.connect().await;
    assert_eq!(idle.call("Plugin.Activate", "").await.status, 200);
    assert!(idle.is_closed().await, "idle connection closed");
    // A client that sends its request is served, its driver call untimed.
    let mut prompt = server.connect().await;
    assert_eq!(prompt.call("Plugin.Activate", "").await.status, 200);
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::at(dir.path().join("rbd.sock"));
    config.max_connections = 2;
    let server = TestServer::start_with(FakeDriver::new(), dir, config).await;
    let mut a = server.connect().await;
    assert_eq!(a.call("Plugin.Activate", "").await.status, 200);
    let mut b = server.connect().await;
    assert_eq!(b.call("Plugin.Activate", "").await.status, 200);
    // Both stay open (keep-alive): a third waits to be accepted.
    let mut c = server.connect().await;
    c.send(&dockerd_json_request("Plugin.Activate", ""))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), c.read_response())
            .await
            .is_err(),
        "a third connection was served while two were open"
    );
    drop(a);
    assert_eq!(c.response().await.status, 200, "served once one closed");
    assert_eq!(b.call("Plugin.Activate", "").await.status, 200);
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_connection_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::at(dir.path().join("rbd.sock"));
    config.max_connections = 0;
    let err = start_error(config).await;
    assert!(matches!(err, ServerError::NoConnections), "{err:?}");
}
