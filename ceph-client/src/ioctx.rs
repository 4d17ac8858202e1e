//! I/O contexts: whole-object I/O, omap reads, atomic compound writes,
//! cls advisory locks and notify.

use std::ffi::CString;
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libc::{c_char, c_int, size_t};

use crate::error::{Error, Result, Target, check};
use crate::ffi;
use crate::rados::{Cluster, single_addr};
use crate::util::{cstr, split_nul, until_nul};
use crate::write_op::WriteOp;

/// An I/O context: one pool and one RADOS namespace of a connected cluster.
///
/// Cheap to clone; clones share one librados ioctx. It keeps the cluster
/// connection alive, so it can never outlive `rados_shutdown`. All methods
/// take `&self` and may be called from several threads at once, except that
/// [`IoCtx::last_version`] reports the last operation of *any* thread using
/// this ioctx (or its clones).
#[derive(Clone)]
pub struct IoCtx {
    inner: Arc<IoCtxInner>,
}

struct IoCtxInner {
    ptr: ffi::rados_ioctx_t,
    pool: String,
    namespace: Option<String>,
    // Dropped after `ptr` is destroyed (fields drop after `Drop::drop`).
    cluster: Arc<Cluster>,
}

// SAFETY: a librados ioctx is safe to use from several threads; its only
// mutable state (namespace, full-try flag) is set once in `create` before the
// value is shared and never changed afterwards.
unsafe impl Send for IoCtxInner {}
// SAFETY: as above.
unsafe impl Sync for IoCtxInner {}

impl Drop for IoCtxInner {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `rados_ioctx_create`, is destroyed once,
        // and the cluster handle is still alive (`cluster` drops after this).
        unsafe { ffi::rados_ioctx_destroy(self.ptr) };
    }
}

impl std::fmt::Debug for IoCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoCtx")
            .field("pool", &self.inner.pool)
            .field("namespace", &self.inner.namespace)
            .finish()
    }
}

/// Options for a cls advisory lock request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockFlags {
    /// Re-locking a lock this (client, cookie) already holds renews it
    /// instead of failing with `EEXIST`.
    pub may_renew: bool,
    /// Only renew: fail (`ENOENT`) unless this (client, cookie) holds it.
    pub must_renew: bool,
}

impl LockFlags {
    fn bits(self) -> u8 {
        let mut bits = 0;
        if self.may_renew {
            bits |= ffi::LIBRADOS_LOCK_FLAG_MAY_RENEW;
        }
        if self.must_renew {
            bits |= ffi::LIBRADOS_LOCK_FLAG_MUST_RENEW;
        }
        bits
    }
}

/// One holder of a cls lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locker {
    /// The holder's entity name, e.g. `client.4123`.
    pub client: String,
    /// The cookie it locked with.
    pub cookie: String,
    /// Its address without protocol prefix, e.g. `127.0.0.1:0/3141592`,
    /// as [`crate::Rados::client_addr`] gives it (for blocklisting).
    pub addr: String,
}

/// The state of a cls lock.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lockers {
    /// Whether the lock is held exclusively (false for shared or unheld).
    pub exclusive: bool,
    /// The tag of a shared lock (empty otherwise).
    pub tag: String,
    /// Current holders; empty when nobody holds it or all leases expired.
    pub lockers: Vec<Locker>,
}

/// A omap key/value read: the pairs and whether more follow.
pub type OmapPage = (Vec<(String, Vec<u8>)>, bool);

fn to_timeval(d: Duration) -> libc::timeval {
    libc::timeval {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(d.subsec_micros() as i32),
    }
}

