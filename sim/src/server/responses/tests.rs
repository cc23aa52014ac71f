//! Tests of the simulated Responses API: stored conversations per server, events, errors.

use super::super::http::app;
use super::*;
use crate::engine::EngineConfig;

/// `n` servers of one fleet on ephemeral 127.0.0.1 ports, their engines and HTTP APIs
/// running on the test's runtime; their base URLs.
async fn fleet(n: usize) -> Vec<String> {
    let mut listeners = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..n {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let cfg = EngineConfig {
            step_base_s: 0.001,
            ..EngineConfig::default()
        };
        let name = format!("127.0.0.1:{port}");
        servers.push(Arc::new(Server::new(name, port, "m".into(), 16, cfg)));
        listeners.push(l);
    }
    let all = Arc::new(servers.clone());
    let mut urls = Vec::new();
    for (l, s) in listeners.into_iter().zip(servers) {
        urls.push(format!("http://127.0.0.1:{}", s.port));
        tokio::spawn(s.clone().run_engine());
        let router = app(s, all.clone());
        tokio::spawn(async move { axum::serve(l, router).await });
    }
    urls
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn send(c: &reqwest::Client, url: &str, body: &Value) -> reqwest::Response {
    let url = format!("{url}/v1/responses");
    c.post(url).json(body).send().await.unwrap()
}

/// POSTs `body` to `{url}/v1/responses`: the status and the JSON answer.
async fn post(c: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = send(c, url, body).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// The streamed events of a request: (event name, data), checking they agree on `type`.
async fn events(c: &reqwest::Client, url: &str, body: &Value) -> Vec<(String, Value)> {
    let r = send(c, url, body).await;
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let text = r.text().await.unwrap();
    let mut out = Vec::new();
    // Each event is `event: <type>\ndata: <json>\n\n`.
    for block in text.split("\n\n").filter(|b| !b.is_empty()) {
        let (name, data) = block.split_once('\n').unwrap();
        let name = name.strip_prefix("event: ").unwrap().to_string();
        let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(data["type"], name.as_str());
        out.push((name, data));
    }
    out
}

fn long_text(tokens: usize) -> String {
    "abcd".repeat(tokens)
}

fn output_text_of(r: &Value) -> &str {
    r["output"][0]["content"][0]["text"].as_str().unwrap()
}

fn not_found_body(id: &str) -> Value {
    json!({"error": {"message": format!("Response with id '{id}' not found."), "type": "invalid_request_error", "param": "previous_response_id", "code": 404}})
}

#[test]
fn input_items_become_chat_messages() {
    let input = json!([
        {"role": "user", "content": "plain"},
        {"type": "message", "role": "developer", "content": [
            {"type": "input_text", "text": "a"},
            {"type": "input_image", "image_url": "data:..."},
            {"type": "text", "text": "b"}
        ]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "c1", "name": "get", "arguments": "{\"x\":1}"},
        {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "42"}]},
        {"type": "function_call_output", "call_id": "c2", "output": "43"},
        {"type": "item_reference", "id": "msg_1"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok", "annotations": []}]}
    ]);
    assert_eq!(
        input_messages(&input).unwrap(),
        vec![
            json!({"role": "user", "content": "plain"}),
            json!({"role": "developer", "content": "a<|media|>b"}),
            json!({"role": "assistant", "content": "get({\"x\":1})"}),
            json!({"role": "tool", "content": "42"}),
            json!({"role": "tool", "content": "43"}),
            json!({"role": "assistant", "content": "ok"}),
        ]
    );
    assert_eq!(
        input_messages(&json!("hi")).unwrap(),
        vec![json!({"role": "user", "content": "hi"})]
    );
    assert!(input_messages(&json!(3)).is_none());
}

#[test]
fn the_store_drops_its_oldest_responses_beyond_capacity() {
    let store = Store::with_capacity(9, 2);
    let turn = |m: &str| {
        Arc::new(Turn {
            prev: None,
            messages: vec![json!(m)],
        })
    };
    let ids: Vec<String> = (0..3).map(|_| store.next_ids().0).collect();
    assert_eq!(ids, ["resp_9_1", "resp_9_2", "resp_9_3"]);
    for (i, id) in ids.iter().enumerate() {
        store.put(id.clone(), turn(&i.to_string()));
    }
    assert!(store.get(&ids[0]).is_none());
    assert_eq!(store.get(&ids[2]).unwrap().conversation(), vec![json!("2")]);
    // A dropped response's conversation survives in the turns that continue it.
    let first = turn("a");
    let second = Arc::new(Turn {
        prev: Some(first),
        messages: vec![json!("b")],
    });
    assert_eq!(second.conversation(), vec![json!("a"), json!("b")]);
    // A very long chain drops without recursing once per turn.
    let mut deep = second;
    for _ in 0..200_000 {
        let (prev, messages) = (Some(deep), Vec::new());
        deep = Arc::new(Turn { prev, messages });
    }
    drop(deep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_response_id_continues_the_conversation_on_the_same_server() {
    let urls = fleet(2).await;
    let c = client();
    let body = json!({"model": "x", "input": long_text(300), "instructions": "be brief", "max_output_tokens": 5});
    let (status, r1) = post(&c, &urls[0], &body).await;
    assert_eq!(status, 200, "{r1}");
    let id = r1["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("resp_"), "{id}");
    assert_eq!(r1["object"], "response");
    assert_eq!(r1["status"], "completed");
    assert_eq!(r1["model"], "x");
    assert_eq!(r1["previous_response_id"], Value::Null);
    assert!(r1["created_at"].as_u64().unwrap() > 0);
    let (item, text) = (&r1["output"][0], output_text_of(&r1));
    assert!(item["id"].as_str().unwrap().starts_with("msg_"));
    assert!(!text.is_empty());
    let message = json!({"type": "message", "id": item["id"], "role": "assistant", "status": "completed", "content": [output_text(text)]});
    assert_eq!(r1["output"], json!([message]));
    let in1 = r1["usage"]["input_tokens"].as_u64().unwrap();
    assert!(in1 > 300, "{r1}");
    let usage = json!({"input_tokens": in1, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": in1 + 5});
    assert_eq!(r1["usage"], usage);

    let next = json!({"input": "and then?", "instructions": "be brief", "previous_response_id": id, "max_output_tokens": 3});
    let (status, r2) = post(&c, &urls[0], &next).await;
    assert_eq!(status, 200, "{r2}");
    assert_eq!(r2["previous_response_id"], id.as_str());
    assert_ne!(r2["id"], r1["id"]);
    let in2 = r2["usage"]["input_tokens"].as_u64().unwrap();
    assert!(in2 > in1 + 5, "{in2} vs {in1}");
    let cached = r2["usage"]["input_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 288, "{cached}");

    // Another server of the fleet does not know it.
    let (status, err) = post(&c, &urls[1], &next).await;
    assert_eq!(status, 404);
    assert_eq!(err, not_found_body(&id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_events_come_in_order_and_the_response_is_stored() {
    let urls = fleet(1).await;
    let c = client();
    let body = json!({"input": long_text(100), "stream": true, "max_output_tokens": 4});
    let evs = events(&c, &urls[0], &body).await;
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    let expected = "created in_progress output_item.added content_part.added \
        output_text.delta output_text.delta output_text.delta output_text.delta \
        output_text.done content_part.done output_item.done completed";
    let expected: Vec<String> = expected
        .split_whitespace()
        .map(|t| format!("response.{t}"))
        .collect();
    assert_eq!(names, expected);
    for (i, (_, d)) in evs.iter().enumerate() {
        assert_eq!(d["sequence_number"], i as u64);
    }
    let created = &evs[0].1["response"];
    let fresh = [&created["status"], &created["output"], &created["usage"]];
    assert_eq!(fresh, [&json!("in_progress"), &json!([]), &Value::Null]);
    let msg_id = evs[2].1["item"]["id"].as_str().unwrap();
    let item = |status, content| json!({"type": "message", "id": msg_id, "role": "assistant", "status": status, "content": content});
    assert_eq!(evs[2].1["item"], item("in_progress", json!([])));
    assert_eq!(evs[3].1["part"], output_text(""));
    let deltas: String = evs[4..8]
        .iter()
        .map(|(_, d)| {
            assert_eq!(d["item_id"], msg_id);
            assert_eq!(d["content_index"], 0);
            d["delta"].as_str().unwrap()
        })
        .collect();
    assert_eq!(evs[8].1["text"], deltas.as_str());
    assert_eq!(evs[9].1["part"]["text"], deltas.as_str());
    let message = item("completed", json!([output_text(&deltas)]));
    assert_eq!(evs[10].1["item"], message);
    let done = &evs[11].1["response"];
    assert_eq!(done["id"], created["id"]);
    assert_eq!(done["status"], "completed");
    assert_eq!(output_text_of(done), deltas);
    assert_eq!(done["usage"]["output_tokens"], 4);
    assert!(done["usage"]["input_tokens"].as_u64().unwrap() > 100);

    // Generation depends on the prompt only: the JSON answer has the same text.
    let body = json!({"input": long_text(100), "max_output_tokens": 4});
    let (_, plain) = post(&c, &urls[0], &body).await;
    assert_eq!(output_text_of(&plain), deltas);

    let id = done["id"].as_str().unwrap();
    let next = json!({"input": "more", "previous_response_id": id, "stream": true, "max_output_tokens": 2});
    let evs = events(&c, &urls[0], &next).await;
    let last = &evs.last().unwrap().1;
    assert_eq!(last["type"], "response.completed");
    assert_eq!(last["response"]["previous_response_id"], id);
    let cached = &last["response"]["usage"]["input_tokens_details"]["cached_tokens"];
    assert!(cached.as_u64().unwrap() >= 96, "{cached}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstored_responses_cannot_be_continued() {
    let urls = fleet(1).await;
    let c = client();
    for stream in [false, true] {
        let body =
            json!({"input": "hello", "store": false, "stream": stream, "max_output_tokens": 2});
        let id = if stream {
            let evs = events(&c, &urls[0], &body).await;
            evs[0].1["response"]["id"].as_str().unwrap().to_string()
        } else {
            let (status, r) = post(&c, &urls[0], &body).await;
            assert_eq!(status, 200);
            assert_eq!(r["store"], false);
            r["id"].as_str().unwrap().to_string()
        };
        let next = json!({"input": "again", "previous_response_id": id});
        let (status, err) = post(&c, &urls[0], &next).await;
        assert_eq!(status, 404);
        assert_eq!(err, not_found_body(&id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instructions_and_tool_items_are_accepted_and_bad_input_is_400() {
    let urls = fleet(1).await;
    let c = client();
    let input = json!([
        {"role": "user", "content": "what is the weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "think"}]},
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
    ]);
    let body = json!({"input": input, "instructions": "You are helpful.", "tools": [{"type": "function", "name": "weather"}], "max_output_tokens": 3});
    let (status, r) = post(&c, &urls[0], &body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["instructions"], "You are helpful.");
    assert_eq!(r["usage"]["output_tokens"], 3);

    for bad in [
        json!({"model": "m"}),
        json!({"input": []}),
        json!({"input": [{"type": "reasoning", "id": "rs_1"}]}),
        json!({"input": 7}),
        json!([1]),
    ] {
        let (status, err) = post(&c, &urls[0], &bad).await;
        assert_eq!(status, 400, "{bad}: {err}");
        assert_eq!(err["error"]["code"], 400);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tools_of_a_responses_request_render_in_its_prompt_chained_or_not() {
    let urls = fleet(1).await;
    let c = client();
    let tool = |name: &str, tokens: usize| json!({"type": "function", "name": name, "description": long_text(tokens), "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}});
    let tools = vec![tool("read_file", 200), tool("edit_file", 200)];
    let tokens_of = |messages: &[Value], tools: Option<&[Value]>| {
        render_chat(messages, tools)
            .len()
            .div_ceil(crate::engine::CHARS_PER_TOKEN) as u64
    };
    let input_tokens = |r: &Value| r["usage"]["input_tokens"].as_u64().unwrap();
    let cached = |r: &Value| {
        r["usage"]["input_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    let system = json!({"role": "system", "content": "Use the tools."});
    let user = json!({"role": "user", "content": long_text(100)});
    // Without tools, then with them: they render in the system turn, after the instructions.
    let body =
        json!({"input": long_text(100), "instructions": "Use the tools.", "max_output_tokens": 3});
    let (_, plain) = post(&c, &urls[0], &body).await;
    assert_eq!(
        input_tokens(&plain),
        tokens_of(&[system.clone(), user.clone()], None)
    );
    let mut body = body;
    body["tools"] = json!(tools);
    let (status, r1) = post(&c, &urls[0], &body).await;
    assert_eq!(status, 200, "{r1}");
    let in1 = input_tokens(&r1);
    assert_eq!(
        in1,
        tokens_of(&[system.clone(), user.clone()], Some(&tools))
    );
    assert!(in1 > input_tokens(&plain) + 400, "{r1}");
    // Without instructions, a system turn of the tools alone.
    let bare = json!({"input": long_text(100), "tools": tools, "max_output_tokens": 3});
    let (_, r) = post(&c, &urls[0], &bare).await;
    assert_eq!(
        input_tokens(&r),
        tokens_of(std::slice::from_ref(&user), Some(&tools))
    );
    // A chained turn renders the new request's tools before the stored conversation: the
    // same tools extend the first prompt and find it cached.
    let id = r1["id"].as_str().unwrap();
    let reply = json!({"role": "assistant", "content": output_text_of(&r1)});
    let next = json!({"role": "user", "content": "and then?"});
    let conversation = [system.clone(), user.clone(), reply, next];
    let chained = json!({"input": "and then?", "instructions": "Use the tools.", "tools": tools, "previous_response_id": id, "max_output_tokens": 2});
    let (status, r2) = post(&c, &urls[0], &chained).await;
    assert_eq!(status, 200, "{r2}");
    assert_eq!(input_tokens(&r2), tokens_of(&conversation, Some(&tools)));
    assert!(cached(&r2) + 16 >= in1, "{r2}");
    // Other tools on a chained turn: those render (the stored turn's are not carried over).
    let mut other = chained.clone();
    other["tools"] = json!([tool("search", 10)]);
    let (_, r3) = post(&c, &urls[0], &other).await;
    let search = [tool("search", 10)];
    assert_eq!(input_tokens(&r3), tokens_of(&conversation, Some(&search)));
    assert!(cached(&r3) < in1 / 2, "{r3}");
}
