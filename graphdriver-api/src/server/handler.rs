//! The one handler behind every path: route, read, parse, dispatch to the
//! driver on a blocking thread, answer.

use std::any::Any;
use std::error::Error as StdError;
use std::io::{self, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request as HttpRequest, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{FutureExt, StreamExt};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::io::{StreamReader, SyncIoBridge};
use tracing::{Instrument, Span, field};

use super::request::{Endpoint, ParseError, Request, RouteError, parse, route};
use crate::driver::{DiffStream, GraphDriver};
use crate::types::{
    ActivateResponse, CapabilitiesResponse, ChangesResponse, EmptyResponse, ErrorResponse,
    ExistsResponse, GetResponse, MetadataResponse, SizeResponse, StatusResponse,
};

/// Largest JSON request body accepted; larger ones are answered 413.
/// dockerd's largest (`Init` with long option lists) are a few KiB.
pub const JSON_BODY_LIMIT: usize = 1 << 20;

/// How much of a refused request body is read and discarded so that the
/// error reply reaches the client and the connection stays usable. Past
/// this, the reply is sent anyway and the connection is closed.
const REFUSED_BODY_DRAIN_LIMIT: u64 = 16 << 20;

/// Content type of every JSON reply (dockerd never checks it).
pub const JSON_CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";

/// Content type of the `Diff` reply.
const TAR_CONTENT_TYPE: &str = "application/x-tar";

/// Size of the chunks a `Diff` stream is read and sent in.
const DIFF_CHUNK: usize = 64 * 1024;

/// Chunks buffered between the blocking `Diff` reader and the socket.
const DIFF_QUEUE: usize = 4;

/// Longest request path written to logs.
const LOGGED_PATH_MAX: usize = 200;

/// Everything that turns a request into an error reply.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("{endpoint} request body exceeds the limit of {limit} bytes")]
    TooLarge { endpoint: Endpoint, limit: usize },
    #[error("reading the {endpoint} request body")]
    BodyRead {
        endpoint: Endpoint,
        #[source]
        source: axum::Error,
    },
    /// The driver returned an error; `message` already holds its chain.
    #[error("{message}")]
    Driver { message: String },
    #[error("the driver panicked in {endpoint}: {message}")]
    Panic { endpoint: Endpoint, message: String },
    #[error("the server panicked handling the request: {message}")]
    ServerPanic { message: String },
    #[error("the {endpoint} driver task failed")]
    Task {
        endpoint: Endpoint,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("{endpoint}: the driver's answer cannot be sent: {reason}")]
    Reply {
        endpoint: Endpoint,
        reason: ReplyProblem,
    },
}

/// Why a successful driver result cannot be put on the wire.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplyProblem {
    #[error("directory {dir:?} is not UTF-8")]
    PathNotUtf8 { dir: std::path::PathBuf },
    #[error("size {size} does not fit dockerd's int64")]
    SizeTooLarge { size: u64 },
}

/// How a request ended, for the log line closing its span.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Ok,
    Client,
    Driver,
    Internal,
}

impl RequestError {
    /// The wire status and the log outcome: one exhaustive match, so a new
    /// variant must be placed deliberately.
    fn classify(&self) -> (StatusCode, Outcome) {
        match self {
            RequestError::Route(RouteError::NotFound { .. }) => {
                (StatusCode::NOT_FOUND, Outcome::Client)
            }
            RequestError::Route(RouteError::MethodNotAllowed { .. }) => {
                (StatusCode::METHOD_NOT_ALLOWED, Outcome::Client)
            }
            RequestError::Parse(_) => (StatusCode::BAD_REQUEST, Outcome::Client),
            RequestError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, Outcome::Client),
            RequestError::BodyRead { .. } => (StatusCode::BAD_REQUEST, Outcome::Client),
            RequestError::Driver { .. } => (StatusCode::INTERNAL_SERVER_ERROR, Outcome::Driver),
            RequestError::Panic { .. } => (StatusCode::INTERNAL_SERVER_ERROR, Outcome::Internal),
            RequestError::ServerPanic { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, Outcome::Internal)
            }
            RequestError::Task { .. } => (StatusCode::INTERNAL_SERVER_ERROR, Outcome::Internal),
            RequestError::Reply { .. } => (StatusCode::INTERNAL_SERVER_ERROR, Outcome::Internal),
        }
    }

    fn into_response(self) -> Response {
        let (status, _) = self.classify();
        let allow_post = matches!(
            self,
            RequestError::Route(RouteError::MethodNotAllowed { .. })
        );
        let mut response = json_response(
            status,
            &ErrorResponse {
                err: error_chain(&self),
            },
        );
        if allow_post {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        response
    }
}

