//! Config JSON → router: never a panic; an accepted config gives a router that picks.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(router) = llmproxy::Router::from_json(data) {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let p = router.pick(&[], body);
        assert!([200, 400, 404, 413, 503].contains(&p.http_status()));
        p.finish(200);
        assert_eq!(router.in_flight(), 0);
        let _ = router.metrics_text();
    }
});
