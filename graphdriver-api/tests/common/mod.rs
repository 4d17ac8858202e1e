//! Shared by the server tests: a recording fake driver, a server on a
//! temporary socket, and a raw HTTP/1.1 client that writes bytes exactly as
//! dockerd 20.10 does.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use graphdriver_api::types::{Capabilities, Change, ChangeKind, CreateRequest, InitRequest};
use graphdriver_api::{DiffStream, GraphDriver, ServerConfig, ServerError};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A 64-hex layer id, as dockerd makes them.
pub const L1: &str = "5b1c3b4f1d0e3b2a5f6e7d8c9b0a1f2e3d4c5b6a79887766554433221100ffee";
/// Another one, for a container layer.
pub const M: &str = "9a8b7c6d5e4f30211f2e3d4c5b6a79880a1b2c3d4e5f60718293a4b5c6d7e8f9";

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// One call the fake driver received, with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Init(InitRequest),
    Create(CreateRequest),
    CreateReadWrite(CreateRequest),
    Remove(String),
    Get {
        id: String,
        mount_label: String,
    },
    Put(String),
    Exists(String),
    Status,
    GetMetadata(String),
    Cleanup,
    Diff {
        id: String,
        parent: String,
    },
    Changes {
        id: String,
        parent: String,
    },
    ApplyDiff {
        id: String,
        parent: String,
        /// What the driver read of the body.
        received: Vec<u8>,
        /// The read error that ended it, if any.
        read_error: Option<String>,
    },
    DiffSize {
        id: String,
        parent: String,
    },
    Capabilities,
}

/// What every fallible call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Succeed,
    Fail,
    Panic,
}

/// How `apply_diff` reads its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyMode {
    /// To end of stream (or the first error).
    ReadAll,
    /// Only this many bytes, then return success.
    ReadPrefix(usize),
}

/// How the `Diff` stream misbehaves after `fail_after` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffFailure {
    Error,
    Panic,
}

/// The fake driver's error: a message plus a source, so tests can check that
/// the server sends the whole chain.
#[derive(Debug, thiserror::Error)]
#[error("fake driver refused {method} of {id:?}")]
pub struct FakeError {
    pub method: &'static str,
    pub id: String,
    #[source]
    pub source: io::Error,
}

/// Holds driver calls until opened.
#[derive(Debug, Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    pub fn open(&self) {
        *lock(&self.0.0) = true;
        self.0.1.notify_all();
    }

    /// Waits until opened (at most [`WAIT`], so a failed test cannot hang).
    fn pass(&self) {
        let guard = lock(&self.0.0);
        let _ = self
            .0
            .1
            .wait_timeout_while(guard, WAIT, |open| !*open)
            .map_err(|_| ());
    }
}

#[derive(Debug)]
pub struct Settings {
    pub mode: Mode,
    pub delay: Duration,
    /// If set, `get` waits for it to open.
    pub get_gate: Option<Gate>,
    /// If set, every call but `get` waits for it to open.
    pub gate: Option<Gate>,
    pub apply: ApplyMode,
    pub diff_data: Vec<u8>,
    pub diff_fail_after: Option<(usize, DiffFailure)>,
    pub diff_size: u64,
    pub get_dir: Option<PathBuf>,
    pub reproduces_exact_diffs: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mode: Mode::Succeed,
            delay: Duration::ZERO,
            get_gate: None,
            gate: None,
            apply: ApplyMode::ReadAll,
            diff_data: b"tar bytes".to_vec(),
            diff_fail_after: None,
            diff_size: 4096,
            get_dir: None,
            reproduces_exact_diffs: false,
        }
    }
}

