//! The cluster connection: configuration, connect with a bounded timeout,
//! monitor commands, fencing (blocklist) and identity of this client.

use std::path::PathBuf;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result, Target, check};
use crate::ffi;
use crate::ioctx::IoCtx;
use crate::pool::PoolFlags;
use crate::util::{cstr, path_cstr};

/// How to reach and authenticate to a cluster; the settings the `rbd` tool
/// takes as `-c`, `--id`, `--keyring`, `--cluster`.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// ceph.conf to read. `None` reads Ceph's default search path
    /// (`$CEPH_CONF`, `/etc/ceph/$cluster.conf`, `~/.ceph/$cluster.conf`,
    /// `./$cluster.conf`) and is fine with none of them existing.
    pub conf: Option<PathBuf>,
    /// cephx user without the `client.` prefix (default `admin`). A leading
    /// `client.` is accepted and not doubled.
    pub id: Option<String>,
    /// Keyring holding the user's key (default: what the conf says).
    pub keyring: Option<PathBuf>,
    /// Cluster name (default `ceph`).
    pub cluster: Option<String>,
    /// Further configuration options, applied in order after everything
    /// else, so they override the conf file and the timeouts below (for
    /// example `("mon_host", "127.0.0.1:3300")`).
    pub options: Vec<(String, String)>,
    /// Bound for connecting and for every monitor and OSD operation of this
    /// handle: sets `client_mount_timeout`, `rados_mon_op_timeout` and
    /// `rados_osd_op_timeout` (rounded up to whole seconds, at least 1 s),
    /// so an unreachable cluster fails with `ETIMEDOUT` instead of hanging.
    /// Override one of them through `options` (e.g. `rados_osd_op_timeout`
    /// = `0` for no limit on data I/O).
    pub timeout: Duration,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        ConnectConfig {
            conf: None,
            id: None,
            keyring: None,
            cluster: None,
            options: Vec::new(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The librados cluster handle; shut down when the last owner (a [`Rados`],
/// [`IoCtx`], image or watch) goes away.
pub(crate) struct Cluster {
    pub(crate) ptr: ffi::rados_t,
}

// SAFETY: a librados cluster handle (`RadosClient`) is internally locked and
// documented as usable from several threads at once; this crate never
// mutates its configuration after `rados_connect`.
unsafe impl Send for Cluster {}
// SAFETY: as above, all calls made through a shared `&Cluster` are
// thread-safe in librados.
unsafe impl Sync for Cluster {}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `rados_create2`; every ioctx, image and
        // watch holds an `Arc<Cluster>`, so none of them is alive any more
        // and this is the last use of the handle.
        unsafe { ffi::rados_shutdown(self.ptr) };
    }
}

/// A connected cluster handle. Cheap to clone (clones share the connection);
/// the connection is shut down when the last clone and the last [`IoCtx`],
/// image and watch made from it are dropped.
#[derive(Clone)]
pub struct Rados {
    cluster: Arc<Cluster>,
}

impl std::fmt::Debug for Rados {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rados")
            .field("instance_id", &self.instance_id())
            .finish()
    }
}

fn timeout_secs(timeout: Duration) -> u64 {
    let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    secs.max(1)
}