/// `err`'s message followed by each `source()` not already spelled out in it,
/// joined by `": "`.
pub(crate) fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// A JSON reply; a type that cannot be encoded becomes a 500 `{"Err"}`.
fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => with_json_type(status, body),
        Err(err) => with_json_type(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "{{\"Err\":{}}}",
                serde_json::Value::String(format!("encoding the reply: {err}"))
            )
            .into_bytes(),
        ),
    }
}

fn with_json_type(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(JSON_CONTENT_TYPE),
        )],
        body,
    )
        .into_response()
}

fn ok_json<T: Serialize>(value: T) -> Result<Response, RequestError> {
    Ok(json_response(StatusCode::OK, &value))
}

/// The axum handler for every method and path.
pub(crate) async fn handle<D: GraphDriver>(
    State(driver): State<Arc<D>>,
    request: HttpRequest,
) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let logged_method = match Endpoint::from_path(parts.uri.path()) {
        Some(endpoint) => endpoint.name().to_owned(),
        None => truncate(parts.uri.path(), LOGGED_PATH_MAX),
    };
    let span = tracing::info_span!(
        "graphdriver",
        method = %logged_method,
        id = field::Empty,
        parent = field::Empty,
    );
    async move {
        let uri = &parts.uri;
        let served = serve_request(driver, &parts.method, uri.path(), uri.query(), body);
        // Driver calls catch their own panics; this catches the server's, so
        // that even a bug here answers instead of dropping the connection.
        let result = match AssertUnwindSafe(served).catch_unwind().await {
            Ok(result) => result,
            Err(payload) => Err(RequestError::ServerPanic {
                message: panic_message(payload.as_ref()),
            }),
        };
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        match result {
            Ok(response) => {
                tracing::info!(
                    status = response.status().as_u16(),
                    elapsed_ms,
                    outcome = ?Outcome::Ok,
                    "request done"
                );
                response
            }
            Err(err) => {
                let (status, outcome) = err.classify();
                let status_code = status.as_u16();
                match outcome {
                    Outcome::Internal => tracing::error!(
                        status = status_code,
                        elapsed_ms,
                        ?outcome,
                        http_method = %parts.method,
                        error = %error_chain(&err),
                        "request failed"
                    ),
                    Outcome::Ok | Outcome::Client | Outcome::Driver => tracing::warn!(
                        status = status_code,
                        elapsed_ms,
                        ?outcome,
                        http_method = %parts.method,
                        error = %error_chain(&err),
                        "request failed"
                    ),
                }
                err.into_response()
            }
        }
    }
    .instrument(span)
    .await
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

async fn serve_request<D: GraphDriver>(
    driver: Arc<D>,
    method: &axum::http::Method,
    path: &str,
    query: Option<&str>,
    body: Body,
) -> Result<Response, RequestError> {
    let endpoint = match route(method, path) {
        Ok(endpoint) => endpoint,
        Err(err) => {
            drain(body, REFUSED_BODY_DRAIN_LIMIT).await;
            return Err(err.into());
        }
    };
    let (request, stream) = if endpoint.streams_request_body() {
        match parse(endpoint, query, b"") {
            Ok(request) => (request, Some(body)),
            Err(err) => {
                drain(body, REFUSED_BODY_DRAIN_LIMIT).await;
                return Err(err.into());
            }
        }
    } else {
        let bytes = read_json_body(endpoint, body).await?;
        (parse(endpoint, query, &bytes)?, None)
    };
    let span = Span::current();
    if let Some(id) = request.id() {
        span.record("id", id);
    }
    if let Some(parent) = request.parent() {
        span.record("parent", parent);
    }
    dispatch(driver, request, stream).await
}

/// Reads a JSON body up to [`JSON_BODY_LIMIT`].
async fn read_json_body(endpoint: Endpoint, body: Body) -> Result<Bytes, RequestError> {
    let mut stream = body.into_data_stream();
    let mut collected = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| RequestError::BodyRead { endpoint, source })?;
        if collected.len() + chunk.len() > JSON_BODY_LIMIT {
            drain_stream(stream, REFUSED_BODY_DRAIN_LIMIT).await;
            return Err(RequestError::TooLarge {
                endpoint,
                limit: JSON_BODY_LIMIT,
            });
        }
        collected.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(collected))
}

