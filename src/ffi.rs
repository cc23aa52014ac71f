//! The C ABI: opaque handles, status codes, and a panic boundary.
//!
//! Rules every function here follows:
//! - NULL-safe: a NULL handle or a NULL pointer with a non-zero length is
//!   `LLMPROXY_INVALID_ARGUMENT` (or a harmless no-op for void functions);
//! - panic-safe: the body runs under `catch_unwind`; a panic becomes `LLMPROXY_INTERNAL`
//!   and never unwinds into C or C++;
//! - input is `(pointer, length)`: no NUL terminator is required, and no borrowed pointer is
//!   kept past the call;
//! - strings handed out are owned by the handle they come from, NUL-terminated, and valid
//!   until that handle is freed.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_void};
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use crate::config::parse_endpoint;
use crate::error::PickError;
use crate::router::{HeaderRef, Outcome, PendingPick, PickStart, PickedRequest, Router};

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
}

use llmproxy_status::*;

impl From<&PickError> for llmproxy_status {
    fn from(e: &PickError) -> Self {
        match e {
            PickError::BadRequest { .. } => LLMPROXY_BAD_REQUEST,
            PickError::ModelNotFound { .. } => LLMPROXY_MODEL_NOT_FOUND,
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

/// Opaque router handle: thread-safe, shared by every worker.
pub struct llmproxy_router {
    router: Router,
    cluster_header: Vec<u8>,
    metrics_path: Vec<u8>,
}

/// Opaque per-request handle, from pick to finish. Used by one thread at a time.
pub struct llmproxy_request {
    request: PickedRequest,
    strings: RequestStrings,
}

/// Opaque handle of a pick waiting for the Metadata-Center (`llmproxy_pick_start`). Used by
/// one thread at a time.
pub struct llmproxy_pick_ticket {
    pending: PendingPick,
}

/// NUL-terminated copies of what the accessors hand out.
#[derive(Default)]
struct RequestStrings {
    endpoint: Vec<u8>,
    cluster: Vec<u8>,
    backend: Vec<u8>,
    model: Vec<u8>,
    scene: Vec<u8>,
    error_body: Vec<u8>,
    upstream_model: Vec<u8>,
    upstream_path: Vec<u8>,
}

impl RequestStrings {
    fn of(r: &PickedRequest) -> Self {
        Self {
            endpoint: nul_terminated(r.endpoint().unwrap_or("")),
            cluster: nul_terminated(r.cluster().unwrap_or("")),
            backend: nul_terminated(r.backend().unwrap_or("")),
            model: nul_terminated(r.model().unwrap_or("")),
            scene: nul_terminated(r.scene().unwrap_or("")),
            error_body: nul_terminated(&r.error_body().unwrap_or_default()),
            upstream_model: nul_terminated(r.upstream_model().unwrap_or("")),
            upstream_path: nul_terminated(r.upstream_path().unwrap_or("")),
        }
    }
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

/// Callback of `llmproxy_pick_async`: receives the finished decision, exactly once.
pub type llmproxy_pick_callback =
    Option<unsafe extern "C" fn(user_data: *mut c_void, req: *mut llmproxy_request)>;

/// Runs `f`, turning a panic into `on_panic`.
fn guard<T>(on_panic: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(on_panic)
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

/// Hands out an owned NUL-terminated string as (pointer, length without the NUL).
unsafe fn out_str(s: &[u8], len: *mut usize) -> *const c_char {
    if !len.is_null() {
        *len = s.len().saturating_sub(1);
    }
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

/// The library version, a static NUL-terminated string.
#[no_mangle]
pub extern "C" fn llmproxy_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Creates a router from a JSON config (bare object or Istio TypedStruct). On error
/// returns `LLMPROXY_INVALID_CONFIG` and writes a message naming the field into `err`.
///
/// # Safety
/// `config_json` must point to `len` readable bytes; `out` must be writable; `err`, when
/// not NULL, must point to `err_cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_router_new(
    config_json: *const c_char,
    len: usize,
    out: *mut *mut llmproxy_router,
    err: *mut c_char,
    err_cap: usize,
) -> llmproxy_status {
    guard(LLMPROXY_INTERNAL, || {
        if out.is_null() {
            write_err(err, err_cap, "out must not be NULL");
            return LLMPROXY_INVALID_ARGUMENT;
        }
        *out = ptr::null_mut();
        let Some(json) = bytes(config_json.cast(), len) else {
            write_err(err, err_cap, "config_json must not be NULL");
            return LLMPROXY_INVALID_ARGUMENT;
        };
        match Router::from_json(json) {
            Ok(router) => {
                let cluster_header = nul_terminated(&router.config().cluster_header);
                let metrics_path = nul_terminated(&router.config().metrics_path);
                *out = Box::into_raw(Box::new(llmproxy_router {
                    router,
                    cluster_header,
                    metrics_path,
                }));
                write_err(err, err_cap, "");
                LLMPROXY_OK
            }
            Err(e) => {
                write_err(err, err_cap, &e.to_string());
                LLMPROXY_INVALID_CONFIG
            }
        }
    })
}

/// Validates a JSON config without creating a router (no thread is started): for hosts
/// that check the config in a process that later forks, such as nginx's master. Returns
/// `LLMPROXY_OK` or `LLMPROXY_INVALID_CONFIG` with the message in `err`.
///
/// # Safety
/// `config_json` must point to `len` readable bytes; `err`, when not NULL, must point to
/// `err_cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_config_validate(
    config_json: *const c_char,
    len: usize,
    err: *mut c_char,
    err_cap: usize,
) -> llmproxy_status {
    guard(LLMPROXY_INTERNAL, || {
        let Some(json) = bytes(config_json.cast(), len) else {
            write_err(err, err_cap, "config_json must not be NULL");
            return LLMPROXY_INVALID_ARGUMENT;
        };
        match crate::Config::from_json(json) {
            Ok(_) => {
                write_err(err, err_cap, "");
                LLMPROXY_OK
            }
            Err(e) => {
                write_err(err, err_cap, &e.to_string());
                LLMPROXY_INVALID_CONFIG
            }
        }
    })
}

/// Frees a router. NULL is a no-op. Requests still in flight stay valid until finished.
///
/// # Safety
/// `router` must come from `llmproxy_router_new` and not be used after this call.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_router_free(router: *mut llmproxy_router) {
    guard((), || {
        if !router.is_null() {
            drop(Box::from_raw(router));
        }
    })
}

/// Replaces the endpoints (`ip:port` each) of a cluster, creating it if unknown.
/// Endpoints that stay keep their load and cache state. Nothing changes on error.
///
/// # Safety
/// Pointers must be valid for their lengths; `endpoints` must hold `n` entries.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_router_set_endpoints(
    router: *mut llmproxy_router,
    cluster: *const c_char,
    cluster_len: usize,
    endpoints: *const llmproxy_str,
    n: usize,
) -> llmproxy_status {
    guard(LLMPROXY_INTERNAL, || {
        let Some(r) = router.as_ref() else {
            return LLMPROXY_INVALID_ARGUMENT;
        };
        let Some(name) =
            bytes(cluster.cast(), cluster_len).and_then(|b| std::str::from_utf8(b).ok())
        else {
            return LLMPROXY_INVALID_ARGUMENT;
        };
        if name.is_empty() || (n > 0 && endpoints.is_null()) {
            return LLMPROXY_INVALID_ARGUMENT;
        }
        let list = if n == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(endpoints, n)
        };
        let mut addrs: Vec<SocketAddr> = Vec::with_capacity(n);
        for s in list {
            let Some(text) = bytes(s.ptr.cast(), s.len).and_then(|b| std::str::from_utf8(b).ok())
            else {
                return LLMPROXY_INVALID_ARGUMENT;
            };
            match parse_endpoint(text) {
                Ok(a) => addrs.push(a),
                Err(_) => return LLMPROXY_INVALID_ARGUMENT,
            }
        }
        r.router.set_endpoints(name, &addrs);
        LLMPROXY_OK
    })
}

/// Renders the router's metrics as Prometheus text into a new NUL-terminated string;
/// free it with `llmproxy_string_free`.
///
/// # Safety
/// `out` must be writable; `out_len` may be NULL.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_router_metrics(
    router: *const llmproxy_router,
    out: *mut *mut c_char,
    out_len: *mut usize,
) -> llmproxy_status {
    guard(LLMPROXY_INTERNAL, || {
        if out.is_null() {
            return LLMPROXY_INVALID_ARGUMENT;
        }
        *out = ptr::null_mut();
        let Some(r) = router.as_ref() else {
            return LLMPROXY_INVALID_ARGUMENT;
        };
        let text = r.router.metrics_text();
        if !out_len.is_null() {
            *out_len = text.len();
        }
        match std::ffi::CString::new(text) {
            Ok(c) => {
                *out = c.into_raw();
                LLMPROXY_OK
            }
            Err(_) => LLMPROXY_INTERNAL,
        }
    })
}

