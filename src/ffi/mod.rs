//! The C ABI (`include/llmproxy.h`, generated from these files by cbindgen).
//!
//! Rules every export follows:
//! - NULL-safe: a NULL handle or a NULL pointer with a non-zero length is
//!   `LLMPROXY_INVALID_ARGUMENT` (or a harmless no-op for void functions);
//! - panic-safe: the whole body, argument checks and writes to output pointers included, runs
//!   inside [`boundary`]; a panic becomes the return type's [`PanicValue`] (for a status,
//!   `LLMPROXY_INTERNAL`) and never unwinds into C or C++;
//! - input is `(pointer, length)`: no NUL terminator is required, and no borrowed pointer is
//!   kept past the call;
//! - strings handed out are owned by the handle they come from, NUL-terminated, and valid
//!   until that handle is freed.
//!
//! One file per handle type, each using only this one and the files before it:
//! - `router`: the router handle (create, validate, free, endpoints, metrics, options);
//! - `shared`: the shared-state region (made before fork) and routers attached to it;
//! - `pick`: picks (synchronous, callback, polled ticket) handing out request handles;
//! - `request`: the request handle (decision, upstream rewrites, retry, finish);
//! - `errors`: error bodies and HTTP statuses for errors hosts produce themselves.
//!
//! This file: the rules above, the panic boundary, the status enum, the borrowed input types
//! and the pointer helpers every export uses.

#![allow(non_camel_case_types)]

use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use crate::error::PickError;

// In the order of their functions in include/llmproxy.h: cbindgen writes them in the order
// the modules are declared (blank lines keep rustfmt from sorting the declarations).
mod router;

mod shared;

mod pick;

mod request;

mod errors;

pub use errors::*;
pub use pick::*;
pub use request::*;
pub use router::*;
pub use shared::*;

/// Result of a C ABI call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum llmproxy_status {
    /// Success.
    LLMPROXY_OK = 0,
    /// `llmproxy_pick_async` / `llmproxy_pick_start`: the decision comes later, through the
    /// callback / by polling the ticket.
    LLMPROXY_PENDING = 1,
    /// A NULL pointer, a bad length or malformed argument.
    LLMPROXY_INVALID_ARGUMENT = 2,
    /// The configuration was rejected (the message names the field and the reason).
    LLMPROXY_INVALID_CONFIG = 3,
    /// The request is malformed (HTTP 400).
    LLMPROXY_BAD_REQUEST = 4,
    /// Unknown model or no matching rule (HTTP 404).
    LLMPROXY_MODEL_NOT_FOUND = 5,
    /// The body is larger than `max_body_bytes` (HTTP 413).
    LLMPROXY_PAYLOAD_TOO_LARGE = 6,
    /// No usable endpoint (HTTP 503).
    LLMPROXY_NO_ENDPOINT = 7,
    /// An internal error, e.g. a caught panic (HTTP 500).
    LLMPROXY_INTERNAL = 8,
    /// Not routed, and nothing to answer: proxy the request untouched, as one
    /// `llmproxy_router_should_intercept` refuses (a request on a stored Responses answer
    /// whose endpoint neither this router nor the Metadata-Center knows). Finish the handle
    /// as any other (`llmproxy_request_finish`); HTTP status 0.
    LLMPROXY_PASSTHROUGH = 9,
}

use llmproxy_status::*;

impl From<&PickError> for llmproxy_status {
    fn from(e: &PickError) -> Self {
        match e {
            PickError::BadRequest { .. } => LLMPROXY_BAD_REQUEST,
            PickError::ModelNotFound { .. } => LLMPROXY_MODEL_NOT_FOUND,
            PickError::PassThrough { .. } => LLMPROXY_PASSTHROUGH,
            PickError::PayloadTooLarge { .. } => LLMPROXY_PAYLOAD_TOO_LARGE,
            PickError::NoEndpoint { .. } => LLMPROXY_NO_ENDPOINT,
            PickError::Internal { .. } => LLMPROXY_INTERNAL,
        }
    }
}

/// A borrowed byte string: `ptr` may be NULL only when `len` is 0.
#[repr(C)]
pub struct llmproxy_str {
    /// First byte.
    pub ptr: *const c_char,
    /// Number of bytes.
    pub len: usize,
}

/// A borrowed request header.
#[repr(C)]
pub struct llmproxy_header {
    /// Header name (matched case-insensitively).
    pub name: *const c_char,
    /// Length of `name`.
    pub name_len: usize,
    /// Header value.
    pub value: *const c_char,
    /// Length of `value`.
    pub value_len: usize,
}

/// The library version, a static NUL-terminated string.
#[no_mangle]
pub extern "C" fn llmproxy_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

// ---- the panic boundary ----

