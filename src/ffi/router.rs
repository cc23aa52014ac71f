//! The router handle: created from a JSON config (or the config only validated), freed,
//! endpoints set by the host, metrics rendered, and the options hosts read from it.

use std::ffi::{c_char, CString};
use std::net::SocketAddr;

use super::llmproxy_status::{self, *};
use super::{
    boundary, boundary_or, bytes, llmproxy_str, nul_terminated, out_param, out_str, set_opt, utf8,
    write_err, Handle,
};
use crate::config::parse_endpoint;
use crate::metrics::Part;
use crate::router::Router;

/// Opaque router handle: thread-safe, shared by every worker.
pub struct llmproxy_router {
    pub(super) router: Router,
    cluster_header: Vec<u8>,
    metrics_path: Vec<u8>,
}

impl Handle for llmproxy_router {}

impl llmproxy_router {
    /// The handle of `router`, with the strings hosts read from it.
    pub(super) fn new(router: Router) -> Self {
        let cluster_header = nul_terminated(&router.config().cluster_header);
        let metrics_path = nul_terminated(&router.config().metrics_path);
        llmproxy_router {
            router,
            cluster_header,
            metrics_path,
        }
    }
}

/// Writes the outcome of a config check into `err`: "" on success, else the message.
pub(super) unsafe fn config_status<T>(
    checked: Result<T, crate::ConfigError>,
    err: *mut c_char,
    err_cap: usize,
) -> Result<T, llmproxy_status> {
    match checked {
        Ok(value) => {
            write_err(err, err_cap, "");
            Ok(value)
        }
        Err(e) => {
            write_err(err, err_cap, &e.to_string());
            Err(LLMPROXY_INVALID_CONFIG)
        }
    }
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
    boundary(|| {
        new_router(config_json, len, out, err, err_cap, |config| {
            Ok(Router::new(config))
        })
    })
}

/// The body of the router constructors: checks `out` and the config, builds the router with
/// `build` (whose error is `LLMPROXY_INTERNAL` with its message) and hands out the handle.
pub(super) unsafe fn new_router(
    config_json: *const c_char,
    len: usize,
    out: *mut *mut llmproxy_router,
    err: *mut c_char,
    err_cap: usize,
    build: impl FnOnce(crate::config::Config) -> Result<Router, String>,
) -> llmproxy_status {
    let Some(out) = out_param(out) else {
        write_err(err, err_cap, "out must not be NULL");
        return LLMPROXY_INVALID_ARGUMENT;
    };
    let Some(json) = bytes(config_json.cast(), len) else {
        write_err(err, err_cap, "config_json must not be NULL");
        return LLMPROXY_INVALID_ARGUMENT;
    };
    let config = match config_status(crate::config::Config::from_json(json), err, err_cap) {
        Ok(config) => config,
        Err(status) => return status,
    };
    match build(config) {
        Ok(router) => {
            *out = llmproxy_router::new(router).into_raw();
            LLMPROXY_OK
        }
        Err(e) => {
            write_err(err, err_cap, &e);
            LLMPROXY_INTERNAL
        }
    }
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
    boundary(|| {
        let Some(json) = bytes(config_json.cast(), len) else {
            write_err(err, err_cap, "config_json must not be NULL");
            return LLMPROXY_INVALID_ARGUMENT;
        };
        match config_status(crate::Config::from_json(json), err, err_cap) {
            Ok(_) => LLMPROXY_OK,
            Err(status) => status,
        }
    })
}

