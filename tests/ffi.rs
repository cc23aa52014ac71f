//! The C ABI driven from Rust, as a C host would: statuses, NULL safety, bad input, error
//! bodies for the host's own errors, and many threads picking on one router.

use std::ffi::{c_char, CStr};
use std::ptr;

use llmproxy::ffi::llmproxy_status::{self, *};
use llmproxy::ffi::*;

const CONFIG: &str = r#"{
    "model_mapping_rule": {
        "llama": {"rules": [{"cluster": "pool", "backend": "vllm", "scene_name": "chat"}]},
        "qwen": {"rules": [{"cluster": "pool", "backend": "sglang"}]}
    },
    "clusters": {"pool": {"endpoints": ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003", "127.0.0.1:8004"]}}
}"#;

struct Router(*mut llmproxy_router);
unsafe impl Send for Router {}
unsafe impl Sync for Router {}
impl Drop for Router {
    fn drop(&mut self) {
        unsafe { llmproxy_router_free(self.0) }
    }
}

fn router(config: &str) -> Result<Router, (llmproxy_status, String)> {
    let mut out = ptr::null_mut();
    let mut err = [0 as c_char; 512];
    let st = unsafe {
        llmproxy_router_new(
            config.as_ptr().cast(),
            config.len(),
            &mut out,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    if st == LLMPROXY_OK {
        assert!(!out.is_null());
        Ok(Router(out))
    } else {
        assert!(out.is_null());
        Err((st, msg))
    }
}

fn header(name: &'static str, value: &'static str) -> llmproxy_header {
    llmproxy_header {
        name: name.as_ptr().cast(),
        name_len: name.len(),
        value: value.as_ptr().cast(),
        value_len: value.len(),
    }
}

unsafe fn text(
    f: unsafe extern "C" fn(*const llmproxy_request, *mut usize) -> *const c_char,
    req: *const llmproxy_request,
) -> String {
    let mut len = 0;
    let p = f(req, &mut len);
    let bytes = std::slice::from_raw_parts(p.cast::<u8>(), len);
    assert_eq!(*p.add(len), 0, "NUL-terminated");
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn pick(
    r: &Router,
    headers: &[llmproxy_header],
    body: &[u8],
) -> (llmproxy_status, *mut llmproxy_request) {
    let mut req = ptr::null_mut();
    let st = unsafe {
        llmproxy_pick(
            r.0,
            headers.as_ptr(),
            headers.len(),
            body.as_ptr(),
            body.len(),
            &mut req,
        )
    };
    assert!(!req.is_null(), "*out is set even on error");
    (st, req)
}

/// `llmproxy_router_should_intercept` for `method` and `path`.
fn intercepts(r: &Router, method: &str, path: &str) -> bool {
    let (m, p) = (method.as_bytes(), path.as_bytes());
    unsafe {
        llmproxy_router_should_intercept(
            r.0,
            m.as_ptr().cast(),
            m.len(),
            p.as_ptr().cast(),
            p.len(),
        )
    }
}

fn chat(model: &str, text: &str) -> Vec<u8> {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]})
        .to_string()
        .into_bytes()
}

fn metrics(r: &Router) -> String {
    let mut out = ptr::null_mut();
    let mut len = 0;
    assert_eq!(
        unsafe { llmproxy_router_metrics(r.0, &mut out, &mut len) },
        LLMPROXY_OK
    );
    let s = unsafe { CStr::from_ptr(out) }.to_str().unwrap().to_owned();
    assert_eq!(s.len(), len);
    unsafe { llmproxy_string_free(out) };
    s
}

#[test]
fn routed_request_exposes_its_decision() {
    let r = router(CONFIG).unwrap();
    let (st, req) = pick(
        &r,
        &[header(":path", "/v1/chat/completions")],
        br#"{"model":"llama","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(st, LLMPROXY_OK);
    unsafe {
        assert_eq!(llmproxy_request_status(req), LLMPROXY_OK);
        assert_eq!(llmproxy_request_http_status(req), 200);
        assert!(text(llmproxy_request_endpoint, req).starts_with("127.0.0.1:800"));
        assert_eq!(text(llmproxy_request_cluster, req), "pool");
        assert_eq!(text(llmproxy_request_backend, req), "vllm");
        assert_eq!(text(llmproxy_request_model, req), "llama");
        assert_eq!(text(llmproxy_request_scene, req), "chat");
        assert_eq!(text(llmproxy_request_error_body, req), "");
        assert!(llmproxy_request_is_stream(req));
        assert_eq!(llmproxy_router_in_flight(r.0), 1);
        llmproxy_request_first_token(req);
        llmproxy_request_finish(req, 200);
        assert_eq!(llmproxy_router_in_flight(r.0), 0);
    }
}

/// A router whose picks can end in every error: bodies over 4 KiB are too large, and
/// `qwen` routes to a cluster without endpoints.
fn error_router() -> Router {
    router(
        &CONFIG
            .replace(
                "\"model_mapping_rule\"",
                "\"max_body_bytes\": 4096, \"model_mapping_rule\"",
            )
            .replace(
                "\"qwen\": {\"rules\": [{\"cluster\": \"pool\"",
                "\"qwen\": {\"rules\": [{\"cluster\": \"empty\"",
            ),
    )
    .unwrap()
}

#[test]
fn every_error_class_has_its_status_and_json() {
    let r = error_router();
    let big = chat("llama", &"x".repeat(5000));
    let cases: [(&[u8], llmproxy_status, u32, &str); 7] = [
        (b"{not json", LLMPROXY_BAD_REQUEST, 400, "invalid_request"),
        (b"", LLMPROXY_BAD_REQUEST, 400, "invalid_request"),
        (
            br#"{"messages":[{"role":"user","content":"x"}]}"#,
            LLMPROXY_BAD_REQUEST,
            400,
            "invalid_request",
        ),
        (
            br#"{"model":"llama","messages":[]}"#,
            LLMPROXY_BAD_REQUEST,
            400,
            "invalid_request",
        ),
        (
            br#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#,
            LLMPROXY_MODEL_NOT_FOUND,
            404,
            "model_not_found",
        ),
        (&big, LLMPROXY_PAYLOAD_TOO_LARGE, 413, "request_too_large"),
        (
            br#"{"model":"qwen","messages":[{"role":"user","content":"x"}]}"#,
            LLMPROXY_NO_ENDPOINT,
            503,
            "no_endpoint",
        ),
    ];
    for (body, want_status, want_http, want_code) in cases {
        let (st, req) = pick(&r, &[], body);
        assert_eq!(st, want_status, "{}", String::from_utf8_lossy(body));
        unsafe {
            assert_eq!(llmproxy_request_status(req), want_status);
            assert_eq!(llmproxy_request_http_status(req), want_http);
            assert_eq!(text(llmproxy_request_endpoint, req), "");
            let err: serde_json::Value =
                serde_json::from_str(&text(llmproxy_request_error_body, req)).unwrap();
            assert_eq!(err["error"]["code"], want_code);
            assert!(err["error"]["message"].as_str().unwrap().len() > 5);
            llmproxy_request_first_token(req);
            llmproxy_request_finish(req, 0);
        }
    }
    let m = metrics(&r);
    assert!(
        m.contains("llmproxy_picks_total{outcome=\"bad_request\"} 4"),
        "{m}"
    );
    assert!(
        m.contains("llmproxy_picks_total{outcome=\"no_endpoint\"} 1"),
        "{m}"
    );
    assert_eq!(unsafe { llmproxy_router_in_flight(r.0) }, 0);
}

#[test]
fn invalid_config_names_field_and_truncates_safely() {
    let bad = r#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "tgi"}]}}}"#;
    let (st, msg) = router(bad).err().unwrap();
    assert_eq!(st, LLMPROXY_INVALID_CONFIG);
    assert!(
        msg.starts_with("config.model_mapping_rule.m.rules[0].backend: unknown backend"),
        "{msg}"
    );

    // A tiny buffer gets a truncated, NUL-terminated message.
    let mut out = ptr::null_mut();
    let mut err = [0x7f as c_char; 8];
    let st = unsafe {
        llmproxy_router_new(
            bad.as_ptr().cast(),
            bad.len(),
            &mut out,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    assert_eq!(st, LLMPROXY_INVALID_CONFIG);
    assert_eq!(
        unsafe { CStr::from_ptr(err.as_ptr()) }.to_bytes(),
        b"config."
    );
    // err may be NULL.
    let st = unsafe {
        llmproxy_router_new(bad.as_ptr().cast(), bad.len(), &mut out, ptr::null_mut(), 0)
    };
    assert_eq!(st, LLMPROXY_INVALID_CONFIG);
}

#[test]
fn validate_checks_without_a_router() {
    let mut err = [0 as c_char; 256];
    let good = CONFIG;
    let bad = r#"{"algorithm": "fastest"}"#;
    unsafe {
        assert_eq!(
            llmproxy_config_validate(
                good.as_ptr().cast(),
                good.len(),
                err.as_mut_ptr(),
                err.len()
            ),
            LLMPROXY_OK
        );
        assert_eq!(CStr::from_ptr(err.as_ptr()).to_bytes(), b"");
        assert_eq!(
            llmproxy_config_validate(bad.as_ptr().cast(), bad.len(), err.as_mut_ptr(), err.len()),
            LLMPROXY_INVALID_CONFIG
        );
        assert!(CStr::from_ptr(err.as_ptr())
            .to_str()
            .unwrap()
            .starts_with("config.algorithm: unknown algorithm"));
        assert_eq!(
            llmproxy_config_validate(ptr::null(), 3, ptr::null_mut(), 0),
            LLMPROXY_INVALID_ARGUMENT
        );
    }
}

#[test]
#[cfg_attr(miri, ignore = "Miri cannot fork")]
fn forked_workers_draw_different_random_choices() {
    // Routers created in different processes must not replay the same tie-breaks: the
    // per-router seed mixes the process id, so two routers in one process differ too.
    let a = router(CONFIG).unwrap();
    let b = router(CONFIG).unwrap();
    let seq = |r: &Router| -> Vec<String> {
        (0..32)
            .map(|i| {
                let (_, req) = pick(r, &[], &chat("llama", &format!("unique {i}")));
                let ep = unsafe { text(llmproxy_request_endpoint, req) };
                unsafe { llmproxy_request_finish(req, 200) };
                ep
            })
            .collect()
    };
    assert_ne!(seq(&a), seq(&b));
}

#[test]
fn null_arguments_are_rejected_not_crashed_on() {
    unsafe {
        let mut out = ptr::null_mut();
        assert_eq!(
            llmproxy_router_new(ptr::null(), 10, &mut out, ptr::null_mut(), 0),
            LLMPROXY_INVALID_ARGUMENT
        );
        assert_eq!(
            llmproxy_router_new(ptr::null(), 0, &mut out, ptr::null_mut(), 0),
            LLMPROXY_INVALID_CONFIG
        );
        assert_eq!(
            llmproxy_router_new(
                b"{}".as_ptr().cast(),
                2,
                ptr::null_mut(),
                ptr::null_mut(),
                0
            ),
            LLMPROXY_INVALID_ARGUMENT
        );
        llmproxy_router_free(ptr::null_mut());
        let mut req = ptr::null_mut();
        assert_eq!(
            llmproxy_pick(ptr::null_mut(), ptr::null(), 0, ptr::null(), 0, &mut req),
            LLMPROXY_INVALID_ARGUMENT
        );
        assert!(req.is_null());

        let r = router(CONFIG).unwrap();
        assert_eq!(
            llmproxy_pick(r.0, ptr::null(), 0, ptr::null(), 0, ptr::null_mut()),
            LLMPROXY_INVALID_ARGUMENT
        );
        // NULL body with a length, NULL headers with a count: INVALID_ARGUMENT with a handle.
        assert_eq!(
            llmproxy_pick(r.0, ptr::null(), 0, ptr::null(), 5, &mut req),
            LLMPROXY_INVALID_ARGUMENT
        );
        assert_eq!(llmproxy_request_http_status(req), 400);
        llmproxy_request_finish(req, 0);
        assert_eq!(
            llmproxy_pick(r.0, ptr::null(), 3, b"{}".as_ptr(), 2, &mut req),
            LLMPROXY_INVALID_ARGUMENT
        );
        llmproxy_request_finish(req, 0);
        let bad_header = [llmproxy_header {
            name: ptr::null(),
            name_len: 4,
            value: ptr::null(),
            value_len: 0,
        }];
        assert_eq!(
            llmproxy_pick(r.0, bad_header.as_ptr(), 1, b"{}".as_ptr(), 2, &mut req),
            LLMPROXY_INVALID_ARGUMENT
        );
        llmproxy_request_finish(req, 0);
        // NULL body of length 0 is an empty body: 400.
        assert_eq!(
            llmproxy_pick(r.0, ptr::null(), 0, ptr::null(), 0, &mut req),
            LLMPROXY_BAD_REQUEST
        );
        llmproxy_request_finish(req, 0);

        // Accessors and lifecycle calls on NULL.
        assert_eq!(llmproxy_request_http_status(ptr::null()), 500);
        assert_eq!(
            llmproxy_request_status(ptr::null()),
            LLMPROXY_INVALID_ARGUMENT
        );
        assert_eq!(text(llmproxy_request_endpoint, ptr::null()), "");
        assert!(!llmproxy_request_endpoint(ptr::null(), ptr::null_mut()).is_null());
        assert!(!llmproxy_request_is_stream(ptr::null()));
        assert_eq!(
            llmproxy_request_retry(ptr::null_mut()),
            LLMPROXY_INVALID_ARGUMENT
        );
        llmproxy_request_first_token(ptr::null_mut());
        llmproxy_request_finish(ptr::null_mut(), 200);
        assert_eq!(llmproxy_router_in_flight(ptr::null()), 0);
        assert_eq!(llmproxy_router_max_body_bytes(ptr::null()), 0);
        assert!(!llmproxy_router_should_intercept(
            ptr::null(),
            ptr::null(),
            0,
            ptr::null(),
            0
        ));
        let mut s = ptr::null_mut();
        assert_eq!(
            llmproxy_router_metrics(ptr::null(), &mut s, ptr::null_mut()),
            LLMPROXY_INVALID_ARGUMENT
        );
        assert_eq!(
            llmproxy_router_metrics(r.0, ptr::null_mut(), ptr::null_mut()),
            LLMPROXY_INVALID_ARGUMENT
        );
        llmproxy_string_free(ptr::null_mut());
        assert_eq!(
            llmproxy_router_set_endpoints(ptr::null_mut(), ptr::null(), 0, ptr::null(), 0),
            LLMPROXY_INVALID_ARGUMENT
        );
        assert_eq!(
            llmproxy_router_set_endpoints(r.0, b"pool".as_ptr().cast(), 4, ptr::null(), 2),
            LLMPROXY_INVALID_ARGUMENT
        );
        assert_eq!(
            CStr::from_ptr(llmproxy_version()).to_str().unwrap(),
            env!("CARGO_PKG_VERSION")
        );
    }
}

#[test]
fn pick_start_without_remote_lookups_decides_at_once() {
    let r = router(CONFIG).unwrap();
    unsafe {
        let (mut ticket, mut req) = (ptr::null_mut(), ptr::null_mut());
        let body = chat("llama", "hello");
        let st = llmproxy_pick_start(
            r.0,
            ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            &mut ticket,
            &mut req,
        );
        assert_eq!(st, LLMPROXY_OK);
        assert!(ticket.is_null() && !req.is_null());
        assert!(text(llmproxy_request_endpoint, req).starts_with("127.0.0.1:800"));
        llmproxy_request_finish(req, 200);
        // Errors too come back at once, with their handle.
        let st = llmproxy_pick_start(r.0, ptr::null(), 0, b"{".as_ptr(), 1, &mut ticket, &mut req);
        assert_eq!(st, LLMPROXY_BAD_REQUEST);
        assert!(ticket.is_null());
        assert_eq!(llmproxy_request_http_status(req), 400);
        llmproxy_request_finish(req, 0);
        // NULLs: rejected, nothing written through them, nothing leaked.
        let st = llmproxy_pick_start(
            r.0,
            ptr::null(),
            0,
            ptr::null(),
            0,
            ptr::null_mut(),
            &mut req,
        );
        assert_eq!(st, LLMPROXY_INVALID_ARGUMENT);
        let st = llmproxy_pick_start(
            r.0,
            ptr::null(),
            0,
            ptr::null(),
            0,
            &mut ticket,
            ptr::null_mut(),
        );
        assert_eq!(st, LLMPROXY_INVALID_ARGUMENT);
        let st = llmproxy_pick_start(
            ptr::null_mut(),
            ptr::null(),
            0,
            ptr::null(),
            0,
            &mut ticket,
            &mut req,
        );
        assert_eq!(st, LLMPROXY_INVALID_ARGUMENT);
        assert!(ticket.is_null() && req.is_null());
        let st = llmproxy_pick_start(r.0, ptr::null(), 0, ptr::null(), 9, &mut ticket, &mut req);
        assert_eq!(st, LLMPROXY_INVALID_ARGUMENT);
        assert!(ticket.is_null());
        llmproxy_request_finish(req, 0);
        assert_eq!(
            llmproxy_pick_poll(ptr::null_mut(), &mut req),
            LLMPROXY_INVALID_ARGUMENT
        );
        assert!(req.is_null());
        llmproxy_pick_ticket_free(ptr::null_mut());
    }
    assert_eq!(unsafe { llmproxy_router_in_flight(r.0) }, 0);
}

#[test]
fn a_stored_answer_is_routed_or_passed_through() {
    // GET /v1/responses/{id}: pinned to the endpoint that made the answer; an id the router
    // does not know is not intercepted, and picked anyway it is LLMPROXY_PASSTHROUGH (HTTP
    // status 0, no endpoint): the host proxies it untouched.
    let r = router(CONFIG).unwrap();
    let intercepts = |m: &str, p: &str| intercepts(&r, m, p);
    let responses = [header(":path", "/v1/responses")];
    let (st, req) = pick(&r, &responses, br#"{"model": "llama", "input": "hello"}"#);
    assert_eq!(st, LLMPROXY_OK);
    let home = unsafe { text(llmproxy_request_endpoint, req) };
    let answer = br#"{"id":"resp_ffi","output":[]}"#;
    unsafe {
        llmproxy_request_observe_response(req, answer.as_ptr(), answer.len(), true);
        llmproxy_request_finish(req, 200);
    }
    assert!(intercepts("GET", "/v1/responses/resp_ffi"));
    assert!(!intercepts("GET", "/v1/responses/resp_other"));
    let poll = [
        header(":method", "GET"),
        header(":path", "/v1/responses/resp_ffi"),
    ];
    let (st, req) = pick(&r, &poll, b"");
    assert_eq!(st, LLMPROXY_OK);
    assert_eq!(unsafe { text(llmproxy_request_endpoint, req) }, home);
    unsafe { llmproxy_request_finish(req, 200) };
    let other = [
        header(":method", "DELETE"),
        header(":path", "/v1/responses/resp_other"),
    ];
    let (st, req) = pick(&r, &other, b"");
    assert_eq!(st, LLMPROXY_PASSTHROUGH);
    unsafe {
        assert_eq!(llmproxy_request_status(req), LLMPROXY_PASSTHROUGH);
        assert_eq!(llmproxy_request_http_status(req), 0);
        assert_eq!(text(llmproxy_request_endpoint, req), "");
        llmproxy_request_finish(req, 0);
        assert_eq!(llmproxy_router_in_flight(r.0), 0);
    }
}

#[test]
fn router_options_for_hosts() {
    let r = router(r#"{"strict_endpoint_override": false, "cluster_header": "X-Target-Cluster", "intercept_paths": ["/v1/chat/completions"], "max_body_bytes": 2048}"#).unwrap();
    unsafe {
        assert!(!llmproxy_router_strict_override(r.0));
        let mut len = 0;
        let p = llmproxy_router_cluster_header(r.0, &mut len);
        assert_eq!(
            std::slice::from_raw_parts(p.cast::<u8>(), len),
            b"x-target-cluster"
        );
        assert_eq!(llmproxy_router_max_body_bytes(r.0), 2048);
        let p = llmproxy_router_metrics_path(r.0, &mut len);
        assert_eq!(
            std::slice::from_raw_parts(p.cast::<u8>(), len),
            b"/llmproxy/metrics"
        );
        let yes = |m: &str, p: &str| intercepts(&r, m, p);
        assert!(yes("POST", "/v1/chat/completions?stream=1"));
        assert!(!yes("POST", "/v1/completions"));
        assert!(!yes("GET", "/v1/chat/completions"));
    }
}

#[test]
fn set_endpoints_replaces_and_validates() {
    let r = router(CONFIG).unwrap();
    let eps = ["127.0.0.1:9000", "[::1]:9001"];
    let list: Vec<llmproxy_str> = eps
        .iter()
        .map(|e| llmproxy_str {
            ptr: e.as_ptr().cast(),
            len: e.len(),
        })
        .collect();
    unsafe {
        assert_eq!(
            llmproxy_router_set_endpoints(r.0, b"pool".as_ptr().cast(), 4, list.as_ptr(), 2),
            LLMPROXY_OK
        );
        let mut seen = std::collections::HashSet::new();
        // both endpoints are seen unless every pick lands on one: 2 chances in 2^20 under Miri
        for i in 0..scaled(50, 20) {
            let (st, req) = pick(&r, &[], &chat("llama", &format!("q{i}")));
            assert_eq!(st, LLMPROXY_OK);
            seen.insert(text(llmproxy_request_endpoint, req));
            llmproxy_request_finish(req, 200);
        }
        assert_eq!(seen, eps.iter().map(|s| s.to_string()).collect());
        // A hostname is refused and nothing changes.
        let bad = ["model-0:8000"];
        let bad_list = [llmproxy_str {
            ptr: bad[0].as_ptr().cast(),
            len: bad[0].len(),
        }];
        assert_eq!(
            llmproxy_router_set_endpoints(r.0, b"pool".as_ptr().cast(), 4, bad_list.as_ptr(), 1),
            LLMPROXY_INVALID_ARGUMENT
        );
        let (_, req) = pick(&r, &[], &chat("llama", "again"));
        assert!(eps.contains(&text(llmproxy_request_endpoint, req).as_str()));
        llmproxy_request_finish(req, 200);
        // An empty set makes the cluster answer 503.
        assert_eq!(
            llmproxy_router_set_endpoints(r.0, b"pool".as_ptr().cast(), 4, ptr::null(), 0),
            LLMPROXY_OK
        );
        let (st, req) = pick(&r, &[], &chat("llama", "none"));
        assert_eq!(st, LLMPROXY_NO_ENDPOINT);
        llmproxy_request_finish(req, 0);
    }
}

#[test]
fn retry_through_the_abi() {
    let r = router(CONFIG).unwrap();
    let (_, req) = pick(&r, &[], &chat("llama", "retry me"));
    unsafe {
        let first = text(llmproxy_request_endpoint, req);
        assert_eq!(llmproxy_request_retry(req), LLMPROXY_OK);
        let second = text(llmproxy_request_endpoint, req);
        assert_ne!(first, second);
        assert_eq!(llmproxy_router_in_flight(r.0), 1);
        llmproxy_request_finish(req, 200);
        assert_eq!(llmproxy_router_in_flight(r.0), 0);
    }
}

#[test]
fn observed_answers_are_learned_and_observing_is_null_safe() {
    let r = router(
        r#"{"hash_chunk_bytes": 32,
        "model_mapping_rule": {"llama": {"rules": [{"cluster": "pool", "backend": "vllm"}]}},
        "clusters": {"pool": {"endpoints": ["127.0.0.1:8001", "127.0.0.1:8002"]}}}"#,
    )
    .unwrap();
    let answer = "Sure. ".repeat(40);
    let sse = format!(
        "data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
        serde_json::json!({"choices": [{"index": 0, "delta": {"content": answer}}]}),
        serde_json::json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 40}}),
    );
    unsafe {
        // NULL request, NULL chunk with a length: ignored.
        llmproxy_request_observe_response(ptr::null_mut(), sse.as_ptr(), sse.len(), true);
        let (_, req) = pick(&r, &[], &chat("llama", "hello"));
        llmproxy_request_observe_response(req, ptr::null(), 5, false);
        llmproxy_request_observe_response(req, ptr::null(), 0, false);
        for piece in sse.as_bytes().chunks(5) {
            llmproxy_request_observe_response(req, piece.as_ptr(), piece.len(), false);
        }
        llmproxy_request_observe_response(req, ptr::null(), 0, true);
        llmproxy_request_finish(req, 200);
        // An unrouted request (bad body) ignores it too.
        let (st, bad) = pick(&r, &[], b"{");
        assert_eq!(st, LLMPROXY_BAD_REQUEST);
        llmproxy_request_observe_response(bad, sse.as_ptr(), sse.len(), true);
        llmproxy_request_finish(bad, 0);
    }
    let page = metrics(&r);
    assert!(
        !page.contains("llmproxy_learned_response_chunks_total 0\n"),
        "{page}"
    );
    assert!(
        page.lines().any(|l| l.starts_with(
            "llmproxy_tokens_total{model=\"llama\",cluster=\"pool\",endpoint=\"127.0.0.1:800"
        ) && l.ends_with(",kind=\"completion\"} 40")),
        "{page}"
    );
}

/// `llmproxy_error_body` into a buffer of `cap` bytes: (returned length, written text).
fn error_body(http_status: u32, message: &[u8], cap: usize) -> (usize, String) {
    let mut out = vec![0x7f as c_char; cap];
    let n = unsafe {
        llmproxy_error_body(
            http_status,
            message.as_ptr().cast(),
            message.len(),
            if cap == 0 {
                ptr::null_mut()
            } else {
                out.as_mut_ptr()
            },
            cap,
        )
    };
    let written = if cap == 0 {
        String::new()
    } else {
        let text = unsafe { CStr::from_ptr(out.as_ptr()) };
        text.to_str().expect("cut on a UTF-8 boundary").to_owned()
    };
    (n, written)
}

#[test]
fn host_error_bodies_match_the_library_s_own_for_the_same_status_and_message() {
    let r = error_router();
    let bodies: [&[u8]; 4] = [
        b"{not json",
        br#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#,
        &chat("llama", &"x".repeat(5000)),
        br#"{"model":"qwen","messages":[{"role":"user","content":"x"}]}"#,
    ];
    for body in bodies {
        let (st, req) = pick(&r, &[], body);
        let http = unsafe { llmproxy_request_http_status(req) };
        assert_eq!(llmproxy_status_http(st as u32), http);
        let library = unsafe { text(llmproxy_request_error_body, req) };
        let v: serde_json::Value = serde_json::from_str(&library).unwrap();
        let message = v["error"]["message"].as_str().unwrap();
        let (n, host) = error_body(http, message.as_bytes(), 4096);
        assert_eq!(host, library, "status {http}");
        assert_eq!(n, library.len());
        unsafe { llmproxy_request_finish(req, 0) };
    }
    // A 500 renders as the library's internal errors do.
    let (_, body) = error_body(
        500,
        b"internal error: llmproxy: no router in this worker",
        512,
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            &v["error"]["type"],
            &v["error"]["code"],
            &v["error"]["param"]
        ),
        (
            &"server_error".into(),
            &"internal_error".into(),
            &serde_json::Value::Null
        )
    );
    // Statuses the library never answers itself still get an OpenAI shape.
    for (status, kind, code) in [
        (502, "upstream_error", "upstream_unavailable"),
        (504, "upstream_error", "upstream_timeout"),
        (429, "invalid_request_error", "invalid_request"),
        (501, "server_error", "not_implemented"),
        (505, "server_error", "internal_error"),
        (0, "server_error", "internal_error"),
    ] {
        let (_, body) = error_body(status, "quote \" newline \n tab \t ü \u{1}".as_bytes(), 512);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["message"], "quote \" newline \n tab \t ü \u{1}");
        assert_eq!(
            (v["error"]["type"].as_str(), v["error"]["code"].as_str()),
            (Some(kind), Some(code))
        );
    }
}