/// Frees a string returned by `llmproxy_router_metrics`. NULL is a no-op.
///
/// # Safety
/// `s` must come from this library and not be used after this call.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_string_free(s: *mut c_char) {
    guard((), || {
        if !s.is_null() {
            drop(std::ffi::CString::from_raw(s));
        }
    })
}

/// Requests picked and not yet finished (0 for NULL).
///
/// # Safety
/// `router` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_router_in_flight(router: *const llmproxy_router) -> u64 {
    guard(0, || router.as_ref().map_or(0, |r| r.router.in_flight()))
}

/// The configured `max_body_bytes` (0 for NULL).
///
/// # Safety
/// `router` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_router_max_body_bytes(router: *const llmproxy_router) -> u64 {
    guard(0, || {
        router
            .as_ref()
            .map_or(0, |r| r.router.config().max_body_bytes)
    })
}

/// The longest a pending pick (`llmproxy_pick_async` / `llmproxy_pick_start`) takes to be
/// decided, in milliseconds: the Metadata-Center lookup's `timeout_ms` plus a small slack for
/// scheduling. 0 when remote cache lookups are off (every pick is decided at once) or for
/// NULL. Hosts may use it as their own deadline for a callback that never comes.
///
/// # Safety
/// `router` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_router_pick_deadline_ms(router: *const llmproxy_router) -> u64 {
    guard(0, || {
        router
            .as_ref()
            .map_or(0, |r| r.router.pending_pick_deadline().as_millis() as u64)
    })
}

