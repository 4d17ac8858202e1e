//! The plugin HTTP server on a unix socket.
//!
//! [`serve`] binds the socket dockerd discovers (`/run/docker/plugins/<name>.sock`
//! by default), answers every call of the protocol by calling a
//! [`GraphDriver`], and on shutdown finishes in-flight requests and removes
//! the socket. [`router`] is the same service without a socket, for tests.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use graphdriver_api::{GraphDriver, ServerConfig, ServerError, serve, shutdown_signal};
//!
//! async fn run(driver: impl GraphDriver) -> Result<(), ServerError> {
//!     // /run/docker/plugins/rbd.sock, mode 0600, for `dockerd -s rbd`.
//!     let config = ServerConfig::for_plugin("rbd");
//!     serve(Arc::new(driver), config, shutdown_signal()?).await
//! }
//! ```
//!
//! How requests are handled, as dockerd 20.10 needs them:
//!
//! - Every call is `POST /<Method>`. The path alone picks the endpoint
//!   ([`request::route`]), the body is then parsed by a pure function
//!   ([`request::parse`]) into a [`Request`], and only then does anything act.
//! - Bodies are parsed from bytes whatever the `Content-Type` (dockerd sends
//!   none). An empty body and `null` mean `{}`; missing keys and `null`
//!   fields take their defaults; unknown keys are ignored. JSON bodies are
//!   limited to [`JSON_BODY_LIMIT`].
//! - Driver methods run on the blocking pool, one tracing span per request
//!   carrying the method, the layer `id` and `parent`, closed by a log line
//!   with the status, elapsed time and outcome.
//! - Replies are JSON (at least `{}`) with `Content-Type:`
//!   [`JSON_CONTENT_TYPE`]. Errors are non-200 with `{"Err": "..."}`: 400 for
//!   malformed JSON or wrong types, 413 for an oversized body, 404 for an
//!   unknown path, 405 for a method other than POST, 500 for a driver error
//!   (its message followed by its `source()` chain) or a driver panic.
//! - `ApplyDiff` takes `id` and `parent` from the query string and streams the
//!   chunked tar body to the driver's blocking reader; a client that goes away
//!   makes that reader fail. What the driver leaves unread is drained so the
//!   reply arrives on a sane connection.
//! - `Diff` opens the driver's stream and reads its first chunk before
//!   answering, so a failure to start is a 500; the rest is streamed as a
//!   chunked body, and a read error midway aborts the connection without the
//!   final chunk, so dockerd sees a failure rather than a short tar.

mod handler;
pub mod request;
mod socket;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;

pub use self::handler::{JSON_BODY_LIMIT, JSON_CONTENT_TYPE};
pub use self::request::{Endpoint, ParseError, QueryError, Request, RouteError};
pub use self::socket::{
    PLUGIN_SOCKET_DIR, ServerConfig, ServerError, SocketGroup, shutdown_signal,
};
use crate::driver::GraphDriver;

/// How long the accept loop pauses after `accept` failed (e.g. `EMFILE`).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The whole protocol as an axum service: every path and method goes to one
/// handler, which answers unknown paths 404 and other methods 405.
pub fn router<D: GraphDriver>(driver: Arc<D>) -> axum::Router {
    axum::Router::new()
        .fallback(handler::handle::<D>)
        .with_state(driver)
}

/// Serves `driver` on `config.socket` until `shutdown` completes.
///
/// Binding creates the socket's directory, replaces a stale socket left by a
/// crashed run (one that refuses connections), and fails on a live socket or
/// on a file that is not a socket. The socket gets `config.mode` and
/// `config.group` before it is reachable.
///
/// At most `config.max_connections` connections are served at once (more
/// wait to be accepted); one that does not send a request header within
/// `config.header_timeout` is closed. A failed `accept` (out of file
/// descriptors) is logged and tried again shortly.
///
/// When `shutdown` completes the server stops accepting, lets in-flight
/// requests finish (for at most `config.shutdown_grace`), closes idle
/// connections, and removes the socket file (only if it is still the one it
/// bound).
pub async fn serve<D: GraphDriver>(
    driver: Arc<D>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let (listener, bound) = socket::bind(&config).await?;
    let service = TowerToHyperService::new(router(driver));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout);
    let connections = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    let mut at_limit = false;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                at_limit = false;
                slot
            }
            Err(_) => {
                if !at_limit {
                    tracing::warn!(
                        max_connections = config.max_connections,
                        "connection limit reached; new connections wait until one closes"
                    );
                    at_limit = true;
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_closed) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed; trying again");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection =
            connections.watch(http.serve_connection(TokioIo::new(stream), service.clone()));
        let header_timeout = config.header_timeout;
        tokio::spawn(async move {
            match connection.await {
                Err(e) if e.is_timeout() => tracing::info!(
                    header_timeout_secs = header_timeout.as_secs_f64(),
                    "closed a connection that sent no request header in time"
                ),
                Err(e) => tracing::debug!(error = %e, "connection ended with an error"),
                Ok(()) => {}
            }
            drop(slot);
        });
    }
    tracing::info!(socket = %bound.path.display(), "shutting down: finishing in-flight requests");
    drop(listener);
    match config.shutdown_grace {
        None => connections.shutdown().await,
        Some(grace) => {
            if tokio::time::timeout(grace, connections.shutdown())
                .await
                .is_err()
            {
                tracing::warn!(
                    grace_secs = grace.as_secs_f64(),
                    "in-flight requests did not finish in time; stopping anyway"
                );
            }
        }
    }
    bound.remove().await?;
    tracing::info!(socket = %bound.path.display(), "server stopped");
    Ok(())
}