#[test]
fn every_status_maps_to_the_http_status_hosts_answer() {
    let cases = [
        (LLMPROXY_OK, 200),
        (LLMPROXY_PENDING, 500),
        (LLMPROXY_INVALID_ARGUMENT, 400),
        (LLMPROXY_INVALID_CONFIG, 500),
        (LLMPROXY_BAD_REQUEST, 400),
        (LLMPROXY_MODEL_NOT_FOUND, 404),
        (LLMPROXY_PAYLOAD_TOO_LARGE, 413),
        (LLMPROXY_NO_ENDPOINT, 503),
        (LLMPROXY_INTERNAL, 500),
        (LLMPROXY_PASSTHROUGH, 500),
    ];
    for (status, http) in cases {
        assert_eq!(llmproxy_status_http(status as u32), http, "{status:?}");
    }
    assert_eq!(llmproxy_status_http(10), 500);
    assert_eq!(llmproxy_status_http(u32::MAX), 500);
}

#[test]
fn error_body_is_cut_on_a_utf8_boundary_and_reports_the_whole_length() {
    let message = "é".repeat(40);
    let (whole, body) = error_body(503, message.as_bytes(), 1024);
    assert_eq!(whole, body.len());
    // Asking for the length only.
    assert_eq!(
        error_body(503, message.as_bytes(), 0),
        (whole, String::new())
    );
    // Every capacity: a NUL-terminated prefix of the body, cut on a character boundary.
    for cap in 1..=whole + 1 {
        let (n, cut) = error_body(503, message.as_bytes(), cap);
        assert_eq!(n, whole);
        assert!(
            cut.len() < cap && body.starts_with(&cut),
            "cap {cap}: {cut}"
        );
        assert!(
            cut.len() + 1 >= cap.min(whole + 1) - 1,
            "cap {cap}: cut too short"
        );
    }
    assert_eq!(error_body(503, message.as_bytes(), whole + 1).1, body);
    // Invalid UTF-8 in the message becomes U+FFFD; the body stays valid JSON.
    let (_, body) = error_body(400, b"bad \xff byte", 256);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["message"], "bad \u{fffd} byte");
}

