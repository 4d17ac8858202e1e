//! Named points inside docker-rbd's multi-step changes where a debug build
//! can be made to die, so that tests prove a restarted daemon recovers
//! from a crash at each of them.
//!
//! `DOCKER_RBD_CRASH_AT=<point>` (a [`CrashPoint::name`]) makes the daemon
//! abort, as a `SIGKILL` would, the first time it reaches that point: no
//! destructor runs, its FUSE servers and mounts stay, RADOS and the local
//! state hold what was written before. Release builds never read the
//! variable and [`reached`] is empty there.
//!
//! Each point sits right after one step of a change is durable and before
//! the next: the recorded intent and the world disagree there, which is
//! what recovery has to sort out.
//!
//! In-process tests can instead run code at a point on one thread
//! ([`on_this_thread`]), e.g. to hold a request there while something else
//! runs concurrently.

use std::cell::RefCell;
use std::sync::OnceLock;

/// The environment variable naming the point to die at.
pub const ENV: &str = "DOCKER_RBD_CRASH_AT";

macro_rules! crash_points {
    ($($(#[doc = $doc:literal])* $variant:ident => $name:literal,)*) => {
        /// A point in a multi-step change (see the module doc).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum CrashPoint {
            $($(#[doc = $doc])* $variant,)*
        }

        impl CrashPoint {
            /// Every point, in the order a layer's life reaches them.
            pub const ALL: &'static [CrashPoint] = &[$(CrashPoint::$variant,)*];

            /// The point's name, as [`ENV`] takes it.
            pub fn name(self) -> &'static str {
                match self {
                    $(CrashPoint::$variant => $name,)*
                }
            }
        }
    };
}

crash_points! {
    /// Making the base image: its cluster lock is taken, nothing made.
    BaseLocked => "base-locked",
    /// Making the base image: the image is created and mapped, not yet
    /// formatted.
    BaseMapped => "base-mapped",
    /// Making the base image: formatted and unmapped, not yet snapshotted.
    BaseFormatted => "base-formatted",
    /// `Create`: the record says `Creating`, no image yet.
    CreateRecorded => "create-recorded",
    /// `Create`: the image is cloned, the record still says `Creating`.
    CreateCloned => "create-cloned",
    /// `CreateReadWrite` of a container layer answered: the record says
    /// `Cloning`, the background clone is about to start.
    CloneDeferred => "clone-deferred",
    /// `Create` with `size=`: the image is mapped to resize its
    /// filesystem (or to make one of that size), the record still says
    /// `Creating`.
    ResizeMapped => "resize-mapped",
    /// `Create` with `size=` on xfs: the layer is mounted to grow its
    /// filesystem or set its project quota, the record still says
    /// `Creating`.
    CreateMounted => "create-mounted",
    /// Sealing a parent: its snapshot is taken, its record not yet marked
    /// sealed.
    SealSnapshotted => "seal-snapshotted",
    /// `Get`: the mount record says `Mapping`, nothing mapped yet.
    MapRecorded => "map-recorded",
    /// `Get`: the image is mapped, the mount record does not name the
    /// device yet.
    Mapped => "mapped",
    /// `Get`: the filesystem is mounted, the mount record says `Mounting`.
    Mounted => "mounted",
    /// `Put` (or an idle mount's end): unmounted, still mapped and
    /// recorded.
    Unmounted => "unmounted",
    /// An init layer's image (a shared one, or a container's own): cloned,
    /// its files not yet written.
    InitCloned => "init-cloned",
    /// The `Put` after dockerd's create-time `Get` of a container layer:
    /// what dockerd wrote is spooled and recorded, the overlay still
    /// mounted, the image not written.
    StagedSpooled => "staged-spooled",
    /// `Remove`: the record says `Removing`, its snapshot and image are
    /// still there (the background purge has not run).
    RemoveRecorded => "remove-recorded",
    /// A purge: the image is removed, the record still says `Removing`.
    RemoveImageGone => "remove-image-gone",
}

impl std::fmt::Display for CrashPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The point [`ENV`] names, read once; `None` when unset or unknown (an
/// unknown name is reported on stderr once).
fn armed() -> Option<CrashPoint> {
    static ARMED: OnceLock<Option<CrashPoint>> = OnceLock::new();
    *ARMED.get_or_init(|| {
        let name = std::env::var(ENV).ok()?;
        let point = CrashPoint::ALL.iter().copied().find(|p| p.name() == name);
        if point.is_none() {
            eprintln!("docker-rbd: {ENV}={name} names no crash point; ignored");
        }
        point
    })
}

type Hook = (CrashPoint, Box<dyn FnOnce()>);

thread_local! {
    static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
}

/// Runs `f` once, the next time the calling thread reaches `point` (debug
/// builds only; a later call replaces an unused hook). Other threads are
/// not affected, so tests running side by side do not see each other's
/// hooks.
pub fn on_this_thread(point: CrashPoint, f: impl FnOnce() + 'static) {
    HOOK.with(|h| *h.borrow_mut() = Some((point, Box::new(f))));
}

/// Aborts the process if this is a debug build and [`ENV`] names `point`;
/// first runs this thread's hook for `point` ([`on_this_thread`]), if any.
pub fn reached(point: CrashPoint) {
    if !cfg!(debug_assertions) {
        return;
    }
    let hook = HOOK.with(|h| h.borrow_mut().take_if(|(at, _)| *at == point));
    if let Some((_, f)) = hook {
        f();
    }
    if armed() == Some(point) {
        eprintln!("docker-rbd: crash point {point} reached; aborting as {ENV} asks");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_kebab_case() {
        let mut seen = std::collections::BTreeSet::new();
        for p in CrashPoint::ALL {
            assert!(seen.insert(p.name()), "{p} twice");
            assert!(
                p.name().chars().all(|c| c.is_ascii_lowercase() || c == '-'),
                "{p}"
            );
        }
    }

    #[test]
    fn a_hook_runs_once_on_its_thread_at_its_point() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        on_this_thread(CrashPoint::Mounted, move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        reached(CrashPoint::Unmounted);
        std::thread::spawn(|| reached(CrashPoint::Mounted))
            .join()
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 0, "other point, other thread");
        reached(CrashPoint::Mounted);
        reached(CrashPoint::Mounted);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_unarmed_point_returns() {
        // The test process does not set the variable.
        reached(CrashPoint::CreateRecorded);
    }
}
