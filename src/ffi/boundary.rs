//! The boundary itself, below every other file of the C ABI: status codes and `FfiError`, the
//! thread's last-error slot (`sfr_last_error_message`), the panic guard every exported body
//! runs under, C strings and paths, and the two ways of copying text out (truncated, sized).
use crate::error::Error;
use std::cell::RefCell;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Result of every fallible call. `SFR_OK` is 0; on any other value the thread's last error
/// message (`sfr_last_error_message`) says what went wrong.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum sfr_status {
    SFR_OK = 0,
    /// A required pointer was NULL.
    SFR_ERR_NULL_POINTER = 1,
    /// Bad dims, dtype, geometry, JSON or config (unknown key, bad value...).
    SFR_ERR_INVALID_ARGUMENT = 2,
    /// An output buffer is too short; the message says the size needed.
    SFR_ERR_BUFFER_TOO_SMALL = 3,
    /// A file could not be read or written.
    SFR_ERR_IO = 4,
    /// A file's content is not acceptable (corrupt or foreign model...).
    SFR_ERR_FORMAT = 5,
    /// The job was cancelled.
    SFR_ERR_CANCELLED = 6,
    /// libtorch reported an error.
    SFR_ERR_TORCH = 7,
    /// The handle was not created by this library, was already freed, or is of the wrong kind.
    SFR_ERR_BAD_HANDLE = 8,
    /// The call does not fit the object's state (result already taken, wrong kind of job,
    /// waiting on a job from its own progress callback).
    SFR_ERR_STATE = 9,
    /// An internal error was caught at the boundary (a bug: please report the message).
    SFR_ERR_PANIC = 10,
}

pub use sfr_status::*;

/// An error on its way to the caller: a status and the message for `sfr_last_error_message`.
#[derive(Debug)]
pub struct FfiError {
    pub status: sfr_status,
    pub message: String,
}

impl FfiError {
    pub fn new(status: sfr_status, message: impl Into<String>) -> FfiError {
        FfiError { status, message: message.into() }
    }
    pub fn null(what: &str) -> FfiError {
        FfiError::new(SFR_ERR_NULL_POINTER, format!("{what} is NULL"))
    }
    pub fn invalid(message: impl Into<String>) -> FfiError {
        FfiError::new(SFR_ERR_INVALID_ARGUMENT, message)
    }
    pub fn too_small(message: impl Into<String>) -> FfiError {
        FfiError::new(SFR_ERR_BUFFER_TOO_SMALL, message)
    }
    pub fn state(message: impl Into<String>) -> FfiError {
        FfiError::new(SFR_ERR_STATE, message)
    }
}

impl From<Error> for FfiError {
    fn from(e: Error) -> FfiError {
        let status = match &e {
            Error::Io { .. } => SFR_ERR_IO,
            Error::Format { .. } => SFR_ERR_FORMAT,
            Error::Invalid(_) => SFR_ERR_INVALID_ARGUMENT,
            Error::Torch(_) => SFR_ERR_TORCH,
            Error::Cancelled => SFR_ERR_CANCELLED,
        };
        FfiError::new(status, e.to_string())
    }
}

pub type FfiResult<T> = std::result::Result<T, FfiError>;

thread_local! {
    pub(crate) static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

pub(crate) fn set_last_error(message: String) {
    LAST_ERROR.with(|m| *m.borrow_mut() = message);
}

/// Runs the body of an exported function: errors become a status plus the thread's last error
/// message (prefixed with the function's name), panics become `SFR_ERR_PANIC`.
pub(crate) fn guard(function: &str, body: impl FnOnce() -> FfiResult<()>) -> sfr_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => SFR_OK,
        Ok(Err(e)) => {
            set_last_error(format!("{function}: {}", e.message));
            e.status
        }
        Err(p) => {
            set_last_error(format!("{function}: internal error: {}", crate::job::panic_message(&p)));
            SFR_ERR_PANIC
        }
    }
}

/// For the `void` functions (the frees): errors only reach the last error message.
pub(crate) fn guard_void(function: &str, body: impl FnOnce() -> FfiResult<()>) {
    let _ = guard(function, body);
}

/// A required, NUL-terminated UTF-8 string argument.
pub(crate) unsafe fn c_str<'a>(p: *const c_char, what: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(FfiError::null(what));
    }
    CStr::from_ptr(p).to_str().map_err(|e| FfiError::invalid(format!("{what} is not valid UTF-8: {e}")))
}

