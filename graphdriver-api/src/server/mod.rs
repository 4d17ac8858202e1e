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

use std::future::{Future, IntoFuture};
use std::sync::Arc;

use tokio::sync::oneshot;

pub use self::handler::{JSON_BODY_LIMIT, JSON_CONTENT_TYPE};
pub use self::request::{Endpoint, ParseError, QueryError, Request, RouteError};
pub use self::socket::{
    PLUGIN_SOCKET_DIR, ServerConfig, ServerError, SocketGroup, shutdown_signal,
};
use crate::driver::GraphDriver;

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
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = axum::serve(listener, router(driver))
        .with_graceful_shutdown(async move {
            // Dropping the sender also means stop.
            let _ = stop_rx.await;
        })
        .into_future();
    let mut server = Box::pin(server);
    let mut shutdown = std::pin::pin!(shutdown);
    let served = tokio::select! {
        result = &mut server => result,
        () = &mut shutdown => {
            tracing::info!(socket = %bound.path.display(), "shutting down: finishing in-flight requests");
            let _ = stop_tx.send(());
            match config.shutdown_grace {
                None => (&mut server).await,
                Some(grace) => match tokio::time::timeout(grace, &mut server).await {
                    Ok(result) => result,
                    Err(_elapsed) => {
                        tracing::warn!(
                            grace_secs = grace.as_secs_f64(),
                            "in-flight requests did not finish in time; stopping anyway"
                        );
                        Ok(())
                    }
                },
            }
        }
    };
    // Closes the listener if a grace timeout left the server future alive.
    drop(server);
    let removed = bound.remove().await;
    served.map_err(|source| ServerError::Serve {
        path: bound.path.clone(),
        source,
    })?;
    removed?;
    tracing::info!(socket = %bound.path.display(), "server stopped");
    Ok(())
}
