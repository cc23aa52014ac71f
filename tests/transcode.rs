//! Upstream rewrites, subsets and response transcoding, driven through the C ABI.

use std::collections::HashMap;
use std::ffi::c_char;
use std::ptr;

use llmproxy::ffi::llmproxy_status::*;
use llmproxy::ffi::*;

const CONFIG: &str = r#"{
  "model_mapping_rule": {
    "alias": {"rules": [{"cluster": "pool", "backend": "vllm", "target_model": "Qwen/Qwen3-8B"}]},
    "plain": {"rules": [{"cluster": "pool", "backend": "vllm"}]},
    "sql": {"rules": [{"cluster": "pool", "backend": "vllm", "subset": [{"name": "sql", "lora": "sql-lora"}]}]},
    "split": {"rules": [{"cluster": "pool", "backend": "vllm", "subset": [
        {"name": "h100", "labels": {"gpu": "h100"}, "weight": 3},
        {"name": "a10", "labels": {"gpu": "a10"}, "weight": 1}]}]},
    "trt": {"rules": [{"cluster": "triton", "backend": "triton", "target_model": "ensemble", "chat_template": "chatml"}]}
  },
  "clusters": {
    "pool": {"endpoints": [
      {"address": "127.0.0.1:9001", "labels": {"gpu": "h100"}, "lora_adapters": ["sql-lora"]},
      {"address": "127.0.0.1:9002", "labels": {"gpu": "h100"}},
      {"address": "127.0.0.1:9003", "labels": {"gpu": "a10"}, "lora_adapters": ["sql-lora", "chat-lora"]},
      {"address": "127.0.0.1:9004", "labels": {"gpu": "a10"}}
    ]},
    "triton": {"endpoints": ["127.0.0.1:9100"]}
  }
}"#;

struct Router(*mut llmproxy_router);
impl Drop for Router {
    fn drop(&mut self) {
        unsafe { llmproxy_router_free(self.0) }
    }
}

fn router() -> Router {
    router_with(CONFIG)
}