/// Records every call; behaves as [`Settings`] say.
#[derive(Debug, Default)]
pub struct FakeDriver {
    calls: Mutex<Vec<Call>>,
    layers: Mutex<BTreeSet<String>>,
    settings: Mutex<Settings>,
    /// Bytes `apply_diff` has read so far, across calls.
    pub apply_progress: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FakeDriver {
    pub fn new() -> Arc<Self> {
        Arc::new(FakeDriver::default())
    }

    pub fn with(settings: Settings) -> Arc<Self> {
        let driver = FakeDriver::default();
        *lock(&driver.settings) = settings;
        Arc::new(driver)
    }

    pub fn set(&self, change: impl FnOnce(&mut Settings)) {
        change(&mut lock(&self.settings));
    }

    pub fn calls(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *lock(&self.calls))
    }

    /// Waits until a call matching `pred` is recorded.
    pub async fn wait_for_call(&self, pred: impl Fn(&Call) -> bool) -> Call {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(call) = self.calls().into_iter().find(|c| pred(c)) {
                return call;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no matching call; calls: {:?}",
                self.calls()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn record(&self, call: Call) {
        lock(&self.calls).push(call);
    }

    /// Records `call`, sleeps the configured delay, then fails or panics if
    /// so configured.
    fn enter(&self, call: Call, method: &'static str, id: &str) -> Result<(), FakeError> {
        let is_get = matches!(call, Call::Get { .. });
        self.record(call);
        let (mode, delay, gate) = {
            let settings = lock(&self.settings);
            let gate = if is_get {
                settings.get_gate.clone()
            } else {
                settings.gate.clone()
            };
            (settings.mode, settings.delay, gate)
        };
        if let Some(gate) = gate {
            gate.pass();
        }
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        match mode {
            Mode::Succeed => Ok(()),
            Mode::Fail => Err(FakeError {
                method,
                id: id.to_owned(),
                source: io::Error::other("injected failure: rbd map returned EIO"),
            }),
            Mode::Panic => panic!("fake driver panics in {method}"),
        }
    }
}

impl GraphDriver for FakeDriver {
    type Error = FakeError;

    fn init(&self, req: InitRequest) -> Result<(), FakeError> {
        let home = req.home.clone();
        self.enter(Call::Init(req), "init", &home)
    }

    fn create(&self, req: CreateRequest) -> Result<(), FakeError> {
        let id = req.id.clone();
        self.enter(Call::Create(req), "create", &id)?;
        lock(&self.layers).insert(id);
        Ok(())
    }

    fn create_read_write(&self, req: CreateRequest) -> Result<(), FakeError> {
        let id = req.id.clone();
        self.enter(Call::CreateReadWrite(req), "create_read_write", &id)?;
        lock(&self.layers).insert(id);
        Ok(())
    }

    fn remove(&self, id: &str) -> Result<(), FakeError> {
        self.enter(Call::Remove(id.to_owned()), "remove", id)?;
        lock(&self.layers).remove(id);
        Ok(())
    }

    fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf, FakeError> {
        self.enter(
            Call::Get {
                id: id.to_owned(),
                mount_label: mount_label.to_owned(),
            },
            "get",
            id,
        )?;
        Ok(lock(&self.settings)
            .get_dir
            .clone()
            .unwrap_or_else(|| Path::new("/var/lib/docker/rbd/mnt").join(id).join("rootfs")))
    }

    fn put(&self, id: &str) -> Result<(), FakeError> {
        self.enter(Call::Put(id.to_owned()), "put", id)
    }

    fn exists(&self, id: &str) -> Result<bool, FakeError> {
        self.enter(Call::Exists(id.to_owned()), "exists", id)?;
        Ok(lock(&self.layers).contains(id))
    }

    fn status(&self) -> Result<Vec<(String, String)>, FakeError> {
        self.enter(Call::Status, "status", "")?;
        let layers = lock(&self.layers).len();
        Ok(vec![
            ("Pool".to_owned(), "rbd".to_owned()),
            ("Layers".to_owned(), layers.to_string()),
        ])
    }

    fn get_metadata(&self, id: &str) -> Result<BTreeMap<String, String>, FakeError> {
        self.enter(Call::GetMetadata(id.to_owned()), "get_metadata", id)?;
        Ok(BTreeMap::from([
            ("DeviceName".to_owned(), format!("rbd/{id}")),
            ("DeviceSize".to_owned(), "10737418240".to_owned()),
        ]))
    }

    fn cleanup(&self) -> Result<(), FakeError> {
        self.enter(Call::Cleanup, "cleanup", "")
    }

    fn diff(&self, id: &str, parent: &str) -> Result<DiffStream, FakeError> {
        self.enter(
            Call::Diff {
                id: id.to_owned(),
                parent: parent.to_owned(),
            },
            "diff",
            id,
        )?;
        let settings = lock(&self.settings);
        Ok(Box::new(PlannedDiff {
            data: settings.diff_data.clone(),
            pos: 0,
            fail_after: settings.diff_fail_after,
        }))
    }

    fn changes(&self, id: &str, parent: &str) -> Result<Vec<Change>, FakeError> {
        self.enter(
            Call::Changes {
                id: id.to_owned(),
                parent: parent.to_owned(),
            },
            "changes",
            id,
        )?;
        Ok(vec![
            Change {
                path: "/etc".into(),
                kind: ChangeKind::Modify,
            },
            Change {
                path: "/etc/hosts.new".into(),
                kind: ChangeKind::Add,
            },
            Change {
                path: "/bin/sh".into(),
                kind: ChangeKind::Delete,
            },
        ])
    }

    fn apply_diff(&self, id: &str, parent: &str, diff: &mut dyn Read) -> Result<u64, FakeError> {
        let (mode, apply) = {
            let settings = lock(&self.settings);
            (settings.mode, settings.apply)
        };
        let mut received = Vec::new();
        let mut read_error = None;
        let mut buf = vec![0u8; 7919];
        loop {
            let want = match apply {
                ApplyMode::ReadAll => buf.len(),
                ApplyMode::ReadPrefix(limit) => buf.len().min(limit - received.len().min(limit)),
            };
            if want == 0 {
                break;
            }
            match diff.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => {
                    received.extend_from_slice(&buf[..n]);
                    self.apply_progress.fetch_add(n as u64, Ordering::SeqCst);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    read_error = Some(err.to_string());
                    break;
                }
            }
        }
        let size = received.len() as u64;
        let failed_read = read_error.clone();
        self.record(Call::ApplyDiff {
            id: id.to_owned(),
            parent: parent.to_owned(),
            received,
            read_error,
        });
        if let Some(err) = failed_read {
            return Err(FakeError {
                method: "apply_diff",
                id: id.to_owned(),
                source: io::Error::other(err),
            });
        }
        match mode {
            Mode::Succeed => Ok(size),
            Mode::Fail => Err(FakeError {
                method: "apply_diff",
                id: id.to_owned(),
                source: io::Error::other("injected failure: no space left on device"),
            }),
            Mode::Panic => panic!("fake driver panics in apply_diff"),
        }
    }

    fn diff_size(&self, id: &str, parent: &str) -> Result<u64, FakeError> {
        self.enter(
            Call::DiffSize {
                id: id.to_owned(),
                parent: parent.to_owned(),
            },
            "diff_size",
            id,
        )?;
        Ok(lock(&self.settings).diff_size)
    }

    fn capabilities(&self) -> Capabilities {
        self.record(Call::Capabilities);
        let settings = lock(&self.settings);
        if settings.mode == Mode::Panic {
            panic!("fake driver panics in capabilities");
        }
        Capabilities {
            reproduces_exact_diffs: settings.reproduces_exact_diffs,
        }
    }
}

/// The `Diff` stream: hands out `data` in uneven pieces, failing or
/// panicking at `fail_after` if configured.
struct PlannedDiff {
    data: Vec<u8>,
    pos: usize,
    fail_after: Option<(usize, DiffFailure)>,
}

impl Read for PlannedDiff {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let end = match self.fail_after {
            Some((at, _)) => at.min(self.data.len()),
            None => self.data.len(),
        };
        if self.pos >= end {
            return match self.fail_after {
                Some((_, DiffFailure::Error)) => Err(io::Error::other("disk on fire")),
                Some((_, DiffFailure::Panic)) => panic!("fake diff stream panics"),
                None => Ok(0),
            };
        }
        let n = buf.len().min(end - self.pos).min(10_007);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A server on a socket in a fresh temporary directory.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub driver: Arc<FakeDriver>,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub async fn start(driver: Arc<FakeDriver>) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("plugins").join("rbd.sock");
        let config = ServerConfig::at(&socket);
        Self::start_with(driver, dir, config).await
    }