/// What an export returns when its body panicked: chosen by the return type, so no export
/// passes it by hand.
trait PanicValue {
    /// The value returned after a caught panic.
    const ON_PANIC: Self;
}

impl PanicValue for llmproxy_status {
    const ON_PANIC: Self = LLMPROXY_INTERNAL;
}

impl PanicValue for () {
    const ON_PANIC: Self = ();
}

impl PanicValue for bool {
    const ON_PANIC: Self = false;
}

impl PanicValue for u32 {
    const ON_PANIC: Self = 0;
}

impl PanicValue for u64 {
    const ON_PANIC: Self = 0;
}

impl PanicValue for usize {
    const ON_PANIC: Self = 0;
}

impl<T> PanicValue for *const T {
    const ON_PANIC: Self = ptr::null();
}

/// Runs an export's whole body; a panic returns the type's [`PanicValue`] instead of
/// unwinding into the host.
fn boundary<T: PanicValue>(body: impl FnOnce() -> T) -> T {
    boundary_or(T::ON_PANIC, body)
}

/// [`boundary`] for the few exports whose documented answer to a panic is not their return
/// type's (e.g. an HTTP status of 500, a flag that defaults to true).
fn boundary_or<T>(on_panic: T, body: impl FnOnce() -> T) -> T {
    caught(body).unwrap_or(on_panic)
}

/// Runs `f`, `None` when it panicked: for the picks that still hand out a request handle
/// (carrying an internal error) after a panic inside the router.
fn caught<T>(f: impl FnOnce() -> T) -> Option<T> {
    catch_unwind(AssertUnwindSafe(f)).ok()
}

// ---- pointer helpers ----

/// An opaque handle type: handed to C as a `Box` pointer, taken back exactly once.
trait Handle: Sized {
    /// Moves the handle to the heap and hands out its pointer.
    fn into_raw(self) -> *mut Self {
        Box::into_raw(Box::new(self))
    }

    /// Takes a handed-out handle back; `None` for NULL.
    ///
    /// # Safety
    /// `p` must be NULL or come from [`Handle::into_raw`], and not be used afterwards.
    unsafe fn from_raw(p: *mut Self) -> Option<Box<Self>> {
        (!p.is_null()).then(|| Box::from_raw(p))
    }
}

/// What an output parameter is set to before anything else happens: NULL or 0.
trait Cleared {
    /// The cleared value.
    const CLEARED: Self;
}

impl<T> Cleared for *mut T {
    const CLEARED: Self = ptr::null_mut();
}

impl<T> Cleared for *const T {
    const CLEARED: Self = ptr::null();
}

/// A required output parameter, cleared (so the host sees NULL on every error path);
/// `None` when the host passed NULL.
unsafe fn out_param<'a, T: Cleared>(out: *mut T) -> Option<&'a mut T> {
    let out = out.as_mut()?;
    *out = T::CLEARED;
    Some(out)
}

/// Writes `value` to an optional output parameter (NULL: nothing to write).
unsafe fn set_opt<T>(out: *mut T, value: T) {
    if let Some(out) = out.as_mut() {
        *out = value;
    }
}

/// Borrows `(ptr, len)` as bytes; NULL is accepted only with length 0.
unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> Option<&'a [u8]> {
    if len == 0 {
        Some(&[])
    } else if ptr.is_null() || len > isize::MAX as usize {
        None
    } else {
        Some(std::slice::from_raw_parts(ptr, len))
    }
}

/// Borrows `(ptr, len)` as UTF-8 text; `None` for NULL with a length or invalid UTF-8.
unsafe fn utf8<'a>(ptr: *const c_char, len: usize) -> Option<&'a str> {
    bytes(ptr.cast(), len).and_then(|b| std::str::from_utf8(b).ok())
}

/// A NUL-terminated copy of `s`, for accessors that hand out `(pointer, length)`.
fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

/// Hands out an owned NUL-terminated string as (pointer, length without the NUL).
unsafe fn out_str(s: &[u8], len: *mut usize) -> *const c_char {
    set_opt(len, s.len().saturating_sub(1));
    s.as_ptr().cast()
}

/// Writes `msg` into `err` (capacity `cap`), truncated on a UTF-8 boundary, always
/// NUL-terminated when `cap > 0`.
unsafe fn write_err(err: *mut c_char, cap: usize, msg: &str) {
    if err.is_null() || cap == 0 {
        return;
    }
    let mut n = msg.len().min(cap - 1);
    while !msg.is_char_boundary(n) {
        n -= 1;
    }
    ptr::copy_nonoverlapping(msg.as_ptr(), err.cast::<u8>(), n);
    *err.add(n) = 0;
}

#[cfg(test)]
mod tests;