/// True when a request with this method and path (query ignored) must go through pick.
///
/// # Safety
/// Pointers must be valid for their lengths.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_router_should_intercept(
    router: *const llmproxy_router,
    method: *const c_char,
    method_len: usize,
    path: *const c_char,
    path_len: usize,
) -> bool {
    guard(false, || {
        let (Some(r), Some(m), Some(p)) = (
            router.as_ref(),
            bytes(method.cast(), method_len),
            bytes(path.cast(), path_len),
        ) else {
            return false;
        };
        r.router.should_intercept(m, p)
    })
}

/// The configured `strict_endpoint_override` (true by default; true for NULL).
///
/// # Safety
/// `router` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_router_strict_override(router: *const llmproxy_router) -> bool {
    guard(true, || {
        router
            .as_ref()
            .is_none_or(|r| r.router.config().strict_endpoint_override)
    })
}

/// The configured `cluster_header` (lower-case); valid for the router's lifetime.
///
/// # Safety
/// `router` must be NULL or valid; `len` may be NULL.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_router_cluster_header(
    router: *const llmproxy_router,
    len: *mut usize,
) -> *const c_char {
    guard(ptr::null(), || match router.as_ref() {
        Some(r) => out_str(&r.cluster_header, len),
        None => out_str(b"\0", len),
    })
}

/// The configured `metrics_path` (default "/llmproxy/metrics"; "" when disabled): hosts
/// answer `GET` on it with `llmproxy_router_metrics`. Valid for the router's lifetime.
///
/// # Safety
/// `router` must be NULL or valid; `len` may be NULL.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_router_metrics_path(
    router: *const llmproxy_router,
    len: *mut usize,
) -> *const c_char {
    guard(ptr::null(), || match router.as_ref() {
        Some(r) => out_str(&r.metrics_path, len),
        None => out_str(b"\0", len),
    })
}

