//! The request handle, from a pick to its finish: the decision and its strings, the upstream
//! rewrites and response transcoding, retry, first token, and finish with its outcome.

use std::ffi::c_char;
use std::ptr;

use super::llmproxy_status::{self, *};
use super::{boundary, boundary_or, bytes, out_param, out_str, set_opt, Handle};
use crate::router::{Outcome, PickedRequest};

/// Opaque per-request handle, from pick to finish. Used by one thread at a time.
pub struct llmproxy_request {
    request: PickedRequest,
    strings: RequestStrings,
}

impl Handle for llmproxy_request {}

impl llmproxy_request {
    /// The handle of a decision, with the strings its accessors hand out.
    pub(super) fn new(request: PickedRequest) -> Self {
        let strings = RequestStrings::of(&request);
        Self { request, strings }
    }
}

/// One of the strings a request hands out.
#[derive(Clone, Copy)]
enum Field {
    Endpoint,
    Cluster,
    Backend,
    Model,
    Scene,
    ErrorBody,
    UpstreamModel,
    UpstreamPath,
}

const FIELDS: usize = Field::UpstreamPath as usize + 1;

/// NUL-terminated copies of what the accessors hand out, back to back in one buffer (one
/// allocation per decision, not one per string: this runs on every pick).
struct RequestStrings {
    buf: Vec<u8>,
    /// Where each [`Field`]'s string starts in `buf`; it ends with the NUL before the next.
    starts: [usize; FIELDS],
}

impl RequestStrings {
    /// The strings of `r`'s current decision.
    fn of(r: &PickedRequest) -> Self {
        let error_body = r.error_body();
        let parts: [&str; FIELDS] = [
            r.endpoint().unwrap_or(""),
            r.cluster().unwrap_or(""),
            r.backend().unwrap_or(""),
            r.model().unwrap_or(""),
            r.scene().unwrap_or(""),
            error_body.as_deref().unwrap_or(""),
            r.upstream_model().unwrap_or(""),
            r.upstream_path().unwrap_or(""),
        ];
        let mut buf = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
        let mut starts = [0; FIELDS];
        for (start, part) in starts.iter_mut().zip(parts) {
            *start = buf.len();
            buf.extend_from_slice(part.as_bytes());
            buf.push(0);
        }
        Self { buf, starts }
    }

    /// `field`'s string with its NUL.
    fn get(&self, field: Field) -> &[u8] {
        let i = field as usize;
        let end = self.starts.get(i + 1).copied().unwrap_or(self.buf.len());
        &self.buf[self.starts[i]..end]
    }
}

/// The status of the pick that made this request.
///
/// # Safety
/// `req` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_status(req: *const llmproxy_request) -> llmproxy_status {
    boundary(|| match req.as_ref() {
        None => LLMPROXY_INVALID_ARGUMENT,
        Some(r) if r.request.http_status() == 200 => LLMPROXY_OK,
        Some(r) => r
            .request
            .error()
            .map_or(LLMPROXY_NO_ENDPOINT, llmproxy_status::from),
    })
}

/// HTTP status for the client: 200 when routed, else 400/404/413/500/503 (500 for NULL); 0
/// for `LLMPROXY_PASSTHROUGH` (nothing to answer).
///
/// # Safety
/// `req` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_http_status(req: *const llmproxy_request) -> u32 {
    boundary_or(500, || {
        req.as_ref().map_or(500, |r| r.request.http_status())
    })
}