/// Reads and discards up to `limit` bytes of `body`; returns how many.
async fn drain(body: Body, limit: u64) -> u64 {
    drain_stream(body.into_data_stream(), limit).await
}

async fn drain_stream<S>(mut stream: S, limit: u64) -> u64
where
    S: futures_util::Stream<Item = Result<Bytes, axum::Error>> + Unpin,
{
    let mut discarded = 0u64;
    while discarded < limit {
        match stream.next().await {
            Some(Ok(chunk)) => {
                discarded = discarded.saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX))
            }
            Some(Err(_)) | None => break,
        }
    }
    if discarded > 0 {
        tracing::debug!(discarded, "discarded unread request body");
    }
    discarded
}

/// Calls the driver for `request`. Every driver call runs on a blocking
/// thread; a panic in it becomes [`RequestError::Panic`].
async fn dispatch<D: GraphDriver>(
    driver: Arc<D>,
    request: Request,
    stream: Option<Body>,
) -> Result<Response, RequestError> {
    let endpoint = request.endpoint();
    match request {
        Request::Activate => ok_json(ActivateResponse::graph_driver()),
        Request::Init(req) => {
            blocking(driver, endpoint, move |d| d.init(req)).await?;
            ok_json(EmptyResponse {})
        }
        Request::Create(req) => {
            blocking(driver, endpoint, move |d| d.create(req)).await?;
            ok_json(EmptyResponse {})
        }
        Request::CreateReadWrite(req) => {
            blocking(driver, endpoint, move |d| d.create_read_write(req)).await?;
            ok_json(EmptyResponse {})
        }
        Request::Remove { id } => {
            blocking(driver, endpoint, move |d| d.remove(&id)).await?;
            ok_json(EmptyResponse {})
        }
        Request::Get { id, mount_label } => {
            let dir = blocking(driver, endpoint, move |d| d.get(&id, &mount_label)).await?;
            match dir.into_os_string().into_string() {
                Ok(dir) => ok_json(GetResponse { dir }),
                Err(dir) => Err(RequestError::Reply {
                    endpoint,
                    reason: ReplyProblem::PathNotUtf8 { dir: dir.into() },
                }),
            }
        }
        Request::Put { id } => {
            blocking(driver, endpoint, move |d| d.put(&id)).await?;
            ok_json(EmptyResponse {})
        }
        Request::Exists { id } => {
            let exists = blocking(driver, endpoint, move |d| d.exists(&id)).await?;
            ok_json(ExistsResponse { exists })
        }
        Request::Status => {
            let pairs = blocking(driver, endpoint, |d| d.status()).await?;
            ok_json(StatusResponse {
                status: pairs.into_iter().map(|(k, v)| [k, v]).collect(),
            })
        }
        Request::GetMetadata { id } => {
            let metadata = blocking(driver, endpoint, move |d| d.get_metadata(&id)).await?;
            ok_json(MetadataResponse { metadata })
        }
        Request::Cleanup => {
            blocking(driver, endpoint, |d| d.cleanup()).await?;
            ok_json(EmptyResponse {})
        }
        Request::Diff { id, parent } => diff(driver, id, parent).await,
        Request::Changes { id, parent } => {
            let changes = blocking(driver, endpoint, move |d| d.changes(&id, &parent)).await?;
            ok_json(ChangesResponse { changes })
        }
        Request::ApplyDiff { id, parent } => match stream {
            Some(body) => apply_diff(driver, id, parent, body).await,
            // `serve_request` always passes the body for ApplyDiff.
            None => Err(RequestError::BodyRead {
                endpoint,
                source: axum::Error::new(io::Error::other("the request body is missing")),
            }),
        },
        Request::DiffSize { id, parent } => {
            let size = blocking(driver, endpoint, move |d| d.diff_size(&id, &parent)).await?;
            size_reply(endpoint, size)
        }
        Request::Capabilities => {
            let capabilities = blocking(driver, endpoint, |d| Ok(d.capabilities())).await?;
            ok_json(CapabilitiesResponse { capabilities })
        }
    }
}