/// Routes one request. `headers` may include `:path` and `:method`. `*out` is always set
/// when `out` is not NULL, also on error, and must be released with
/// `llmproxy_request_finish` exactly once.
///
/// # Safety
/// Pointers must be valid for their lengths; `headers` must hold `n_headers` entries.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_pick(
    router: *mut llmproxy_router,
    headers: *const llmproxy_header,
    n_headers: usize,
    body: *const u8,
    body_len: usize,
    out: *mut *mut llmproxy_request,
) -> llmproxy_status {
    guard(LLMPROXY_INTERNAL, || {
        if out.is_null() {
            return LLMPROXY_INVALID_ARGUMENT;
        }
        *out = ptr::null_mut();
        let Some(r) = router.as_ref() else {
            return LLMPROXY_INVALID_ARGUMENT;
        };
        let picked = catch_unwind(AssertUnwindSafe(|| {
            let Some(hdrs) = header_refs(headers, n_headers) else {
                return Err(LLMPROXY_INVALID_ARGUMENT);
            };
            let Some(body) = bytes(body, body_len) else {
                return Err(LLMPROXY_INVALID_ARGUMENT);
            };
            Ok(r.router.pick(&hdrs, body))
        }));
        let (request, status) = match picked {
            Ok(Ok(p)) => {
                let status = p.error().map_or(LLMPROXY_OK, llmproxy_status::from);
                (p, status)
            }
            Ok(Err(status)) => (
                r.router.failed_request(PickError::bad_request(
                    "invalid arguments from the host (NULL pointer with a length)",
                    None,
                )),
                status,
            ),
            Err(_) => (
                r.router.failed_request(PickError::Internal {
                    message: "panic while picking an endpoint".into(),
                }),
                LLMPROXY_INTERNAL,
            ),
        };
        let handle = guard(None, || {
            let strings = RequestStrings::of(&request);
            Some(Box::new(llmproxy_request { request, strings }))
        });
        match handle {
            Some(h) => {
                *out = Box::into_raw(h);
                status
            }
            None => LLMPROXY_INTERNAL,
        }
    })
}

unsafe fn header_refs<'a>(
    headers: *const llmproxy_header,
    n: usize,
) -> Option<Vec<(&'a [u8], &'a [u8])>> {
    if n == 0 {
        return Some(Vec::new());
    }
    if headers.is_null() {
        return None;
    }
    std::slice::from_raw_parts(headers, n)
        .iter()
        .map(|h| {
            Some((
                bytes(h.name.cast(), h.name_len)?,
                bytes(h.value.cast(), h.value_len)?,
            ))
        })
        .collect()
}

/// Like `llmproxy_pick`, but may answer `LLMPROXY_PENDING` when the config enables remote
/// cache lookups (`metadata_center.cache_enabled`): then `*out` stays NULL and
/// `cb(user_data, req)` is called exactly once, from the library's lookup thread, with the
/// decision (within `metadata_center.timeout_ms`; on timeout or error the decision uses local
/// data). With any other status `*out` is set as by `llmproxy_pick` and `cb` is never
/// called. A NULL `cb` makes this exactly `llmproxy_pick`.
///
/// # Safety
/// As `llmproxy_pick`; `cb` must be callable from any thread with `user_data`.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_pick_async(
    router: *mut llmproxy_router,
    headers: *const llmproxy_header,
    n_headers: usize,
    body: *const u8,
    body_len: usize,
    cb: llmproxy_pick_callback,
    user_data: *mut c_void,
    out: *mut *mut llmproxy_request,
) -> llmproxy_status {
    guard(LLMPROXY_INTERNAL, || {
        let Some(cb) = cb else {
            return llmproxy_pick(router, headers, n_headers, body, body_len, out);
        };
        let (r, hdrs, body_bytes) =
            match deferred_pick_args(router, headers, n_headers, body, body_len, out) {
                Ok(args) => args,
                Err(status) => return status,
            };
        /// The host's opaque pointer, handed back on the lookup thread as the contract says.
        struct UserData(*mut c_void);
        unsafe impl Send for UserData {}
        let user = UserData(user_data);
        let done = Box::new(move |request: PickedRequest| {
            let user = user;
            let strings = RequestStrings::of(&request);
            let handle = Box::into_raw(Box::new(llmproxy_request { request, strings }));
            // SAFETY: the host promised `cb` may run on any thread with `user_data`.
            unsafe { cb(user.0, handle) };
        });
        let decided = catch_unwind(AssertUnwindSafe(|| {
            r.router.pick_async(&hdrs, body_bytes, done)
        }));
        match decided {
            Ok(None) => LLMPROXY_PENDING,
            Ok(Some(request)) => hand_out(request, out),
            Err(_) => internal_error(r, out),
        }
    })
}