/// A path argument: any bytes but NUL (Linux paths need not be UTF-8).
pub(crate) unsafe fn c_path<'a>(p: *const c_char, what: &str) -> FfiResult<&'a std::path::Path> {
    if p.is_null() {
        return Err(FfiError::null(what));
    }
    let bytes = CStr::from_ptr(p).to_bytes();
    if bytes.is_empty() {
        return Err(FfiError::invalid(format!("{what} is empty")));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(std::path::Path::new(std::ffi::OsStr::from_bytes(bytes)))
    }
    #[cfg(not(unix))]
    {
        std::str::from_utf8(bytes).map(std::path::Path::new).map_err(|e| FfiError::invalid(format!("{what} is not valid UTF-8: {e}")))
    }
}

/// Copies `s` into `buf` (capacity `buf.len()` bytes including the NUL), cutting at a UTF-8
/// character boundary so the result is always valid UTF-8.
pub(crate) fn copy_truncated(s: &str, buf: &mut [c_char]) {
    if buf.is_empty() {
        return;
    }
    let mut n = s.len().min(buf.len() - 1);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    for (d, &b) in buf.iter_mut().zip(&s.as_bytes()[..n]) {
        *d = b as c_char;
    }
    buf[n] = 0;
}

/// Copies `text` and a NUL into `buf` when it fits: `*needed` (required) receives the size in
/// bytes including the NUL; a shorter `len` is SFR_ERR_BUFFER_TOO_SMALL and `buf` is untouched.
pub(crate) unsafe fn copy_sized(text: &str, buf: *mut c_char, len: usize, needed: *mut usize, what: &str) -> FfiResult<()> {
    if needed.is_null() {
        return Err(FfiError::null("needed"));
    }
    let need = text.len() + 1;
    *needed = need;
    if len < need {
        return Err(FfiError::too_small(format!("buf has {len} bytes, {what} needs {need}")));
    }
    if buf.is_null() {
        return Err(FfiError::null("buf"));
    }
    std::ptr::copy_nonoverlapping(text.as_ptr(), buf as *mut u8, text.len());
    *buf.add(text.len()) = 0;
    Ok(())
}

/// Copies this thread's last error message into `buf` (NUL-terminated, truncated at a UTF-8
/// character boundary to fit `len` bytes) and returns the length of the whole message + 1, so
/// a caller can size a buffer: `n = sfr_last_error_message(NULL, 0)`. The message is empty
/// (and the return value 1) when no call on this thread has failed yet. It is kept until the
/// next failing call on the same thread; successful calls do not clear it.
/// `buf` may be NULL when `len` is 0. Thread-safe (each thread has its own message).
#[no_mangle]
pub unsafe extern "C" fn sfr_last_error_message(buf: *mut c_char, len: usize) -> usize {
    catch_unwind(AssertUnwindSafe(|| {
        LAST_ERROR.with(|m| {
            let m = m.borrow();
            if !buf.is_null() && len > 0 {
                copy_truncated(&m, std::slice::from_raw_parts_mut(buf, len));
            }
            m.len() + 1
        })
    }))
    .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_utf8() {
        let mut buf = [1 as c_char; 4];
        copy_truncated("aéb", &mut buf); // 'é' is 2 bytes: "aé" fits 3 bytes + NUL
        assert_eq!(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap(), "aé");
        let mut buf = [1 as c_char; 3];
        copy_truncated("aéb", &mut buf); // only "a" fits before the 2-byte 'é'
        assert_eq!(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap(), "a");
    }

    #[test]
    fn errors_map_to_statuses() {
        let st = guard("f", || Err(Error::format("/x", "bad").into()));
        assert_eq!(st, SFR_ERR_FORMAT);
        let mut buf = [0 as c_char; 64];
        let n = unsafe { sfr_last_error_message(buf.as_mut_ptr(), buf.len()) };
        let s = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
        assert_eq!(s, "f: /x: bad");
        assert_eq!(n, s.len() + 1);
        assert_eq!(guard("g", || panic!("boom")), SFR_ERR_PANIC);
        assert_eq!(unsafe { sfr_last_error_message(std::ptr::null_mut(), 0) }, "g: internal error: boom".len() + 1);
        assert_eq!(guard("h", || Err(Error::Cancelled.into())), SFR_ERR_CANCELLED);
    }
}