impl Rados {
    /// Creates a handle, applies `config` and connects. Fails with
    /// `ETIMEDOUT` within about `config.timeout` when no monitor answers.
    pub fn connect(config: &ConnectConfig) -> Result<Rados> {
        let cluster_name = cstr(
            "rados_create2",
            "cluster name",
            config.cluster.as_deref().unwrap_or("ceph"),
        )?;
        let id = config.id.as_deref().unwrap_or("admin");
        let id = id.strip_prefix("client.").unwrap_or(id);
        let name = cstr("rados_create2", "client id", &format!("client.{id}"))?;
        let mut ptr: ffi::rados_t = ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer; both strings are
        // NUL-terminated and outlive the call.
        let ret = unsafe { ffi::rados_create2(&mut ptr, cluster_name.as_ptr(), name.as_ptr(), 0) };
        check("rados_create2", || Target::Cluster, ret.into())?;
        // From here on the handle is shut down on every error path.
        let cluster = Cluster { ptr };

        match &config.conf {
            Some(path) => {
                let c = path_cstr("rados_conf_read_file", "conf path", path)?;
                // SAFETY: the handle is valid and not yet connected; `c` is
                // NUL-terminated.
                let ret = unsafe { ffi::rados_conf_read_file(cluster.ptr, c.as_ptr()) };
                check(
                    "rados_conf_read_file",
                    || Target::ConfigOption(path.display().to_string()),
                    ret.into(),
                )?;
            }
            None => {
                // SAFETY: a null path asks librados for its default search
                // path; the handle is valid and not yet connected.
                let ret = unsafe { ffi::rados_conf_read_file(cluster.ptr, ptr::null()) };
                // No default conf file is fine: options may name the monitors.
                if ret < 0 && ret != -libc::ENOENT {
                    check(
                        "rados_conf_read_file",
                        || Target::ConfigOption("default conf".into()),
                        ret.into(),
                    )?;
                }
            }
        }

        let secs = timeout_secs(config.timeout).to_string();
        let mut settings: Vec<(&str, &str)> = Vec::new();
        let keyring;
        if let Some(k) = &config.keyring {
            keyring = k.to_str().ok_or_else(|| Error::InvalidArgument {
                op: "rados_conf_set",
                reason: format!("keyring path {} is not UTF-8", k.display()),
            })?;
            settings.push(("keyring", keyring));
        }
        settings.push(("client_mount_timeout", &secs));
        settings.push(("rados_mon_op_timeout", &secs));
        settings.push(("rados_osd_op_timeout", &secs));
        for (k, v) in &config.options {
            settings.push((k, v));
        }
        for (key, value) in settings {
            set_conf(&cluster, key, value)?;
        }

        // SAFETY: the handle is valid and configured; connect may block up to
        // `client_mount_timeout`.
        let ret = unsafe { ffi::rados_connect(cluster.ptr) };
        check("rados_connect", || Target::Cluster, ret.into())?;
        tracing::debug!(client = %name.to_string_lossy(), "connected to ceph");
        Ok(Rados {
            cluster: Arc::new(cluster),
        })
    }

    pub(crate) fn from_cluster(cluster: Arc<Cluster>) -> Rados {
        Rados { cluster }
    }

    /// An I/O context on `pool`, in RADOS namespace `namespace` (`None` or
    /// `Some("")`: the default namespace). `ENOENT` if the pool does not exist.
    pub fn ioctx(&self, pool: &str, namespace: Option<&str>) -> Result<IoCtx> {
        IoCtx::create(self.cluster.clone(), pool, namespace, false)
    }

    /// [`Rados::ioctx`], but its writes are sent even while the pool is
    /// full: each then fails at once with `ENOSPC` (an OSD is full) or
    /// `EDQUOT` (the pool's quota is reached) instead of waiting, possibly
    /// until the operation timeout, for space; object removals go through
    /// and free space. librbd calls on it inherit this (an image removal
    /// fails too: librbd 16 first moves the image to the trash, a write).
    pub fn ioctx_full_try(&self, pool: &str, namespace: Option<&str>) -> Result<IoCtx> {
        IoCtx::create(self.cluster.clone(), pool, namespace, true)
    }

    /// The full-state flags the OSD map holds for `pool` (one monitor
    /// command; needs `allow r` on the monitors). `ENOENT` if there is no
    /// such pool.
    pub fn pool_flags(&self, pool: &str) -> Result<PoolFlags> {
        let command = r#"{"prefix":"osd pool ls","detail":"detail","format":"json"}"#;
        let (out, _) = self.mon_command(command)?;
        PoolFlags::from_pool_list(&out, pool).map_err(|e| match e {
            crate::pool::ParseError::NoPool => Error::Op {
                op: "rados_mon_command",
                target: Target::Pool(pool.to_string()),
                errno: libc::ENOENT,
            },
            crate::pool::ParseError::Json(reason) => Error::BadData {
                op: "rados_mon_command",
                target: Target::Command(command.to_string()),
                reason,
            },
        })
    }

