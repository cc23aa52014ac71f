//! Session affinity (`session_affinity`): a conversation stays on its endpoint.

use super::*;

/// A router over 4 endpoints of cluster `c` for model `m`, with `extra` top-level config
/// (e.g. a `session_affinity` block).
fn session_router(extra: &str) -> Router {
    Router::from_json(
        format!(
            r#"{{{extra}
            "model_mapping_rule": {{"m": {{"rules": [{{"cluster": "c", "backend": "vllm"}}]}}}},
            "clusters": {{"c": {{"endpoints": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]}}}}}}"#
        )
        .as_bytes(),
    )
    .unwrap()
}

const AFFINITY: &str = r#""session_affinity": {"header": "x-session-id"},"#;

/// A prompt sharing nothing with any other (its first chunk differs).
fn fresh_prompt(i: usize) -> String {
    fresh_prompt_of("", i)
}

/// [`fresh_prompt`] `i` of `session`: the sessions' prompts differ too.
fn fresh_prompt_of(session: &str, i: usize) -> String {
    format!(
        "{session} {i} turn of a rewritten conversation {}",
        "z".repeat(700)
    )
}

/// `llmproxy_session_affinity_total` by result: (kept, moved, new).
fn session_counts(r: &Router) -> (f64, f64, f64) {
    let page = r.metrics_text();
    let n = |result: &str| {
        sample(
            &page,
            &format!("llmproxy_session_affinity_total{{result=\"{result}\"}}"),
        )
    };
    (n("kept"), n("moved"), n("new"))
}

/// Finished picks of `session` (a header) with prompts that share no prefix: their endpoints.
fn session_endpoints(r: &Router, session: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let p = r.pick(
                &[(b"x-session-id", session.as_bytes())],
                &chat("m", &fresh_prompt_of(session, i)),
            );
            let ep = p.endpoint().unwrap().to_string();
            p.finish(200);
            ep
        })
        .collect()
}

#[test]
fn a_session_stays_on_its_endpoint_whatever_its_prompts() {
    let r = session_router(AFFINITY);
    let eps = session_endpoints(&r, "conv-1", 30);
    assert!(eps.iter().all(|e| *e == eps[0]), "{eps:?}");
    assert_eq!(session_counts(&r), (29.0, 0.0, 1.0));
    // without the feature the same prompts spread (nothing else ties them together)
    let off = session_router("");
    let spread: std::collections::HashSet<_> =
        session_endpoints(&off, "conv-1", 30).into_iter().collect();
    assert!(spread.len() > 1, "{spread:?}");
    assert_eq!(session_counts(&off), (0.0, 0.0, 0.0), "off by default");
}

#[test]
fn different_sessions_spread_and_each_keeps_its_own() {
    let r = session_router(AFFINITY);
    let homes: Vec<String> = (0..16)
        .map(|s| session_endpoints(&r, &format!("s{s}"), 1).remove(0))
        .collect();
    let distinct: std::collections::HashSet<_> = homes.iter().collect();
    assert!(distinct.len() >= 2, "{homes:?}");
    for (s, home) in homes.iter().enumerate() {
        let again = session_endpoints(&r, &format!("s{s}"), 3);
        assert!(
            again.iter().all(|e| e == home),
            "s{s}: {home} then {again:?}"
        );
    }
    assert_eq!(session_counts(&r), (48.0, 0.0, 16.0));
}

#[test]
fn an_overloaded_endpoint_lets_its_session_move() {
    // defaults: moved when more than 8 beyond the least loaded and more than 1.5 times it
    let r = session_router(AFFINITY);
    let pick = |i: usize| r.pick(&[(b"x-session-id", b"busy")], &chat("m", &fresh_prompt(i)));
    let held: Vec<_> = (0..9).map(pick).collect();
    let home = held[0].endpoint().unwrap().to_string();
    assert!(
        held.iter().all(|p| p.endpoint() == Some(home.as_str())),
        "up to 9 in flight against 0 elsewhere: kept"
    );
    assert_eq!(session_counts(&r), (8.0, 0.0, 1.0));
    // the 10th finds its endpoint 9 in flight beyond idle ones: moved, and bound there
    let moved = pick(9);
    let away = moved.endpoint().unwrap().to_string();
    assert_ne!(away, home);
    assert_eq!(session_counts(&r), (8.0, 1.0, 1.0));
    let next = pick(10);
    assert_eq!(
        next.endpoint(),
        Some(away.as_str()),
        "the new binding holds"
    );
    assert_eq!(session_counts(&r), (9.0, 1.0, 1.0));
}

#[test]
fn a_session_leaves_an_ejected_endpoint_and_a_failed_attempt() {
    let r = session_router(
        r#""session_affinity": {"header": "x-session-id"},
        "ejection": {"consecutive_failures": 1, "eject_ms": 60000},"#,
    );
    let home = session_endpoints(&r, "s", 1).remove(0);
    let p = r.pick(&[(b"x-session-id", b"s")], &chat("m", &fresh_prompt(1)));
    assert_eq!(p.endpoint(), Some(home.as_str()));
    p.finish(503); // its endpoint fails: ejected
    let after = session_endpoints(&r, "s", 5);
    assert!(
        after.iter().all(|e| *e != home && *e == after[0]),
        "{after:?}"
    );
    assert_eq!(session_counts(&r), (5.0, 1.0, 1.0));
    // a retry (connect failure) moves the session with it
    let mut p = r.pick(&[(b"x-session-id", b"s")], &chat("m", &fresh_prompt(2)));
    assert_eq!(p.endpoint(), Some(after[0].as_str()));
    p.retry().unwrap();
    let retried = p.endpoint().unwrap().to_string();
    assert!(retried != after[0] && retried != home);
    p.finish(200);
    assert_eq!(session_endpoints(&r, "s", 1), vec![retried]);
}

