//! Raw declarations of the parts of librados and librbd (Ceph 16.2 "Pacific"
//! ABI, `librados.so.2`, `librbd.so.1`) that this crate uses.
//!
//! Every declaration here was written by hand from
//! `/usr/include/rados/librados.h` and `/usr/include/rbd/librbd.h` and is
//! checked against those headers by `tests/ffi_headers.rs`, which feeds each
//! signature, struct layout and constant to the C compiler. Keep the format
//! simple (one `pub fn` per item, no inline function-pointer types in
//! parameter lists) so that check can parse it.
//!
//! Prefer the safe API of the crate; these are public only for callers that
//! need a call the safe API does not wrap yet.

#![allow(non_camel_case_types)]

use libc::{c_char, c_int, c_uchar, c_void, size_t, ssize_t, time_t, timeval};

// ---------------------------------------------------------------- librados

/// `rados_t`: a cluster handle.
pub type rados_t = *mut c_void;
/// `rados_ioctx_t`: an I/O context (pool + namespace).
pub type rados_ioctx_t = *mut c_void;
/// `rados_write_op_t`: a compound write operation.
pub type rados_write_op_t = *mut c_void;
/// `rados_read_op_t`: a compound read operation.
pub type rados_read_op_t = *mut c_void;
/// `rados_omap_iter_t`: an iterator over omap key/value pairs.
pub type rados_omap_iter_t = *mut c_void;
/// `rados_list_ctx_t`: an object listing in progress.
pub type rados_list_ctx_t = *mut c_void;

/// `rados_watchcb2_t`:
/// `void (*)(void *arg, uint64_t notify_id, uint64_t handle, uint64_t notifier_id, void *data, size_t data_len)`.
pub type rados_watchcb2_t =
    Option<unsafe extern "C" fn(*mut c_void, u64, u64, u64, *mut c_void, size_t)>;
/// `rados_watcherrcb_t`: `void (*)(void *pre, uint64_t cookie, int err)`.
pub type rados_watcherrcb_t = Option<unsafe extern "C" fn(*mut c_void, u64, c_int)>;

pub const LIBRADOS_LOCK_FLAG_MAY_RENEW: u8 = 1;
pub const LIBRADOS_LOCK_FLAG_MUST_RENEW: u8 = 2;
pub const LIBRADOS_CREATE_EXCLUSIVE: c_int = 1;
pub const LIBRADOS_CREATE_IDEMPOTENT: c_int = 0;
pub const LIBRADOS_CMPXATTR_OP_EQ: u8 = 1;
pub const LIBRADOS_CMPXATTR_OP_NE: u8 = 2;
pub const LIBRADOS_CMPXATTR_OP_GT: u8 = 3;
pub const LIBRADOS_CMPXATTR_OP_GTE: u8 = 4;
pub const LIBRADOS_CMPXATTR_OP_LT: u8 = 5;
pub const LIBRADOS_CMPXATTR_OP_LTE: u8 = 6;
pub const LIBRADOS_OPERATION_NOFLAG: c_int = 0;