/// Frees a router. NULL is a no-op. Requests still in flight stay valid until finished.
///
/// # Safety
/// `router` must come from `llmproxy_router_new` and not be used after this call.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_router_free(router: *mut llmproxy_router) {
    boundary(|| drop(llmproxy_router::from_raw(router)))
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
    boundary(|| {
        let (Some(r), Some(name)) = (router.as_ref(), utf8(cluster, cluster_len)) else {
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
            match utf8(s.ptr, s.len).map(parse_endpoint) {
                Some(Ok(a)) => addrs.push(a),
                _ => return LLMPROXY_INVALID_ARGUMENT,
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
    boundary(|| metrics_into(router, Part::All, out, out_len))
}

/// Which part of the metrics `llmproxy_router_metrics_part` renders.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum llmproxy_metrics_part {
    /// Everything (as `llmproxy_router_metrics`).
    LLMPROXY_METRICS_ALL = 0,
    /// What this router counted itself: picks, finished requests, calls, latency histograms.
    LLMPROXY_METRICS_ROUTER = 1,
    /// The endpoints' counters and the prefix index: with a shared state, the same in every
    /// attached router (render it once, not per worker).
    LLMPROXY_METRICS_STATE = 2,
}

/// Renders one part of the router's metrics (`llmproxy_metrics_part`; another value is
/// `LLMPROXY_INVALID_ARGUMENT`) like `llmproxy_router_metrics`.
///
/// # Safety
/// `out` must be writable; `out_len` may be NULL.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_router_metrics_part(
    router: *const llmproxy_router,
    part: u32,
    out: *mut *mut c_char,
    out_len: *mut usize,
) -> llmproxy_status {
    boundary(|| {
        let part = match part {
            0 => Part::All,
            1 => Part::Router,
            2 => Part::State,
            _ => {
                let _ = out_param(out);
                return LLMPROXY_INVALID_ARGUMENT;
            }
        };
        metrics_into(router, part, out, out_len)
    })
}

/// Renders `part` of the metrics into a new C string at `out`.
unsafe fn metrics_into(
    router: *const llmproxy_router,
    part: Part,
    out: *mut *mut c_char,
    out_len: *mut usize,
) -> llmproxy_status {
    let (Some(out), Some(r)) = (out_param(out), router.as_ref()) else {
        return LLMPROXY_INVALID_ARGUMENT;
    };
    let text = r.router.metrics_part(part);
    set_opt(out_len, text.len());
    match CString::new(text) {
        Ok(c) => {
            *out = c.into_raw();
            LLMPROXY_OK
        }
        Err(_) => LLMPROXY_INTERNAL,
    }
}

/// Frees a string returned by `llmproxy_router_metrics`. NULL is a no-op.
///
/// # Safety
/// `s` must come from this library and not be used after this call.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_string_free(s: *mut c_char) {
    boundary(|| {
        if !s.is_null() {
            drop(CString::from_raw(s));
        }
    })
}

/// Requests picked and not yet finished (0 for NULL).
///
/// # Safety
/// `router` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_router_in_flight(router: *const llmproxy_router) -> u64 {
    boundary(|| router.as_ref().map_or(0, |r| r.router.in_flight()))
}

/// The configured `max_body_bytes` (0 for NULL).
///
/// # Safety
/// `router` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_router_max_body_bytes(router: *const llmproxy_router) -> u64 {
    boundary(|| {
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
    boundary(|| {
        router
            .as_ref()
            .map_or(0, |r| r.router.pending_pick_deadline().as_millis() as u64)
    })
}

/// True when a request with this method and path must go through pick: a POST to one of
/// `intercept_paths` (query ignored), or a request on a stored Responses answer this router
/// knows the endpoint of (`GET`/`DELETE /v1/responses/{id}`, `GET …/input_items`, `POST
/// …/cancel`; no body: pick it with an empty one). The answer may change from one call to
/// the next for the same stored answer (learned, forgotten).
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
    boundary(|| {
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
    boundary_or(true, || {
        router
            .as_ref()
            .is_none_or(|r| r.router.config().strict_endpoint_override)
    })
}

/// Hands out one of a router's strings; "" for a NULL router.
unsafe fn router_string(
    router: *const llmproxy_router,
    len: *mut usize,
    field: fn(&llmproxy_router) -> &[u8],
) -> *const c_char {
    out_str(router.as_ref().map_or(&b"\0"[..], field), len)
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
    boundary(|| router_string(router, len, |r| &r.cluster_header))
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
    boundary(|| router_string(router, len, |r| &r.metrics_path))
}
