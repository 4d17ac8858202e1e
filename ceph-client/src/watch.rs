//! Watches on RADOS objects: callbacks for notifies, acknowledged
//! automatically, torn down safely on drop.

use std::ffi::CString;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

use libc::{c_int, c_void, size_t};

use crate::error::{Result, Target, check};
use crate::ffi;
use crate::ioctx::IoCtx;
use crate::rados::Rados;
use crate::util::cstr;

/// Called for each notify on a watched object with `(notify_id,
/// notifier_id, payload)`. Runs on a librados thread; the notify is
/// acknowledged when it returns, so a notifier's [`IoCtx::notify`] returns
/// only after every watcher's callback has run. Keep it short: it delays
/// other callbacks of the same cluster handle.
pub type WatchCallback = Box<dyn Fn(u64, u64, &[u8]) + Send + Sync>;

/// State shared with librados's callback threads. Boxed, so its address is
/// stable; freed only after `rados_unwatch2` + `rados_watch_flush`.
struct WatchState {
    /// Raw ioctx for `rados_notify_ack`; kept valid by `Watch::ioctx`.
    io: ffi::rados_ioctx_t,
    oid: CString,
    callback: WatchCallback,
    /// Last error librados reported for the watch (0: none).
    last_error: AtomicI32,
    notifies: AtomicU64,
}

/// A registered watch. Dropping it unregisters the watch and waits for
/// callbacks in flight to finish. Do not drop a `Watch` from inside a watch
/// callback of the same cluster (that wait would never end).
pub struct Watch {
    // Field order matters: `state` is freed in `Drop::drop`, before `ioctx`
    // (which keeps the ioctx and cluster alive) is released.
    state: *mut WatchState,
    cookie: u64,
    oid: String,
    ioctx: IoCtx,
}

// SAFETY: the state is only read through shared references (the callback is
// `Send + Sync`, counters are atomics), librados allows its ioctx to be used
// from any thread, and the raw pointer is only freed in `Drop`.
unsafe impl Send for Watch {}
// SAFETY: as above; `&Watch` methods only call thread-safe librados functions
// and read atomics.
unsafe impl Sync for Watch {}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("oid", &self.oid)
            .field("cookie", &self.cookie)
            .finish()
    }
}

unsafe extern "C" fn on_notify(
    arg: *mut c_void,
    notify_id: u64,
    handle: u64,
    notifier_id: u64,
    data: *mut c_void,
    data_len: size_t,
) {
    // SAFETY: `arg` is the `WatchState` registered with `rados_watch2`; it is
    // freed only after `rados_unwatch2` and `rados_watch_flush` guarantee no
    // callback is running or queued.
    let state = unsafe { &*arg.cast::<WatchState>() };
    let payload: &[u8] = if data.is_null() || data_len == 0 {
        &[]
    } else {
        // SAFETY: librados passes `data_len` readable bytes, valid for the
        // duration of the callback.
        unsafe { std::slice::from_raw_parts(data.cast::<u8>(), data_len) }
    };
    state.notifies.fetch_add(1, Ordering::Relaxed);
    // A panic must not unwind into C; report it and still acknowledge.
    if catch_unwind(AssertUnwindSafe(|| {
        (state.callback)(notify_id, notifier_id, payload)
    }))
    .is_err()
    {
        tracing::error!(oid = %state.oid.to_string_lossy(), notify_id, "watch callback panicked");
    }
    // SAFETY: the ioctx is alive while the watch is (see `Watch::ioctx`);
    // the object name is NUL-terminated; no reply payload.
    let ret = unsafe {
        ffi::rados_notify_ack(
            state.io,
            state.oid.as_ptr(),
            notify_id,
            handle,
            ptr::null(),
            0,
        )
    };
    if ret < 0 {
        tracing::warn!(oid = %state.oid.to_string_lossy(), notify_id, errno = -ret, "rados_notify_ack failed");
    }
}