#[link(name = "rados")]
unsafe extern "C" {
    pub fn rados_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);

    pub fn rados_create2(
        pcluster: *mut rados_t,
        clustername: *const c_char,
        name: *const c_char,
        flags: u64,
    ) -> c_int;
    pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_connect(cluster: rados_t) -> c_int;
    pub fn rados_shutdown(cluster: rados_t);
    pub fn rados_get_instance_id(cluster: rados_t) -> u64;
    pub fn rados_getaddrs(cluster: rados_t, addrs: *mut *mut c_char) -> c_int;
    pub fn rados_blocklist_add(
        cluster: rados_t,
        client_address: *mut c_char,
        expire_seconds: u32,
    ) -> c_int;
    pub fn rados_mon_command(
        cluster: rados_t,
        cmd: *mut *const c_char,
        cmdlen: size_t,
        inbuf: *const c_char,
        inbuflen: size_t,
        outbuf: *mut *mut c_char,
        outbuflen: *mut size_t,
        outs: *mut *mut c_char,
        outslen: *mut size_t,
    ) -> c_int;
    pub fn rados_buffer_free(buf: *mut c_char);
    pub fn rados_watch_flush(cluster: rados_t) -> c_int;

    pub fn rados_ioctx_create(
        cluster: rados_t,
        pool_name: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    pub fn rados_ioctx_destroy(io: rados_ioctx_t);
    pub fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
    pub fn rados_set_pool_full_try(io: rados_ioctx_t);
    pub fn rados_get_last_version(io: rados_ioctx_t) -> u64;

    pub fn rados_write_full(
        io: rados_ioctx_t,
        oid: *const c_char,
        buf: *const c_char,
        len: size_t,
    ) -> c_int;
    pub fn rados_read(
        io: rados_ioctx_t,
        oid: *const c_char,
        buf: *mut c_char,
        len: size_t,
        off: u64,
    ) -> c_int;
    pub fn rados_stat(
        io: rados_ioctx_t,
        o: *const c_char,
        psize: *mut u64,
        pmtime: *mut time_t,
    ) -> c_int;
    pub fn rados_remove(io: rados_ioctx_t, oid: *const c_char) -> c_int;
    pub fn rados_nobjects_list_open(io: rados_ioctx_t, ctx: *mut rados_list_ctx_t) -> c_int;
    pub fn rados_nobjects_list_next(
        ctx: rados_list_ctx_t,
        entry: *mut *const c_char,
        key: *mut *const c_char,
        nspace: *mut *const c_char,
    ) -> c_int;
    pub fn rados_nobjects_list_close(ctx: rados_list_ctx_t);

    pub fn rados_create_write_op() -> rados_write_op_t;
    pub fn rados_release_write_op(write_op: rados_write_op_t);
    pub fn rados_write_op_create(
        write_op: rados_write_op_t,
        exclusive: c_int,
        category: *const c_char,
    );
    pub fn rados_write_op_assert_exists(write_op: rados_write_op_t);
    pub fn rados_write_op_assert_version(write_op: rados_write_op_t, ver: u64);
    pub fn rados_write_op_omap_cmp2(
        write_op: rados_write_op_t,
        key: *const c_char,
        comparison_operator: u8,
        val: *const c_char,
        key_len: size_t,
        val_len: size_t,
        prval: *mut c_int,
    );
    pub fn rados_write_op_omap_set2(
        write_op: rados_write_op_t,
        keys: *const *const c_char,
        vals: *const *const c_char,
        key_lens: *const size_t,
        val_lens: *const size_t,
        num: size_t,
    );
    pub fn rados_write_op_omap_rm_keys2(
        write_op: rados_write_op_t,
        keys: *const *const c_char,
        key_lens: *const size_t,
        keys_len: size_t,
    );
    pub fn rados_write_op_omap_clear(write_op: rados_write_op_t);
    pub fn rados_write_op_write_full(
        write_op: rados_write_op_t,
        buffer: *const c_char,
        len: size_t,
    );
    pub fn rados_write_op_remove(write_op: rados_write_op_t);
    pub fn rados_write_op_operate(
        write_op: rados_write_op_t,
        io: rados_ioctx_t,
        oid: *const c_char,
        mtime: *mut time_t,
        flags: c_int,
    ) -> c_int;

    pub fn rados_create_read_op() -> rados_read_op_t;
    pub fn rados_release_read_op(read_op: rados_read_op_t);
    pub fn rados_read_op_omap_get_vals2(
        read_op: rados_read_op_t,
        start_after: *const c_char,
        filter_prefix: *const c_char,
        max_return: u64,
        iter: *mut rados_omap_iter_t,
        pmore: *mut c_uchar,
        prval: *mut c_int,
    );
    pub fn rados_read_op_omap_get_vals_by_keys2(
        read_op: rados_read_op_t,
        keys: *const *const c_char,
        num_keys: size_t,
        key_lens: *const size_t,
        iter: *mut rados_omap_iter_t,
        prval: *mut c_int,
    );
    pub fn rados_read_op_operate(
        read_op: rados_read_op_t,
        io: rados_ioctx_t,
        oid: *const c_char,
        flags: c_int,
    ) -> c_int;
    pub fn rados_omap_get_next2(
        iter: rados_omap_iter_t,
        key: *mut *mut c_char,
        val: *mut *mut c_char,
        key_len: *mut size_t,
        val_len: *mut size_t,
    ) -> c_int;
    pub fn rados_omap_get_end(iter: rados_omap_iter_t);

    pub fn rados_lock_exclusive(
        io: rados_ioctx_t,
        oid: *const c_char,
        name: *const c_char,
        cookie: *const c_char,
        desc: *const c_char,
        duration: *mut timeval,
        flags: u8,
    ) -> c_int;
    pub fn rados_lock_shared(
        io: rados_ioctx_t,
        o: *const c_char,
        name: *const c_char,
        cookie: *const c_char,
        tag: *const c_char,
        desc: *const c_char,
        duration: *mut timeval,
        flags: u8,
    ) -> c_int;
    pub fn rados_unlock(
        io: rados_ioctx_t,
        o: *const c_char,
        name: *const c_char,
        cookie: *const c_char,
    ) -> c_int;
    pub fn rados_break_lock(
        io: rados_ioctx_t,
        o: *const c_char,
        name: *const c_char,
        client: *const c_char,
        cookie: *const c_char,
    ) -> c_int;
    pub fn rados_list_lockers(
        io: rados_ioctx_t,
        o: *const c_char,
        name: *const c_char,
        exclusive: *mut c_int,
        tag: *mut c_char,
        tag_len: *mut size_t,
        clients: *mut c_char,
        clients_len: *mut size_t,
        cookies: *mut c_char,
        cookies_len: *mut size_t,
        addrs: *mut c_char,
        addrs_len: *mut size_t,
    ) -> ssize_t;

    pub fn rados_watch2(
        io: rados_ioctx_t,
        o: *const c_char,
        cookie: *mut u64,
        watchcb: rados_watchcb2_t,
        watcherrcb: rados_watcherrcb_t,
        arg: *mut c_void,
    ) -> c_int;
    pub fn rados_watch_check(io: rados_ioctx_t, cookie: u64) -> c_int;
    pub fn rados_unwatch2(io: rados_ioctx_t, cookie: u64) -> c_int;
    pub fn rados_notify2(
        io: rados_ioctx_t,
        o: *const c_char,
        buf: *const c_char,
        buf_len: c_int,
        timeout_ms: u64,
        reply_buffer: *mut *mut c_char,
        reply_buffer_len: *mut size_t,
    ) -> c_int;
    pub fn rados_notify_ack(
        io: rados_ioctx_t,
        o: *const c_char,
        notify_id: u64,
        cookie: u64,
        buf: *const c_char,
        buf_len: c_int,
    ) -> c_int;
}