fn size_reply(endpoint: Endpoint, size: u64) -> Result<Response, RequestError> {
    match i64::try_from(size) {
        Ok(size) => ok_json(SizeResponse { size }),
        Err(_) => Err(RequestError::Reply {
            endpoint,
            reason: ReplyProblem::SizeTooLarge { size },
        }),
    }
}

/// Runs `call` on the blocking pool inside the current span.
async fn blocking<D, T, F>(driver: Arc<D>, endpoint: Endpoint, call: F) -> Result<T, RequestError>
where
    D: GraphDriver,
    T: Send + 'static,
    F: FnOnce(&D) -> Result<T, D::Error> + Send + 'static,
{
    let span = Span::current();
    let joined = tokio::task::spawn_blocking(move || {
        span.in_scope(|| catch_unwind(AssertUnwindSafe(|| call(&driver))))
    })
    .await;
    match joined {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(err))) => Err(RequestError::Driver {
            message: error_chain(&err),
        }),
        Ok(Err(payload)) => Err(RequestError::Panic {
            endpoint,
            message: panic_message(payload.as_ref()),
        }),
        Err(source) => Err(RequestError::Task { endpoint, source }),
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&'static str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    }
}

/// `GraphDriver.Diff`: opens the stream and reads its first chunk before
/// answering, so a failure to start is a 500 `{"Err"}`; then streams the rest
/// as a chunked 200 body. A read error later aborts the body, so hyper closes
/// the connection without the final chunk and dockerd sees a failed transfer
/// rather than a short tar.
async fn diff<D: GraphDriver>(
    driver: Arc<D>,
    id: String,
    parent: String,
) -> Result<Response, RequestError> {
    let endpoint = Endpoint::Diff;
    let (first_tx, first_rx) = oneshot::channel();
    let (chunk_tx, mut chunk_rx) = mpsc::channel::<io::Result<Bytes>>(DIFF_QUEUE);
    let span = Span::current();
    let pump = tokio::task::spawn_blocking(move || {
        span.in_scope(|| pump_diff(driver.as_ref(), &id, &parent, first_tx, chunk_tx));
    });
    let first = match first_rx.await {
        Ok(first) => first?,
        // The pump never drops the sender without sending unless it died.
        Err(_) => {
            return Err(match pump.await {
                Err(source) => RequestError::Task { endpoint, source },
                Ok(()) => RequestError::Panic {
                    endpoint,
                    message: "the diff reader ended without an answer".to_owned(),
                },
            });
        }
    };
    let rest = futures_util::stream::poll_fn(move |cx| chunk_rx.poll_recv(cx));
    let body = futures_util::stream::iter(first.map(Ok)).chain(rest);
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(TAR_CONTENT_TYPE),
        )],
        Body::from_stream(body),
    )
        .into_response())
}

type FirstChunk = Result<Option<Bytes>, RequestError>;

/// Blocking side of [`diff`]: opens the driver's stream, hands the first
/// chunk (or the error) to `first`, then every further chunk to `chunks`.
fn pump_diff<D: GraphDriver>(
    driver: &D,
    id: &str,
    parent: &str,
    first: oneshot::Sender<FirstChunk>,
    chunks: mpsc::Sender<io::Result<Bytes>>,
) {
    let endpoint = Endpoint::Diff;
    let started = Instant::now();
    let mut stream: DiffStream = match catch_unwind(AssertUnwindSafe(|| driver.diff(id, parent))) {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            let _ = first.send(Err(RequestError::Driver {
                message: error_chain(&err),
            }));
            return;
        }
        Err(payload) => {
            let _ = first.send(Err(RequestError::Panic {
                endpoint,
                message: panic_message(payload.as_ref()),
            }));
            return;
        }
    };
    let mut sent: u64 = 0;
    match read_chunk(&mut stream) {
        Ok(chunk) => {
            let done = chunk.is_none();
            sent += chunk_len(chunk.as_ref());
            if first.send(Ok(chunk)).is_err() {
                tracing::debug!("client went away before the diff stream started");
                return;
            }
            if done {
                tracing::info!(bytes = sent, "diff stream complete");
                return;
            }
        }
        Err(ChunkError::Io(err)) => {
            let _ = first.send(Err(RequestError::Driver {
                message: format!("reading the diff of {id}: {}", error_chain(&err)),
            }));
            return;
        }
        Err(ChunkError::Panic(message)) => {
            let _ = first.send(Err(RequestError::Panic { endpoint, message }));
            return;
        }
    }
    loop {
        let item = match read_chunk(&mut stream) {
            Ok(Some(chunk)) => {
                sent += chunk_len(Some(&chunk));
                Ok(chunk)
            }
            Ok(None) => {
                let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
                tracing::info!(bytes = sent, elapsed_ms, "diff stream complete");
                return;
            }
            Err(ChunkError::Io(err)) => {
                tracing::warn!(
                    bytes = sent,
                    error = %error_chain(&err),
                    "diff stream failed; aborting the response"
                );
                Err(err)
            }
            Err(ChunkError::Panic(message)) => {
                tracing::error!(bytes = sent, %message, "diff stream panicked; aborting the response");
                Err(io::Error::other(format!(
                    "the diff reader panicked: {message}"
                )))
            }
        };
        let failed = item.is_err();
        if chunks.blocking_send(item).is_err() {
            tracing::debug!(bytes = sent, "client went away during the diff stream");
            return;
        }
        if failed {
            return;
        }
    }
}