impl IoCtx {
    pub(crate) fn create(
        cluster: Arc<Cluster>,
        pool: &str,
        namespace: Option<&str>,
        full_try: bool,
    ) -> Result<IoCtx> {
        let pool_c = cstr("rados_ioctx_create", "pool name", pool)?;
        let namespace = namespace.filter(|n| !n.is_empty());
        let ns_c = namespace
            .map(|n| cstr("rados_ioctx_set_namespace", "namespace", n))
            .transpose()?;
        let mut ptr: ffi::rados_ioctx_t = ptr::null_mut();
        // SAFETY: connected cluster handle, NUL-terminated pool name, valid
        // out-pointer.
        let ret = unsafe { ffi::rados_ioctx_create(cluster.ptr, pool_c.as_ptr(), &mut ptr) };
        check(
            "rados_ioctx_create",
            || Target::Pool(pool.to_string()),
            ret.into(),
        )?;
        let inner = IoCtxInner {
            ptr,
            pool: pool.to_string(),
            namespace: namespace.map(str::to_string),
            cluster,
        };
        if let Some(ns) = &ns_c {
            // SAFETY: `ptr` is a fresh ioctx not yet shared with any other
            // thread; `ns` is NUL-terminated (librados copies it).
            unsafe { ffi::rados_ioctx_set_namespace(inner.ptr, ns.as_ptr()) };
        }
        if full_try {
            // SAFETY: as above, a fresh ioctx not yet shared.
            unsafe { ffi::rados_set_pool_full_try(inner.ptr) };
        }
        Ok(IoCtx {
            inner: Arc::new(inner),
        })
    }

    pub(crate) fn ptr(&self) -> ffi::rados_ioctx_t {
        self.inner.ptr
    }

    pub(crate) fn cluster(&self) -> &Arc<Cluster> {
        &self.inner.cluster
    }

    /// The cluster connection this ioctx belongs to (shared, not a new
    /// connection), e.g. for [`crate::Rados::instance_id`] or blocklisting.
    pub fn rados(&self) -> crate::Rados {
        crate::Rados::from_cluster(self.inner.cluster.clone())
    }

    /// The pool name.
    pub fn pool_name(&self) -> &str {
        &self.inner.pool
    }

    /// The RADOS namespace, `None` for the default one.
    pub fn namespace(&self) -> Option<&str> {
        self.inner.namespace.as_deref()
    }

    /// The object version of the last object read or written through this
    /// ioctx (see the type's note on threads).
    pub fn last_version(&self) -> u64 {
        // SAFETY: valid ioctx.
        unsafe { ffi::rados_get_last_version(self.inner.ptr) }
    }

    fn oid(op: &'static str, oid: &str) -> Result<CString> {
        cstr(op, "object name", oid)
    }

    /// Replaces the object's data with `data`, creating it if needed.
    pub fn write_full(&self, oid: &str, data: &[u8]) -> Result<()> {
        let o = Self::oid("rados_write_full", oid)?;
        // SAFETY: valid ioctx, NUL-terminated name, `data` readable for
        // `data.len()` bytes (librados copies it).
        let ret = unsafe {
            ffi::rados_write_full(self.inner.ptr, o.as_ptr(), data.as_ptr().cast(), data.len())
        };
        check(
            "rados_write_full",
            || Target::Object(oid.to_string()),
            ret.into(),
        )?;
        Ok(())
    }

    /// The object's whole data. `ENOENT` if it does not exist.
    pub fn read(&self, oid: &str) -> Result<Vec<u8>> {
        // Reads are capped so the returned `int` cannot overflow; the OSD
        // rejects objects this large anyway (osd_max_object_size).
        const MAX_CHUNK: usize = 64 << 20;
        let (size, _) = self.stat(oid)?;
        let o = Self::oid("rados_read", oid)?;
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let mut out: Vec<u8> = Vec::new();
        loop {
            // Ask for a little more than the size `stat` saw: a short read
            // then proves we reached the end, in one round trip.
            let want = size
                .saturating_sub(out.len())
                .saturating_add(4096)
                .min(MAX_CHUNK);
            let start = out.len();
            out.resize(start + want, 0);
            // SAFETY: `out[start..]` is `want` writable bytes; valid ioctx
            // and NUL-terminated name.
            let ret = unsafe {
                ffi::rados_read(
                    self.inner.ptr,
                    o.as_ptr(),
                    out[start..].as_mut_ptr().cast(),
                    want,
                    start as u64,
                )
            };
            let n = check("rados_read", || Target::Object(oid.to_string()), ret.into())? as usize;
            out.truncate(start + n.min(want));
            if n < want {
                return Ok(out);
            }
        }
    }