    pub async fn start_with(
        driver: Arc<FakeDriver>,
        dir: tempfile::TempDir,
        config: ServerConfig,
    ) -> TestServer {
        let socket = config.socket.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(graphdriver_api::serve(driver.clone(), config, async move {
            let _ = stopped.await;
        }));
        let deadline = tokio::time::Instant::now() + WAIT;
        while UnixStream::connect(&socket).await.is_err() {
            if task.is_finished() {
                let result = task.await;
                panic!("server exited at start: {result:?}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "server did not start"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        TestServer {
            dir,
            socket,
            driver,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn connect(&self) -> Conn {
        Conn::connect(&self.socket).await
    }

    /// Signals shutdown without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Signals shutdown and waits for `serve` to return.
    pub async fn stop(self) -> Result<(), ServerError> {
        self.stop_keeping_dir().await.0
    }

    /// [`TestServer::stop`], handing back the temporary directory so that
    /// its contents can be inspected afterwards.
    pub async fn stop_keeping_dir(mut self) -> (Result<(), ServerError>, tempfile::TempDir) {
        self.signal_stop();
        let task = self.task.take().expect("server task");
        let result = tokio::time::timeout(WAIT, task)
            .await
            .expect("server did not stop in time")
            .expect("server task panicked");
        (result, self.dir)
    }
}

/// A response as read off the wire.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// For a chunked body: whether the final `0` chunk arrived.
    pub complete: bool,
    pub chunked: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "body is not JSON ({err}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `Err` string of an error reply.
    pub fn err(&self) -> String {
        match self.json().get("Err") {
            Some(serde_json::Value::String(text)) => text.clone(),
            other => panic!("no Err string in {other:?} (status {})", self.status),
        }
    }
}

/// Why a response could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The connection closed before a status line.
    Closed,
    Io(io::Error),
    Malformed(String),
}

/// A raw HTTP/1.1 client connection.
pub struct Conn {
    stream: BufReader<UnixStream>,
}

/// The request head dockerd writes for a JSON call.
pub fn dockerd_json_request(method: &str, body: &str) -> Vec<u8> {
    let mut request = format!(
        "POST /{method} HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: {}\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body.as_bytes());
    request
}

/// The request head dockerd writes for `ApplyDiff`, before the chunks.
pub fn dockerd_apply_diff_head(id: &str, parent: &str) -> Vec<u8> {
    format!(
        "POST /GraphDriver.ApplyDiff?id={id}&parent={parent} HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\nTransfer-Encoding: chunked\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n\r\n"
    )
    .into_bytes()
}

/// One chunk of a chunked body.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// The end of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A JSON body as Go's `json.Encoder` writes it: with a trailing newline.
pub fn go_json(value: &serde_json::Value) -> String {
    format!("{value}\n")
}

impl Conn {
    pub async fn connect(path: &Path) -> Conn {
        let stream = tokio::time::timeout(WAIT, UnixStream::connect(path))
            .await
            .expect("connect timed out")
            .expect("connect");
        Conn {
            stream: BufReader::new(stream),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let stream = self.stream.get_mut();
        stream.write_all(bytes).await?;
        stream.flush().await
    }

    /// The underlying buffered stream, for tests that read raw bytes.
    pub fn raw(&mut self) -> &mut BufReader<UnixStream> {
        &mut self.stream
    }

    /// Shuts down the write half, as a client that sent everything.
    pub async fn shutdown_write(&mut self) -> io::Result<()> {
        self.stream.get_mut().shutdown().await
    }

    /// Sends a JSON call exactly as dockerd does and reads the reply.
    pub async fn call(&mut self, method: &str, body: &str) -> Response {
        self.send(&dockerd_json_request(method, body))
            .await
            .expect("send request");
        self.response().await
    }

    /// Reads one response, failing the test on error or timeout.
    pub async fn response(&mut self) -> Response {
        match tokio::time::timeout(WAIT, self.read_response()).await {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => panic!("reading response: {err:?}"),
            Err(_) => panic!("no response within {WAIT:?}"),
        }
    }

    /// Whether the server closed the connection: reads to EOF.
    pub async fn is_closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(WAIT, self.stream.read_to_end(&mut rest)).await,
            Ok(Ok(_)) | Ok(Err(_))
        )
    }

    pub async fn read_response(&mut self) -> Result<Response, ReadError> {
        let status_line = self.line().await?.ok_or(ReadError::Closed)?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        if version != "HTTP/1.1" {
            return Err(ReadError::Malformed(status_line));
        }
        let status = parts
            .next()
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| ReadError::Malformed(status_line.clone()))?;
        let mut headers = Vec::new();
        loop {
            let line = self
                .line()
                .await?
                .ok_or_else(|| ReadError::Malformed("EOF in headers".into()))?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| ReadError::Malformed(line.clone()))?;
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let chunked = find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let mut body = Vec::new();
        let mut complete = true;
        if chunked {
            complete = self.chunked_body(&mut body).await?;
        } else if let Some(length) = find("content-length") {
            let length: usize = length
                .parse()
                .map_err(|_| ReadError::Malformed(format!("content-length {length}")))?;
            body.resize(length, 0);
            self.stream
                .read_exact(&mut body)
                .await
                .map_err(ReadError::Io)?;
        } else {
            self.stream
                .read_to_end(&mut body)
                .await
                .map_err(ReadError::Io)?;
        }
        Ok(Response {
            status,
            headers,
            body,
            complete,
            chunked,
        })
    }

    /// Reads a chunked body; `Ok(false)` if the connection ended (or was
    /// reset) before the final chunk.
    async fn chunked_body(&mut self, body: &mut Vec<u8>) -> Result<bool, ReadError> {
        loop {
            let line = match self.line().await {
                Ok(Some(line)) => line,
                Ok(None) | Err(ReadError::Io(_)) => return Ok(false),
                Err(other) => return Err(other),
            };
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| ReadError::Malformed(format!("chunk size {line:?}")))?;
            if size == 0 {
                loop {
                    match self.line().await {
                        Ok(Some(trailer)) if trailer.is_empty() => return Ok(true),
                        Ok(Some(_)) => {}
                        Ok(None) | Err(ReadError::Io(_)) => return Ok(false),
                        Err(other) => return Err(other),
                    }
                }
            }
            let start = body.len();
            body.resize(start + size, 0);
            if self.stream.read_exact(&mut body[start..]).await.is_err() {
                body.truncate(start);
                return Ok(false);
            }
            let mut crlf = [0u8; 2];
            if self.stream.read_exact(&mut crlf).await.is_err() {
                return Ok(false);
            }
            if &crlf != b"\r\n" {
                return Err(ReadError::Malformed("chunk not followed by CRLF".into()));
            }
        }
    }

    /// One CRLF-terminated line without its terminator; `None` at EOF.
    async fn line(&mut self) -> Result<Option<String>, ReadError> {
        let mut raw = Vec::new();
        let n = self
            .stream
            .read_until(b'\n', &mut raw)
            .await
            .map_err(ReadError::Io)?;
        if n == 0 {
            return Ok(None);
        }
        if !raw.ends_with(b"\r\n") {
            return Err(ReadError::Malformed(format!(
                "line without CRLF: {:?}",
                String::from_utf8_lossy(&raw)
            )));
        }
        raw.truncate(raw.len() - 2);
        String::from_utf8(raw)
            .map(Some)
            .map_err(|err| ReadError::Malformed(err.to_string()))
    }
}