fn chunk_len(chunk: Option<&Bytes>) -> u64 {
    chunk.map_or(0, |c| u64::try_from(c.len()).unwrap_or(u64::MAX))
}

enum ChunkError {
    Io(io::Error),
    Panic(String),
}

/// Reads the next non-empty chunk; `None` at end of stream.
fn read_chunk(stream: &mut DiffStream) -> Result<Option<Bytes>, ChunkError> {
    let mut buf = vec![0u8; DIFF_CHUNK];
    loop {
        match catch_unwind(AssertUnwindSafe(|| stream.read(&mut buf))) {
            Ok(Ok(0)) => return Ok(None),
            Ok(Ok(n)) => {
                buf.truncate(n.min(DIFF_CHUNK));
                return Ok(Some(Bytes::from(buf)));
            }
            Ok(Err(err)) if err.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Err(err)) => return Err(ChunkError::Io(err)),
            Err(payload) => return Err(ChunkError::Panic(panic_message(payload.as_ref()))),
        }
    }
}

/// Counts what the driver reads of an `ApplyDiff` body.
struct Counting<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read = self
            .read
            .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        Ok(n)
    }
}

/// `GraphDriver.ApplyDiff`: streams the chunked body to the driver's blocking
/// reader, never holding more than hyper's current chunk. Whatever the driver
/// leaves unread (tar padding, or everything after an error) is drained so
/// the reply reaches dockerd on a sane connection. A client that disconnects
/// makes the driver's reads fail.
async fn apply_diff<D: GraphDriver>(
    driver: Arc<D>,
    id: String,
    parent: String,
    body: Body,
) -> Result<Response, RequestError> {
    let endpoint = Endpoint::ApplyDiff;
    let stream = body
        .into_data_stream()
        .map(|chunk| chunk.map_err(io::Error::other));
    let reader = Counting {
        inner: SyncIoBridge::new(StreamReader::new(stream)),
        read: 0,
    };
    let span = Span::current();
    let joined = tokio::task::spawn_blocking(move || {
        span.in_scope(|| {
            let mut reader = reader;
            let result = catch_unwind(AssertUnwindSafe(|| {
                driver.apply_diff(&id, &parent, &mut reader)
            }));
            tracing::debug!(bytes_read = reader.read, "driver apply_diff returned");
            let outcome = match result {
                Ok(Ok(size)) => Ok(size),
                Ok(Err(err)) => Err(RequestError::Driver {
                    message: error_chain(&err),
                }),
                Err(payload) => Err(RequestError::Panic {
                    endpoint,
                    message: panic_message(payload.as_ref()),
                }),
            };
            (outcome, reader)
        })
    })
    .await;
    let (outcome, reader) = joined.map_err(|source| RequestError::Task { endpoint, source })?;
    let bytes_read = reader.read;
    let rest = reader.inner.into_inner().into_inner();
    let discarded = drain_io_stream(rest).await;
    tracing::debug!(bytes_read, discarded, "ApplyDiff body consumed");
    let size = outcome?;
    size_reply(endpoint, size)
}

async fn drain_io_stream<S>(mut stream: S) -> u64
where
    S: futures_util::Stream<Item = io::Result<Bytes>> + Unpin,
{
    let mut discarded = 0u64;
    while let Some(Ok(chunk)) = stream.next().await {
        discarded = discarded.saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
    }
    discarded
}
