//! The C ABI (`include/sfr.h`, generated from this module by cbindgen; see cbindgen.toml).
//!
//! Conventions (DESIGN.md, "C ABI conventions"):
//! * every fallible function returns an [`sfr_status`]; a failing call stores a message naming
//!   the function and the problem in a thread-local slot that `sfr_last_error_message` reads;
//! * no panic crosses the boundary: every body runs under `catch_unwind` ([`guard`]);
//! * outputs are written only on success, every pointer is checked for NULL, every buffer comes
//!   with its length and is checked against the dims and dtype;
//! * handles (`sfr_dataset *`, `sfr_job *`, `sfr_model *`) are opaque values that index a global
//!   registry ([`registry`]); they are never dereferenced. So a freed handle, a handle of the
//!   wrong kind or a pointer this library never returned is detected (`SFR_ERR_BAD_HANDLE`) and
//!   a double free is a harmless no-op. Handle values are never reused within a process.
#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

pub mod boundary;
pub mod dataset;
pub mod job;
pub mod model;
pub mod registry;
pub mod stitch;
pub mod view;

use boundary::{copy_sized, guard};
use std::ffi::c_char;

pub use boundary::*;
pub use dataset::*;
pub use job::*;
pub use model::*;
pub use stitch::*;
pub use view::*;

static VERSION_C: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// The library version ("MAJOR.MINOR.PATCH", Cargo.toml's), as a static NUL-terminated string.
/// Never NULL. Compare with the SFR_VERSION macro to detect a header/library mismatch.
/// Thread-safe.
#[no_mangle]
pub extern "C" fn sfr_version() -> *const c_char {
    VERSION_C.as_ptr() as *const c_char
}

/// What this process can compute on, as NUL-terminated JSON:
/// `{"library_version": "0.1.0", "libtorch_dir": "/…/torch/lib", "cuda_linked": true,
/// "cuda_available": false, "cuda_device_count": 0, "cudnn_available": false, "auto": "cpu"}`.
/// `cuda_linked` says whether libtorch_cuda is loaded in the process (without it CUDA is never
/// used); `auto` is the device that "auto" (the default of `sfr_model_load` and of the
/// configs) resolves to. Sized like `sfr_model_metadata_json`: `*needed` (required) receives
/// the size including the NUL; if `len` < that, SFR_ERR_BUFFER_TOO_SMALL and `buf` is
/// untouched (call with NULL, 0 first). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_device_info(buf: *mut c_char, len: usize, needed: *mut usize) -> sfr_status {
    guard("sfr_device_info", || copy_sized(&crate::nn::device_info().to_string(), buf, len, needed, "the device information"))
}