    /// The object's size and modification time. `ENOENT` if it does not
    /// exist.
    pub fn stat(&self, oid: &str) -> Result<(u64, SystemTime)> {
        let o = Self::oid("rados_stat", oid)?;
        let mut size = 0u64;
        let mut mtime: libc::time_t = 0;
        // SAFETY: valid ioctx, NUL-terminated name, valid out-pointers.
        let ret = unsafe { ffi::rados_stat(self.inner.ptr, o.as_ptr(), &mut size, &mut mtime) };
        check("rados_stat", || Target::Object(oid.to_string()), ret.into())?;
        let mtime = if mtime >= 0 {
            UNIX_EPOCH.checked_add(Duration::from_secs(mtime.unsigned_abs()))
        } else {
            UNIX_EPOCH.checked_sub(Duration::from_secs(mtime.unsigned_abs()))
        }
        .unwrap_or(UNIX_EPOCH);
        Ok((size, mtime))
    }

    /// Deletes the object. `ENOENT` if it does not exist.
    pub fn remove(&self, oid: &str) -> Result<()> {
        let o = Self::oid("rados_remove", oid)?;
        // SAFETY: valid ioctx and NUL-terminated name.
        let ret = unsafe { ffi::rados_remove(self.inner.ptr, o.as_ptr()) };
        check(
            "rados_remove",
            || Target::Object(oid.to_string()),
            ret.into(),
        )?;
        Ok(())
    }

    /// The names of every object in this context's namespace, in no
    /// particular order (a listing walks every placement group: meant for
    /// tools and tests, not hot paths).
    pub fn list_objects(&self) -> Result<Vec<String>> {
        const OP: &str = "rados_nobjects_list";
        let mut ctx: ffi::rados_list_ctx_t = ptr::null_mut();
        // SAFETY: valid ioctx and out-pointer.
        let ret = unsafe { ffi::rados_nobjects_list_open(self.inner.ptr, &mut ctx) };
        check(
            OP,
            || Target::Pool(self.pool_name().to_string()),
            ret.into(),
        )?;
        let mut names = Vec::new();
        let result = loop {
            let mut entry: *const libc::c_char = ptr::null();
            // SAFETY: `ctx` is open; the out-pointers are valid; key and
            // namespace may be null.
            let ret = unsafe {
                ffi::rados_nobjects_list_next(ctx, &mut entry, ptr::null_mut(), ptr::null_mut())
            };
            if ret == -libc::ENOENT {
                break Ok(());
            }
            if let Err(e) = check(
                OP,
                || Target::Pool(self.pool_name().to_string()),
                ret.into(),
            ) {
                break Err(e);
            }
            if !entry.is_null() {
                // SAFETY: librados returns a NUL-terminated string valid
                // until the next call on `ctx`; it is copied at once.
                let name = unsafe { std::ffi::CStr::from_ptr(entry) };
                names.push(name.to_string_lossy().into_owned());
            }
        };
        // SAFETY: `ctx` was opened above and is closed once.
        unsafe { ffi::rados_nobjects_list_close(ctx) };
        result.map(|()| names)
    }

    /// Applies every step of `op` to `oid` atomically: all of them or none.
    /// A failed [`WriteOp::omap_cmp_eq`] gives `ECANCELED`, a failed
    /// exclusive create `EEXIST`, [`WriteOp::assert_version`] `ERANGE` (object
    /// newer) or `EOVERFLOW` (older).
    pub fn operate(&self, oid: &str, op: WriteOp) -> Result<()> {
        op.operate(self, oid)
    }