unsafe extern "C" fn on_error(arg: *mut c_void, cookie: u64, err: c_int) {
    // SAFETY: as in `on_notify`.
    let state = unsafe { &*arg.cast::<WatchState>() };
    let errno = err.saturating_abs();
    state.last_error.store(errno, Ordering::Relaxed);
    tracing::warn!(
        oid = %state.oid.to_string_lossy(),
        cookie,
        errno,
        "watch error: notifies may have been missed; re-read the object and re-watch"
    );
}

impl IoCtx {
    /// Watches `oid` (which must exist: `ENOENT` otherwise): `callback` runs
    /// for every notify until the returned [`Watch`] is dropped.
    pub fn watch(&self, oid: &str, callback: WatchCallback) -> Result<Watch> {
        const OP: &str = "rados_watch2";
        let o = cstr(OP, "object name", oid)?;
        let state = Box::into_raw(Box::new(WatchState {
            io: self.ptr(),
            oid: o,
            callback,
            last_error: AtomicI32::new(0),
            notifies: AtomicU64::new(0),
        }));
        let mut cookie = 0u64;
        // SAFETY: valid ioctx; the name lives in `*state`, which stays
        // allocated until the watch is torn down; both callbacks have the
        // exact C signatures; `cookie` is a valid out-pointer.
        let ret = unsafe {
            ffi::rados_watch2(
                self.ptr(),
                (*state).oid.as_ptr(),
                &mut cookie,
                Some(on_notify),
                Some(on_error),
                state.cast(),
            )
        };
        if ret < 0 {
            // SAFETY: registration failed, so librados holds no reference to
            // `state`; reclaim it.
            drop(unsafe { Box::from_raw(state) });
            check(OP, || Target::Object(oid.to_string()), ret.into())?;
        }
        Ok(Watch {
            state,
            cookie,
            oid: oid.to_string(),
            ioctx: self.clone(),
        })
    }
}

impl Watch {
    /// The watched object.
    pub fn oid(&self) -> &str {
        &self.oid
    }

    /// librados's handle of this watch.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// How many notifies reached the callback so far.
    pub fn notifies(&self) -> u64 {
        self.state_ref().notifies.load(Ordering::Relaxed)
    }

    /// The errno of the last watch error librados reported (e.g.
    /// `ENOTCONN` after a disconnect), if any. After an error notifies may
    /// have been missed: re-read the object; if [`Watch::check`] fails too,
    /// drop this watch and create a new one.
    pub fn last_error(&self) -> Option<i32> {
        match self.state_ref().last_error.load(Ordering::Relaxed) {
            0 => None,
            e => Some(e),
        }
    }

    /// Whether the watch is still registered with the OSD: the time since
    /// it was last confirmed, or the error that broke it.
    pub fn check(&self) -> Result<Duration> {
        // SAFETY: valid ioctx and a cookie from `rados_watch2`.
        let ret = unsafe { ffi::rados_watch_check(self.ioctx.ptr(), self.cookie) };
        let ms = check(
            "rados_watch_check",
            || Target::Object(self.oid.clone()),
            ret.into(),
        )?;
        Ok(Duration::from_millis(ms as u64))
    }

    fn state_ref(&self) -> &WatchState {
        // SAFETY: `state` is a live allocation until `Drop`.
        unsafe { &*self.state }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // SAFETY: valid ioctx and cookie. librados cancels the watch locally
        // even when telling the OSD fails, so no new callback starts after.
        let ret = unsafe { ffi::rados_unwatch2(self.ioctx.ptr(), self.cookie) };
        if ret < 0 {
            tracing::warn!(oid = %self.oid, errno = -ret, "rados_unwatch2 failed");
        }
        // Wait for callbacks already queued or running.
        let flushed = Rados::watch_flush(self.ioctx.cluster());
        if flushed < 0 {
            // Cannot prove no callback still uses the state: leak it rather
            // than free memory a librados thread may read.
            tracing::error!(oid = %self.oid, errno = -flushed, "rados_watch_flush failed; leaking watch state");
            return;
        }
        // SAFETY: no callback can run any more (unwatched and flushed), and
        // this is the only owner of the allocation.
        drop(unsafe { Box::from_raw(self.state) });
    }
}
