//! Compound write operations, applied atomically to one object.

use libc::{c_char, c_int, size_t};

use crate::error::{Error, Result, Target, check};
use crate::ffi;
use crate::ioctx::IoCtx;
use crate::util::cstr;

/// A compound write: steps recorded here and applied to one object by
/// [`IoCtx::operate`], all of them or none. Steps run in the order added;
/// asserts and compares placed first guard the writes after them.
///
/// ```no_run
/// # fn f(io: &ceph_client::IoCtx) -> ceph_client::Result<()> {
/// use ceph_client::WriteOp;
/// // Compare-and-set: write v2 only if the key still holds v1.
/// let op = WriteOp::new()
///     .omap_cmp_eq("layer.abc", b"v1")
///     .omap_set(&[("layer.abc", b"v2".as_slice())]);
/// match io.operate("records", op) {
///     Err(e) if e.is_canceled() => { /* lost the race: re-read and retry */ }
///     other => other?,
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOp {
    steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Create { exclusive: bool },
    AssertExists,
    AssertVersion(u64),
    OmapCmp { key: String, op: u8, value: Vec<u8> },
    OmapSet(Vec<(String, Vec<u8>)>),
    OmapRmKeys(Vec<String>),
    OmapClear,
    WriteFull(Vec<u8>),
    Remove,
}

/// How [`WriteOp::omap_cmp`] compares the stored value with the given one
/// (bytewise; a missing key compares as the empty value). The OSD's omap
/// compare knows only these three (others give `EINVAL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// stored == given
    Eq,
    /// stored > given
    Gt,
    /// stored < given
    Lt,
}

impl CmpOp {
    fn code(self) -> u8 {
        match self {
            CmpOp::Eq => ffi::LIBRADOS_CMPXATTR_OP_EQ,
            CmpOp::Gt => ffi::LIBRADOS_CMPXATTR_OP_GT,
            CmpOp::Lt => ffi::LIBRADOS_CMPXATTR_OP_LT,
        }
    }
}

impl WriteOp {
    /// An empty operation.
    pub fn new() -> WriteOp {
        WriteOp::default()
    }

    /// Whether no step was added.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Creates the object; `exclusive`: fail with `EEXIST` if it exists.
    pub fn create(mut self, exclusive: bool) -> Self {
        self.steps.push(Step::Create { exclusive });
        self
    }

    /// Fails with `ENOENT` unless the object exists.
    pub fn assert_exists(mut self) -> Self {
        self.steps.push(Step::AssertExists);
        self
    }

    /// Fails unless the object's version is `version` (see
    /// [`IoCtx::last_version`]): `ERANGE` if newer, `EOVERFLOW` if older.
    pub fn assert_version(mut self, version: u64) -> Self {
        self.steps.push(Step::AssertVersion(version));
        self
    }

    /// Fails with `ECANCELED` unless omap `key` holds exactly `value` (an
    /// absent key equals the empty value, so `b""` means "not set yet").
    /// `ENOENT` if the object does not exist.
    pub fn omap_cmp_eq(self, key: &str, value: &[u8]) -> Self {
        self.omap_cmp(key, CmpOp::Eq, value)
    }

    /// Fails with `ECANCELED` unless `stored <op> value` holds.
    pub fn omap_cmp(mut self, key: &str, op: CmpOp, value: &[u8]) -> Self {
        self.steps.push(Step::OmapCmp {
            key: key.to_string(),
            op: op.code(),
            value: value.to_vec(),
        });
        self
    }