/// Like `llmproxy_pick_async`, for hosts that cannot take a callback on a library thread
/// (LuaJIT in nginx): instead of calling back, a pending decision answers `LLMPROXY_PENDING`
/// with `*ticket` set, and the host polls it with `llmproxy_pick_poll` from its own event loop
/// (e.g. every millisecond). With any other status `*ticket` is NULL and `*out` is set as by
/// `llmproxy_pick`. Without remote cache lookups this is exactly `llmproxy_pick`.
///
/// # Safety
/// As `llmproxy_pick`; `ticket` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_pick_start(
    router: *mut llmproxy_router,
    headers: *const llmproxy_header,
    n_headers: usize,
    body: *const u8,
    body_len: usize,
    ticket: *mut *mut llmproxy_pick_ticket,
    out: *mut *mut llmproxy_request,
) -> llmproxy_status {
    guard(LLMPROXY_INTERNAL, || {
        if ticket.is_null() {
            return LLMPROXY_INVALID_ARGUMENT;
        }
        *ticket = ptr::null_mut();
        let (r, hdrs, body_bytes) =
            match deferred_pick_args(router, headers, n_headers, body, body_len, out) {
                Ok(args) => args,
                Err(status) => return status,
            };
        let started = catch_unwind(AssertUnwindSafe(|| r.router.pick_start(&hdrs, body_bytes)));
        match started {
            Ok(PickStart::Pending(pending)) => {
                *ticket = Box::into_raw(Box::new(llmproxy_pick_ticket { pending }));
                LLMPROXY_PENDING
            }
            Ok(PickStart::Decided(request)) => hand_out(request, out),
            Err(_) => internal_error(r, out),
        }
    })
}

/// Polls a ticket of `llmproxy_pick_start`: `LLMPROXY_PENDING` while the decision is still
/// being made; then, once, sets `*out` as `llmproxy_pick` does and returns its status. Later
/// calls answer `LLMPROXY_INVALID_ARGUMENT`. Never blocks. The ticket must still be freed.
///
/// # Safety
/// `ticket` must be NULL or a live ticket; `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_pick_poll(
    ticket: *mut llmproxy_pick_ticket,
    out: *mut *mut llmproxy_request,
) -> llmproxy_status {
    guard(LLMPROXY_INTERNAL, || {
        if out.is_null() {
            return LLMPROXY_INVALID_ARGUMENT;
        }
        *out = ptr::null_mut();
        let Some(t) = ticket.as_mut() else {
            return LLMPROXY_INVALID_ARGUMENT;
        };
        if t.pending.is_taken() {
            return LLMPROXY_INVALID_ARGUMENT;
        }
        match guard(None, || Some(t.pending.try_take())) {
            Some(Some(request)) => hand_out(request, out),
            Some(None) => LLMPROXY_PENDING,
            None => LLMPROXY_INTERNAL,
        }
    })
}

/// Frees a ticket of `llmproxy_pick_start` (NULL: no-op). A decision not taken (still
/// pending, or made and never polled) is finished with status 0 when it arrives: it never
/// reached an upstream.
///
/// # Safety
/// `ticket` must be NULL or a live ticket, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_pick_ticket_free(ticket: *mut llmproxy_pick_ticket) {
    guard((), || {
        if !ticket.is_null() {
            drop(Box::from_raw(ticket));
        }
    })
}

/// Checks the arguments of the picks that may decide later (`llmproxy_pick_async`,
/// `llmproxy_pick_start`): `Ok` with the router, headers and body; otherwise `Err` with the
/// status to answer, `*out` set as `llmproxy_pick` sets it.
unsafe fn deferred_pick_args<'a>(
    router: *mut llmproxy_router,
    headers: *const llmproxy_header,
    n_headers: usize,
    body: *const u8,
    body_len: usize,
    out: *mut *mut llmproxy_request,
) -> Result<(&'a llmproxy_router, Vec<HeaderRef<'a>>, &'a [u8]), llmproxy_status> {
    if out.is_null() {
        return Err(LLMPROXY_INVALID_ARGUMENT);
    }
    *out = ptr::null_mut();
    let Some(r) = router.as_ref() else {
        return Err(LLMPROXY_INVALID_ARGUMENT);
    };
    match (header_refs(headers, n_headers), bytes(body, body_len)) {
        (Some(hdrs), Some(body_bytes)) => Ok((r, hdrs, body_bytes)),
        // Bad pointers or lengths: the synchronous pick answers them (a 400 handle).
        _ => Err(llmproxy_pick(
            router, headers, n_headers, body, body_len, out,
        )),
    }
}

