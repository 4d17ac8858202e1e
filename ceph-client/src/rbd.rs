//! librbd: image lifecycle (create, clone v2, list, remove), RBD
//! namespaces, and open images (I/O, snapshots, parents and children,
//! flatten, the managed exclusive lock, per-image metadata, diffs).
//!
//! Images live in the pool and RADOS namespace of the [`IoCtx`] passed in.
//! librbd creates images only in the default namespace or in one created
//! with [`namespace_create`] (`ENOENT` otherwise).

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::ptr;
use std::sync::Mutex;

use libc::{c_char, c_int, c_void, size_t};

use crate::error::{Error, Result, Target, check};
use crate::ffi;
use crate::ioctx::IoCtx;
use crate::util::{cstr, from_c, opt_cstr, opt_ptr, until_nul};

pub use crate::ffi::{
    RBD_FEATURE_DATA_POOL, RBD_FEATURE_DEEP_FLATTEN, RBD_FEATURE_DIRTY_CACHE,
    RBD_FEATURE_EXCLUSIVE_LOCK, RBD_FEATURE_FAST_DIFF, RBD_FEATURE_JOURNALING,
    RBD_FEATURE_LAYERING, RBD_FEATURE_MIGRATING, RBD_FEATURE_NON_PRIMARY, RBD_FEATURE_OBJECT_MAP,
    RBD_FEATURE_OPERATIONS, RBD_FEATURE_STRIPINGV2, RBD_FEATURES_DEFAULT,
};

/// The largest single `rbd_read`/`rbd_write` issued: librbd reports the
/// byte count in an `int` internally.
const MAX_IO: usize = 1 << 30;

/// Options for creating or cloning an image; `None` takes the cluster's
/// default (`rbd_default_features`, `rbd_default_order`, or for a clone the
/// parent's features and order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageOptions {
    /// Feature bits (`RBD_FEATURE_*`).
    pub features: Option<u64>,
    /// Object size as a power of two (12..=25; 22 = 4 MiB).
    pub order: Option<u8>,
}

/// An image in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The image id (stable across renames).
    pub id: String,
    /// The image name.
    pub name: String,
}

/// The namespace a snapshot lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapNamespace {
    /// A snapshot a user created.
    User,
    /// Part of a group snapshot.
    Group,
    /// Removed while clone-v2 children still used it; deleted by librbd
    /// when the last child goes away. Its name is a UUID.
    Trash,
    /// Taken by rbd-mirror.
    Mirror,
    /// A namespace this crate does not know (the raw value).
    Other(i32),
}

impl SnapNamespace {
    fn from_raw(t: c_int) -> SnapNamespace {
        match t {
            ffi::RBD_SNAP_NAMESPACE_TYPE_USER => SnapNamespace::User,
            ffi::RBD_SNAP_NAMESPACE_TYPE_GROUP => SnapNamespace::Group,
            ffi::RBD_SNAP_NAMESPACE_TYPE_TRASH => SnapNamespace::Trash,
            ffi::RBD_SNAP_NAMESPACE_TYPE_MIRROR => SnapNamespace::Mirror,
            other => SnapNamespace::Other(other),
        }
    }
}

/// A snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    /// Snapshot id.
    pub id: u64,
    /// Name (a UUID for [`SnapNamespace::Trash`] snapshots).
    pub name: String,
    /// Image size when the snapshot was taken.
    pub size: u64,
    /// Which namespace it is in.
    pub namespace: SnapNamespace,
}

/// The parent of a clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentSpec {
    /// Pool id of the parent.
    pub pool_id: i64,
    /// Pool name of the parent.
    pub pool_name: String,
    /// RADOS namespace of the parent ("" for the default one).
    pub pool_namespace: String,
    /// Parent image name.
    pub image_name: String,
    /// Parent image id.
    pub image_id: String,
    /// Whether the parent image is in the RBD trash.
    pub trash: bool,
    /// Parent snapshot id.
    pub snap_id: u64,
    /// Parent snapshot name (a UUID once the snapshot moved to the trash
    /// namespace).
    pub snap_name: String,
    /// Namespace of the parent snapshot.
    pub snap_namespace: SnapNamespace,
}

/// A clone of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildSpec {
    /// Pool id of the child.
    pub pool_id: i64,
    /// Pool name of the child.
    pub pool_name: String,
    /// RADOS namespace of the child ("" for the default one).
    pub pool_namespace: String,
    /// Child image name.
    pub image_name: String,
    /// Child image id.
    pub image_id: String,
    /// Whether the child is in the RBD trash.
    pub trash: bool,
}

/// librbd's version (major, minor, extra); 1.16.x on Pacific.
pub fn version() -> (i32, i32, i32) {
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: three valid out-pointers.
    unsafe { ffi::rbd_version(&mut a, &mut b, &mut c) };
    (a, b, c)
}

/// `rbd_image_options_t`, destroyed on drop.
struct Opts(ffi::rbd_image_options_t);