    /// Up to `max` omap pairs of `oid` with keys after `start_after` (from
    /// the first key when `None`) and starting with `prefix` (all when
    /// `None`), in key order, and whether more follow. `ENOENT` if the object
    /// does not exist.
    pub fn omap_get_vals(
        &self,
        oid: &str,
        start_after: Option<&str>,
        prefix: Option<&str>,
        max: u64,
    ) -> Result<OmapPage> {
        const OP: &str = "rados_read_op_omap_get_vals2";
        let o = Self::oid(OP, oid)?;
        let start = cstr(OP, "start_after", start_after.unwrap_or(""))?;
        let filter = cstr(OP, "prefix", prefix.unwrap_or(""))?;
        let read_op = ReadOp::new(OP, oid)?;
        let mut iter = OmapIter(ptr::null_mut());
        let mut more: libc::c_uchar = 0;
        let mut prval: c_int = 0;
        // SAFETY: valid read op; strings NUL-terminated (copied); `iter`,
        // `more` and `prval` stay at these addresses until after
        // `rados_read_op_operate` below returns, which is when librados
        // writes them.
        unsafe {
            ffi::rados_read_op_omap_get_vals2(
                read_op.0,
                start.as_ptr(),
                filter.as_ptr(),
                max,
                &mut iter.0,
                &mut more,
                &mut prval,
            )
        };
        // SAFETY: valid read op, ioctx and object name; the out-pointers
        // above are still live.
        let ret = unsafe { ffi::rados_read_op_operate(read_op.0, self.inner.ptr, o.as_ptr(), 0) };
        check(OP, || Target::Object(oid.to_string()), ret.into())?;
        check(OP, || Target::Object(oid.to_string()), prval.into())?;
        let pairs = iter.collect(OP, oid)?;
        Ok((pairs, more != 0))
    }

    /// All omap pairs of `oid`, in key order (pages through
    /// [`IoCtx::omap_get_vals`]; not a consistent snapshot when the object
    /// changes between pages).
    pub fn omap_get_all(&self, oid: &str) -> Result<Vec<(String, Vec<u8>)>> {
        const PAGE: u64 = 512;
        let mut all: Vec<(String, Vec<u8>)> = Vec::new();
        loop {
            let after = all.last().map(|(k, _)| k.clone());
            let (page, more) = self.omap_get_vals(oid, after.as_deref(), None, PAGE)?;
            let empty = page.is_empty();
            all.extend(page);
            if !more || empty {
                return Ok(all);
            }
        }
    }