/// Boxes a decision into a request handle in `*out` and returns its status.
unsafe fn hand_out(request: PickedRequest, out: *mut *mut llmproxy_request) -> llmproxy_status {
    let status = request.error().map_or(LLMPROXY_OK, llmproxy_status::from);
    let strings = RequestStrings::of(&request);
    *out = Box::into_raw(Box::new(llmproxy_request { request, strings }));
    status
}

/// A request handle carrying an internal error (a caught panic) in `*out`.
unsafe fn internal_error(r: &llmproxy_router, out: *mut *mut llmproxy_request) -> llmproxy_status {
    let request = r.router.failed_request(PickError::Internal {
        message: "panic while picking an endpoint".into(),
    });
    hand_out(request, out);
    LLMPROXY_INTERNAL
}

/// The status of the pick that made this request.
///
/// # Safety
/// `req` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_status(req: *const llmproxy_request) -> llmproxy_status {
    guard(LLMPROXY_INTERNAL, || match req.as_ref() {
        None => LLMPROXY_INVALID_ARGUMENT,
        Some(r) if r.request.http_status() == 200 => LLMPROXY_OK,
        Some(r) => r
            .request
            .error()
            .map_or(LLMPROXY_NO_ENDPOINT, llmproxy_status::from),
    })
}

/// HTTP status for the client: 200 when routed, else 400/404/413/500/503 (500 for NULL).
///
/// # Safety
/// `req` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_http_status(req: *const llmproxy_request) -> u32 {
    guard(500, || {
        req.as_ref().map_or(500, |r| r.request.http_status())
    })
}

/// Hands out one of a request's strings; "" for a NULL request.
unsafe fn request_str(
    req: *const llmproxy_request,
    len: *mut usize,
    field: fn(&RequestStrings) -> &[u8],
) -> *const c_char {
    guard(ptr::null(), || match req.as_ref() {
        Some(r) => out_str(field(&r.strings), len),
        None => out_str(b"\0", len),
    })
}

/// The chosen endpoint `ip:port` ("" when not routed).
///
/// # Safety
/// `req` must be NULL or valid; `len` may be NULL. The string lives until finish.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_endpoint(
    req: *const llmproxy_request,
    len: *mut usize,
) -> *const c_char {
    request_str(req, len, |s| &s.endpoint)
}

/// The cluster of the matched rule ("" when none matched).
///
/// # Safety
/// `req` must be NULL or valid; `len` may be NULL. The string lives until finish.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_cluster(
    req: *const llmproxy_request,
    len: *mut usize,
) -> *const c_char {
    request_str(req, len, |s| &s.cluster)
}

/// The backend of the matched rule: vllm, sglang, tensorrt-llm or triton.
///
/// # Safety
/// `req` must be NULL or valid; `len` may be NULL. The string lives until finish.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_backend(
    req: *const llmproxy_request,
    len: *mut usize,
) -> *const c_char {
    request_str(req, len, |s| &s.backend)
}

/// The requested model ("" when the body could not be parsed).
///
/// # Safety
/// `req` must be NULL or valid; `len` may be NULL. The string lives until finish.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_model(
    req: *const llmproxy_request,
    len: *mut usize,
) -> *const c_char {
    request_str(req, len, |s| &s.model)
}

/// The scene name of the matched rule.
///
/// # Safety
/// `req` must be NULL or valid; `len` may be NULL. The string lives until finish.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_scene(
    req: *const llmproxy_request,
    len: *mut usize,
) -> *const c_char {
    request_str(req, len, |s| &s.scene)
}

/// The OpenAI error JSON when not routed ("" when routed).
///
/// # Safety
/// `req` must be NULL or valid; `len` may be NULL. The string lives until finish.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_error_body(
    req: *const llmproxy_request,
    len: *mut usize,
) -> *const c_char {
    request_str(req, len, |s| &s.error_body)
}

/// The model name the backend receives: differs from `llmproxy_request_model` after a
/// `target_model` or LoRA rewrite.
///
/// # Safety
/// `req` must be NULL or valid; `len` may be NULL. The string lives until finish.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_upstream_model(
    req: *const llmproxy_request,
    len: *mut usize,
) -> *const c_char {
    request_str(req, len, |s| &s.upstream_model)
}

/// The path to send upstream when it differs from the client's (Triton generate); ""
/// when the client's path stays.
///
/// # Safety
/// `req` must be NULL or valid; `len` may be NULL. The string lives until finish.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_upstream_path(
    req: *const llmproxy_request,
    len: *mut usize,
) -> *const c_char {
    request_str(req, len, |s| &s.upstream_path)
}