// ------------------------------------------------------------------ librbd

/// `rbd_image_t`: an open image.
pub type rbd_image_t = *mut c_void;
/// `rbd_image_options_t`: creation options.
pub type rbd_image_options_t = *mut c_void;
/// `librbd_progress_fn_t`: `int (*)(uint64_t offset, uint64_t total, void *ptr)`.
pub type librbd_progress_fn_t = Option<unsafe extern "C" fn(u64, u64, *mut c_void) -> c_int>;
/// The callback type of `rbd_diff_iterate2` (an unnamed type in the header):
/// `int (*)(uint64_t offset, size_t len, int exists, void *arg)`.
pub type rbd_diff_iterate_cb_t =
    Option<unsafe extern "C" fn(u64, size_t, c_int, *mut c_void) -> c_int>;
/// `rbd_lock_mode_t` (a C enum, `int`-sized).
pub type rbd_lock_mode_t = c_int;
/// `rbd_snap_namespace_type_t` (a C enum, `int`-sized).
pub type rbd_snap_namespace_type_t = c_int;

/// `rbd_image_spec_t`.
#[repr(C)]
#[derive(Debug)]
pub struct rbd_image_spec_t {
    pub id: *mut c_char,
    pub name: *mut c_char,
}

/// `rbd_linked_image_spec_t`.
#[repr(C)]
#[derive(Debug)]
pub struct rbd_linked_image_spec_t {
    pub pool_id: i64,
    pub pool_name: *mut c_char,
    pub pool_namespace: *mut c_char,
    pub image_id: *mut c_char,
    pub image_name: *mut c_char,
    pub trash: bool,
}