    /// Sets omap keys (binary-safe values).
    pub fn omap_set<K: AsRef<str>, V: AsRef<[u8]>>(mut self, pairs: &[(K, V)]) -> Self {
        let pairs = pairs
            .iter()
            .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_vec()))
            .collect();
        self.steps.push(Step::OmapSet(pairs));
        self
    }

    /// Removes omap keys (absent keys are ignored).
    pub fn omap_rm_keys<K: AsRef<str>>(mut self, keys: &[K]) -> Self {
        self.steps.push(Step::OmapRmKeys(
            keys.iter().map(|k| k.as_ref().to_string()).collect(),
        ));
        self
    }

    /// Removes every omap key.
    pub fn omap_clear(mut self) -> Self {
        self.steps.push(Step::OmapClear);
        self
    }

    /// Replaces the object's data.
    pub fn write_full(mut self, data: &[u8]) -> Self {
        self.steps.push(Step::WriteFull(data.to_vec()));
        self
    }

    /// Deletes the object (`ENOENT` if it does not exist).
    pub fn remove(mut self) -> Self {
        self.steps.push(Step::Remove);
        self
    }

    pub(crate) fn operate(self, io: &IoCtx, oid: &str) -> Result<()> {
        const OP: &str = "rados_write_op_operate";
        let o = cstr(OP, "object name", oid)?;
        // Result slots of the compare steps: allocated once, before any
        // pointer into them is handed out, and alive until operate returns.
        let n_cmp = self
            .steps
            .iter()
            .filter(|s| matches!(s, Step::OmapCmp { .. }))
            .count();
        let mut prvals: Box<[c_int]> = vec![0; n_cmp].into_boxed_slice();
        let mut next_prval = prvals.as_mut_ptr();

        let handle = Handle::new(oid)?;
        let h = handle.0;
        for step in &self.steps {
            match step {
                Step::Create { exclusive } => {
                    let mode = if *exclusive {
                        ffi::LIBRADOS_CREATE_EXCLUSIVE
                    } else {
                        ffi::LIBRADOS_CREATE_IDEMPOTENT
                    };
                    // SAFETY: `h` is a live write op; the category argument
                    // may be null (deprecated, ignored).
                    unsafe { ffi::rados_write_op_create(h, mode, std::ptr::null()) }
                }
                // SAFETY: live write op.
                Step::AssertExists => unsafe { ffi::rados_write_op_assert_exists(h) },
                // SAFETY: live write op.
                Step::AssertVersion(v) => unsafe { ffi::rados_write_op_assert_version(h, *v) },
                Step::OmapCmp { key, op, value } => {
                    let prval = next_prval;
                    // SAFETY: `prvals` has one slot per compare step, so
                    // advancing once per compare stays within (or one past)
                    // the allocation.
                    next_prval = unsafe { next_prval.add(1) };
                    // SAFETY: key and value are readable for their explicit
                    // lengths (copied); `prval` points into `prvals`, which
                    // outlives the operate call.
                    unsafe {
                        ffi::rados_write_op_omap_cmp2(
                            h,
                            key.as_ptr().cast(),
                            *op,
                            value.as_ptr().cast(),
                            key.len(),
                            value.len(),
                            prval,
                        )
                    }
                }
                Step::OmapSet(pairs) => {
                    let keys: Vec<*const c_char> =
                        pairs.iter().map(|(k, _)| k.as_ptr().cast()).collect();
                    let vals: Vec<*const c_char> =
                        pairs.iter().map(|(_, v)| v.as_ptr().cast()).collect();
                    let klens: Vec<size_t> = pairs.iter().map(|(k, _)| k.len()).collect();
                    let vlens: Vec<size_t> = pairs.iter().map(|(_, v)| v.len()).collect();
                    // SAFETY: four arrays of `pairs.len()` entries; each key
                    // and value pointer is readable for its length (copied).
                    unsafe {
                        ffi::rados_write_op_omap_set2(
                            h,
                            keys.as_ptr(),
                            vals.as_ptr(),
                            klens.as_ptr(),
                            vlens.as_ptr(),
                            pairs.len(),
                        )
                    }
                }
                Step::OmapRmKeys(keys) => {
                    let ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr().cast()).collect();
                    let lens: Vec<size_t> = keys.iter().map(|k| k.len()).collect();
                    // SAFETY: two arrays of `keys.len()` entries; each key
                    // readable for its length (copied).
                    unsafe {
                        ffi::rados_write_op_omap_rm_keys2(
                            h,
                            ptrs.as_ptr(),
                            lens.as_ptr(),
                            keys.len(),
                        )
                    }
                }
                // SAFETY: live write op.
                Step::OmapClear => unsafe { ffi::rados_write_op_omap_clear(h) },
                // SAFETY: `data` readable for its length (copied).
                Step::WriteFull(data) => unsafe {
                    ffi::rados_write_op_write_full(h, data.as_ptr().cast(), data.len())
                },
                // SAFETY: live write op.
                Step::Remove => unsafe { ffi::rados_write_op_remove(h) },
            }
        }
        // SAFETY: live write op, valid ioctx, NUL-terminated name; a null
        // mtime means "now". Every pointer registered above is still live.
        let ret = unsafe {
            ffi::rados_write_op_operate(h, io.ptr(), o.as_ptr(), std::ptr::null_mut(), 0)
        };
        drop(handle);
        check(OP, || Target::Object(oid.to_string()), ret.into())?;
        // The op as a whole succeeded, so every compare did; report a
        // compare's own error if librados recorded one anyway.
        for &r in prvals.iter() {
            check(
                "rados_write_op_omap_cmp2",
                || Target::Object(oid.to_string()),
                r.into(),
            )?;
        }
        Ok(())
    }
}

/// A `rados_write_op_t`, released on drop.
struct Handle(ffi::rados_write_op_t);

impl Handle {
    fn new(oid: &str) -> Result<Handle> {
        // SAFETY: no preconditions; null means allocation failure.
        let p = unsafe { ffi::rados_create_write_op() };
        if p.is_null() {
            return Err(Error::ceph(
                "rados_create_write_op",
                Target::Object(oid.to_string()),
                -(libc::ENOMEM as i64),
            ));
        }
        Ok(Handle(p))
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by `rados_create_write_op`, released once, never
        // while an operate call on it is running.
        unsafe { ffi::rados_release_write_op(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_records_steps_in_order() {
        let op = WriteOp::new()
            .create(true)
            .assert_exists()
            .assert_version(7)
            .omap_cmp_eq("k", b"")
            .omap_set(&[("k", b"v".as_slice())])
            .omap_rm_keys(&["x"])
            .omap_clear()
            .write_full(b"data")
            .remove();
        assert_eq!(op.steps.len(), 9);
        assert_eq!(op.steps[0], Step::Create { exclusive: true });
        assert_eq!(
            op.steps[3],
            Step::OmapCmp {
                key: "k".into(),
                op: 1,
                value: vec![]
            }
        );
        assert_eq!(
            op.steps[4],
            Step::OmapSet(vec![("k".into(), b"v".to_vec())])
        );
        assert!(WriteOp::new().is_empty());
    }

    #[test]
    fn omap_set_accepts_owned_pairs() {
        let pairs = vec![("a".to_string(), vec![0u8, 1, 2])];
        let op = WriteOp::new().omap_set(&pairs);
        assert_eq!(
            op.steps,
            vec![Step::OmapSet(vec![("a".into(), vec![0, 1, 2])])]
        );
    }
}