fn router_with(config: &str) -> Router {
    let mut out = ptr::null_mut();
    let mut err = [0 as c_char; 256];
    let st = unsafe {
        llmproxy_router_new(
            config.as_ptr().cast(),
            config.len(),
            &mut out,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    assert_eq!(st, LLMPROXY_OK);
    Router(out)
}

fn pick(r: &Router, path: &str, body: &str) -> *mut llmproxy_request {
    let h = [llmproxy_header {
        name: ":path".as_ptr().cast(),
        name_len: 5,
        value: path.as_ptr().cast(),
        value_len: path.len(),
    }];
    let mut req = ptr::null_mut();
    let st = unsafe { llmproxy_pick(r.0, h.as_ptr(), 1, body.as_ptr(), body.len(), &mut req) };
    assert_eq!(st, LLMPROXY_OK, "{body}");
    req
}

unsafe fn s(
    f: unsafe extern "C" fn(*const llmproxy_request, *mut usize) -> *const c_char,
    req: *const llmproxy_request,
) -> String {
    let mut len = 0;
    let p = f(req, &mut len);
    String::from_utf8(std::slice::from_raw_parts(p.cast::<u8>(), len).to_vec()).unwrap()
}

unsafe fn upstream_body(req: *const llmproxy_request) -> Option<serde_json::Value> {
    let mut len = 0;
    let p = llmproxy_request_upstream_body(req, &mut len);
    (!p.is_null()).then(|| serde_json::from_slice(std::slice::from_raw_parts(p, len)).unwrap())
}

unsafe fn transcode(req: *mut llmproxy_request, chunk: &[u8], eos: bool) -> Vec<u8> {
    let mut out = ptr::null();
    let mut len = 0;
    assert_eq!(
        llmproxy_request_transcode_response(
            req,
            chunk.as_ptr(),
            chunk.len(),
            eos,
            &mut out,
            &mut len
        ),
        LLMPROXY_OK
    );
    if len == 0 {
        Vec::new()
    } else {
        std::slice::from_raw_parts(out, len).to_vec()
    }
}

#[test]
fn target_model_rewrites_only_the_model() {
    let r = router();
    unsafe {
        let req = pick(
            &r,
            "/v1/chat/completions",
            r#"{"model":"alias","temperature":0.1,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert_eq!(s(llmproxy_request_model, req), "alias");
        assert_eq!(s(llmproxy_request_upstream_model, req), "Qwen/Qwen3-8B");
        assert_eq!(s(llmproxy_request_upstream_path, req), "");
        let body = upstream_body(req).unwrap();
        assert_eq!(body["model"], "Qwen/Qwen3-8B");
        assert_eq!(body["temperature"], 0.1);
        assert_eq!(body["messages"][0]["content"], "hi");
        assert!(!llmproxy_request_needs_transcoding(req));
        llmproxy_request_finish(req, 200);

        let req = pick(
            &r,
            "/v1/chat/completions",
            r#"{"model":"plain","messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert!(upstream_body(req).is_none(), "unchanged body is not copied");
        // Passthrough hands back the caller's own bytes.
        let chunk = b"data: {}\n\n";
        let mut out = ptr::null();
        let mut len = 0;
        llmproxy_request_transcode_response(
            req,
            chunk.as_ptr(),
            chunk.len(),
            false,
            &mut out,
            &mut len,
        );
        assert_eq!((out, len), (chunk.as_ptr(), chunk.len()));
        llmproxy_request_finish(req, 200);
    }
}

#[test]
fn lora_subset_picks_only_adapter_servers_and_rewrites_model() {
    let r = router();
    let mut seen = HashMap::new();
    for i in 0..200 {
        unsafe {
            let req = pick(
                &r,
                "/v1/chat/completions",
                &format!(r#"{{"model":"sql","messages":[{{"role":"user","content":"q{i}"}}]}}"#),
            );
            *seen.entry(s(llmproxy_request_endpoint, req)).or_insert(0) += 1;
            assert_eq!(upstream_body(req).unwrap()["model"], "sql-lora");
            llmproxy_request_finish(req, 200);
        }
    }
    let mut eps: Vec<_> = seen.keys().cloned().collect();
    eps.sort();
    assert_eq!(eps, ["127.0.0.1:9001", "127.0.0.1:9003"]);
}

#[test]
fn weighted_label_subsets_split_traffic() {
    let r = router();
    let mut h100 = 0;
    for i in 0..2000 {
        unsafe {
            let req = pick(
                &r,
                "/v1/chat/completions",
                &format!(r#"{{"model":"split","messages":[{{"role":"user","content":"q{i}"}}]}}"#),
            );
            let ep = s(llmproxy_request_endpoint, req);
            if ep == "127.0.0.1:9001" || ep == "127.0.0.1:9002" {
                h100 += 1;
            }
            llmproxy_request_finish(req, 200);
        }
    }
    assert!(
        (1350..1650).contains(&h100),
        "3:1 split expected, got {h100}/2000 on h100"
    );
}

#[test]
fn triton_stream_round_trip_through_the_abi() {
    let r = router();
    unsafe {
        let req = pick(
            &r,
            "/v1/chat/completions",
            r#"{"model":"trt","stream":true,"max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#,
        );
        assert_eq!(
            s(llmproxy_request_upstream_path, req),
            "/v2/models/ensemble/generate_stream"
        );
        let body = upstream_body(req).unwrap();
        assert_eq!(
            body["text_input"],
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(body["max_tokens"], 8);
        assert!(llmproxy_request_needs_transcoding(req));
        assert_eq!(llmproxy_request_response_status(req, 200), 200);
        assert_eq!(
            s(llmproxy_request_response_content_type, req),
            "text/event-stream"
        );
        assert!(llmproxy_router_in_flight(r.0) == 1);

        let mut client = Vec::new();
        client.extend(transcode(req, b"data: {\"text_output\":\"He", false));
        // Prefill is released at the first content, inside transcode_response.
        client.extend(transcode(req, b"llo\"}\n\nda", false));
        let mut m = ptr::null_mut();
        llmproxy_router_metrics(r.0, &mut m, ptr::null_mut());
        let text = std::ffi::CStr::from_ptr(m).to_str().unwrap().to_owned();
        llmproxy_string_free(m);
        assert!(
            text.contains(
                "llmproxy_endpoint_prefill_chars{cluster=\"triton\",endpoint=\"127.0.0.1:9100\"} 0"
            ),
            "{text}"
        );
        client.extend(transcode(
            req,
            b"ta: {\"text_output\":\" world\"}\n\n",
            false,
        ));
        client.extend(transcode(req, b"", true));
        let out = String::from_utf8(client).unwrap();
        let content: String = out
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|e| *e != "[DONE]")
            .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(content, "Hello world");
        assert!(out.ends_with("data: [DONE]\n\n"));
        llmproxy_request_finish(req, 200);
        assert_eq!(llmproxy_router_in_flight(r.0), 0);
    }
}

#[test]
fn a_transcoded_answer_is_learned_from_its_openai_output() {
    // 16-byte chunks: the next turn "<|user|>\nHi\n<|assistant|>\nHello world, how are you\n"
    // (51 bytes) has 3 full chunks, none of them inside the first prompt (12 bytes).
    let r = router_with(&CONFIG.replacen('{', r#"{"hash_chunk_bytes": 16,"#, 1));
    unsafe {
        let req = pick(
            &r,
            "/v1/chat/completions",
            r#"{"model":"trt","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#,
        );
        llmproxy_request_response_status(req, 200);
        let upstream: &[&[u8]] = &[
            b"data: {\"text_output\":\"Hello wor\"}\n\n",
            b"data: {\"text_output\":\"ld, how are you\"}\n\n",
        ];
        for chunk in upstream {
            // Hosts may hand the raw bytes to observe_response too: ignored when transcoding.
            llmproxy_request_observe_response(req, chunk.as_ptr(), chunk.len(), false);
            transcode(req, chunk, false);
        }
        llmproxy_request_observe_response(req, ptr::null(), 0, true);
        transcode(req, b"", true);
        llmproxy_request_finish(req, 200);
        let mut m = ptr::null_mut();
        llmproxy_router_metrics(r.0, &mut m, ptr::null_mut());
        let text = std::ffi::CStr::from_ptr(m).to_str().unwrap().to_owned();
        llmproxy_string_free(m);
        assert!(
            text.contains("llmproxy_learned_response_chunks_total 3\n"),
            "{text}"
        );
    }
}

#[test]
fn triton_error_status_becomes_openai_error() {
    let r = router();
    unsafe {
        let req = pick(&r, "/v1/completions", r#"{"model":"trt","prompt":"x"}"#);
        assert_eq!(
            s(llmproxy_request_upstream_path, req),
            "/v2/models/ensemble/generate"
        );
        assert_eq!(llmproxy_request_response_status(req, 400), 400);
        let out = transcode(req, br#"{"error":"input too long"}"#, true);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["message"], "input too long");
        llmproxy_request_finish(req, 400);
        // NULL and bad arguments.
        let mut o = ptr::null();
        let mut l = 0;
        assert_eq!(
            llmproxy_request_transcode_response(
                ptr::null_mut(),
                ptr::null(),
                0,
                true,
                &mut o,
                &mut l
            ),
            LLMPROXY_INVALID_ARGUMENT
        );
        assert!(llmproxy_request_upstream_body(ptr::null(), &mut l).is_null() && l == 0);
    }
}