    /// This client's global id (the `N` of `client.N` that cls locks and
    /// watchers report).
    pub fn instance_id(&self) -> u64 {
        // SAFETY: the handle is connected and valid for the life of `self`.
        unsafe { ffi::rados_get_instance_id(self.cluster.ptr) }
    }

    /// The address of this client's session, as `ceph osd blocklist` and
    /// [`Rados::blocklist_add`] take it (e.g. `127.0.0.1:0/3141592`).
    pub fn client_addr(&self) -> Result<String> {
        let mut out: *mut libc::c_char = ptr::null_mut();
        // SAFETY: valid handle and out-pointer.
        let ret = unsafe { ffi::rados_getaddrs(self.cluster.ptr, &mut out) };
        check("rados_getaddrs", || Target::Cluster, ret.into())?;
        // SAFETY: on success `out` is a NUL-terminated `strdup` copy or null.
        let addrs = unsafe { crate::util::from_c(out) };
        // SAFETY: `out` was allocated by `strdup` inside librados (or is
        // null) and is not used after this.
        unsafe { libc::free(out.cast()) };
        Ok(single_addr(&addrs))
    }

    /// Fences a client: the OSDs refuse its operations for `expire` (rounded
    /// up to whole seconds; zero means the cluster default, one hour). Waits
    /// until this handle has the OSD map carrying the entry. An OSD refuses
    /// the fenced client once it has that map too: the next operation of this
    /// handle makes it catch up, so what the fencer writes after this call is
    /// never overwritten by the fenced client, though a write of the fenced
    /// client that reaches an OSD before any such operation may still land.
    pub fn blocklist_add(&self, client_addr: &str, expire: Duration) -> Result<()> {
        let addr = cstr("rados_blocklist_add", "client address", client_addr)?;
        let mut bytes = addr.into_bytes_with_nul();
        let secs = if expire.is_zero() {
            0
        } else {
            timeout_secs(expire)
        };
        let secs = u32::try_from(secs).unwrap_or(u32::MAX);
        // SAFETY: `bytes` is a NUL-terminated, writable buffer that outlives
        // the call (librados only reads it despite the non-const pointer).
        let ret =
            unsafe { ffi::rados_blocklist_add(self.cluster.ptr, bytes.as_mut_ptr().cast(), secs) };
        check(
            "rados_blocklist_add",
            || Target::Command(format!("osd blocklist add {client_addr}")),
            ret.into(),
        )?;
        Ok(())
    }

    /// Sends one JSON monitor command (e.g. `{"prefix":"osd pool ls","format":"json"}`)
    /// and returns `(outbuf, outs)`: the command's output and its status
    /// text. On failure the error carries the status text.
    pub fn mon_command(&self, json: &str) -> Result<(String, String)> {
        let cmd = cstr("rados_mon_command", "command", json)?;
        let mut cmds = [cmd.as_ptr()];
        let mut outbuf: *mut libc::c_char = ptr::null_mut();
        let mut outbuf_len: libc::size_t = 0;
        let mut outs: *mut libc::c_char = ptr::null_mut();
        let mut outs_len: libc::size_t = 0;
        // SAFETY: `cmds` holds one valid C string pointer for the duration
        // of the call; all out-pointers are valid; no input buffer.
        let ret = unsafe {
            ffi::rados_mon_command(
                self.cluster.ptr,
                cmds.as_mut_ptr(),
                1,
                ptr::null(),
                0,
                &mut outbuf,
                &mut outbuf_len,
                &mut outs,
                &mut outs_len,
            )
        };
        // SAFETY: librados set each buffer to null or to `len` readable bytes
        // it allocated; we copy and free each exactly once.
        let (out, status) =
            unsafe { (take_buffer(outbuf, outbuf_len), take_buffer(outs, outs_len)) };
        if ret < 0 {
            return Err(Error::MonCommand {
                op: "rados_mon_command",
                command: json.to_string(),
                errno: -ret,
                status,
            });
        }
        Ok((out, status))
    }