/// The body to send upstream when it differs from the client's (model rewrite, Triton);
/// NULL with `*len` = 0 when the client's body goes unchanged. Hosts replace the body and
/// its `content-length`.
///
/// # Safety
/// `req` must be NULL or valid; `len` may be NULL. The bytes live until finish.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_upstream_body(
    req: *const llmproxy_request,
    len: *mut usize,
) -> *const u8 {
    guard(ptr::null(), || {
        let body = req.as_ref().and_then(|r| r.request.upstream_body());
        if !len.is_null() {
            *len = body.map_or(0, <[u8]>::len);
        }
        body.map_or(ptr::null(), <[u8]>::as_ptr)
    })
}

/// True when the response body is transcoded: hosts drop the upstream `content-length`
/// and pass every body chunk through `llmproxy_request_transcode_response`.
///
/// # Safety
/// `req` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_needs_transcoding(req: *const llmproxy_request) -> bool {
    guard(false, || {
        req.as_ref().is_some_and(|r| r.request.needs_transcoding())
    })
}

/// Call once at the upstream response headers with the upstream status; returns the
/// status to send to the client.
///
/// # Safety
/// `req` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_response_status(
    req: *mut llmproxy_request,
    upstream_status: u32,
) -> u32 {
    guard(upstream_status, || match req.as_mut() {
        Some(r) => r.request.response_status(upstream_status),
        None => upstream_status,
    })
}

/// The `content-type` for the client when transcoding changes it; "" to keep the
/// upstream's. Valid after `llmproxy_request_response_status`.
///
/// # Safety
/// `req` must be NULL or valid; `len` may be NULL. The string is static.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_response_content_type(
    req: *const llmproxy_request,
    len: *mut usize,
) -> *const c_char {
    guard(ptr::null(), || {
        let ct = req
            .as_ref()
            .and_then(|r| r.request.response_content_type())
            .unwrap_or("");
        if !len.is_null() {
            *len = ct.len();
        }
        match ct {
            "text/event-stream" => c"text/event-stream".as_ptr(),
            "application/json" => c"application/json".as_ptr(),
            _ => c"".as_ptr(),
        }
    })
}

/// Feeds one upstream response body chunk (any size, any boundary) and returns in
/// `*out`/`*out_len` the bytes to send to the client instead: the input itself when nothing
/// changes, possibly nothing while a transcoder buffers. Pass `end_of_stream` with the last
/// chunk (an empty one is fine). The first chunk with content marks the first token, so a
/// host that uses this needs no separate `llmproxy_request_first_token` call. `*out` is
/// valid until the next call on `req`.
///
/// # Safety
/// `chunk` must hold `len` bytes; `out` and `out_len` must be writable.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_transcode_response(
    req: *mut llmproxy_request,
    chunk: *const u8,
    len: usize,
    end_of_stream: bool,
    out: *mut *const u8,
    out_len: *mut usize,
) -> llmproxy_status {
    guard(LLMPROXY_INTERNAL, || {
        if out.is_null() || out_len.is_null() {
            return LLMPROXY_INVALID_ARGUMENT;
        }
        *out = ptr::null();
        *out_len = 0;
        let (Some(r), Some(input)) = (req.as_mut(), bytes(chunk, len)) else {
            return LLMPROXY_INVALID_ARGUMENT;
        };
        match r.request.transcode_response(input, end_of_stream) {
            None => {
                *out = input.as_ptr();
                *out_len = input.len();
            }
            Some(bytes) => {
                *out = bytes.as_ptr();
                *out_len = bytes.len();
            }
        }
        LLMPROXY_OK
    })
}

/// The request's `stream` flag.
///
/// # Safety
/// `req` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_is_stream(req: *const llmproxy_request) -> bool {
    guard(false, || {
        req.as_ref().is_some_and(|r| r.request.is_stream())
    })
}

/// Re-picks another endpoint of the same cluster after a connect failure, excluding the
/// endpoints already tried. `LLMPROXY_NO_ENDPOINT` when none is left.
///
/// # Safety
/// `req` must be NULL or valid; accessor strings obtained before are invalidated.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_retry(req: *mut llmproxy_request) -> llmproxy_status {
    guard(LLMPROXY_INTERNAL, || {
        let Some(r) = req.as_mut() else {
            return LLMPROXY_INVALID_ARGUMENT;
        };
        let status = match r.request.retry() {
            Ok(()) => LLMPROXY_OK,
            Err(e) => llmproxy_status::from(&e),
        };
        r.strings = RequestStrings::of(&r.request);
        status
    })
}

