//! The unmounting of idle read-only layers, in the background.
//!
//! A read-only layer's last `Put` leaves it mounted for `rbd.mountlinger`
//! (see the `mounts` module). The [`Reaper`]'s thread looks once a second
//! for idle mounts whose time is up and unmounts them; when it stops
//! (dockerd's next `Init`, the daemon's shutdown) it unmounts every idle
//! mount, so an idle mount never outlives the engine that made it. A crash
//! leaves them recorded: the next daemon adopts them idle, and its reaper
//! unmounts them.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Engine;

/// How often the reaper looks for mounts whose linger is over.
const TICK: Duration = Duration::from_secs(1);

/// The background unmounter of one engine's idle mounts.
pub struct Reaper {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    engine: Arc<Engine>,
}

impl Reaper {
    /// Starts the reaper thread of `engine`.
    pub fn start(engine: Arc<Engine>) -> std::io::Result<Reaper> {
        let (stop, stopped) = mpsc::channel::<()>();
        let watched = engine.clone();
        let thread = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                    let released = watched.release_idle_mounts(false);
                    if released > 0 {
                        tracing::debug!(released, "unmounted idle layers");
                    }
                }
            })?;
        Ok(Reaper {
            stop: Some(stop),
            thread: Some(thread),
            engine,
        })
    }
}

impl Drop for Reaper {
    /// Stops the thread, then unmounts every idle mount.
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let released = self.engine.release_idle_mounts(true);
        if released > 0 {
            tracing::info!(released, "unmounted idle layers");
        }
    }
}
