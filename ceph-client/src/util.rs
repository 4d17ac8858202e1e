//! Small helpers for crossing the C boundary.

use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::path::Path;

use crate::error::{Error, Result};

/// `s` as a C string, or [`Error::Nul`] naming the call and the argument.
pub(crate) fn cstr(op: &'static str, what: &'static str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Nul {
        op,
        what,
        value: s.to_string(),
    })
}

/// An optional C string (`None` becomes a null pointer at the call site).
pub(crate) fn opt_cstr(
    op: &'static str,
    what: &'static str,
    s: Option<&str>,
) -> Result<Option<CString>> {
    s.map(|s| cstr(op, what, s)).transpose()
}

/// The pointer of an optional C string, null for `None`.
pub(crate) fn opt_ptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
}

/// A path as a C string.
pub(crate) fn path_cstr(op: &'static str, what: &'static str, p: &Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::Nul {
        op,
        what,
        value: p.display().to_string(),
    })
}

/// Copies a C string owned by the C library into a `String` (lossy for
/// invalid UTF-8; Ceph names are UTF-8). Null becomes the empty string.
///
/// # Safety
/// `p` must be null or point to a NUL-terminated string valid for reads.
pub(crate) unsafe fn from_c(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the caller guarantees `p` is a valid NUL-terminated string.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The first NUL-terminated string in `buf` (all of it if there is no NUL).
pub(crate) fn until_nul(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Splits a buffer of NUL-terminated strings into at most `n` strings.
pub(crate) fn split_nul(buf: &[u8], n: usize) -> Vec<String> {
    buf.split(|&b| b == 0)
        .take(n)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_in_argument_is_an_error_not_a_panic() {
        let e = cstr("rados_stat", "object name", "a\0b").unwrap_err();
        assert!(matches!(
            e,
            Error::Nul {
                op: "rados_stat",
                what: "object name",
                ..
            }
        ));
        assert!(opt_cstr("x", "y", None).unwrap().is_none());
        assert!(opt_ptr(&None).is_null());
    }

    #[test]
    fn nul_separated_buffers() {
        assert_eq!(until_nul(b"abc\0def"), "abc");
        assert_eq!(until_nul(b"abc"), "abc");
        assert_eq!(split_nul(b"a\0bb\0\0", 2), vec!["a", "bb"]);
        assert_eq!(split_nul(b"", 0), Vec::<String>::new());
    }
}