/// `rbd_snap_spec_t`.
#[repr(C)]
#[derive(Debug)]
pub struct rbd_snap_spec_t {
    pub id: u64,
    pub namespace_type: rbd_snap_namespace_type_t,
    pub name: *mut c_char,
}

/// `rbd_snap_info_t`.
#[repr(C)]
#[derive(Debug)]
pub struct rbd_snap_info_t {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

pub const RBD_FEATURE_LAYERING: u64 = 1 << 0;
pub const RBD_FEATURE_STRIPINGV2: u64 = 1 << 1;
pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
pub const RBD_FEATURE_OBJECT_MAP: u64 = 1 << 3;
pub const RBD_FEATURE_FAST_DIFF: u64 = 1 << 4;
pub const RBD_FEATURE_DEEP_FLATTEN: u64 = 1 << 5;
pub const RBD_FEATURE_JOURNALING: u64 = 1 << 6;
pub const RBD_FEATURE_DATA_POOL: u64 = 1 << 7;
pub const RBD_FEATURE_OPERATIONS: u64 = 1 << 8;
pub const RBD_FEATURE_MIGRATING: u64 = 1 << 9;
pub const RBD_FEATURE_NON_PRIMARY: u64 = 1 << 10;
pub const RBD_FEATURE_DIRTY_CACHE: u64 = 1 << 11;
pub const RBD_FEATURES_DEFAULT: u64 = 61;

pub const RBD_IMAGE_OPTION_FORMAT: c_int = 0;
pub const RBD_IMAGE_OPTION_FEATURES: c_int = 1;
pub const RBD_IMAGE_OPTION_ORDER: c_int = 2;
pub const RBD_IMAGE_OPTION_CLONE_FORMAT: c_int = 12;

pub const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;
pub const RBD_LOCK_MODE_SHARED: c_int = 1;

pub const RBD_SNAP_NAMESPACE_TYPE_USER: c_int = 0;
pub const RBD_SNAP_NAMESPACE_TYPE_GROUP: c_int = 1;
pub const RBD_SNAP_NAMESPACE_TYPE_TRASH: c_int = 2;
pub const RBD_SNAP_NAMESPACE_TYPE_MIRROR: c_int = 3;

#[link(name = "rbd")]
unsafe extern "C" {
    pub fn rbd_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);

    pub fn rbd_image_options_create(opts: *mut rbd_image_options_t);
    pub fn rbd_image_options_destroy(opts: rbd_image_options_t);
    pub fn rbd_image_options_set_uint64(
        opts: rbd_image_options_t,
        optname: c_int,
        optval: u64,
    ) -> c_int;

    pub fn rbd_image_spec_list_cleanup(images: *mut rbd_image_spec_t, num_images: size_t);
    pub fn rbd_linked_image_spec_cleanup(image: *mut rbd_linked_image_spec_t);
    pub fn rbd_linked_image_spec_list_cleanup(
        images: *mut rbd_linked_image_spec_t,
        num_images: size_t,
    );
    pub fn rbd_snap_spec_cleanup(snap: *mut rbd_snap_spec_t);

    pub fn rbd_list2(
        io: rados_ioctx_t,
        images: *mut rbd_image_spec_t,
        max_images: *mut size_t,
    ) -> c_int;
    pub fn rbd_create4(
        io: rados_ioctx_t,
        name: *const c_char,
        size: u64,
        opts: rbd_image_options_t,
    ) -> c_int;
    pub fn rbd_clone3(
        p_ioctx: rados_ioctx_t,
        p_name: *const c_char,
        p_snapname: *const c_char,
        c_ioctx: rados_ioctx_t,
        c_name: *const c_char,
        c_opts: rbd_image_options_t,
    ) -> c_int;
    pub fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;