    /// The omap pairs of `oid` for those of `keys` that exist, in key order.
    /// `ENOENT` if the object does not exist.
    pub fn omap_get_vals_by_keys<K: AsRef<str>>(
        &self,
        oid: &str,
        keys: &[K],
    ) -> Result<Vec<(String, Vec<u8>)>> {
        const OP: &str = "rados_read_op_omap_get_vals_by_keys2";
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let o = Self::oid(OP, oid)?;
        let ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ref().as_ptr().cast()).collect();
        let lens: Vec<size_t> = keys.iter().map(|k| k.as_ref().len()).collect();
        let read_op = ReadOp::new(OP, oid)?;
        let mut iter = OmapIter(ptr::null_mut());
        let mut prval: c_int = 0;
        // SAFETY: `ptrs[i]` points to `lens[i]` readable bytes (the keys,
        // copied by librados, explicit lengths so no NUL is needed); `iter`
        // and `prval` live until after the operate call below.
        unsafe {
            ffi::rados_read_op_omap_get_vals_by_keys2(
                read_op.0,
                ptrs.as_ptr(),
                ptrs.len(),
                lens.as_ptr(),
                &mut iter.0,
                &mut prval,
            )
        };
        // SAFETY: valid read op, ioctx and object name.
        let ret = unsafe { ffi::rados_read_op_operate(read_op.0, self.inner.ptr, o.as_ptr(), 0) };
        check(OP, || Target::Object(oid.to_string()), ret.into())?;
        check(OP, || Target::Object(oid.to_string()), prval.into())?;
        iter.collect(OP, oid)
    }

    /// Takes the exclusive cls lock `name` on `oid` (creating the object if
    /// needed) as (this client, `cookie`). `duration`: lease length, `None`
    /// (or zero) for no expiry. `EBUSY` when another (client, cookie) holds
    /// it; `EEXIST` when this one already does and `flags.may_renew` is not
    /// set; `ENOENT` with `flags.must_renew` when it is not held.
    pub fn lock_exclusive(
        &self,
        oid: &str,
        name: &str,
        cookie: &str,
        desc: &str,
        duration: Option<Duration>,
        flags: LockFlags,
    ) -> Result<()> {
        const OP: &str = "rados_lock_exclusive";
        let (o, n, c, d) = (
            Self::oid(OP, oid)?,
            cstr(OP, "lock name", name)?,
            cstr(OP, "cookie", cookie)?,
            cstr(OP, "description", desc)?,
        );
        let mut tv = duration.map(to_timeval);
        let tv_ptr = tv
            .as_mut()
            .map_or(ptr::null_mut(), |t| t as *mut libc::timeval);
        // SAFETY: valid ioctx; all strings NUL-terminated; `tv_ptr` is null
        // or points to a live timeval.
        let ret = unsafe {
            ffi::rados_lock_exclusive(
                self.inner.ptr,
                o.as_ptr(),
                n.as_ptr(),
                c.as_ptr(),
                d.as_ptr(),
                tv_ptr,
                flags.bits(),
            )
        };
        check(OP, || Target::Object(oid.to_string()), ret.into())?;
        Ok(())
    }

    /// Takes the shared cls lock `name` on `oid` with `tag` (all shared
    /// holders must use the same tag). Errors as for
    /// [`IoCtx::lock_exclusive`].
    #[allow(clippy::too_many_arguments)]
    pub fn lock_shared(
        &self,
        oid: &str,
        name: &str,
        cookie: &str,
        tag: &str,
        desc: &str,
        duration: Option<Duration>,
        flags: LockFlags,
    ) -> Result<()> {
        const OP: &str = "rados_lock_shared";
        let o = Self::oid(OP, oid)?;
        let (n, c, t, d) = (
            cstr(OP, "lock name", name)?,
            cstr(OP, "cookie", cookie)?,
            cstr(OP, "tag", tag)?,
            cstr(OP, "description", desc)?,
        );
        let mut tv = duration.map(to_timeval);
        let tv_ptr = tv
            .as_mut()
            .map_or(ptr::null_mut(), |t| t as *mut libc::timeval);
        // SAFETY: valid ioctx; all strings NUL-terminated; `tv_ptr` is null
        // or points to a live timeval.
        let ret = unsafe {
            ffi::rados_lock_shared(
                self.inner.ptr,
                o.as_ptr(),
                n.as_ptr(),
                c.as_ptr(),
                t.as_ptr(),
                d.as_ptr(),
                tv_ptr,
                flags.bits(),
            )
        };
        check(OP, || Target::Object(oid.to_string()), ret.into())?;
        Ok(())
    }

    /// Releases the cls lock `name` held by (this client, `cookie`).
    /// `ENOENT` if it is not held by them.
    pub fn unlock(&self, oid: &str, name: &str, cookie: &str) -> Result<()> {
        const OP: &str = "rados_unlock";
        let (o, n, c) = (
            Self::oid(OP, oid)?,
            cstr(OP, "lock name", name)?,
            cstr(OP, "cookie", cookie)?,
        );
        // SAFETY: valid ioctx; strings NUL-terminated.
        let ret = unsafe { ffi::rados_unlock(self.inner.ptr, o.as_ptr(), n.as_ptr(), c.as_ptr()) };
        check(OP, || Target::Object(oid.to_string()), ret.into())?;
        Ok(())
    }

    /// Removes another client's hold on the cls lock `name` (`client` as
    /// [`Locker::client`] reports it). `ENOENT` if that (client, cookie) does
    /// not hold it. Fence the client first ([`crate::Rados::blocklist_add`])
    /// if it may still be alive.
    pub fn break_lock(&self, oid: &str, name: &str, client: &str, cookie: &str) -> Result<()> {
        const OP: &str = "rados_break_lock";
        let o = Self::oid(OP, oid)?;
        let (n, cl, c) = (
            cstr(OP, "lock name", name)?,
            cstr(OP, "client", client)?,
            cstr(OP, "cookie", cookie)?,
        );
        // SAFETY: valid ioctx; strings NUL-terminated.
        let ret = unsafe {
            ffi::rados_break_lock(
                self.inner.ptr,
                o.as_ptr(),
                n.as_ptr(),
                cl.as_ptr(),
                c.as_ptr(),
            )
        };
        check(OP, || Target::Object(oid.to_string()), ret.into())?;
        Ok(())
    }

    /// Who holds the cls lock `name` on `oid`. `ENOENT` if the object does
    /// not exist.
    pub fn list_lockers(&self, oid: &str, name: &str) -> Result<Lockers> {
        const OP: &str = "rados_list_lockers";
        let (o, n) = (Self::oid(OP, oid)?, cstr(OP, "lock name", name)?);
        let mut caps = [256usize; 4];
        // A lock can change between the sizing and the filling call; retry a
        // few times, growing to what librados asked for.
        for _ in 0..16 {
            let mut bufs: [Vec<u8>; 4] = caps.map(|c| vec![0u8; c]);
            let mut lens = caps;
            let mut exclusive: c_int = 0;
            let [tag, clients, cookies, addrs] = &mut bufs;
            let [tag_len, clients_len, cookies_len, addrs_len] = &mut lens;
            // SAFETY: each buffer is writable for the length passed next to
            // it; strings NUL-terminated; out-pointers valid.
            let ret = unsafe {
                ffi::rados_list_lockers(
                    self.inner.ptr,
                    o.as_ptr(),
                    n.as_ptr(),
                    &mut exclusive,
                    tag.as_mut_ptr().cast(),
                    tag_len,
                    clients.as_mut_ptr().cast(),
                    clients_len,
                    cookies.as_mut_ptr().cast(),
                    cookies_len,
                    addrs.as_mut_ptr().cast(),
                    addrs_len,
                )
            };
            if ret == -(libc::ERANGE as isize) {
                for (cap, len) in caps.iter_mut().zip(lens) {
                    *cap = (*cap).max(len).max(*cap * 2);
                }
                continue;
            }
            let count = check(OP, || Target::Object(oid.to_string()), ret as i64)? as usize;
            let used = |i: usize| &bufs[i][..lens[i].min(caps[i])];
            let clients = split_nul(used(1), count);
            let cookies = split_nul(used(2), count);
            let addrs = split_nul(used(3), count);
            let lockers = (0..count)
                .map(|i| Locker {
                    client: clients.get(i).cloned().unwrap_or_default(),
                    cookie: cookies.get(i).cloned().unwrap_or_default(),
                    addr: addrs.get(i).map(|a| single_addr(a)).unwrap_or_default(),
                })
                .collect();
            return Ok(Lockers {
                exclusive: exclusive != 0,
                tag: until_nul(used(0)),
                lockers,
            });
        }
        Err(Error::ceph(
            OP,
            Target::Object(oid.to_string()),
            -(libc::ERANGE as i64),
        ))
    }

    /// Sends `payload` to every watcher of `oid` and waits until all have
    /// acknowledged, at most `timeout`. `ETIMEDOUT` if a watcher did not
    /// acknowledge in time; `ENOENT` if the object does not exist.
    pub fn notify(&self, oid: &str, payload: &[u8], timeout: Duration) -> Result<()> {
        const OP: &str = "rados_notify2";
        let o = Self::oid(OP, oid)?;
        let len = c_int::try_from(payload.len()).map_err(|_| Error::InvalidArgument {
            op: OP,
            reason: format!("payload of {} bytes is too large", payload.len()),
        })?;
        let timeout_ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut reply: *mut c_char = ptr::null_mut();
        let mut reply_len: size_t = 0;
        // SAFETY: valid ioctx and name; `payload` readable for `len` bytes;
        // valid out-pointers.
        let ret = unsafe {
            ffi::rados_notify2(
                self.inner.ptr,
                o.as_ptr(),
                payload.as_ptr().cast(),
                len,
                timeout_ms,
                &mut reply,
                &mut reply_len,
            )
        };
        if !reply.is_null() {
            // SAFETY: the reply buffer is allocated by librados (also on
            // error) and freed exactly once.
            unsafe { ffi::rados_buffer_free(reply) };
        }
        check(OP, || Target::Object(oid.to_string()), ret.into())?;
        Ok(())
    }
}

