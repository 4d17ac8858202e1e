//! The plugin server over a real unix socket, driven with the bytes dockerd
//! 20.10 writes, against a recording fake driver.

mod common;

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::time::Duration;

use common::{
    ApplyMode, Call, Conn, DiffFailure, FakeDriver, L1, LAST_CHUNK, M, Mode, Settings, TestServer,
    chunk, dockerd_apply_diff_head, dockerd_json_request,
};
use graphdriver_api::types::{CreateRequest, IdMap, InitRequest};
use serde_json::{Value, json};

const JSON_TYPE: &str = "application/vnd.docker.plugins.v1+json";

/// One JSON call: endpoint, body as dockerd sends it, expected status and
/// reply, and the call the driver must see.
struct Case {
    method: &'static str,
    body: String,
    status: u16,
    reply: Value,
    call: Option<Call>,
}

fn case(method: &'static str, body: &str, reply: Value, call: Option<Call>) -> Case {
    Case {
        method,
        body: body.to_owned(),
        status: 200,
        reply,
        call,
    }
}

/// The call sequence dockerd makes from start to `docker rm` and stop, with
/// the wire bodies captured from dockerd 20.10.24.
fn dockerd_session() -> Vec<Case> {
    let init = format!("{M}-init");
    let size_20g = BTreeMap::from([("size".to_owned(), "20G".to_owned())]);
    vec![
        case(
            "Plugin.Activate",
            "",
            json!({"Implements": ["GraphDriver"]}),
            None,
        ),
        case(
            "GraphDriver.Init",
            "{\"Home\":\"/var/lib/docker/rbd\",\"Opts\":null,\"UIDMaps\":null,\"GIDMaps\":null}\n",
            json!({}),
            Some(Call::Init(InitRequest {
                home: "/var/lib/docker/rbd".into(),
                ..InitRequest::default()
            })),
        ),
        case(
            "GraphDriver.Capabilities",
            "{}\n",
            json!({"Capabilities": {"ReproducesExactDiffs": false}}),
            Some(Call::Capabilities),
        ),
        case(
            "GraphDriver.Create",
            &format!("{{\"ID\":\"{L1}\"}}\n"),
            json!({}),
            Some(Call::Create(CreateRequest {
                id: L1.into(),
                ..CreateRequest::default()
            })),
        ),
        case(
            "GraphDriver.CreateReadWrite",
            &format!(
                "{{\"ID\":\"{init}\",\"Parent\":\"{L1}\",\"StorageOpt\":{{\"size\":\"20G\"}}}}\n"
            ),
            json!({}),
            Some(Call::CreateReadWrite(CreateRequest {
                id: init.clone(),
                parent: L1.into(),
                mount_label: String::new(),
                storage_opt: size_20g.clone(),
            })),
        ),
        case(
            "GraphDriver.CreateReadWrite",
            &format!(
                "{{\"ID\":\"{M}\",\"Parent\":\"{init}\",\"StorageOpt\":{{\"size\":\"20G\"}}}}\n"
            ),
            json!({}),
            Some(Call::CreateReadWrite(CreateRequest {
                id: M.into(),
                parent: init.clone(),
                mount_label: String::new(),
                storage_opt: size_20g,
            })),
        ),
        case(
            "GraphDriver.Get",
            &format!(
                "{{\"ID\":\"{M}\",\"MountLabel\":\"system_u:object_r:container_file_t:s0:c1,c2\"}}\n"
            ),
            json!({"Dir": format!("/var/lib/docker/rbd/mnt/{M}/rootfs")}),
            Some(Call::Get {
                id: M.into(),
                mount_label: "system_u:object_r:container_file_t:s0:c1,c2".into(),
            }),
        ),
        case(
            "GraphDriver.Exists",
            &format!("{{\"ID\":\"{M}\"}}\n"),
            json!({"Exists": true}),
            Some(Call::Exists(M.into())),
        ),
        case(
            "GraphDriver.Exists",
            "{\"ID\":\"nope\"}\n",
            json!({"Exists": false}),
            Some(Call::Exists("nope".into())),
        ),
        case(
            "GraphDriver.GetMetadata",
            &format!("{{\"ID\":\"{M}\"}}\n"),
            json!({"Metadata": {"DeviceName": format!("rbd/{M}"), "DeviceSize": "10737418240"}}),
            Some(Call::GetMetadata(M.into())),
        ),
        case(
            "GraphDriver.Status",
            "{}\n",
            json!({"Status": [["Pool", "rbd"], ["Layers", "3"]]}),
            Some(Call::Status),
        ),
        case(
            "GraphDriver.Changes",
            &format!("{{\"ID\":\"{M}\",\"Parent\":\"{init}\"}}\n"),
            json!({"Changes": [
                {"Path": "/etc", "Kind": 0},
                {"Path": "/etc/hosts.new", "Kind": 1},
                {"Path": "/bin/sh", "Kind": 2},
            ]}),
            Some(Call::Changes {
                id: M.into(),
                parent: init.clone(),
            }),
        ),
        case(
            "GraphDriver.DiffSize",
            &format!("{{\"ID\":\"{M}\",\"Parent\":\"{init}\"}}\n"),
            json!({"Size": 4096}),
            Some(Call::DiffSize {
                id: M.into(),
                parent: init.clone(),
            }),
        ),
        case(
            "GraphDriver.Put",
            &format!("{{\"ID\":\"{M}\"}}\n"),
            json!({}),
            Some(Call::Put(M.into())),
        ),
        case(
            "GraphDriver.Remove",
            &format!("{{\"ID\":\"{M}\"}}\n"),
            json!({}),
            Some(Call::Remove(M.into())),
        ),
        case(
            "GraphDriver.Remove",
            &format!("{{\"ID\":\"{init}\"}}\n"),
            json!({}),
            Some(Call::Remove(init)),
        ),
        case(
            "GraphDriver.Cleanup",
            "{}\n",
            json!({}),
            Some(Call::Cleanup),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_endpoint_on_one_keep_alive_connection() {
    let server = TestServer::start(FakeDriver::new()).await;
    let mut conn = server.connect().await;
    for case in dockerd_session() {
        let response = conn.call(case.method, &case.body).await;
        assert_eq!(
            response.status, case.status,
            "{}: {:?}",
            case.method, response
        );
        assert_eq!(
            response.header("content-type"),
            Some(JSON_TYPE),
            "{}",
            case.method
        );
        assert_eq!(response.json(), case.reply, "{}", case.method);
        let calls = server.driver.take_calls();
        assert_eq!(
            calls,
            case.call.into_iter().collect::<Vec<_>>(),
            "{}",
            case.method
        );
    }
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_with_options_and_user_namespace_maps() {
    let server = TestServer::start(FakeDriver::new()).await;
    let mut conn = server.connect().await;
    let cases = [
        (
            "{\"Home\":\"/var/lib/docker/rbdprobe\",\"Opts\":[\"rbd.pool=docker\",\"rbd.size=10G\"],\"UIDMaps\":null,\"GIDMaps\":null}\n",
            InitRequest {
                home: "/var/lib/docker/rbdprobe".into(),
                opts: vec!["rbd.pool=docker".into(), "rbd.size=10G".into()],
                ..InitRequest::default()
            },
        ),
        (
            "{\"Home\":\"/var/lib/docker/231072.231072/rbd\",\"Opts\":null,\"UIDMaps\":[{\"container_id\":0,\"host_id\":231072,\"size\":65536}],\"GIDMaps\":[{\"container_id\":0,\"host_id\":231072,\"size\":65536}]}\n",
            InitRequest {
                home: "/var/lib/docker/231072.231072/rbd".into(),
                opts: vec![],
                uid_maps: vec![IdMap {
                    container_id: 0,
                    host_id: 231072,
                    size: 65536,
                }],
                gid_maps: vec![IdMap {
                    container_id: 0,
                    host_id: 231072,
                    size: 65536,
                }],
            },
        ),
    ];
    for (body, want) in cases {
        let response = conn.call("GraphDriver.Init", body).await;
        assert_eq!((response.status, response.json()), (200, json!({})));
        assert_eq!(server.driver.take_calls(), vec![Call::Init(want)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_null_bodies_mean_no_arguments() {
    let server = TestServer::start(FakeDriver::new()).await;
    let mut conn = server.connect().await;
    for body in ["", "null", "null\n", "{}\n", "  \n"] {
        let response = conn.call("GraphDriver.Remove", body).await;
        assert_eq!(
            (response.status, response.json()),
            (200, json!({})),
            "{body:?}"
        );
        assert_eq!(
            server.driver.take_calls(),
            vec![Call::Remove(String::new())]
        );
        let response = conn.call("GraphDriver.Init", body).await;
        assert_eq!(response.status, 200, "{body:?}");
        assert_eq!(
            server.driver.take_calls(),
            vec![Call::Init(InitRequest::default())]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_reproduces_exact_diffs_when_the_driver_says_so() {
    let driver = FakeDriver::with(Settings {
        reproduces_exact_diffs: true,
        ..Settings::default()
    });
    let server = TestServer::start(driver).await;
    let response = server
        .connect()
        .await
        .call("GraphDriver.Capabilities", "{}\n")
        .await;
    assert_eq!(
        response.json(),
        json!({"Capabilities": {"ReproducesExactDiffs": true}})
    );
}

/// Error replies: status, and words the `Err` must contain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_are_json_with_status() {
    let server = TestServer::start(FakeDriver::new()).await;
    let oversized = format!("{{\"ID\":\"{}\"}}", "a".repeat(1 << 20));
    let cases: Vec<(String, u16, Vec<&str>)> = vec![
        (
            String::from_utf8(dockerd_json_request("GraphDriver.Create", "{\"ID\":")).unwrap(),
            400,
            vec!["GraphDriver.Create", "EOF while parsing"],
        ),
        (
            String::from_utf8(dockerd_json_request("GraphDriver.Create", "{\"ID\":42}\n")).unwrap(),
            400,
            vec!["GraphDriver.Create", "invalid type: integer `42`, expected a string"],
        ),
        (
            String::from_utf8(dockerd_json_request(
                "GraphDriver.CreateReadWrite",
                "{\"ID\":\"x\",\"StorageOpt\":{\"size\":20}}\n",
            ))
            .unwrap(),
            400,
            vec!["GraphDriver.CreateReadWrite", "expected a string"],
        ),
        (
            String::from_utf8(dockerd_json_request(
                "GraphDriver.Init",
                "{\"Home\":\"/h\",\"Opts\":\"rbd.pool=x\"}\n",
            ))
            .unwrap(),
            400,
            vec!["GraphDriver.Init", "expected a sequence"],
        ),
        (
            String::from_utf8(dockerd_json_request("GraphDriver.Get", "[\"x\"]\n")).unwrap(),
            400,
            vec!["GraphDriver.Get", "expected a JSON object, found an array"],
        ),
        (
            String::from_utf8(dockerd_json_request("GraphDriver.Get", &oversized)).unwrap(),
            413,
            vec!["GraphDriver.Get", "exceeds the limit of 1048576 bytes"],
        ),
        (
            String::from_utf8(dockerd_json_request("GraphDriver.Frobnicate", "{}\n")).unwrap(),
            404,
            vec!["no such endpoint: /GraphDriver.Frobnicate"],
        ),
        (
            String::from_utf8(dockerd_json_request("", "{}\n")).unwrap(),
            404,
            vec!["no such endpoint: /"],
        ),
        (
            "GET /GraphDriver.Status HTTP/1.1\r\nHost: \r\n\r\n".to_owned(),
            405,
            vec!["GraphDriver.Status accepts only POST, not GET"],
        ),
        (
            "PUT /Plugin.Activate HTTP/1.1\r\nHost: \r\nContent-Length: 2\r\n\r\n{}".to_owned(),
            405,
            vec!["Plugin.Activate accepts only POST, not PUT"],
        ),
        (
            "POST /GraphDriver.ApplyDiff?id=%zz HTTP/1.1\r\nHost: \r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_owned(),
            400,
            vec!["GraphDriver.ApplyDiff", "malformed percent escape"],
        ),
    ];
    // All on one connection: each error reply leaves it usable.
    let mut conn = server.connect().await;
    for (raw, status, words) in &cases {
        conn.send(raw.as_bytes()).await.expect("send");
        let response = conn.response().await;
        assert_eq!(response.status, *status, "{:.80}: {:?}", raw, response);
        assert_eq!(response.header("content-type"), Some(JSON_TYPE));
        let err = response.err();
        for word in words {
            assert!(err.contains(word), "{err:?} lacks {word:?}");
        }
        if *status == 405 {
            assert_eq!(response.header("allow"), Some("POST"));
        }
        let activate = conn.call("Plugin.Activate", "").await;
        assert_eq!(activate.status, 200, "connection unusable after {raw:.80}");
    }
    assert_eq!(
        server.driver.calls(),
        vec![],
        "no bad request reached the driver"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_errors_are_500_with_the_source_chain() {
    let driver = FakeDriver::with(Settings {
        mode: Mode::Fail,
        ..Settings::default()
    });
    let server = TestServer::start(driver).await;
    let mut conn = server.connect().await;
    let id = format!("{{\"ID\":\"{M}\",\"Parent\":\"{L1}\"}}\n");
    let cases = [
        ("GraphDriver.Init", "{\"Home\":\"/h\"}\n", "init", "/h"),
        ("GraphDriver.Create", id.as_str(), "create", M),
        (
            "GraphDriver.CreateReadWrite",
            id.as_str(),
            "create_read_write",
            M,
        ),
        ("GraphDriver.Remove", id.as_str(), "remove", M),
        ("GraphDriver.Get", id.as_str(), "get", M),
        ("GraphDriver.Put", id.as_str(), "put", M),
        ("GraphDriver.Exists", id.as_str(), "exists", M),
        ("GraphDriver.Status", "{}\n", "status", ""),
        ("GraphDriver.GetMetadata", id.as_str(), "get_metadata", M),
        ("GraphDriver.Cleanup", "{}\n", "cleanup", ""),
        ("GraphDriver.Diff", id.as_str(), "diff", M),
        ("GraphDriver.Changes", id.as_str(), "changes", M),
        ("GraphDriver.DiffSize", id.as_str(), "diff_size", M),
    ];
    for (method, body, fake_method, fake_id) in cases {
        let response = conn.call(method, body).await;
        assert_eq!(response.status, 500, "{method}");
        assert_eq!(response.header("content-type"), Some(JSON_TYPE), "{method}");
        assert_eq!(
            response.err(),
            format!(
                "fake driver refused {fake_method} of {fake_id:?}: injected failure: rbd map returned EIO"
            ),
            "{method}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_panics_are_500_and_the_server_keeps_serving() {
    let driver = FakeDriver::with(Settings {
        mode: Mode::Panic,
        ..Settings::default()
    });
    let server = TestServer::start(driver.clone()).await;
    let mut conn = server.connect().await;
    let id = format!("{{\"ID\":\"{M}\"}}\n");
    for (method, body, fake_method) in [
        ("GraphDriver.Create", id.as_str(), "create"),
        ("GraphDriver.Get", id.as_str(), "get"),
        ("GraphDriver.Status", "{}\n", "status"),
        ("GraphDriver.Capabilities", "{}\n", "capabilities"),
        ("GraphDriver.Diff", id.as_str(), "diff"),
    ] {
        let response = conn.call(method, body).await;
        assert_eq!(response.status, 500, "{method}");
        let err = response.err();
        assert!(err.contains("panicked"), "{err}");
        assert!(
            err.contains(&format!("fake driver panics in {fake_method}")),
            "{err}"
        );
    }
    // ApplyDiff panics after reading the whole body.
    conn.send(&dockerd_apply_diff_head(L1, "")).await.unwrap();
    conn.send(&chunk(b"some tar")).await.unwrap();
    conn.send(LAST_CHUNK).await.unwrap();
    let response = conn.response().await;
    assert_eq!(response.status, 500);
    assert!(response.err().contains("fake driver panics in apply_diff"));

    driver.set(|s| s.mode = Mode::Succeed);
    let response = conn.call("GraphDriver.Get", &id).await;
    assert_eq!(response.status, 200, "same connection still served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_dockerd_cannot_read_are_500() {
    use std::os::unix::ffi::OsStrExt;
    let driver = FakeDriver::with(Settings {
        diff_size: u64::MAX,
        get_dir: Some(std::ffi::OsStr::from_bytes(b"/mnt/\xff").into()),
        ..Settings::default()
    });
    let server = TestServer::start(driver).await;
    let mut conn = server.connect().await;
    let response = conn.call("GraphDriver.DiffSize", "{\"ID\":\"a\"}\n").await;
    assert_eq!(response.status, 500);
    assert!(
        response.err().contains("does not fit dockerd's int64"),
        "{}",
        response.err()
    );
    let response = conn.call("GraphDriver.Get", "{\"ID\":\"a\"}\n").await;
    assert_eq!(response.status, 500);
    assert!(
        response.err().contains("is not UTF-8"),
        "{}",
        response.err()
    );
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_diff_streams_the_chunked_body_to_the_driver() {
    let server = TestServer::start(FakeDriver::new()).await;
    let mut conn = server.connect().await;
    let data = pattern(3 << 20);
    conn.send(&dockerd_apply_diff_head(L1, "")).await.unwrap();
    // The driver reads while the client is still sending: the body is
    // streamed, not collected first.
    conn.send(&chunk(&data[..32 * 1024])).await.unwrap();
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while server
        .driver
        .apply_progress
        .load(std::sync::atomic::Ordering::SeqCst)
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "driver saw no bytes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for piece in data[32 * 1024..].chunks(65_521) {
        conn.send(&chunk(piece)).await.unwrap();
    }
    conn.send(LAST_CHUNK).await.unwrap();
    let response = conn.response().await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.header("content-type"), Some(JSON_TYPE));
    assert_eq!(response.json(), json!({"Size": data.len()}));
    match server.driver.take_calls().as_slice() {
        [
            Call::ApplyDiff {
                id,
                parent,
                received,
                read_error: None,
            },
        ] => {
            assert_eq!((id.as_str(), parent.as_str()), (L1, ""));
            assert!(received == &data, "received bytes differ");
        }
        other => panic!("calls: {:?}", other.len()),
    }
    // Same connection, next layer with a parent.
    conn.send(&dockerd_apply_diff_head(M, L1)).await.unwrap();
    conn.send(&chunk(b"second")).await.unwrap();
    conn.send(LAST_CHUNK).await.unwrap();
    let response = conn.response().await;
    assert_eq!(response.json(), json!({"Size": 6}));
    assert_eq!(
        server.driver.take_calls(),
        vec![Call::ApplyDiff {
            id: M.into(),
            parent: L1.into(),
            received: b"second".to_vec(),
            read_error: None
        }]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_diff_with_an_empty_body() {
    let server = TestServer::start(FakeDriver::new()).await;
    let mut conn = server.connect().await;
    conn.send(&dockerd_apply_diff_head(L1, "")).await.unwrap();
    conn.send(LAST_CHUNK).await.unwrap();
    let response = conn.response().await;
    assert_eq!(
        (response.status, response.json()),
        (200, json!({"Size": 0}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_diff_unread_rest_is_drained_and_the_connection_reused() {
    let driver = FakeDriver::with(Settings {
        apply: ApplyMode::ReadPrefix(1000),
        ..Settings::default()
    });
    let server = TestServer::start(driver).await;
    let mut conn = server.connect().await;
    let data = pattern(512 * 1024);
    conn.send(&dockerd_apply_diff_head(L1, "")).await.unwrap();
    for piece in data.chunks(32 * 1024) {
        conn.send(&chunk(piece)).await.unwrap();
    }
    conn.send(LAST_CHUNK).await.unwrap();
    let response = conn.response().await;
    assert_eq!(
        (response.status, response.json()),
        (200, json!({"Size": 1000}))
    );
    let response = conn
        .call("GraphDriver.Put", &format!("{{\"ID\":\"{L1}\"}}\n"))
        .await;
    assert_eq!(response.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_diff_driver_error_is_500_after_the_body() {
    let driver = FakeDriver::with(Settings {
        mode: Mode::Fail,
        apply: ApplyMode::ReadPrefix(10),
        ..Settings::default()
    });
    let server = TestServer::start(driver).await;
    let mut conn = server.connect().await;
    conn.send(&dockerd_apply_diff_head(L1, "")).await.unwrap();
    for piece in pattern(200 * 1024).chunks(8192) {
        conn.send(&chunk(piece)).await.unwrap();
    }
    conn.send(LAST_CHUNK).await.unwrap();
    let response = conn.response().await;
    assert_eq!(response.status, 500);
    assert_eq!(
        response.err(),
        format!(
            "fake driver refused apply_diff of {L1:?}: injected failure: no space left on device"
        )
    );
    let activate = conn.call("Plugin.Activate", "").await;
    assert_eq!(activate.status, 200, "connection still usable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnecting_mid_apply_diff_fails_the_drivers_read() {
    let server = TestServer::start(FakeDriver::new()).await;
    let mut conn = server.connect().await;
    conn.send(&dockerd_apply_diff_head(L1, "")).await.unwrap();
    conn.send(&chunk(&pattern(100_000))).await.unwrap();
    // Half a chunk, then gone.
    conn.send(b"1000\r\nonly part of it").await.unwrap();
    drop(conn);
    let call = server
        .driver
        .wait_for_call(|c| matches!(c, Call::ApplyDiff { .. }))
        .await;
    match call {
        Call::ApplyDiff {
            received,
            read_error,
            ..
        } => {
            assert!(read_error.is_some(), "driver read a clean EOF");
            assert!(received.len() <= 100_000 + 16, "{}", received.len());
        }
        other => panic!("{other:?}"),
    }
    let mut conn = server.connect().await;
    assert_eq!(conn.call("Plugin.Activate", "").await.status, 200);
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_streams_the_tar_chunked() {
    let data = pattern(1 << 20);
    let driver = FakeDriver::with(Settings {
        diff_data: data.clone(),
        ..Settings::default()
    });
    let server = TestServer::start(driver).await;
    let mut conn = server.connect().await;
    let body = format!("{{\"ID\":\"{M}\",\"Parent\":\"{M}-init\"}}\n");
    let response = conn.call("GraphDriver.Diff", &body).await;
    assert_eq!(response.status, 200);
    assert!(
        response.chunked && response.complete,
        "{:?}",
        response.headers
    );
    assert_eq!(response.header("content-type"), Some("application/x-tar"));
    assert!(response.body == data, "streamed bytes differ");
    assert_eq!(
        server.driver.take_calls(),
        vec![Call::Diff {
            id: M.into(),
            parent: format!("{M}-init")
        }]
    );
    // An empty diff is an empty 200 body; the connection stays usable.
    server.driver.set(|s| s.diff_data.clear());
    let response = conn.call("GraphDriver.Diff", &body).await;
    assert_eq!((response.status, response.body.len()), (200, 0));
    assert!(response.complete);
    assert_eq!(conn.call("Plugin.Activate", "").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_failing_before_the_first_byte_is_a_500() {
    for (failure, words) in [
        (DiffFailure::Error, "reading the diff of"),
        (DiffFailure::Panic, "fake diff stream panics"),
    ] {
        let driver = FakeDriver::with(Settings {
            diff_data: pattern(1000),
            diff_fail_after: Some((0, failure)),
            ..Settings::default()
        });
        let server = TestServer::start(driver).await;
        let mut conn = server.connect().await;
        let response = conn
            .call("GraphDriver.Diff", &format!("{{\"ID\":\"{M}\"}}\n"))
            .await;
        assert_eq!(response.status, 500, "{failure:?}");
        assert_eq!(response.header("content-type"), Some(JSON_TYPE));
        let err = response.err();
        assert!(err.contains(words), "{err}");
        assert_eq!(conn.call("Plugin.Activate", "").await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_failing_midstream_aborts_the_chunked_body() {
    for failure in [DiffFailure::Error, DiffFailure::Panic] {
        let fail_at = 300 * 1024;
        let driver = FakeDriver::with(Settings {
            diff_data: pattern(1 << 20),
            diff_fail_after: Some((fail_at, failure)),
            ..Settings::default()
        });
        let server = TestServer::start(driver).await;
        let mut conn = server.connect().await;
        let response = conn
            .call("GraphDriver.Diff", &format!("{{\"ID\":\"{M}\"}}\n"))
            .await;
        assert_eq!(response.status, 200, "{failure:?}");
        assert!(response.chunked);
        assert!(
            !response.complete,
            "{failure:?}: the body ended with a final chunk, so dockerd would take a short tar"
        );
        assert!(!response.body.is_empty() && response.body.len() <= fail_at);
        assert!(conn.is_closed().await, "connection must be closed");
        // The server still serves new connections.
        assert_eq!(
            server
                .connect()
                .await
                .call("Plugin.Activate", "")
                .await
                .status,
            200
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_during_a_diff_releases_the_stream() {
    let driver = FakeDriver::with(Settings {
        diff_data: pattern(64 << 20),
        ..Settings::default()
    });
    let server = TestServer::start(driver).await;
    let mut conn = server.connect().await;
    conn.send(&dockerd_json_request(
        "GraphDriver.Diff",
        &format!("{{\"ID\":\"{M}\"}}\n"),
    ))
    .await
    .unwrap();
    drop(conn);
    // Stopping waits for every connection: it returns only if the pump
    // noticed the client had gone.
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let server = TestServer::start(FakeDriver::new()).await;
    let mut conn = server.connect().await;
    let mut both = dockerd_json_request("GraphDriver.Get", "{\"ID\":\"a\"}\n");
    both.extend(dockerd_json_request("GraphDriver.Put", "{\"ID\":\"a\"}\n"));
    conn.send(&both).await.unwrap();
    let first = conn.response().await;
    let second = conn.response().await;
    assert_eq!(
        first.json(),
        json!({"Dir": "/var/lib/docker/rbd/mnt/a/rootfs"})
    );
    assert_eq!(second.json(), json!({}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_calls_do_not_block_other_connections() {
    let gate = common::Gate::default();
    let driver = FakeDriver::with(Settings {
        get_gate: Some(gate.clone()),
        ..Settings::default()
    });
    let server = TestServer::start(driver).await;
    let mut slow = server.connect().await;
    slow.send(&dockerd_json_request("GraphDriver.Get", "{\"ID\":\"a\"}\n"))
        .await
        .unwrap();
    server
        .driver
        .wait_for_call(|c| matches!(c, Call::Get { .. }))
        .await;
    // While Get is held in the driver, other calls are served.
    let mut other = server.connect().await;
    assert_eq!(
        other
            .call("GraphDriver.Put", "{\"ID\":\"b\"}\n")
            .await
            .status,
        200
    );
    assert_eq!(other.call("Plugin.Activate", "").await.status, 200);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), slow.read_response())
            .await
            .is_err(),
        "Get answered before the driver returned"
    );
    gate.open();
    assert_eq!(slow.response().await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_serves_on_a_listener_of_the_callers_choice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let driver = FakeDriver::new();
    let task =
        tokio::spawn(axum::serve(listener, graphdriver_api::router(driver.clone())).into_future());
    let mut conn = Conn::connect(&path).await;
    assert_eq!(conn.call("Plugin.Activate", "").await.status, 200);
    assert_eq!(
        conn.call("GraphDriver.Put", "{\"ID\":\"x\"}\n")
            .await
            .status,
        200
    );
    assert_eq!(driver.calls(), vec![Call::Put("x".into())]);
    task.abort();
}