    /// Blocks until every watch callback already queued has run.
    pub(crate) fn watch_flush(cluster: &Cluster) -> i32 {
        // SAFETY: the handle is valid for the life of `cluster`.
        unsafe { ffi::rados_watch_flush(cluster.ptr) }
    }
}

fn set_conf(cluster: &Cluster, key: &str, value: &str) -> Result<()> {
    let k = cstr("rados_conf_set", "option name", key)?;
    let v = cstr("rados_conf_set", "option value", value)?;
    // SAFETY: valid, not yet connected handle; both strings NUL-terminated.
    let ret = unsafe { ffi::rados_conf_set(cluster.ptr, k.as_ptr(), v.as_ptr()) };
    check(
        "rados_conf_set",
        || Target::ConfigOption(key.to_string()),
        ret.into(),
    )?;
    Ok(())
}

/// Copies and frees a buffer returned by librados.
///
/// # Safety
/// `buf` must be null or a `rados_buffer_free`-able allocation of at least
/// `len` bytes, not used afterwards.
unsafe fn take_buffer(buf: *mut libc::c_char, len: libc::size_t) -> String {
    if buf.is_null() {
        return String::new();
    }
    // SAFETY: per the contract, `buf` holds `len` readable bytes.
    let s = String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) })
        .into_owned();
    // SAFETY: allocated by librados, freed once.
    unsafe { ffi::rados_buffer_free(buf) };
    s
}

/// Normalises a client address: `rados_getaddrs` prints an address vector
/// (`[v2:a/n,v1:b/n]`) when the session has several, cls_lock reports
/// `v1:a/n`; blocklisting wants one address and matches any protocol. Takes
/// the first, without its protocol prefix, so addresses from different
/// sources compare equal.
pub(crate) fn single_addr(addrs: &str) -> String {
    let inner = addrs.trim().trim_start_matches('[').trim_end_matches(']');
    let first = inner.split(',').next().unwrap_or(inner);
    let first = first
        .strip_prefix("v2:")
        .or_else(|| first.strip_prefix("v1:"))
        .unwrap_or(first);
    let first = first.strip_prefix("any:").unwrap_or(first);
    first.to_string()
}

/// The (major, minor, extra) version of the librados library in use.
pub fn librados_version() -> (i32, i32, i32) {
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: three valid out-pointers.
    unsafe { ffi::rados_version(&mut a, &mut b, &mut c) };
    (a, b, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_up_to_whole_seconds() {
        assert_eq!(timeout_secs(Duration::from_millis(1)), 1);
        assert_eq!(timeout_secs(Duration::ZERO), 1);
        assert_eq!(timeout_secs(Duration::from_millis(2500)), 3);
        assert_eq!(timeout_secs(Duration::from_secs(10)), 10);
    }

    #[test]
    fn addr_vectors_reduce_to_one_address() {
        assert_eq!(single_addr("127.0.0.1:0/123"), "127.0.0.1:0/123");
        assert_eq!(
            single_addr("[v2:10.0.0.1:0/7,v1:10.0.0.1:0/7]"),
            "10.0.0.1:0/7"
        );
        assert_eq!(single_addr("any:127.0.0.1:0/5"), "127.0.0.1:0/5");
    }

    #[test]
    fn nul_in_config_is_reported_before_touching_ceph() {
        let cfg = ConnectConfig {
            id: Some("a\0b".into()),
            ..Default::default()
        };
        let e = Rados::connect(&cfg).unwrap_err();
        assert!(matches!(e, Error::Nul { .. }), "{e}");
    }

    #[test]
    fn library_version_is_pacific_abi() {
        let (major, _, _) = librados_version();
        assert!(major >= 3);
    }
}