    pub fn rbd_namespace_create(io: rados_ioctx_t, namespace_name: *const c_char) -> c_int;
    pub fn rbd_namespace_remove(io: rados_ioctx_t, namespace_name: *const c_char) -> c_int;
    pub fn rbd_namespace_list(
        io: rados_ioctx_t,
        namespace_names: *mut c_char,
        size: *mut size_t,
    ) -> c_int;
    pub fn rbd_namespace_exists(
        io: rados_ioctx_t,
        namespace_name: *const c_char,
        exists: *mut bool,
    ) -> c_int;

    pub fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: rbd_image_t) -> c_int;
    pub fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;
    pub fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    pub fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int;
    pub fn rbd_get_overlap(image: rbd_image_t, overlap: *mut u64) -> c_int;
    pub fn rbd_get_id(image: rbd_image_t, id: *mut c_char, id_len: size_t) -> c_int;
    pub fn rbd_get_parent(
        image: rbd_image_t,
        parent_image: *mut rbd_linked_image_spec_t,
        parent_snap: *mut rbd_snap_spec_t,
    ) -> c_int;

    pub fn rbd_is_exclusive_lock_owner(image: rbd_image_t, is_owner: *mut c_int) -> c_int;
    pub fn rbd_lock_acquire(image: rbd_image_t, lock_mode: rbd_lock_mode_t) -> c_int;
    pub fn rbd_lock_release(image: rbd_image_t) -> c_int;
    pub fn rbd_lock_get_owners(
        image: rbd_image_t,
        lock_mode: *mut rbd_lock_mode_t,
        lock_owners: *mut *mut c_char,
        max_lock_owners: *mut size_t,
    ) -> c_int;
    pub fn rbd_lock_get_owners_cleanup(lock_owners: *mut *mut c_char, lock_owner_count: size_t);
    pub fn rbd_lock_break(
        image: rbd_image_t,
        lock_mode: rbd_lock_mode_t,
        lock_owner: *const c_char,
    ) -> c_int;

    pub fn rbd_snap_list(
        image: rbd_image_t,
        snaps: *mut rbd_snap_info_t,
        max_snaps: *mut c_int,
    ) -> c_int;
    pub fn rbd_snap_list_end(snaps: *mut rbd_snap_info_t);
    pub fn rbd_snap_exists(image: rbd_image_t, snapname: *const c_char, exists: *mut bool)
    -> c_int;
    pub fn rbd_snap_set(image: rbd_image_t, snapname: *const c_char) -> c_int;
    pub fn rbd_snap_create(image: rbd_image_t, snapname: *const c_char) -> c_int;
    pub fn rbd_snap_remove(image: rbd_image_t, snapname: *const c_char) -> c_int;
    pub fn rbd_snap_get_namespace_type(
        image: rbd_image_t,
        snap_id: u64,
        namespace_type: *mut rbd_snap_namespace_type_t,
    ) -> c_int;

    pub fn rbd_flatten_with_progress(
        image: rbd_image_t,
        cb: librbd_progress_fn_t,
        cbdata: *mut c_void,
    ) -> c_int;
    pub fn rbd_list_children3(
        image: rbd_image_t,
        images: *mut rbd_linked_image_spec_t,
        max_images: *mut size_t,
    ) -> c_int;

    pub fn rbd_read(image: rbd_image_t, ofs: u64, len: size_t, buf: *mut c_char) -> ssize_t;
    pub fn rbd_write(image: rbd_image_t, ofs: u64, len: size_t, buf: *const c_char) -> ssize_t;
    pub fn rbd_discard(image: rbd_image_t, ofs: u64, len: u64) -> c_int;
    pub fn rbd_flush(image: rbd_image_t) -> c_int;
    pub fn rbd_diff_iterate2(
        image: rbd_image_t,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: rbd_diff_iterate_cb_t,
        arg: *mut c_void,
    ) -> c_int;

    pub fn rbd_metadata_get(
        image: rbd_image_t,
        key: *const c_char,
        value: *mut c_char,
        val_len: *mut size_t,
    ) -> c_int;
    pub fn rbd_metadata_set(image: rbd_image_t, key: *const c_char, value: *const c_char) -> c_int;
    pub fn rbd_metadata_remove(image: rbd_image_t, key: *const c_char) -> c_int;
}