/// A chat body with the OpenAI `user` field.
fn chat_of_user(user: &str, text: &str) -> Vec<u8> {
    serde_json::json!({"model": "m", "user": user, "messages": [{"role": "user", "content": text}]})
        .to_string()
        .into_bytes()
}

#[test]
fn the_user_field_names_the_session_when_there_is_no_header() {
    let r =
        session_router(r#""session_affinity": {"header": "x-session-id", "user_field": true},"#);
    let by_user = |user: &str, headers: &[HeaderRef], i: usize| {
        let p = r.pick(headers, &chat_of_user(user, &fresh_prompt(i)));
        let ep = p.endpoint().unwrap().to_string();
        p.finish(200);
        ep
    };
    let alice: Vec<String> = (0..20).map(|i| by_user("alice", &[], i)).collect();
    assert!(alice.iter().all(|e| *e == alice[0]), "{alice:?}");
    // the header wins over the field: a header session bound elsewhere than alice's
    let (session, home) = (0..64)
        .map(|s| format!("h{s}"))
        .find_map(|s| {
            let ep = session_endpoints(&r, &s, 1).remove(0);
            (ep != alice[0]).then_some((s, ep))
        })
        .unwrap();
    for i in 0..10 {
        assert_eq!(
            by_user("alice", &[(b"x-session-id", session.as_bytes())], i),
            home
        );
    }
    // an empty header is no session: the field decides
    assert_eq!(by_user("alice", &[(b"x-session-id", b"")], 0), alice[0]);
    // without user_field the field names nothing
    let r = session_router(AFFINITY);
    let seen: std::collections::HashSet<_> = (0..30)
        .map(|i| {
            let p = r.pick(&[], &chat_of_user("alice", &fresh_prompt(i)));
            let ep = p.endpoint().unwrap().to_string();
            p.finish(200);
            ep
        })
        .collect();
    assert!(seen.len() > 1, "{seen:?}");
    assert_eq!(session_counts(&r), (0.0, 0.0, 0.0));
}

#[test]
fn sessions_apply_to_every_algorithm() {
    for algorithm in ["round_robin", "random", "least_request", "inference_lb"] {
        let r = session_router(&format!(r#""algorithm": "{algorithm}", {AFFINITY}"#));
        let eps = session_endpoints(&r, "conv", 12);
        assert!(eps.iter().all(|e| *e == eps[0]), "{algorithm}: {eps:?}");
    }
}

/// A chat body with the OpenAI `prompt_cache_key` field, and `user` when given.
fn chat_of_cache_key(key: &str, user: Option<&str>, text: &str) -> Vec<u8> {
    let mut body = serde_json::json!({"model": "m", "prompt_cache_key": key,
        "messages": [{"role": "user", "content": text}]});
    if let Some(user) = user {
        body["user"] = user.into();
    }
    body.to_string().into_bytes()
}

#[test]
fn prompt_cache_key_names_the_session_after_the_header_and_before_user() {
    let r = session_router(r#""session_affinity": {"user_field": true},"#);
    let pick = |headers: &[HeaderRef], body: Vec<u8>| {
        let p = r.pick(headers, &body);
        let ep = p.endpoint().unwrap().to_string();
        p.finish(200);
        ep
    };
    // OpenAI's routing hint for requests that share a prefix: on by default with sessions
    let thread: Vec<String> = (0..20)
        .map(|i| pick(&[], chat_of_cache_key("thread-7", None, &fresh_prompt(i))))
        .collect();
    assert!(thread.iter().all(|e| *e == thread[0]), "{thread:?}");
    // it wins over `user`: a user bound elsewhere does not move the thread
    let (user, user_home) = (0..64)
        .map(|u| format!("u{u}"))
        .find_map(|u| {
            let ep = pick(&[], chat_of_user(&u, &fresh_prompt_of(&u, 0)));
            (ep != thread[0]).then_some((u, ep))
        })
        .unwrap();
    for i in 0..10 {
        let body = chat_of_cache_key("thread-7", Some(&user), &fresh_prompt_of("x", i));
        assert_eq!(pick(&[], body), thread[0]);
    }
    // an empty key names nothing: `user` decides
    assert_eq!(
        pick(
            &[],
            chat_of_cache_key("", Some(&user), &fresh_prompt_of("y", 0))
        ),
        user_home
    );
    // the header wins over both
    let (session, home) = (0..64)
        .map(|s| format!("h{s}"))
        .find_map(|s| {
            let ep = session_endpoints(&r, &s, 1).remove(0);
            (ep != thread[0]).then_some((s, ep))
        })
        .unwrap();
    let body = chat_of_cache_key("thread-7", None, &fresh_prompt_of("z", 0));
    assert_eq!(pick(&[(b"x-session-id", session.as_bytes())], body), home);
    // cache_key_field false: the key names nothing
    let r = session_router(r#""session_affinity": {"cache_key_field": false},"#);
    let seen: std::collections::HashSet<_> = (0..30)
        .map(|i| {
            let p = r.pick(&[], &chat_of_cache_key("thread-7", None, &fresh_prompt(i)));
            let ep = p.endpoint().unwrap().to_string();
            p.finish(200);
            ep
        })
        .collect();
    assert!(seen.len() > 1, "{seen:?}");
}
