//! Request body + headers → pick on a fixed router: a clear status, never a panic, and the
//! accounting always returns to zero.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use llmproxy::Router;

const CONFIG: &str = r#"{
  "max_body_bytes": 65536,
  "model_mapping_rule": {
    "m": {"rules": [
      {"cluster": "a", "backend": "vllm", "headers": [{"key": "x-env", "value": "gray"}]},
      {"cluster": "b", "backend": "sglang", "target_model": "served"}]},
    "t": {"rules": [{"cluster": "b", "backend": "triton", "chat_template": "llama3"}]},
    "l": {"rules": [{"cluster": "b", "backend": "vllm", "subset": [{"lora": "ad"}]}]}
  },
  "clusters": {"a": {"endpoints": ["127.0.0.1:1"]},
               "b": {"endpoints": ["127.0.0.1:2", {"address": "127.0.0.1:3", "lora_adapters": ["ad"]}]}}
}"#;

fn router() -> &'static Router {
    static R: OnceLock<Router> = OnceLock::new();
    R.get_or_init(|| Router::from_json(CONFIG.as_bytes()).unwrap())
}

fuzz_target!(|data: &[u8]| {
    // First byte: which path and headers; the rest: the body.
    let (sel, body) = data.split_first().map_or((0, data), |(s, b)| (*s, b));
    let path: &[u8] = match sel % 4 {
        0 => b"/v1/chat/completions",
        1 => b"/v1/completions",
        2 => b"/v1/embeddings",
        _ => b"",
    };
    let mut headers: Vec<(&[u8], &[u8])> = vec![(b":path", path)];
    if sel & 4 != 0 {
        headers.push((b"X-Env", b"gray"));
    }
    let r = router();
    let mut p = r.pick(&headers, body);
    let status = p.http_status();
    assert!([200, 400, 404, 413, 503].contains(&status), "status {status}");
    if status == 200 {
        assert!(p.endpoint().is_some());
        let _ = p.upstream_body();
        p.response_status(200);
        let _ = p.transcode_response(body, sel & 8 != 0);
        if sel & 16 != 0 {
            let _ = p.retry();
        }
    } else {
        let err: serde_json::Value = serde_json::from_str(&p.error_body().unwrap()).unwrap();
        assert!(err["error"]["message"].is_string());
    }
    p.first_token();
    p.finish(u32::from(sel));
    assert_eq!(r.in_flight(), 0);
});
