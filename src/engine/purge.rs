//! Deferred removal: the slow half of `Remove`, in the background.
//!
//! Removing a layer costs an RBD snapshot removal (a new OSD map, paced by
//! the monitors) and an image removal: hundreds of milliseconds that
//! `docker rm` would otherwise wait for. [`Engine::retire`] records the
//! intent (the layer is `Removing` in RADOS) and returns; the [`Purger`]'s
//! thread then runs [`Engine::purge`] for each such layer, in order. A
//! crash or shutdown with purges queued loses nothing: startup recovery
//! finishes every `Removing` layer it finds.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

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
            return purge_now(engine, &purge);
        };
        if let Err(mpsc::SendError(purge)) = queue.send(purge) {
            purge_now(engine, &purge);
        }
    }
}

fn run(engine: &Engine, jobs: &Receiver<Purge>) {
    while let Ok(purge) = jobs.recv() {
        purge_now(engine, &purge);
    }
}

fn purge_now(engine: &Engine, purge: &Purge) {
    let started = std::time::Instant::now();
    match engine.purge(purge) {
        Ok(()) => tracing::debug!(
            layer = %purge.id,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "purged"
        ),
        Err(e) => tracing::warn!(
            layer = %purge.id,
            error = %e,
            "purging a removed layer failed; it stays Removing, and startup recovery finishes it"
        ),
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
