//! Property tests: no input makes the server panic or hang. Every request is
//! answered, or its connection closed, within a deadline, and the server
//! keeps serving afterwards.

mod common;

use std::time::Duration;

use common::{Conn, FakeDriver, TestServer, dockerd_json_request};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::Value;
use tokio::io::AsyncReadExt;

/// Deadline for one case's answer.
const CASE_DEADLINE: Duration = Duration::from_secs(10);

const JSON_METHODS: [&str; 14] = [
    "GraphDriver.Init",
    "GraphDriver.Create",
    "GraphDriver.CreateReadWrite",
    "GraphDriver.Remove",
    "GraphDriver.Get",
    "GraphDriver.Put",
    "GraphDriver.Exists",
    "GraphDriver.Status",
    "GraphDriver.GetMetadata",
    "GraphDriver.Cleanup",
    "GraphDriver.Changes",
    "GraphDriver.DiffSize",
    "GraphDriver.Capabilities",
    "Plugin.Activate",
];

struct Harness {
    runtime: tokio::runtime::Runtime,
    server: Option<TestServer>,
}

impl Harness {
    fn start() -> Harness {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let server = runtime.block_on(TestServer::start(FakeDriver::new()));
        Harness {
            runtime,
            server: Some(server),
        }
    }

    fn server(&self) -> &TestServer {
        self.server.as_ref().expect("server running")
    }

    /// Fails the case unless a fresh connection is still served.
    fn assert_alive(&self) -> Result<(), TestCaseError> {
        let socket = self.server().socket.clone();
        let status = self.runtime.block_on(async move {
            tokio::time::timeout(CASE_DEADLINE, async {
                Conn::connect(&socket)
                    .await
                    .call("Plugin.Activate", "")
                    .await
                    .status
            })
            .await
        });
        prop_assert_eq!(status.ok(), Some(200), "server no longer serves");
        Ok(())
    }

