//! Errors hosts produce themselves (a router that failed to load, a body over their own
//! limit, an upstream that timed out): the HTTP status of a library status, and the OpenAI
//! error body the library renders for a status and a message, so that hosts answer in the
//! library's exact shape instead of keeping their own copy of it.

use std::ffi::c_char;

use super::llmproxy_status::{self, *};
use super::{boundary, boundary_or, bytes, write_err};
use crate::error::error_json;

/// The HTTP status a host answers with for a library status: 200 for `LLMPROXY_OK`; 400 for
/// `LLMPROXY_BAD_REQUEST` and `LLMPROXY_INVALID_ARGUMENT`; 404, 413 and 503 for
/// `LLMPROXY_MODEL_NOT_FOUND`, `LLMPROXY_PAYLOAD_TOO_LARGE` and `LLMPROXY_NO_ENDPOINT`;
/// 500 for everything else (`LLMPROXY_INTERNAL`, `LLMPROXY_INVALID_CONFIG`,
/// `LLMPROXY_PENDING`, `LLMPROXY_PASSTHROUGH` — which a host proxies untouched instead —,
/// values outside the enum). `status` is an `llmproxy_status` value,
/// passed as an integer so that any value is safe.
#[no_mangle]
pub extern "C" fn llmproxy_status_http(status: u32) -> u32 {
    boundary_or(500, || {
        HTTP_STATUSES
            .iter()
            .find(|(s, _)| *s as u32 == status)
            .map_or(500, |(_, http)| *http)
    })
}

/// The statuses that answer something other than 500, with their HTTP status.
const HTTP_STATUSES: [(llmproxy_status, u32); 6] = [
    (LLMPROXY_OK, 200),
    (LLMPROXY_BAD_REQUEST, 400),
    (LLMPROXY_INVALID_ARGUMENT, 400),
    (LLMPROXY_MODEL_NOT_FOUND, 404),
    (LLMPROXY_PAYLOAD_TOO_LARGE, 413),
    (LLMPROXY_NO_ENDPOINT, 503),
];

/// Renders into `out` the OpenAI error body `{"error": {"message", "type", "param", "code"}}`
/// that the library sends for its own errors, for an error of `http_status` with this
/// message: the same bytes as `llmproxy_request_error_body` of a request that failed with
/// that status and message (except that `param` never names a request field of a 400).
/// `type`/`code`: `invalid_request_error`/`invalid_request` (400),
/// `invalid_request_error`/`model_not_found` (404), `invalid_request_error`/
/// `request_too_large` (413), `server_error`/`internal_error` (500),
/// `service_unavailable_error`/`no_endpoint` (503), `upstream_error`/`upstream_unavailable`
/// (502), `upstream_error`/`upstream_timeout` (504); otherwise `invalid_request_error`/
/// `invalid_request` for 4xx and `server_error`/`internal_error` for anything else. `param`
/// is "model" for 404 and null otherwise. The message is escaped as JSON; invalid UTF-8 in
/// it becomes U+FFFD.
///
/// Returns the length of the whole body without its NUL, like `snprintf`: at most
/// `out_cap - 1` bytes of it are written, cut on a UTF-8 boundary, always NUL-terminated when
/// `out_cap > 0`; a result `>= out_cap` means the body was cut (call again with a buffer of
/// the result + 1 bytes). `out` may be NULL with `out_cap` 0 to ask for the length only.
/// Returns 0 and writes "" when `message` is NULL with a non-zero length.
///
/// # Safety
/// `message` must point to `message_len` readable bytes; `out`, when not NULL, must point
/// to `out_cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn llmproxy_error_body(
    http_status: u32,
    message: *const c_char,
    message_len: usize,
    out: *mut c_char,
    out_cap: usize,
) -> usize {
    boundary(|| {
        let Some(message) = bytes(message.cast(), message_len) else {
            write_err(out, out_cap, "");
            return 0;
        };
        let body = error_json(http_status, &String::from_utf8_lossy(message));
        write_err(out, out_cap, &body);
        body.len()
    })
}
