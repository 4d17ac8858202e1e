//! Per-layer locks within one daemon.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex, PoisonError};

/// Which layers an operation is working on. [`LayerLocks::lock`] takes all
/// the ids an operation needs at once, so two operations can never wait on
/// each other in a cycle.
#[derive(Default)]
pub struct LayerLocks {
    busy: Mutex<HashSet<String>>,
    released: Condvar,
}

/// The layers one operation holds; released on drop.
pub struct Held<'a> {
    locks: &'a LayerLocks,
    ids: Vec<String>,
}

impl LayerLocks {
    /// Waits until none of `ids` is held, then holds them all. Empty ids
    /// are ignored.
    pub fn lock(&self, ids: &[&str]) -> Held<'_> {
        let ids: Vec<String> = ids
            .iter()
            .filter(|id| !id.is_empty())
            .map(|id| id.to_string())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        while ids.iter().any(|id| busy.contains(id)) {
            busy = self
                .released
                .wait(busy)
                .unwrap_or_else(PoisonError::into_inner);
        }
        busy.extend(ids.iter().cloned());
        Held { locks: self, ids }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut busy = self
            .locks
            .busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for id in &self.ids {
            busy.remove(id);
        }
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn same_id_is_exclusive_and_order_does_not_deadlock() {
        let locks = Arc::new(LayerLocks::default());
        let inside = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let locks = locks.clone();
                let inside = inside.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let ids = if i % 2 == 0 { ["a", "b"] } else { ["b", "a"] };
                        let _held = locks.lock(&ids);
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(locks.busy.lock().unwrap().is_empty());
    }

    #[test]
    fn different_ids_do_not_wait() {
        let locks = LayerLocks::default();
        let _a = locks.lock(&["a", "a", ""]);
        let _b = locks.lock(&["b"]);
        assert_eq!(locks.busy.lock().unwrap().len(), 2);
    }
}