impl Opts {
    fn new(op: &'static str, target: &dyn Fn() -> Target, opts: &ImageOptions) -> Result<Opts> {
        let mut p: ffi::rbd_image_options_t = ptr::null_mut();
        // SAFETY: valid out-pointer.
        unsafe { ffi::rbd_image_options_create(&mut p) };
        if p.is_null() {
            return Err(Error::ceph(op, target(), -(libc::ENOMEM as i64)));
        }
        let o = Opts(p);
        if let Some(f) = opts.features {
            o.set(op, target, ffi::RBD_IMAGE_OPTION_FEATURES, f)?;
        }
        if let Some(order) = opts.order {
            o.set(op, target, ffi::RBD_IMAGE_OPTION_ORDER, u64::from(order))?;
        }
        Ok(o)
    }

    fn set(
        &self,
        op: &'static str,
        target: &dyn Fn() -> Target,
        key: c_int,
        value: u64,
    ) -> Result<()> {
        // SAFETY: live options handle.
        let ret = unsafe { ffi::rbd_image_options_set_uint64(self.0, key, value) };
        check(op, target, ret.into())?;
        Ok(())
    }
}

impl Drop for Opts {
    fn drop(&mut self) {
        // SAFETY: created by `rbd_image_options_create`, destroyed once.
        unsafe { ffi::rbd_image_options_destroy(self.0) };
    }
}

/// Creates a format-2 image of `size` bytes. `EEXIST` if the name is taken.
pub fn create(ioctx: &IoCtx, name: &str, size: u64, opts: &ImageOptions) -> Result<()> {
    const OP: &str = "rbd_create4";
    let target = || Target::Image(name.to_string());
    let n = cstr(OP, "image name", name)?;
    let o = Opts::new(OP, &target, opts)?;
    o.set(OP, &target, ffi::RBD_IMAGE_OPTION_FORMAT, 2)?;
    // SAFETY: valid ioctx, NUL-terminated name, live options handle.
    let ret = unsafe { ffi::rbd_create4(ioctx.ptr(), n.as_ptr(), size, o.0) };
    check(OP, target, ret.into())?;
    Ok(())
}

/// Clones `parent_name@parent_snap` as `child_name`, always as a clone v2
/// (no snapshot protection needed; the snapshot may later be removed while
/// the child exists). `ENOENT` if the parent or snapshot is missing,
/// `EEXIST` if the child name is taken.
pub fn clone(
    parent_ioctx: &IoCtx,
    parent_name: &str,
    parent_snap: &str,
    child_ioctx: &IoCtx,
    child_name: &str,
    opts: &ImageOptions,
) -> Result<()> {
    const OP: &str = "rbd_clone3";
    let target = || Target::Image(child_name.to_string());
    let p = cstr(OP, "parent image name", parent_name)?;
    let s = cstr(OP, "parent snapshot name", parent_snap)?;
    let c = cstr(OP, "child image name", child_name)?;
    let o = Opts::new(OP, &target, opts)?;
    // A fresh Pacific cluster's "auto" clone format means v1, which needs a
    // protected snapshot; always ask for v2.
    o.set(OP, &target, ffi::RBD_IMAGE_OPTION_CLONE_FORMAT, 2)?;
    // SAFETY: valid ioctxs, NUL-terminated names, live options handle.
    let ret = unsafe {
        ffi::rbd_clone3(
            parent_ioctx.ptr(),
            p.as_ptr(),
            s.as_ptr(),
            child_ioctx.ptr(),
            c.as_ptr(),
            o.0,
        )
    };
    check(OP, target, ret.into())?;
    Ok(())
}