/// Hands out one of a request's strings; "" for a NULL request. The body of every string
/// accessor below: only their names, fields and first doc lines differ.
unsafe fn request_string(
    req: *const llmproxy_request,
    len: *mut usize,
    field: Field,
) -> *const c_char {
    out_str(
        req.as_ref().map_or(&b"\0"[..], |r| r.strings.get(field)),
        len,
    )
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
    boundary(|| request_string(req, len, Field::Endpoint))
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
    boundary(|| request_string(req, len, Field::Cluster))
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
    boundary(|| request_string(req, len, Field::Backend))
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
    boundary(|| request_string(req, len, Field::Model))
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
    boundary(|| request_string(req, len, Field::Scene))
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
    boundary(|| request_string(req, len, Field::ErrorBody))
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
    boundary(|| request_string(req, len, Field::UpstreamModel))
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
    boundary(|| request_string(req, len, Field::UpstreamPath))
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
    boundary(|| {
        let body = req.as_ref().and_then(|r| r.request.upstream_body());
        set_opt(len, body.map_or(0, <[u8]>::len));
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
    boundary(|| req.as_ref().is_some_and(|r| r.request.needs_transcoding()))
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
    boundary_or(upstream_status, || match req.as_mut() {
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
    boundary(|| {
        let ct = req
            .as_ref()
            .and_then(|r| r.request.response_content_type())
            .unwrap_or("");
        set_opt(len, ct.len());
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
    boundary(|| {
        if out_len.is_null() {
            return LLMPROXY_INVALID_ARGUMENT;
        }
        let Some(out) = out_param(out) else {
            return LLMPROXY_INVALID_ARGUMENT;
        };
        *out_len = 0;
        let (Some(r), Some(input)) = (req.as_mut(), bytes(chunk, len)) else {
            return LLMPROXY_INVALID_ARGUMENT;
        };
        let output = r
            .request
            .transcode_response(input, end_of_stream)
            .unwrap_or(input);
        *out = output.as_ptr();
        *out_len = output.len();
        LLMPROXY_OK
    })
}

/// Reads one upstream response body chunk (any size, any boundary; pass `end_of_stream`
/// with the last one, an empty chunk is fine) so that, when the request finishes with a 2xx
/// answer read in full (or up to `learn_response_bytes`), the router learns the next turn's
/// prefix (this prompt followed by the answer) for the endpoint that answered, and counts
/// the answer's `usage` tokens. Call it for every chunk, in order, with the bytes as the
/// upstream sent them. Cheap no-op when `learn_response_bytes` is 0, for requests whose next
/// turn does not extend the prompt, and for transcoded answers (Triton):
/// `llmproxy_request_transcode_response` reads its own OpenAI output. Never fails the
/// response and never marks the first token. A host that cannot see a chunk (e.g. one
/// buffered to a file) must stop calling it for the rest of the response rather than skip
/// that piece: an answer whose end is never read is not learned (unless the cap was reached
/// before the gap, and then only what precedes it).
///
/// # Safety
/// `req` must be NULL or valid; `chunk` must hold `len` bytes (NULL when `len` is 0 is fine).
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_observe_response(
    req: *mut llmproxy_request,
    chunk: *const u8,
    len: usize,
    end_of_stream: bool,
) {
    boundary(|| {
        if let (Some(r), Some(input)) = (req.as_mut(), bytes(chunk, len)) {
            r.request.observe_response(input, end_of_stream);
        }
    })
}

/// The request's `stream` flag.
///
/// # Safety
/// `req` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_is_stream(req: *const llmproxy_request) -> bool {
    boundary(|| req.as_ref().is_some_and(|r| r.request.is_stream()))
}

/// Re-picks another endpoint of the same cluster after a connect failure, excluding the
/// endpoints already tried. `LLMPROXY_NO_ENDPOINT` when none is left.
///
/// # Safety
/// `req` must be NULL or valid; accessor strings obtained before are invalidated.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_request_retry(req: *mut llmproxy_request) -> llmproxy_status {
    boundary(|| {
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
    boundary(|| {
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
    boundary(|| finish(req, upstream_status, Outcome::Upstream))
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
    boundary(|| {
        // An integer, not the enum: a C caller may pass any value, and an out-of-range Rust
        // enum would be undefined behaviour.
        let outcome = match outcome {
            x if x == llmproxy_outcome::LLMPROXY_OUTCOME_UPSTREAM as u32 => Outcome::Upstream,
            x if x == llmproxy_outcome::LLMPROXY_OUTCOME_ENDPOINT_FAILED as u32 => {
                Outcome::EndpointFailed
            }
            _ => Outcome::Local,
        };
        finish(req, status, outcome)
    })
}

/// Finishes and frees `req` (NULL: nothing to do).
unsafe fn finish(req: *mut llmproxy_request, status: u32, outcome: Outcome) {
    if let Some(handle) = llmproxy_request::from_raw(req) {
        handle.request.finish_with(status, outcome);
    }
}
