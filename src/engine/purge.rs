//! Deferred removal: the slow half of `Remove`, in the background.
//!
//! Removing a layer costs an RBD snapshot removal (a new OSD map, paced by
//! the monitors) and an image removal: hundreds of milliseconds that
//! `docker rm` would otherwise wait for. [`Engine::retire`] records the
//! intent (the layer is `Removing` in RADOS) and returns; the [`Purger`]'s
//! thread then runs [`Engine::purge`] for each such layer, in order. A
//! purge that fails (a full pool, a watch a dead client left on the image)
//! is tried again after [`RETRY_FIRST`], then at doubling intervals up to
//! [`RETRY_MAX`]. A crash or shutdown with purges queued loses nothing:
//! startup recovery finishes every `Removing` layer it finds.

use std::sync::Arc;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Engine;
use super::layers::Purge;

/// The background remover of one engine.
pub struct Purger {
    queue: Option<Sender<Purge>>,
    thread: Option<JoinHandle<()>>,
}

impl Purger {
    /// Starts the purge thread of `engine`.
    pub fn start(engine: Arc<Engine>) -> std::io::Result<Purger> {
        let (queue, jobs) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("purge".into())
            .spawn(move || run(&engine, &jobs))?;
        Ok(Purger {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Queues `purge`; if the thread is gone, purges in the caller's
    /// thread.
    pub fn submit(&self, engine: &Engine, purge: Purge) {
        let Some(queue) = &self.queue else {
            purge_now(engine, &purge);
            return;
        };
        if let Err(mpsc::SendError(purge)) = queue.send(purge) {
            purge_now(engine, &purge);
        }
    }
}

/// The wait before a failed purge is tried again; doubled after each
/// failure, up to [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_secs(5);
/// The longest wait between two tries of a failing purge.
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// A purge that failed, and when to try it again.
struct Retry {
    purge: Purge,
    at: Instant,
    wait: Duration,
}

fn run(engine: &Engine, jobs: &Receiver<Purge>) {
    let mut retries: Vec<Retry> = Vec::new();
    loop {
        let job = match retries.iter().map(|r| r.at).min() {
            None => jobs.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => jobs.recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        match job {
            Ok(purge) => {
                if !purge_now(engine, &purge) {
                    retries.push(Retry {
                        purge,
                        at: Instant::now() + RETRY_FIRST,
                        wait: RETRY_FIRST,
                    });
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        let due: Vec<Retry> = retries.extract_if(.., |r| r.at <= now).collect();
        for retry in due {
            if !purge_now(engine, &retry.purge) {
                let wait = (retry.wait * 2).min(RETRY_MAX);
                retries.push(Retry {
                    at: Instant::now() + wait,
                    wait,
                    ..retry
                });
            }
        }
    }
    // Shutting down: one last try; what still fails stays `Removing`.
    for retry in retries {
        purge_now(engine, &retry.purge);
    }
}

/// Purges one layer; whether it is done.
fn purge_now(engine: &Engine, purge: &Purge) -> bool {
    let started = std::time::Instant::now();
    match engine.purge(purge) {
        Ok(()) => {
            tracing::debug!(
                layer = %purge.id,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "purged"
            );
            true
        }
        Err(e) => {
            tracing::warn!(
                layer = %purge.id,
                error = %e,
                "purging a removed layer failed; it stays Removing and is tried again"
            );
            false
        }
    }
}

impl Drop for Purger {
    /// Finishes the purges queued so far, then stops the thread.
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
