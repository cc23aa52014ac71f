//! The C ABI in random orders with random arguments (NULLs, zero lengths, bogus endpoints;
//! `pick` and `pick_start`, which decides at once without remote lookups):
//! never a crash, and once every request is finished nothing is left in flight.
#![no_main]
use std::ptr;

use libfuzzer_sys::fuzz_target;
use llmproxy::ffi::*;

const CONFIG: &str = r#"{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm"}]}},
  "clusters": {"c": {"endpoints": ["127.0.0.1:1", "127.0.0.1:2"]}}, "max_body_bytes": 4096, "prefix_index_capacity": 4096}"#;

fuzz_target!(|data: &[u8]| unsafe {
    let mut router = ptr::null_mut();
    assert_eq!(
        llmproxy_router_new(CONFIG.as_ptr().cast(), CONFIG.len(), &mut router, ptr::null_mut(), 0),
        llmproxy_status::LLMPROXY_OK
    );
    let mut live: Vec<*mut llmproxy_request> = Vec::new();
    let mut ops = data.chunks(8);
    for op in ops.by_ref() {
        let arg = op.get(1).copied().unwrap_or(0) as usize;
        let tail = op.get(2..).unwrap_or(&[]);
        match op[0] % 8 {
            0 | 1 => {
                let body = if op[0] % 2 == 0 {
                    format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{arg}"}}]}}"#).into_bytes()
                } else {
                    tail.to_vec()
                };
                let (b, n) = if arg % 5 == 0 { (ptr::null(), 0) } else { (body.as_ptr(), body.len()) };
                let mut req = ptr::null_mut();
                if arg % 3 == 1 {
                    // No remote lookups in this config: pick_start decides at once.
                    let mut ticket = ptr::null_mut();
                    let st = llmproxy_pick_start(router, ptr::null(), 0, b, n, &mut ticket, &mut req);
                    assert!(st != llmproxy_status::LLMPROXY_PENDING && ticket.is_null());
                } else {
                    llmproxy_pick(router, ptr::null(), 0, b, n, &mut req);
                }
                assert!(!req.is_null());
                live.push(req);
            }
            2 if !live.is_empty() => {
                let req = live[arg % live.len()];
                llmproxy_request_first_token(req);
                // The answer's bytes, as a host hands them over (learning at finish).
                llmproxy_request_observe_response(req, tail.as_ptr(), tail.len(), arg % 4 == 0);
            }
            3 if !live.is_empty() => {
                let req = live.swap_remove(arg % live.len());
                llmproxy_request_finish(req, arg as u32 * 3);
            }
            4 if !live.is_empty() => {
                llmproxy_request_retry(live[arg % live.len()]);
            }
            5 => {
                let text = String::from_utf8_lossy(tail).into_owned();
                let eps = [
                    llmproxy_str { ptr: text.as_ptr().cast(), len: text.len() },
                    llmproxy_str { ptr: "127.0.0.1:3".as_ptr().cast(), len: 11 },
                ];
                let n = arg % 3;
                llmproxy_router_set_endpoints(router, "c".as_ptr().cast(), 1, if n == 0 { ptr::null() } else { eps.as_ptr() }, n);
            }
            6 => {
                let mut s = ptr::null_mut();
                let mut len = 0;
                if llmproxy_router_metrics(router, &mut s, &mut len) == llmproxy_status::LLMPROXY_OK {
                    llmproxy_string_free(s);
                }
            }
            _ => {
                // NULLs and zero lengths everywhere.
                llmproxy_request_first_token(ptr::null_mut());
                llmproxy_request_observe_response(ptr::null_mut(), ptr::null(), 5, true);
                llmproxy_request_finish(ptr::null_mut(), 0);
                let mut o = ptr::null();
                let mut l = 0;
                if let Some(&req) = live.first() {
                    llmproxy_request_transcode_response(req, ptr::null(), 0, arg % 2 == 0, &mut o, &mut l);
                    let _ = llmproxy_request_endpoint(req, ptr::null_mut());
                }
                llmproxy_pick(router, ptr::null(), 3, ptr::null(), 9, ptr::null_mut());
                llmproxy_pick_start(router, ptr::null(), 3, ptr::null(), 9, ptr::null_mut(), ptr::null_mut());
                llmproxy_pick_poll(ptr::null_mut(), ptr::null_mut());
                llmproxy_pick_ticket_free(ptr::null_mut());
            }
        }
    }
    for req in live {
        llmproxy_request_finish(req, 200);
    }
    assert_eq!(llmproxy_router_in_flight(router), 0);
    llmproxy_router_free(router);
});