/// A `rados_read_op_t`, released on drop.
struct ReadOp(ffi::rados_read_op_t);

impl ReadOp {
    fn new(op: &'static str, oid: &str) -> Result<ReadOp> {
        // SAFETY: no preconditions; null means allocation failure.
        let p = unsafe { ffi::rados_create_read_op() };
        if p.is_null() {
            return Err(Error::ceph(
                op,
                Target::Object(oid.to_string()),
                -(libc::ENOMEM as i64),
            ));
        }
        Ok(ReadOp(p))
    }
}

impl Drop for ReadOp {
    fn drop(&mut self) {
        // SAFETY: created by `rados_create_read_op`, released once, after
        // any operate call on it has returned.
        unsafe { ffi::rados_release_read_op(self.0) };
    }
}

/// A `rados_omap_iter_t`, ended on drop. Declared after the read op that
/// fills it, so dropped before it.
struct OmapIter(ffi::rados_omap_iter_t);

impl OmapIter {
    fn collect(&self, op: &'static str, oid: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        if self.0.is_null() {
            return Ok(out);
        }
        loop {
            let (mut k, mut v): (*mut c_char, *mut c_char) = (ptr::null_mut(), ptr::null_mut());
            let (mut klen, mut vlen): (size_t, size_t) = (0, 0);
            // SAFETY: a valid iterator filled by a completed read op; valid
            // out-pointers.
            let ret =
                unsafe { ffi::rados_omap_get_next2(self.0, &mut k, &mut v, &mut klen, &mut vlen) };
            check(op, || Target::Object(oid.to_string()), ret.into())?;
            if k.is_null() {
                return Ok(out);
            }
            // SAFETY: `k` points to `klen` bytes valid until the iterator
            // ends; copied here.
            let key = unsafe { std::slice::from_raw_parts(k.cast::<u8>(), klen) }.to_vec();
            let val = if v.is_null() || vlen == 0 {
                Vec::new()
            } else {
                // SAFETY: `v` points to `vlen` bytes valid until the
                // iterator ends; copied here.
                unsafe { std::slice::from_raw_parts(v.cast::<u8>(), vlen) }.to_vec()
            };
            let key = String::from_utf8(key).map_err(|e| Error::BadData {
                op,
                target: Target::Object(oid.to_string()),
                reason: format!(
                    "omap key is not UTF-8: {:?}",
                    String::from_utf8_lossy(e.as_bytes())
                ),
            })?;
            out.push((key, val));
        }
    }
}

impl Drop for OmapIter {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: an iterator librados allocated when the omap read was
            // added to the op; ended exactly once.
            unsafe { ffi::rados_omap_get_end(self.0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_flag_bits() {
        assert_eq!(LockFlags::default().bits(), 0);
        assert_eq!(
            LockFlags {
                may_renew: true,
                must_renew: false
            }
            .bits(),
            1
        );
        assert_eq!(
            LockFlags {
                may_renew: false,
                must_renew: true
            }
            .bits(),
            2
        );
    }

    #[test]
    fn timeval_conversion() {
        let tv = to_timeval(Duration::from_millis(2500));
        assert_eq!((tv.tv_sec, tv.tv_usec), (2, 500_000));
    }
}
