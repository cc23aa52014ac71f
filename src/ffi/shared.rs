//! The shared-state handle: a region made before fork (nginx's master) that every worker's
//! router attaches to, so that all processes of a host route on one state (docs/nginx.md).

use std::ffi::c_char;
use std::sync::Arc;

use super::llmproxy_status::{self, *};
use super::router::{llmproxy_router, new_router};
use super::{boundary, out_param, utf8, write_err, Handle};
use crate::router::Router;
use crate::state::SharedState;

/// Opaque shared-state handle: a region of shared memory mapped by the creating process and
/// inherited by the processes it forks afterwards.
pub struct llmproxy_shared_state {
    state: Arc<SharedState>,
    reused: bool,
}

impl Handle for llmproxy_shared_state {}

/// Creates (or, by name, finds again) a shared-state region of `size_bytes` (16 MiB–64 GiB).
/// Call it before fork; routers attach with `llmproxy_router_new_shared` after fork.
///
/// With a `name` (`name_len` > 0), the region is registered in this process under that name
/// and a later call with the same name and size returns the same region (nginx's master on
/// reload: learned prefixes and load survive); another size maps a fresh region. Without a
/// name the region is private to this handle and the routers attached to it.
///
/// The region is unmapped when the handle, the registry entry and every attached router are
/// gone. On error returns `LLMPROXY_INVALID_ARGUMENT` with the reason in `err`.
///
/// # Safety
/// `name` must point to `name_len` readable bytes (or be NULL with 0); `out` must be
/// writable; `err`, when not NULL, must point to `err_cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_shared_state_new(
    name: *const c_char,
    name_len: usize,
    size_bytes: u64,
    out: *mut *mut llmproxy_shared_state,
    err: *mut c_char,
    err_cap: usize,
) -> llmproxy_status {
    boundary(|| {
        let Some(out) = out_param(out) else {
            write_err(err, err_cap, "out must not be NULL");
            return LLMPROXY_INVALID_ARGUMENT;
        };
        let Some(name) = utf8(name, name_len) else {
            write_err(err, err_cap, "name must be UTF-8 (or NULL with length 0)");
            return LLMPROXY_INVALID_ARGUMENT;
        };
        let size = usize::try_from(size_bytes).unwrap_or(usize::MAX);
        let made = if name.is_empty() {
            SharedState::create(size).map(|s| (s, false))
        } else {
            SharedState::named(name, size)
        };
        match made {
            Ok((state, reused)) => {
                write_err(err, err_cap, "");
                *out = llmproxy_shared_state { state, reused }.into_raw();
                LLMPROXY_OK
            }
            Err(e) => {
                write_err(err, err_cap, &format!("shared_state.size: {e}"));
                LLMPROXY_INVALID_ARGUMENT
            }
        }
    })
}

/// True when `llmproxy_shared_state_new` found the named region again (false for NULL).
///
/// # Safety
/// `shared` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_shared_state_reused(
    shared: *const llmproxy_shared_state,
) -> bool {
    boundary(|| shared.as_ref().is_some_and(|s| s.reused))
}

/// Requests in flight on the endpoints of the region, all processes together (0 for NULL).
///
/// # Safety
/// `shared` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_shared_state_in_flight(
    shared: *const llmproxy_shared_state,
) -> u64 {
    boundary(|| shared.as_ref().map_or(0, |s| s.state.total_in_flight()))
}

/// Takes back now the load of attached processes that are gone (attached routers also do it
/// every 500 ms on their own); returns how many were found (0 for NULL).
///
/// # Safety
/// `shared` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_shared_state_reap(shared: *const llmproxy_shared_state) -> u64 {
    boundary(|| {
        shared
            .as_ref()
            .map_or(0, |s| s.state.reap_dead_workers() as u64)
    })
}

/// Frees the handle (NULL is a no-op). Attached routers keep the region mapped.
///
/// # Safety
/// `shared` must come from `llmproxy_shared_state_new` and not be used after this call.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_shared_state_free(shared: *mut llmproxy_shared_state) {
    boundary(|| drop(llmproxy_shared_state::from_raw(shared)))
}

/// Creates a router like `llmproxy_router_new` whose endpoint load counters, passive health
/// and prefix index live in `shared`, seen and updated by every router attached to it. Call
/// it in the process that routes (after fork). Fails with `LLMPROXY_INVALID_CONFIG` as
/// `llmproxy_router_new` does, or `LLMPROXY_INTERNAL` when all 128 worker slots of the region
/// are held by live processes.
///
/// # Safety
/// `config_json` must point to `len` readable bytes; `shared` must be valid; `out` must be
/// writable; `err`, when not NULL, must point to `err_cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_router_new_shared(
    config_json: *const c_char,
    len: usize,
    shared: *const llmproxy_shared_state,
    out: *mut *mut llmproxy_router,
    err: *mut c_char,
    err_cap: usize,
) -> llmproxy_status {
    boundary(|| {
        let Some(shared) = shared.as_ref() else {
            let _ = out_param(out);
            write_err(err, err_cap, "shared must not be NULL");
            return LLMPROXY_INVALID_ARGUMENT;
        };
        new_router(config_json, len, out, err, err_cap, |config| {
            Router::new_shared(config, &shared.state).map_err(|e| format!("shared state: {e}"))
        })
    })
}