#[test]
fn error_body_is_null_safe() {
    unsafe {
        let mut out = [0x7f as c_char; 16];
        assert_eq!(
            llmproxy_error_body(500, ptr::null(), 5, out.as_mut_ptr(), out.len()),
            0
        );
        assert_eq!(CStr::from_ptr(out.as_ptr()).to_bytes(), b"");
        // A NULL message of length 0 is an empty message.
        let n = llmproxy_error_body(500, ptr::null(), 0, ptr::null_mut(), 0);
        assert!(n > 0);
        // A NULL buffer is never written, whatever its capacity claims.
        assert_eq!(
            llmproxy_error_body(500, ptr::null(), 0, ptr::null_mut(), 64),
            n
        );
        // A capacity of 0 leaves the buffer alone.
        assert_eq!(
            llmproxy_error_body(500, b"x".as_ptr().cast(), 1, out.as_mut_ptr(), 0),
            n + 1
        );
        assert_eq!(out[0], 0);
    }
}

/// `native` normally, `miri` under Miri (`make miri`), which interprets every instruction.
fn scaled(native: usize, miri: usize) -> usize {
    if cfg!(miri) {
        miri
    } else {
        native
    }
}

#[test]
fn garbage_bodies_get_clear_statuses() {
    let r = router(CONFIG).unwrap();
    let mut rng = fastrand::Rng::with_seed(42);
    let mut bodies: Vec<Vec<u8>> = (0..scaled(500, 40))
        .map(|_| (0..rng.usize(0..300)).map(|_| rng.u8(..)).collect())
        .collect();
    let good = chat("llama", "a complete and valid request body");
    for cut in 0..good.len() {
        bodies.push(good[..cut].to_vec());
    }
    bodies.push(
        format!(
            "{{\"model\":\"llama\",\"messages\":{}{}}}",
            "[".repeat(scaled(200_000, 2_000)),
            "]".repeat(scaled(200_000, 2_000))
        )
        .into_bytes(),
    );
    bodies.push(vec![b'{'; scaled(1 << 20, 4 << 10)]);
    let mut ten_mb = br#"{"model":"llama","messages":[{"role":"user","content":""#.to_vec();
    ten_mb.resize(scaled(10 << 20, 16 << 10), b'a');
    bodies.push(ten_mb);
    for body in &bodies {
        let (st, req) = pick(&r, &[], body);
        let http = unsafe { llmproxy_request_http_status(req) };
        assert!(
            matches!(
                st,
                LLMPROXY_BAD_REQUEST | LLMPROXY_PAYLOAD_TOO_LARGE | LLMPROXY_OK
            ),
            "{st:?}"
        );
        assert!([400, 413, 200].contains(&http));
        unsafe { llmproxy_request_finish(req, 0) };
    }
    assert_eq!(unsafe { llmproxy_router_in_flight(r.0) }, 0);
}

