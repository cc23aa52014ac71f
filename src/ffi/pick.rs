//! Picks: `llmproxy_pick` decides at once; `llmproxy_pick_async` may decide later through a
//! callback on the library's lookup thread; `llmproxy_pick_start` / `llmproxy_pick_poll` may
//! decide later through a ticket the host polls. Every decision, an error or a caught panic
//! included, reaches the host as a request handle through [`hand_out`].

use std::ffi::c_void;

use super::llmproxy_status::{self, *};
use super::{boundary, bytes, caught, out_param, Handle};
use super::{llmproxy_header, llmproxy_request, llmproxy_router};
use crate::error::PickError;
use crate::router::{HeaderRef, PendingPick, PickStart, PickedRequest};

/// Opaque handle of a pick waiting for the Metadata-Center (`llmproxy_pick_start`). Used by
/// one thread at a time.
pub struct llmproxy_pick_ticket {
    pending: PendingPick,
}

impl Handle for llmproxy_pick_ticket {}

/// Callback of `llmproxy_pick_async`: receives the finished decision, exactly once.
pub type llmproxy_pick_callback =
    Option<unsafe extern "C" fn(user_data: *mut c_void, req: *mut llmproxy_request)>;

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
    boundary(|| {
        let p = match pick_args(router, headers, n_headers, body, body_len, out) {
            Ok(p) => p,
            Err(status) => return status,
        };
        match caught(|| p.router.router.pick(&p.headers, p.body)) {
            Some(request) => hand_out(request, p.out),
            None => internal_error(p.router, p.out),
        }
    })
}

/// Like `llmproxy_pick`, but may answer `LLMPROXY_PENDING` when the config enables remote
/// cache lookups (`metadata_center.cache_enabled`): then `*out` stays NULL and
/// `cb(user_data, req)` is called exactly once, from the library's lookup thread, with the
/// decision (within `llmproxy_router_pick_deadline_ms`: `metadata_center.timeout_ms` plus a
/// small slack; on timeout or error the decision uses local data). With any other status `*out` is set as by `llmproxy_pick` and `cb` is never
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
    boundary(|| {
        let Some(cb) = cb else {
            return llmproxy_pick(router, headers, n_headers, body, body_len, out);
        };
        let p = match pick_args(router, headers, n_headers, body, body_len, out) {
            Ok(p) => p,
            Err(status) => return status,
        };
        /// The host's opaque pointer, handed back on the lookup thread as the contract says.
        struct UserData(*mut c_void);
        unsafe impl Send for UserData {}
        let user = UserData(user_data);
        let done = Box::new(move |request: PickedRequest| {
            let user = user;
            let handle = llmproxy_request::new(request).into_raw();
            // SAFETY: the host promised `cb` may run on any thread with `user_data`.
            unsafe { cb(user.0, handle) };
        });
        match caught(|| p.router.router.pick_async(&p.headers, p.body, done)) {
            Some(None) => LLMPROXY_PENDING,
            Some(Some(request)) => hand_out(request, p.out),
            None => internal_error(p.router, p.out),
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
    boundary(|| {
        let Some(ticket) = out_param(ticket) else {
            return LLMPROXY_INVALID_ARGUMENT;
        };
        let p = match pick_args(router, headers, n_headers, body, body_len, out) {
            Ok(p) => p,
            Err(status) => return status,
        };
        match caught(|| p.router.router.pick_start(&p.headers, p.body)) {
            Some(PickStart::Pending(pending)) => {
                *ticket = llmproxy_pick_ticket { pending }.into_raw();
                LLMPROXY_PENDING
            }
            Some(PickStart::Decided(request)) => hand_out(request, p.out),
            None => internal_error(p.router, p.out),
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
    boundary(|| {
        let (Some(out), Some(t)) = (out_param(out), ticket.as_mut()) else {
            return LLMPROXY_INVALID_ARGUMENT;
        };
        if t.pending.is_taken() {
            return LLMPROXY_INVALID_ARGUMENT;
        }
        match t.pending.try_take() {
            Some(request) => hand_out(request, out),
            None => LLMPROXY_PENDING,
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
    boundary(|| drop(llmproxy_pick_ticket::from_raw(ticket)))
}

/// The checked arguments of a pick.
struct PickArgs<'a> {
    router: &'a llmproxy_router,
    headers: Vec<HeaderRef<'a>>,
    body: &'a [u8],
    /// The cleared `*out`, for [`hand_out`].
    out: &'a mut *mut llmproxy_request,
}

/// Checks the arguments every pick takes. `Err` carries the status to answer with `*out` set
/// as `llmproxy_pick` documents: NULL for a NULL `out` or router; a 400 request handle (and
/// `LLMPROXY_INVALID_ARGUMENT`) for bad header or body pointers.
unsafe fn pick_args<'a>(
    router: *mut llmproxy_router,
    headers: *const llmproxy_header,
    n_headers: usize,
    body: *const u8,
    body_len: usize,
    out: *mut *mut llmproxy_request,
) -> Result<PickArgs<'a>, llmproxy_status> {
    let (Some(out), Some(router)) = (out_param(out), router.as_ref()) else {
        return Err(LLMPROXY_INVALID_ARGUMENT);
    };
    let (Some(headers), Some(body)) = (header_refs(headers, n_headers), bytes(body, body_len))
    else {
        let request = router.router.failed_request(PickError::bad_request(
            "invalid arguments from the host (NULL pointer with a length)",
            None,
        ));
        hand_out(request, out);
        return Err(LLMPROXY_INVALID_ARGUMENT);
    };
    Ok(PickArgs {
        router,
        headers,
        body,
        out,
    })
}

/// Borrows the host's headers; `None` when a pointer is NULL with a length.
unsafe fn header_refs<'a>(headers: *const llmproxy_header, n: usize) -> Option<Vec<HeaderRef<'a>>> {
    if n == 0 {
        return Some(Vec::new());
    }
    if headers.is_null() {
        return None;
    }
    // Sized once: collecting into an `Option<Vec<_>>` would start small and regrow.
    let mut refs = Vec::with_capacity(n);
    for h in std::slice::from_raw_parts(headers, n) {
        refs.push((
            bytes(h.name.cast(), h.name_len)?,
            bytes(h.value.cast(), h.value_len)?,
        ));
    }
    Some(refs)
}

/// Boxes a decision into a request handle in `*out` and returns its status.
fn hand_out(request: PickedRequest, out: &mut *mut llmproxy_request) -> llmproxy_status {
    let status = request.error().map_or(LLMPROXY_OK, llmproxy_status::from);
    *out = llmproxy_request::new(request).into_raw();
    status
}

/// A request handle carrying an internal error (a panic caught while picking) in `*out`;
/// `LLMPROXY_INTERNAL`.
fn internal_error(r: &llmproxy_router, out: &mut *mut llmproxy_request) -> llmproxy_status {
    let request = r.router.failed_request(PickError::Internal {
        message: "panic while picking an endpoint".into(),
    });
    hand_out(request, out);
    LLMPROXY_INTERNAL
}