/// The first response byte arrived: releases the prompt's prefill load. Idempotent.
///
/// # Safety
/// `req` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_first_token(req: *mut llmproxy_request) {
    guard((), || {
        if let Some(r) = req.as_mut() {
            r.request.first_token();
        }
    })
}

/// How a request ended, for the endpoint's passive health (`llmproxy_request_finish_outcome`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum llmproxy_outcome {
    /// The status is the endpoint's own response: 502–504 count as endpoint failures,
    /// 100–498 as successes, anything else as neither.
    LLMPROXY_OUTCOME_UPSTREAM = 0,
    /// The endpoint failed before any response byte: connect failure, or the connection was
    /// reset or closed before a response. Counts as an endpoint failure.
    LLMPROXY_OUTCOME_ENDPOINT_FAILED = 1,
    /// The proxy or the client ended the request: a route timeout, the proxy's own local
    /// reply, the client going away. Says nothing about the endpoint.
    LLMPROXY_OUTCOME_LOCAL = 2,
}

/// Finishes and frees a request whose `upstream_status` is the endpoint's own response
/// status (0 when there was none): `llmproxy_request_finish_outcome(req, upstream_status,
/// LLMPROXY_OUTCOME_UPSTREAM)`. Only 502/503/504 count as endpoint failures; 0 and 499 never
/// do. Hosts that also see connect failures and their own local replies should call
/// `llmproxy_request_finish_outcome`, so that a client cannot get an endpoint ejected.
///
/// # Safety
/// `req` must come from `llmproxy_pick` and not be used after this call. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_finish(req: *mut llmproxy_request, upstream_status: u32) {
    llmproxy_request_finish_outcome(
        req,
        upstream_status,
        llmproxy_outcome::LLMPROXY_OUTCOME_UPSTREAM as u32,
    )
}

/// Finishes and frees a request. `status` is the HTTP status the client got (0 when none;
/// 499 when the client went away), counted in the metrics; `outcome` (an `llmproxy_outcome`
/// value) says whether the
/// endpoint is to blame: only `LLMPROXY_OUTCOME_ENDPOINT_FAILED` and an upstream 502–504
/// count toward passive ejection. An `outcome` outside the enum is treated as
/// `LLMPROXY_OUTCOME_LOCAL`.
///
/// # Safety
/// `req` must come from `llmproxy_pick` and not be used after this call. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_finish_outcome(
    req: *mut llmproxy_request,
    status: u32,
    outcome: u32,
) {
    guard((), || {
        // An integer, not the enum: a C caller may pass any value, and an out-of-range Rust
        // enum would be undefined behaviour.
        let outcome = match outcome {
            0 => Outcome::Upstream,
            1 => Outcome::EndpointFailed,
            _ => Outcome::Local,
        };
        if !req.is_null() {
            let handle = Box::from_raw(req);
            handle.request.finish_with(status, outcome);
        }
    })
}

#[cfg(test)]
mod tests {
    /// docs/security.md promises that no panic crosses the C ABI: every export's whole body
    /// (argument checks and writes to output pointers included) runs inside `guard`, or only
    /// delegates to a function that does.
    #[test]
    fn every_export_runs_its_whole_body_inside_the_panic_boundary() {
        let source = include_str!("ffi.rs");
        let delegates_to_guarded = ["request_str(", "llmproxy_request_finish_outcome("];
        let mut exports = 0;
        let mut unguarded = Vec::new();
        for (i, _) in source.match_indices("extern \"C\" fn llmproxy_") {
            let rest = &source[i..];
            let name: String = rest["extern \"C\" fn ".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            // The body starts after the signature's opening brace at the end of a line.
            let body_at = rest.find("{\n").expect("function body");
            let first = rest[body_at + 2..].trim_start();
            exports += 1;
            let constant = name == "llmproxy_version";
            if !(first.starts_with("guard(")
                || constant
                || delegates_to_guarded.iter().any(|d| first.starts_with(d)))
            {
                unguarded.push(name);
            }
        }
        assert!(exports >= 38, "found only {exports} exports");
        assert!(
            unguarded.is_empty(),
            "exports with code outside the panic boundary: {unguarded:?}"
        );
    }
}