#[test]
fn eight_threads_times_100k_requests_leave_every_counter_at_zero() {
    let per_thread = scaled(100_000, 5);
    // Under Miri every byte hashed is interpreted: prompts of ~100 characters instead of ~1 KiB
    // take the same paths.
    let context_words = scaled(100, 10);
    let r = std::sync::Arc::new(router(CONFIG).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let r = std::sync::Arc::clone(&r);
            std::thread::spawn(move || {
                let bodies: Vec<Vec<u8>> = (0..16)
                    .map(|i| {
                        chat(
                            if i % 2 == 0 { "llama" } else { "qwen" },
                            &format!(
                                "tenant {} {}",
                                i % 5,
                                "context ".repeat(context_words + i * context_words / 10)
                            ),
                        )
                    })
                    .collect();
                for i in 0..per_thread {
                    let (st, req) = pick(&r, &[], &bodies[(i + t) % bodies.len()]);
                    assert_eq!(st, LLMPROXY_OK);
                    unsafe {
                        if i % 3 != 0 {
                            llmproxy_request_first_token(req);
                        }
                        llmproxy_request_finish(req, if i % 97 == 0 { 500 } else { 200 });
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(unsafe { llmproxy_router_in_flight(r.0) }, 0);
    let m = metrics(&r);
    let routed = format!(
        "llmproxy_picks_total{{outcome=\"routed\"}} {}",
        8 * per_thread
    );
    assert!(m.contains(&routed), "{m}");
    assert!(m.contains("llmproxy_in_flight_requests 0"));
    for line in m.lines().filter(|l| {
        l.starts_with("llmproxy_endpoint_in_flight_requests{")
            || l.starts_with("llmproxy_endpoint_prefill_chars{")
    }) {
        assert!(line.ends_with(" 0"), "{line}");
    }
}

/// Endpoint sets swapped by one thread (as DNS refreshes or a host's cluster update do) while
/// others pick, retry and finish: every request keeps a valid endpoint, and the counters of
/// the endpoints still present, and of the router, return to zero.
#[test]
fn endpoint_swaps_during_picks_leave_every_counter_at_zero() {
    let per_thread = scaled(20_000, 12);
    let r = std::sync::Arc::new(router(CONFIG).unwrap());
    let sets: [&[&str]; 3] = [
        &["127.0.0.1:8001", "127.0.0.1:8002"],
        &["127.0.0.1:8002", "127.0.0.1:8003", "127.0.0.1:8004"],
        &["127.0.0.1:8005"],
    ];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (r, stop) = (std::sync::Arc::clone(&r), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut swaps = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || swaps < 3 {
                let list: Vec<llmproxy_str> = sets[swaps % sets.len()]
                    .iter()
                    .map(|e| llmproxy_str {
                        ptr: e.as_ptr().cast(),
                        len: e.len(),
                    })
                    .collect();
                let st = unsafe {
                    llmproxy_router_set_endpoints(
                        r.0,
                        b"pool".as_ptr().cast(),
                        4,
                        list.as_ptr(),
                        list.len(),
                    )
                };
                assert_eq!(st, LLMPROXY_OK);
                swaps += 1;
                std::thread::yield_now();
            }
            swaps
        })
    };
    let pickers: Vec<_> = (0..3)
        .map(|t| {
            let r = std::sync::Arc::clone(&r);
            std::thread::spawn(move || {
                let all: Vec<&str> = sets.iter().flat_map(|s| s.iter().copied()).collect();
                for i in 0..per_thread {
                    let body = chat("llama", &format!("tenant {} question {i}", (i + t) % 7));
                    let (st, req) = pick(&r, &[], &body);
                    assert_eq!(st, LLMPROXY_OK);
                    unsafe {
                        assert!(all.contains(&text(llmproxy_request_endpoint, req).as_str()));
                        if i % 5 == 0 {
                            llmproxy_request_retry(req);
                        }
                        llmproxy_request_first_token(req);
                        llmproxy_request_finish(req, if i % 11 == 0 { 503 } else { 200 });
                    }
                }
            })
        })
        .collect();
    for p in pickers {
        p.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(swapper.join().unwrap() >= 3);
    assert_eq!(unsafe { llmproxy_router_in_flight(r.0) }, 0);
    let m = metrics(&r);
    let load_lines: Vec<&str> = m
        .lines()
        .filter(|l| {
            l.starts_with("llmproxy_endpoint_in_flight_requests{")
                || l.starts_with("llmproxy_endpoint_prefill_chars{")
        })
        .collect();
    assert!(!load_lines.is_empty(), "{m}");
    for line in load_lines {
        assert!(line.ends_with(" 0"), "{line}");
    }
}

fn shared_state(name: &str, size: u64) -> Result<*mut llmproxy_shared_state, String> {
    let mut out = ptr::null_mut();
    let mut err = [0 as c_char; 256];
    let st = unsafe {
        llmproxy_shared_state_new(
            name.as_ptr().cast(),
            name.len(),
            size,
            &mut out,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    match st {
        LLMPROXY_OK => Ok(out),
        _ => {
            assert!(out.is_null());
            Err(msg)
        }
    }
}

#[test]
fn shared_state_arguments_and_reuse_by_name() {
    let small = shared_state("", 1 << 20).unwrap_err();
    assert!(
        small.starts_with("shared_state.size: size must be within 16 MiB"),
        "{small}"
    );
    let mut out = ptr::null_mut();
    let null_out = unsafe {
        llmproxy_shared_state_new(
            ptr::null(),
            0,
            16 << 20,
            ptr::null_mut(),
            ptr::null_mut(),
            0,
        )
    };
    assert_eq!(null_out, LLMPROXY_INVALID_ARGUMENT);
    let st = unsafe {
        llmproxy_router_new_shared(
            CONFIG.as_ptr().cast(),
            CONFIG.len(),
            ptr::null(),
            &mut out,
            ptr::null_mut(),
            0,
        )
    };
    assert_eq!((st, out.is_null()), (LLMPROXY_INVALID_ARGUMENT, true));
    // NULL-safe accessors.
    unsafe {
        assert!(!llmproxy_shared_state_reused(ptr::null()));
        assert_eq!(llmproxy_shared_state_in_flight(ptr::null()), 0);
        assert_eq!(llmproxy_shared_state_reap(ptr::null()), 0);
        llmproxy_shared_state_free(ptr::null_mut());
    }
    let a = shared_state("ffi-test", 16 << 20).unwrap();
    let b = shared_state("ffi-test", 16 << 20).unwrap();
    let c = shared_state("ffi-test", 17 << 20).unwrap();
    unsafe {
        assert!(!llmproxy_shared_state_reused(a));
        assert!(llmproxy_shared_state_reused(b));
        assert!(!llmproxy_shared_state_reused(c));
        for s in [a, b, c] {
            llmproxy_shared_state_free(s);
        }
    }
}

#[test]
#[cfg_attr(
    miri,
    ignore = "starts the reaper thread over a 16 MiB region: slow under Miri"
)]
fn routers_attached_to_one_region_see_each_other_s_requests() {
    let shared = shared_state("", 16 << 20).unwrap();
    let attach = || {
        let mut out = ptr::null_mut();
        let st = unsafe {
            llmproxy_router_new_shared(
                CONFIG.as_ptr().cast(),
                CONFIG.len(),
                shared,
                &mut out,
                ptr::null_mut(),
                0,
            )
        };
        assert_eq!(st, LLMPROXY_OK);
        Router(out)
    };
    let (a, b) = (attach(), attach());
    let held: Vec<_> = (0..5)
        .map(|i| pick(&a, &[], &chat("llama", &format!("q{i}"))).1)
        .collect();
    assert_eq!(unsafe { llmproxy_shared_state_in_flight(shared) }, 5);
    // b's router counted none of them, but its state part shows all five.
    assert_eq!(unsafe { llmproxy_router_in_flight(b.0) }, 0);
    let state = unsafe {
        let (mut s, mut len) = (ptr::null_mut(), 0usize);
        assert_eq!(
            llmproxy_router_metrics_part(b.0, 2, &mut s, &mut len),
            LLMPROXY_OK
        );
        let text = CStr::from_ptr(s).to_string_lossy().into_owned();
        llmproxy_string_free(s);
        text
    };
    let in_flight: u64 = state
        .lines()
        .filter(|l| l.starts_with("llmproxy_endpoint_in_flight_requests{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(in_flight, 5, "{state}");
    for req in held {
        unsafe { llmproxy_request_finish(req, 200) };
    }
    assert_eq!(unsafe { llmproxy_shared_state_in_flight(shared) }, 0);
    // An unknown part is refused and leaves the output NULL.
    let mut s = ptr::dangling_mut::<c_char>();
    assert_eq!(
        unsafe { llmproxy_router_metrics_part(a.0, 3, &mut s, ptr::null_mut()) },
        LLMPROXY_INVALID_ARGUMENT
    );
    assert!(s.is_null());
    drop((a, b));
    unsafe { llmproxy_shared_state_free(shared) };
}