    fn stop(mut self) {
        if let Some(server) = self.server.take() {
            self.runtime
                .block_on(server.stop())
                .expect("server stops cleanly");
        }
    }
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Bytes that look more or less like HTTP: raw noise, a valid request head
/// followed by noise, and valid requests with bytes flipped or cut.
fn http_ish() -> impl Strategy<Value = Vec<u8>> {
    let heads = prop_oneof![
        Just(b"POST /GraphDriver.Create HTTP/1.1\r\nHost: \r\n".to_vec()),
        Just(b"POST /GraphDriver.ApplyDiff?id=a&parent= HTTP/1.1\r\nHost: \r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()),
        Just(b"POST /GraphDriver.Get HTTP/1.1\r\nContent-Length: 10\r\n\r\n".to_vec()),
        Just(b"GET / HTTP/1.1\r\n".to_vec()),
        Just(b"POST /GraphDriver.Diff HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()),
        Just(dockerd_json_request("GraphDriver.Status", "{}\n")),
    ];
    let valid = prop_oneof![
        Just(dockerd_json_request("GraphDriver.Create", "{\"ID\":\"abc\",\"Parent\":\"def\"}\n")),
        Just(dockerd_json_request("GraphDriver.Diff", "{\"ID\":\"abc\"}\n")),
        Just(b"POST /GraphDriver.ApplyDiff?id=a&parent=b HTTP/1.1\r\nHost: \r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec()),
    ];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2048),
        (heads, proptest::collection::vec(any::<u8>(), 0..1024)).prop_map(|(mut h, tail)| {
            h.extend(tail);
            h
        }),
        (
            valid,
            proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            any::<prop::sample::Index>(),
        )
            .prop_map(|(mut bytes, flips, cut)| {
                for (at, byte) in flips {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
                bytes.truncate(cut.index(bytes.len() + 1));
                bytes
            }),
    ]
}

#[test]
fn arbitrary_bytes_are_answered_or_closed_without_harm() {
    let harness = Harness::start();
    let socket = harness.server().socket.clone();
    runner(192)
        .run(&http_ish(), |bytes| {
            let socket = socket.clone();
            let finished = harness.runtime.block_on(async move {
                let mut conn = Conn::connect(&socket).await;
                // The server may close early; a failed write is fine.
                let _ = conn.send(&bytes).await;
                let _ = conn.shutdown_write().await;
                tokio::time::timeout(CASE_DEADLINE, conn.read_to_end_lossy()).await
            });
            prop_assert!(finished.is_ok(), "neither answered nor closed in time");
            harness.assert_alive()
        })
        .unwrap_or_else(|err| panic!("{err}"));
    harness.stop();
}

#[test]
fn arbitrary_bodies_to_each_json_endpoint_get_a_json_reply() {
    let harness = Harness::start();
    let socket = harness.server().socket.clone();
    let strategy = (
        0..JSON_METHODS.len(),
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..512),
            "\\PC{0,200}".prop_map(String::into_bytes),
        ],
    );
    let seen = std::cell::Cell::new((0u32, 0u32));
    runner(256)
        .run(&strategy, |(method, body)| {
            let method = JSON_METHODS[method];
            let socket = socket.clone();
            let response = harness.runtime.block_on(async move {
                let mut conn = Conn::connect(&socket).await;
                let mut request = dockerd_json_request(method, "");
                // Replace the zero length with the real one.
                let head = String::from_utf8(request.clone()).expect("ascii head");
                request = head
                    .replace(
                        "Content-Length: 0",
                        &format!("Content-Length: {}", body.len()),
                    )
                    .into_bytes();
                request.extend_from_slice(&body);
                conn.send(&request).await.expect("send");
                tokio::time::timeout(CASE_DEADLINE, conn.read_response()).await
            });
            let response = match response {
                Ok(Ok(response)) => response,
                Ok(Err(err)) => return Err(TestCaseError::fail(format!("{method}: {err:?}"))),
                Err(_) => return Err(TestCaseError::fail(format!("{method}: no answer"))),
            };
            prop_assert!(
                response.status == 200 || response.status == 400,
                "{} -> {}",
                method,
                response.status
            );
            seen.set((
                seen.get().0 + u32::from(response.status == 200),
                seen.get().1 + u32::from(response.status == 400),
            ));
            let json: Value = serde_json::from_slice(&response.body)
                .map_err(|err| TestCaseError::fail(format!("{method}: reply not JSON: {err}")))?;
            prop_assert!(json.is_object());
            if response.status == 400 {
                let err = json["Err"].as_str().unwrap_or_default();
                prop_assert!(err.contains(method), "{:?} does not name {}", err, method);
            }
            Ok(())
        })
        .unwrap_or_else(|err| panic!("{err}"));
    let (accepted, refused) = seen.get();
    assert!(
        accepted > 0 && refused > 0,
        "vacuous run: {accepted} accepted, {refused} refused"
    );
    harness.assert_alive().expect("alive");
    harness.stop();
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        let keys = prop_oneof![
            Just("ID".to_owned()),
            Just("Parent".to_owned()),
            Just("MountLabel".to_owned()),
            Just("StorageOpt".to_owned()),
            Just("Home".to_owned()),
            Just("Opts".to_owned()),
            Just("UIDMaps".to_owned()),
            Just("GIDMaps".to_owned()),
            Just("container_id".to_owned()),
            "\\PC{0,8}",
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(keys, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn arbitrary_json_documents_are_accepted_or_refused_with_400() {
    let harness = Harness::start();
    let socket = harness.server().socket.clone();
    let methods = [
        "GraphDriver.Init",
        "GraphDriver.Create",
        "GraphDriver.CreateReadWrite",
        "GraphDriver.Get",
        "GraphDriver.Diff",
        "GraphDriver.Changes",
        "GraphDriver.DiffSize",
        "GraphDriver.Status",
    ];
    let seen = std::cell::Cell::new((0u32, 0u32));
    runner(256)
        .run(&(0..methods.len(), json_value()), |(method, value)| {
            let method = methods[method];
            let socket = socket.clone();
            let body = format!("{value}\n");
            let response = harness.runtime.block_on(async move {
                let mut conn = Conn::connect(&socket).await;
                conn.send(&dockerd_json_request(method, &body))
                    .await
                    .expect("send");
                tokio::time::timeout(CASE_DEADLINE, conn.read_response()).await
            });
            let response = match response {
                Ok(Ok(response)) => response,
                other => return Err(TestCaseError::fail(format!("{method}: {other:?}"))),
            };
            prop_assert!(
                response.status == 200 || response.status == 400,
                "{} {} -> {}",
                method,
                value,
                response.status
            );
            seen.set((
                seen.get().0 + u32::from(response.status == 200),
                seen.get().1 + u32::from(response.status == 400),
            ));
            // A refused object says what was invalid.
            if value.is_object() && response.status == 400 {
                let err = String::from_utf8_lossy(&response.body).into_owned();
                prop_assert!(err.contains("invalid"), "{}", err);
            }
            if !value.is_object() && !value.is_null() {
                prop_assert_eq!(response.status, 400, "{} accepted {}", method, value);
            }
            Ok(())
        })
        .unwrap_or_else(|err| panic!("{err}"));
    let (accepted, refused) = seen.get();
    assert!(
        accepted > 0 && refused > 0,
        "vacuous run: {accepted} accepted, {refused} refused"
    );
    harness.assert_alive().expect("alive");
    harness.stop();
}

#[test]
fn arbitrary_apply_diff_queries_and_bodies() {
    let harness = Harness::start();
    let socket = harness.server().socket.clone();
    let strategy = (
        "[a-zA-Z0-9=&%+._-]{0,40}",
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..5),
    );
    runner(128)
        .run(&strategy, |(query, chunks)| {
            let socket = socket.clone();
            let total: usize = chunks.iter().map(Vec::len).sum();
            let response = harness.runtime.block_on(async move {
                let mut conn = Conn::connect(&socket).await;
                let mut request = format!(
                    "POST /GraphDriver.ApplyDiff?{query} HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\nTransfer-Encoding: chunked\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n\r\n"
                )
                .into_bytes();
                for piece in &chunks {
                    request.extend(common::chunk(piece));
                }
                request.extend_from_slice(common::LAST_CHUNK);
                conn.send(&request).await.expect("send");
                tokio::time::timeout(CASE_DEADLINE, conn.read_response()).await
            });
            let response = match response {
                Ok(Ok(response)) => response,
                other => return Err(TestCaseError::fail(format!("{other:?}"))),
            };
            match response.status {
                200 => prop_assert_eq!(response.json(), serde_json::json!({"Size": total})),
                400 => prop_assert!(response.err().contains("GraphDriver.ApplyDiff query string")),
                other => prop_assert!(false, "status {}", other),
            }
            Ok(())
        })
        .unwrap_or_else(|err| panic!("{err}"));
    harness.assert_alive().expect("alive");
    harness.stop();
}

trait ReadToEndLossy {
    /// Reads until the server closes or errors; the bytes do not matter.
    async fn read_to_end_lossy(&mut self);
}

impl ReadToEndLossy for Conn {
    async fn read_to_end_lossy(&mut self) {
        let _ = self.raw().read_to_end(&mut Vec::new()).await;
    }
}