/// Every image in the ioctx's pool and namespace.
pub fn list(ioctx: &IoCtx) -> Result<Vec<ImageSpec>> {
    const OP: &str = "rbd_list2";
    let target = || Target::Pool(ioctx.pool_name().to_string());
    let mut cap: usize = 16;
    // The image count can grow between the sizing and the filling call;
    // retry with what librbd reports.
    for _ in 0..32 {
        let mut specs: Vec<ffi::rbd_image_spec_t> = (0..cap)
            .map(|_| ffi::rbd_image_spec_t {
                id: ptr::null_mut(),
                name: ptr::null_mut(),
            })
            .collect();
        let mut n: size_t = cap;
        // SAFETY: `specs` has room for `n` entries; valid ioctx and
        // out-pointer.
        let ret = unsafe { ffi::rbd_list2(ioctx.ptr(), specs.as_mut_ptr(), &mut n) };
        if ret == -libc::ERANGE {
            cap = n.max(cap + 1);
            continue;
        }
        check(OP, target, ret.into())?;
        let n = n.min(cap);
        let out = specs[..n]
            .iter()
            // SAFETY: librbd filled the first `n` entries with `strdup`ed
            // strings (or null).
            .map(|s| unsafe {
                ImageSpec {
                    id: from_c(s.id),
                    name: from_c(s.name),
                }
            })
            .collect();
        // SAFETY: frees the strings of exactly the `n` filled entries, once.
        unsafe { ffi::rbd_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
        return Ok(out);
    }
    Err(Error::ceph(OP, target(), -(libc::ERANGE as i64)))
}

/// Removes an image (and its data). `ENOENT` if missing; `EBUSY` if it has
/// watchers (open elsewhere); `ENOTEMPTY` if it still has snapshots.
pub fn remove(ioctx: &IoCtx, name: &str) -> Result<()> {
    const OP: &str = "rbd_remove";
    let n = cstr(OP, "image name", name)?;
    // librbd opens the image to remove it; a missing one is answered here
    // (see `Image::open_impl` for why librbd must not fail that open),
    // unless the pool's directory still names it: a removal interrupted
    // after the id object went, which only librbd can finish.
    if !image_exists(ioctx, name)? && !directory_names(ioctx, name)? {
        return Err(not_found(OP, Target::Image(name.to_string())));
    }
    // SAFETY: valid ioctx and NUL-terminated name.
    let ret = unsafe { ffi::rbd_remove(ioctx.ptr(), n.as_ptr()) };
    check(OP, || Target::Image(name.to_string()), ret.into())?;
    Ok(())
}

/// Whether image `name` has an id object (format 2) or a header (format 1)
/// in the ioctx's namespace: what `rbd_open` looks up first, without
/// opening anything. A trashed image has neither.
fn image_exists(ioctx: &IoCtx, name: &str) -> Result<bool> {
    for oid in [format!("rbd_id.{name}"), format!("{name}.rbd")] {
        match ioctx.stat(&oid) {
            Ok(_) => return Ok(true),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Whether the namespace's image directory names `name`.
fn directory_names(ioctx: &IoCtx, name: &str) -> Result<bool> {
    match ioctx.omap_get_vals_by_keys("rbd_directory", &[format!("name_{name}")]) {
        Ok(found) => Ok(!found.is_empty()),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

fn not_found(op: &'static str, target: Target) -> Error {
    Error::ceph(op, target, -i64::from(libc::ENOENT))
}

/// Creates RBD namespace `name` in the ioctx's pool (whatever namespace
/// `ioctx` itself is in). Images can only be created in a namespace that
/// exists. `EEXIST` if it does.
pub fn namespace_create(ioctx: &IoCtx, name: &str) -> Result<()> {
    const OP: &str = "rbd_namespace_create";
    let n = cstr(OP, "namespace", name)?;
    // SAFETY: valid ioctx and NUL-terminated name.
    let ret = unsafe { ffi::rbd_namespace_create(ioctx.ptr(), n.as_ptr()) };
    check(OP, || Target::Namespace(name.to_string()), ret.into())?;
    Ok(())
}

/// Removes RBD namespace `name`. `EBUSY` while it holds images (including
/// trashed ones); `ENOENT` if it does not exist.
pub fn namespace_remove(ioctx: &IoCtx, name: &str) -> Result<()> {
    const OP: &str = "rbd_namespace_remove";
    let n = cstr(OP, "namespace", name)?;
    // SAFETY: valid ioctx and NUL-terminated name.
    let ret = unsafe { ffi::rbd_namespace_remove(ioctx.ptr(), n.as_ptr()) };
    check(OP, || Target::Namespace(name.to_string()), ret.into())?;
    Ok(())
}

/// Whether RBD namespace `name` exists in the ioctx's pool.
pub fn namespace_exists(ioctx: &IoCtx, name: &str) -> Result<bool> {
    const OP: &str = "rbd_namespace_exists";
    let n = cstr(OP, "namespace", name)?;
    let mut exists = false;
    // SAFETY: valid ioctx, NUL-terminated name, valid out-pointer.
    let ret = unsafe { ffi::rbd_namespace_exists(ioctx.ptr(), n.as_ptr(), &mut exists) };
    check(OP, || Target::Namespace(name.to_string()), ret.into())?;
    Ok(exists)
}

/// The RBD namespaces of the ioctx's pool.
pub fn namespace_list(ioctx: &IoCtx) -> Result<Vec<String>> {
    const OP: &str = "rbd_namespace_list";
    let target = || Target::Pool(ioctx.pool_name().to_string());
    let mut buf = vec![0u8; 1024];
    for _ in 0..32 {
        let mut size: size_t = buf.len();
        // SAFETY: `buf` is writable for `size` bytes; valid out-pointer.
        let ret =
            unsafe { ffi::rbd_namespace_list(ioctx.ptr(), buf.as_mut_ptr().cast(), &mut size) };
        if ret == -libc::ERANGE {
            let want = size.max(buf.len() * 2);
            buf.resize(want, 0);
            continue;
        }
        check(OP, target, ret.into())?;
        let used = &buf[..size.min(buf.len())];
        return Ok(used
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect());
    }
    Err(Error::ceph(OP, target(), -(libc::ERANGE as i64)))
}

/// An open image. Closed on drop.
///
/// librbd image handles allow concurrent I/O and queries from several
/// threads, so `Image` is `Send + Sync` and every method takes `&self`. The
/// handle keeps the cluster connection alive.
pub struct Image {
    ptr: ffi::rbd_image_t,
    name: String,
    snap: Option<String>,
    read_only: bool,
    // Dropped after `rbd_close` in `Drop::drop`.
    _ioctx: IoCtx,
}

// SAFETY: librbd serialises access to an image's state internally
// (ImageCtx locks) and supports I/O from several threads on one handle; this
// wrapper never changes the handle's snapshot after open.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("name", &self.name)
            .field("snap", &self.snap)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened by `rbd_open*`, closed once; no other reference to
        // the handle exists (we own it and are being dropped).
        let ret = unsafe { ffi::rbd_close(self.ptr) };
        if ret < 0 {
            tracing::warn!(image = %self.name, errno = -ret, "rbd_close failed");
        }
    }
}

/// State for a callback handed to librbd for the duration of one call. The
/// closure may be called from librbd's threads while the caller blocks, so
/// it must be `Send`; the mutex serialises calls.
struct CallbackState<F> {
    f: Mutex<F>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl<F> CallbackState<F> {
    fn new(f: F) -> Self {
        CallbackState {
            f: Mutex::new(f),
            panic: Mutex::new(None),
        }
    }

    /// Runs `call` on the closure; a panic is stored (to be resumed on the
    /// caller's thread) and reported as `false`.
    fn run(&self, call: impl FnOnce(&mut F)) -> bool {
        let mut guard = match self.f.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        match catch_unwind(AssertUnwindSafe(|| call(&mut guard))) {
            Ok(()) => true,
            Err(payload) => {
                if let Ok(mut slot) = self.panic.lock() {
                    slot.get_or_insert(payload);
                }
                false
            }
        }
    }

    fn resume_panic(self) {
        if let Ok(Some(payload)) = self.panic.into_inner() {
            resume_unwind(payload);
        }
    }
}

unsafe extern "C" fn progress_trampoline<F: FnMut(u64, u64) + Send>(
    offset: u64,
    total: u64,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: `arg` is the `CallbackState<F>` on the stack of `flatten`,
    // which blocks until librbd stops calling back.
    let state = unsafe { &*arg.cast::<CallbackState<F>>() };
    if state.run(|f| f(offset, total)) {
        0
    } else {
        -libc::ECANCELED
    }
}

unsafe extern "C" fn diff_trampoline<F: FnMut(u64, u64, bool) + Send>(
    offset: u64,
    len: size_t,
    exists: c_int,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: `arg` is the `CallbackState<F>` on the stack of
    // `diff_iterate`, which blocks until librbd stops calling back.
    let state = unsafe { &*arg.cast::<CallbackState<F>>() };
    if state.run(|f| f(offset, len as u64, exists != 0)) {
        0
    } else {
        -libc::ECANCELED
    }
}

impl Image {
    /// Opens `name` read-write, or at snapshot `snap` (then read-only).
    /// `ENOENT` if the image or snapshot does not exist.
    pub fn open(ioctx: &IoCtx, name: &str, snap: Option<&str>) -> Result<Image> {
        Self::open_impl(ioctx, name, snap, false)
    }

    /// Opens `name` (or its snapshot `snap`) read-only: no header watch, no
    /// exclusive lock, cheaper.
    pub fn open_read_only(ioctx: &IoCtx, name: &str, snap: Option<&str>) -> Result<Image> {
        Self::open_impl(ioctx, name, snap, true)
    }

    // librbd 16 frees the image context of a failed `rbd_open` on one of
    // its finisher threads after the caller has its answer, and that
    // teardown races with the caller's next open: processes crashed in
    // `md_config_t::~md_config_t` or with an uncaught `std::system_error`
    // (EINVAL). So librbd is never asked to open what is not there: a
    // missing image is answered from its id object, and a snapshot is
    // selected with `rbd_snap_set` on the open head once it is known to
    // exist. An image removed between the check and the open can still
    // fail the open; that window is a round trip wide.
    fn open_impl(ioctx: &IoCtx, name: &str, snap: Option<&str>, read_only: bool) -> Result<Image> {
        let op = if read_only {
            "rbd_open_read_only"
        } else {
            "rbd_open"
        };
        let n = cstr(op, "image name", name)?;
        let s = opt_cstr(op, "snapshot name", snap)?;
        if !image_exists(ioctx, name)? {
            return Err(not_found(op, Target::Image(name.to_string())));
        }
        let mut p: ffi::rbd_image_t = ptr::null_mut();
        // SAFETY: valid ioctx, NUL-terminated name, null snapshot name,
        // valid out-pointer.
        let ret = unsafe {
            if read_only {
                ffi::rbd_open_read_only(ioctx.ptr(), n.as_ptr(), &mut p, ptr::null())
            } else {
                ffi::rbd_open(ioctx.ptr(), n.as_ptr(), &mut p, ptr::null())
            }
        };
        check(op, || Target::Image(name.to_string()), ret.into())?;
        let mut image = Image {
            ptr: p,
            name: name.to_string(),
            snap: None,
            read_only,
            _ioctx: ioctx.clone(),
        };
        if let (Some(snap), Some(s)) = (snap, s) {
            if !image.snap_exists(snap)? {
                return Err(not_found(op, image.snap_target(snap)));
            }
            // SAFETY: open image, NUL-terminated snapshot name.
            let ret = unsafe { ffi::rbd_snap_set(image.ptr, s.as_ptr()) };
            check("rbd_snap_set", || image.snap_target(snap), ret.into())?;
            image.snap = Some(snap.to_string());
            image.read_only = true;
        }
        Ok(image)
    }

    fn target(&self) -> Target {
        match &self.snap {
            Some(snap) => Target::Snapshot {
                image: self.name.clone(),
                snap: snap.clone(),
            },
            None => Target::Image(self.name.clone()),
        }
    }

    fn check(&self, op: &'static str, ret: i64) -> Result<i64> {
        check(op, || self.target(), ret)
    }

    /// The name the image was opened by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The snapshot the image was opened at, if any.
    pub fn snap_name(&self) -> Option<&str> {
        self.snap.as_deref()
    }

    /// Whether the handle is read-only (opened read-only or at a snapshot).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The image id.
    pub fn id(&self) -> Result<String> {
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: `buf` is writable for `buf.len()` bytes.
            let ret = unsafe { ffi::rbd_get_id(self.ptr, buf.as_mut_ptr().cast(), buf.len()) };
            if ret == -libc::ERANGE && buf.len() < 1 << 16 {
                buf.resize(buf.len() * 2, 0);
                continue;
            }
            self.check("rbd_get_id", ret.into())?;
            return Ok(until_nul(&buf));
        }
    }

    /// Size in bytes (of the snapshot, when opened at one).
    pub fn size(&self) -> Result<u64> {
        let mut size = 0u64;
        // SAFETY: open image, valid out-pointer.
        let ret = unsafe { ffi::rbd_get_size(self.ptr, &mut size) };
        self.check("rbd_get_size", ret.into())?;
        Ok(size)
    }

    /// Grows or shrinks the image (shrinking discards the tail).
    pub fn resize(&self, size: u64) -> Result<()> {
        // SAFETY: open image.
        let ret = unsafe { ffi::rbd_resize(self.ptr, size) };
        self.check("rbd_resize", ret.into())?;
        Ok(())
    }

    /// Feature bits (`RBD_FEATURE_*`).
    pub fn features(&self) -> Result<u64> {
        let mut f = 0u64;
        // SAFETY: open image, valid out-pointer.
        let ret = unsafe { ffi::rbd_get_features(self.ptr, &mut f) };
        self.check("rbd_get_features", ret.into())?;
        Ok(f)
    }

    /// How many bytes of a clone still come from its parent (0 when not a
    /// clone or flattened).
    pub fn overlap(&self) -> Result<u64> {
        let mut o = 0u64;
        // SAFETY: open image, valid out-pointer.
        let ret = unsafe { ffi::rbd_get_overlap(self.ptr, &mut o) };
        self.check("rbd_get_overlap", ret.into())?;
        Ok(o)
    }

    /// Reads at `off` into `buf`; returns the bytes read, which is less than
    /// `buf.len()` at the end of the image or for requests over 1 GiB (use
    /// [`Image::read_exact_at`] to fill the buffer). `EINVAL` when `off` is
    /// at or past the end.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        let len = buf.len().min(MAX_IO);
        if len == 0 {
            return Ok(0);
        }
        // SAFETY: `buf` is writable for `len` bytes; open image.
        let ret = unsafe { ffi::rbd_read(self.ptr, off, len, buf.as_mut_ptr().cast()) };
        Ok(self.check("rbd_read", ret as i64)? as usize)
    }

    /// Reads exactly `buf.len()` bytes at `off`; `EINVAL` if the image ends
    /// first.
    pub fn read_exact_at(&self, mut off: u64, mut buf: &mut [u8]) -> Result<()> {
        while !buf.is_empty() {
            let n = self.read_at(off, buf)?;
            if n == 0 {
                return Err(Error::ceph(
                    "rbd_read",
                    self.target(),
                    -(libc::EINVAL as i64),
                ));
            }
            buf = &mut buf[n..];
            off += n as u64;
        }
        Ok(())
    }

    /// Writes `buf` at `off`; returns the bytes written, which is less than
    /// `buf.len()` for requests over 1 GiB (use [`Image::write_all_at`]).
    /// `EINVAL` past the end of the image, `EROFS` on a read-only handle or
    /// when another client holds the exclusive lock in exclusive mode.
    pub fn write_at(&self, off: u64, buf: &[u8]) -> Result<usize> {
        let len = buf.len().min(MAX_IO);
        if len == 0 {
            return Ok(0);
        }
        // SAFETY: `buf` is readable for `len` bytes; open image.
        let ret = unsafe { ffi::rbd_write(self.ptr, off, len, buf.as_ptr().cast()) };
        Ok(self.check("rbd_write", ret as i64)? as usize)
    }

    /// Writes all of `buf` at `off`.
    pub fn write_all_at(&self, mut off: u64, mut buf: &[u8]) -> Result<()> {
        while !buf.is_empty() {
            let n = self.write_at(off, buf)?;
            if n == 0 {
                return Err(Error::ceph(
                    "rbd_write",
                    self.target(),
                    -(libc::EINVAL as i64),
                ));
            }
            buf = &buf[n..];
            off += n as u64;
        }
        Ok(())
    }

    /// Waits until written data is durable.
    pub fn flush(&self) -> Result<()> {
        // SAFETY: open image.
        let ret = unsafe { ffi::rbd_flush(self.ptr) };
        self.check("rbd_flush", ret.into())?;
        Ok(())
    }

    /// Deallocates `len` bytes at `off` (they read back as zeros).
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        // SAFETY: open image.
        let ret = unsafe { ffi::rbd_discard(self.ptr, off, len) };
        self.check("rbd_discard", ret.into())?;
        Ok(())
    }

    /// Takes a snapshot. `EEXIST` if the name is taken.
    pub fn snap_create(&self, name: &str) -> Result<()> {
        const OP: &str = "rbd_snap_create";
        let n = cstr(OP, "snapshot name", name)?;
        // SAFETY: open image, NUL-terminated name.
        let ret = unsafe { ffi::rbd_snap_create(self.ptr, n.as_ptr()) };
        check(OP, || self.snap_target(name), ret.into())?;
        Ok(())
    }

    /// Removes a snapshot. With clone-v2 children it moves to the trash
    /// namespace and disappears with its last child. `ENOENT` if missing;
    /// `EBUSY` if protected (clone v1).
    pub fn snap_remove(&self, name: &str) -> Result<()> {
        const OP: &str = "rbd_snap_remove";
        let n = cstr(OP, "snapshot name", name)?;
        // SAFETY: open image, NUL-terminated name.
        let ret = unsafe { ffi::rbd_snap_remove(self.ptr, n.as_ptr()) };
        check(OP, || self.snap_target(name), ret.into())?;
        Ok(())
    }

    fn snap_target(&self, snap: &str) -> Target {
        Target::Snapshot {
            image: self.name.clone(),
            snap: snap.to_string(),
        }
    }

    /// Whether a user snapshot of this name exists.
    pub fn snap_exists(&self, name: &str) -> Result<bool> {
        const OP: &str = "rbd_snap_exists";
        let n = cstr(OP, "snapshot name", name)?;
        let mut exists = false;
        // SAFETY: open image, NUL-terminated name, valid out-pointer.
        let ret = unsafe { ffi::rbd_snap_exists(self.ptr, n.as_ptr(), &mut exists) };
        check(OP, || self.snap_target(name), ret.into())?;
        Ok(exists)
    }

    /// Every snapshot of the image, including trashed ones (see
    /// [`SnapInfo::namespace`]).
    pub fn snap_list(&self) -> Result<Vec<SnapInfo>> {
        const OP: &str = "rbd_snap_list";
        let mut cap: c_int = 16;
        for _ in 0..32 {
            let slots = usize::try_from(cap).unwrap_or(16);
            let mut snaps: Vec<ffi::rbd_snap_info_t> = (0..slots)
                .map(|_| ffi::rbd_snap_info_t {
                    id: 0,
                    size: 0,
                    name: ptr::null(),
                })
                .collect();
            let mut max = cap;
            // SAFETY: `snaps` has room for `max` entries (librbd needs one
            // more than the count for its terminator and says so via
            // ERANGE); valid out-pointer.
            let ret = unsafe { ffi::rbd_snap_list(self.ptr, snaps.as_mut_ptr(), &mut max) };
            if ret == -libc::ERANGE {
                cap = max.max(cap.saturating_add(1));
                continue;
            }
            self.check(OP, ret.into())?;
            let n = usize::try_from(ret).unwrap_or(0).min(slots);
            let mut out = Vec::with_capacity(n);
            for s in &snaps[..n] {
                let mut t: ffi::rbd_snap_namespace_type_t = ffi::RBD_SNAP_NAMESPACE_TYPE_USER;
                // SAFETY: open image, valid out-pointer.
                let r = unsafe { ffi::rbd_snap_get_namespace_type(self.ptr, s.id, &mut t) };
                let namespace = if r < 0 {
                    SnapNamespace::User
                } else {
                    SnapNamespace::from_raw(t)
                };
                out.push(SnapInfo {
                    id: s.id,
                    // SAFETY: librbd filled the entry with a `strdup`ed name.
                    name: unsafe { from_c(s.name) },
                    size: s.size,
                    namespace,
                });
            }
            // SAFETY: frees the names of the filled, null-terminated array
            // once.
            unsafe { ffi::rbd_snap_list_end(snaps.as_mut_ptr()) };
            return Ok(out);
        }
        Err(Error::ceph(OP, self.target(), -(libc::ERANGE as i64)))
    }

    /// The parent of a clone, `None` for an image without one (never cloned,
    /// or flattened).
    pub fn parent(&self) -> Result<Option<ParentSpec>> {
        let mut img = ffi::rbd_linked_image_spec_t {
            pool_id: 0,
            pool_name: ptr::null_mut(),
            pool_namespace: ptr::null_mut(),
            image_id: ptr::null_mut(),
            image_name: ptr::null_mut(),
            trash: false,
        };
        let mut snap = ffi::rbd_snap_spec_t {
            id: 0,
            namespace_type: 0,
            name: ptr::null_mut(),
        };
        // SAFETY: open image, valid out-structs.
        let ret = unsafe { ffi::rbd_get_parent(self.ptr, &mut img, &mut snap) };
        if ret == -libc::ENOENT {
            return Ok(None);
        }
        self.check("rbd_get_parent", ret.into())?;
        // SAFETY: on success librbd filled both structs with `strdup`ed
        // strings; copied here, then freed once by the cleanup calls.
        let spec = unsafe {
            ParentSpec {
                pool_id: img.pool_id,
                pool_name: from_c(img.pool_name),
                pool_namespace: from_c(img.pool_namespace),
                image_name: from_c(img.image_name),
                image_id: from_c(img.image_id),
                trash: img.trash,
                snap_id: snap.id,
                snap_name: from_c(snap.name),
                snap_namespace: SnapNamespace::from_raw(snap.namespace_type),
            }
        };
        // SAFETY: see above.
        unsafe {
            ffi::rbd_linked_image_spec_cleanup(&mut img);
            ffi::rbd_snap_spec_cleanup(&mut snap);
        }
        Ok(Some(spec))
    }

    /// The clones of the snapshot this image is opened at, or, on the
    /// head, of all its snapshots.
    pub fn children(&self) -> Result<Vec<ChildSpec>> {
        const OP: &str = "rbd_list_children3";
        let mut cap: usize = 8;
        for _ in 0..32 {
            let mut specs: Vec<ffi::rbd_linked_image_spec_t> = (0..cap)
                .map(|_| ffi::rbd_linked_image_spec_t {
                    pool_id: 0,
                    pool_name: ptr::null_mut(),
                    pool_namespace: ptr::null_mut(),
                    image_id: ptr::null_mut(),
                    image_name: ptr::null_mut(),
                    trash: false,
                })
                .collect();
            let mut n: size_t = cap;
            // SAFETY: `specs` has room for `n` entries; valid out-pointer.
            let ret = unsafe { ffi::rbd_list_children3(self.ptr, specs.as_mut_ptr(), &mut n) };
            if ret == -libc::ERANGE {
                cap = n.max(cap + 1);
                continue;
            }
            self.check(OP, ret.into())?;
            let n = n.min(cap);
            let out = specs[..n]
                .iter()
                // SAFETY: the first `n` entries were filled with `strdup`ed
                // strings.
                .map(|s| unsafe {
                    ChildSpec {
                        pool_id: s.pool_id,
                        pool_name: from_c(s.pool_name),
                        pool_namespace: from_c(s.pool_namespace),
                        image_name: from_c(s.image_name),
                        image_id: from_c(s.image_id),
                        trash: s.trash,
                    }
                })
                .collect();
            // SAFETY: frees exactly the `n` filled entries, once.
            unsafe { ffi::rbd_linked_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
            return Ok(out);
        }
        Err(Error::ceph(OP, self.target(), -(libc::ERANGE as i64)))
    }

    /// Copies all data still shared with the parent into this clone and
    /// drops the parent link. `progress(done, total)` may be called from
    /// librbd threads (calls are serialised). `EINVAL` if not a clone.
    /// A panic in `progress` resumes here after librbd returns.
    pub fn flatten<F: FnMut(u64, u64) + Send>(&self, progress: F) -> Result<()> {
        let state = CallbackState::new(progress);
        // SAFETY: the trampoline matches `librbd_progress_fn_t` and receives
        // a pointer to `state`, which outlives this synchronous call.
        let ret = unsafe {
            ffi::rbd_flatten_with_progress(
                self.ptr,
                Some(progress_trampoline::<F>),
                (&state as *const CallbackState<F>).cast_mut().cast(),
            )
        };
        state.resume_panic();
        self.check("rbd_flatten_with_progress", ret.into())?;
        Ok(())
    }

    /// Takes the managed exclusive lock in exclusive mode: other clients'
    /// writes fail with `EROFS` instead of asking for the lock, until
    /// [`Image::lock_release`] or close. `EINVAL` without the exclusive-lock
    /// feature; `EROFS` on a read-only handle; fails while another client
    /// holds it.
    pub fn lock_acquire_exclusive(&self) -> Result<()> {
        // SAFETY: open image.
        let ret = unsafe { ffi::rbd_lock_acquire(self.ptr, ffi::RBD_LOCK_MODE_EXCLUSIVE) };
        self.check("rbd_lock_acquire", ret.into())?;
        Ok(())
    }

    /// Releases the managed exclusive lock.
    pub fn lock_release(&self) -> Result<()> {
        // SAFETY: open image.
        let ret = unsafe { ffi::rbd_lock_release(self.ptr) };
        self.check("rbd_lock_release", ret.into())?;
        Ok(())
    }

    /// Whether this handle owns the managed exclusive lock.
    pub fn is_lock_owner(&self) -> Result<bool> {
        let mut owner: c_int = 0;
        // SAFETY: open image, valid out-pointer.
        let ret = unsafe { ffi::rbd_is_exclusive_lock_owner(self.ptr, &mut owner) };
        self.check("rbd_is_exclusive_lock_owner", ret.into())?;
        Ok(owner != 0)
    }

    /// The clients holding the managed exclusive lock, by session address
    /// (e.g. `127.0.0.1:0/3141592`, as [`crate::Rados::client_addr`] gives
    /// and [`Image::lock_break`] and blocklisting take); empty when nobody
    /// does.
    pub fn lock_owners(&self) -> Result<Vec<String>> {
        const OP: &str = "rbd_lock_get_owners";
        let mut cap: usize = 4;
        for _ in 0..16 {
            let mut owners: Vec<*mut c_char> = vec![ptr::null_mut(); cap];
            let mut n: size_t = cap;
            let mut mode: ffi::rbd_lock_mode_t = ffi::RBD_LOCK_MODE_EXCLUSIVE;
            // SAFETY: `owners` has room for `n` pointers; valid out-pointers.
            let ret = unsafe {
                ffi::rbd_lock_get_owners(self.ptr, &mut mode, owners.as_mut_ptr(), &mut n)
            };
            if ret == -libc::ENOENT {
                return Ok(Vec::new());
            }
            if ret == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            self.check(OP, ret.into())?;
            let n = n.min(cap);
            // SAFETY: the first `n` pointers are `strdup`ed strings.
            let out = owners[..n].iter().map(|&p| unsafe { from_c(p) }).collect();
            // SAFETY: frees exactly those `n` strings, once.
            unsafe { ffi::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), n) };
            return Ok(out);
        }
        Err(Error::ceph(OP, self.target(), -(libc::ERANGE as i64)))
    }

    /// Breaks `owner`'s managed exclusive lock (as [`Image::lock_owners`]
    /// names it). Blocklist the owner first if it may still be alive.
    pub fn lock_break(&self, owner: &str) -> Result<()> {
        const OP: &str = "rbd_lock_break";
        let o = cstr(OP, "lock owner", owner)?;
        // SAFETY: open image, NUL-terminated owner.
        let ret =
            unsafe { ffi::rbd_lock_break(self.ptr, ffi::RBD_LOCK_MODE_EXCLUSIVE, o.as_ptr()) };
        self.check(OP, ret.into())?;
        Ok(())
    }

    /// Sets per-image metadata `key` (stored in the image header).
    pub fn metadata_set(&self, key: &str, value: &str) -> Result<()> {
        const OP: &str = "rbd_metadata_set";
        let (k, v) = (cstr(OP, "key", key)?, cstr(OP, "value", value)?);
        // SAFETY: open image, NUL-terminated strings.
        let ret = unsafe { ffi::rbd_metadata_set(self.ptr, k.as_ptr(), v.as_ptr()) };
        self.check(OP, ret.into())?;
        Ok(())
    }

    /// Per-image metadata `key`, `None` if unset.
    pub fn metadata_get(&self, key: &str) -> Result<Option<String>> {
        const OP: &str = "rbd_metadata_get";
        let k = cstr(OP, "key", key)?;
        let mut buf = vec![0u8; 256];
        for _ in 0..16 {
            let mut len: size_t = buf.len();
            // SAFETY: `buf` is writable for `len` bytes; valid out-pointer.
            let ret = unsafe {
                ffi::rbd_metadata_get(self.ptr, k.as_ptr(), buf.as_mut_ptr().cast(), &mut len)
            };
            if ret == -libc::ENOENT {
                return Ok(None);
            }
            if ret == -libc::ERANGE {
                let want = len.max(buf.len() * 2);
                buf.resize(want, 0);
                continue;
            }
            self.check(OP, ret.into())?;
            return Ok(Some(until_nul(&buf)));
        }
        Err(Error::ceph(OP, self.target(), -(libc::ERANGE as i64)))
    }

    /// Removes per-image metadata `key`; `ENOENT` if unset.
    pub fn metadata_remove(&self, key: &str) -> Result<()> {
        const OP: &str = "rbd_metadata_remove";
        let k = cstr(OP, "key", key)?;
        // SAFETY: open image, NUL-terminated key.
        let ret = unsafe { ffi::rbd_metadata_remove(self.ptr, k.as_ptr()) };
        self.check(OP, ret.into())?;
        Ok(())
    }

    /// Calls `cb(offset, len, exists)` for every extent of the image (or of
    /// the snapshot it is opened at) that changed since `from_snap` (since
    /// creation when `None`): `exists` false means the extent is now a hole
    /// (zeros). `include_parent`: also report data a clone reads from its
    /// parent. `whole_object`: report whole objects (faster with fast-diff).
    /// `cb` may be called from librbd threads (calls are serialised); a
    /// panic in it stops the iteration and resumes here.
    pub fn diff_iterate<F: FnMut(u64, u64, bool) + Send>(
        &self,
        from_snap: Option<&str>,
        include_parent: bool,
        whole_object: bool,
        cb: F,
    ) -> Result<()> {
        const OP: &str = "rbd_diff_iterate2";
        let from = opt_cstr(OP, "from snapshot name", from_snap)?;
        let size = self.size()?;
        let state = CallbackState::new(cb);
        // SAFETY: open image; `from` is null or NUL-terminated; the
        // trampoline matches the callback type and receives a pointer to
        // `state`, which outlives this synchronous call.
        let ret = unsafe {
            ffi::rbd_diff_iterate2(
                self.ptr,
                opt_ptr(&from),
                0,
                size,
                u8::from(include_parent),
                u8::from(whole_object),
                Some(diff_trampoline::<F>),
                (&state as *const CallbackState<F>).cast_mut().cast(),
            )
        };
        state.resume_panic();
        self.check(OP, ret.into())?;
        Ok(())
    }
}
