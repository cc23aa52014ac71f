//! Wire tests: the real server binary on an ephemeral 127.0.0.1 port, driven over HTTP.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Server {
    child: Child,
    base: String,
    port: u16,
    agent: ureq::Agent,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    fn start(args: &[&str], envs: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmproxy-metadata-center"));
        cmd.arg("run").args(["--host", "127.0.0.1"]);
        if !args.contains(&"--port") {
            cmd.args(["--port", "0"]);
        }
        cmd.args(args);
        for var in [
            "METADATA_CENTER_AUTH_TOKEN",
            "META_DATA_CENTER_SVC_DISC_HOST",
            "POD_IP",
            "METADATA_CENTER_CACHE_TOPK",
            "METADATA_CENTER_MAX_MEMORY_MB",
            "METADATA_CENTER_HEADER_TIMEOUT",
            "METADATA_CENTER_BODY_TIMEOUT",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn server");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        // Drain the log so the server never blocks on a full pipe; keep it for assertions and
        // print warnings and errors.
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("ERROR") || line.contains("WARN") || line.starts_with("llmproxy") {
                    eprintln!("[server] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not report its address");
            }
        };
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        let port = addr.rsplit(':').next().unwrap().parse().unwrap();
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .build()
            .into();
        Server {
            child,
            base: format!("http://{addr}"),
            port,
            agent,
            log,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// (status, headers of interest, body as JSON or text)
    fn call(&self, method: &str, path: &str, body: Option<&str>, headers: &[(&str, &str)]) -> Resp {
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = match body {
            Some(b) => self.agent.run(req.body(b.to_string()).unwrap()),
            None => self.agent.run(req.body(()).unwrap()),
        };
        let mut resp = r.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let header = |k: &str| {
            resp.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (trace, ctype) = (header("x-trace-id"), header("content-type"));
        let connection = header("connection");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            trace,
            ctype,
            connection,
            text,
            json,
        }
    }

    fn post(&self, path: &str, body: Value) -> Resp {
        self.call("POST", path, Some(&body.to_string()), &[])
    }

    fn delete(&self, path: &str, body: Value) -> Resp {
        self.call("DELETE", path, Some(&body.to_string()), &[])
    }

    fn engines(&self, cluster: &str) -> Value {
        let r = self.call(
            "GET",
            &format!("/v1/load/stats?cluster={cluster}"),
            None,
            &[],
        );
        assert_eq!(r.status, 200, "{}", r.text);
        r.json["data"].clone()
    }

    /// (queued, prompt) of one engine, None when absent.
    fn engine(&self, cluster: &str, ip: &str) -> Option<(i64, i64)> {
        let data = self.engines(cluster);
        data.as_array()?.iter().find(|e| e["ip"] == ip).map(|e| {
            (
                e["queued_req_num"].as_i64().unwrap(),
                e["prompt_length"].as_i64().unwrap(),
            )
        })
    }

    fn metrics(&self) -> String {
        self.call("GET", "/metrics", None, &[]).text
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Resp {
    status: u16,
    trace: Option<String>,
    ctype: Option<String>,
    /// The `connection` header (`close` when the server will not read this connection again).
    connection: Option<String>,
    text: String,
    json: Value,
}

fn add(cluster: &str, id: &str, ip: &str, prompt: i64) -> Value {
    json!({"cluster": cluster, "request_id": id, "prompt_length": prompt, "ip": ip, "timestamp": 1})
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metric(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn envelope_errors_and_trace_ids() {
    let s = Server::start(&[], &[]);
    // The origin's pinned test.
    let r = s.call("DELETE", "/v1/load/prompt", Some("invalid-json"), &[]);
    assert_eq!(r.status, 400);
    assert_eq!(r.ctype.as_deref(), Some("application/json; charset=utf-8"));
    let trace = r.trace.clone().unwrap();
    assert!(uuid_like(&trace), "generated trace id {trace}");
    assert_eq!(
        r.json,
        json!({"status":"ERROR","error":{"code":40001400,"message":"Invalid input parameters: invalid JSON format",
               "reason":"invalid character 'i' looking for beginning of value"},"data":null,"trace_id":trace})
    );
    // TraceId header echoed in X-Trace-ID and the body.
    let r = s.call(
        "GET",
        "/v1/load/stats?cluster=none",
        None,
        &[("TraceId", "trace-42")],
    );
    assert_eq!(r.trace.as_deref(), Some("trace-42"));
    assert_eq!(
        r.json,
        json!({"status":"OK","error":null,"data":null,"trace_id":"trace-42"})
    );
    // Validation and type errors.
    let r = s.call("GET", "/v1/load/stats", None, &[]);
    assert_eq!(r.status, 400);
    assert_eq!(r.json["error"]["message"], "Invalid input parameters");
    let r = s.post(
        "/v1/load/stats",
        json!({"cluster":"m","request_id":"r","ip":"10.0.0.1","prompt_length":"9"}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json["error"]["message"],
        "Invalid input parameters: field InferenceRequest.prompt_length should be int32, not string"
    );
    for bad in [
        json!({"request_id":"r","ip":"10.0.0.1"}),
        json!({"cluster":"m","ip":"10.0.0.1"}),
        json!({"cluster":"m","request_id":"r"}),
        json!({"cluster":"m","request_id":"r","ip":"not-an-ip"}),
        json!({"cluster":"m","request_id":"r","ip":"10.0.0.1","prompt_length":-1}),
    ] {
        let r = s.post("/v1/load/stats", bad.clone());
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json["error"]["code"], 40001400);
        assert_eq!(r.json["status"], "ERROR");
    }
    let r = s.call("POST", "/v1/load/stats", Some(""), &[]);
    assert_eq!(
        (r.status, r.json["error"]["reason"].as_str()),
        (400, Some("EOF"))
    );
    // Unknown route: gin-style 404.
    assert_eq!(s.call("GET", "/nope", None, &[]).status, 404);
    // Metrics count the real status codes (the origin always recorded 200).
    let m = s.metrics();
    assert_eq!(
        metric(
            &m,
            r#"http_request_status_code_total{method="DELETE",status_code="400",url="/v1/load/prompt"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"http_request_status_code_total{method="POST",status_code="400",url="/v1/load/stats"}"#
        ),
        Some(7.0)
    );
    assert_eq!(metric(&m, "metacenter_node_alive"), Some(1.0));
    assert!(m.contains("app_version_info{version="));
    assert!(m.contains("process_resident_memory_bytes"));
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4
}

#[test]
fn load_lifecycle_and_identities() {
    let s = Server::start(&[], &[]);
    // JSON bodies are read whatever the Content-Type (a raw request without one is below).
    assert_eq!(
        s.post("/v1/load/stats", add("m", "r1", "10.0.0.1", 100))
            .json["data"],
        Value::Null
    );
    s.post("/v1/load/stats", add("m", "r2", "10.0.0.1", 50));
    s.post("/v1/load/stats", add("m", "r3", "10.0.0.1:8001", 7));
    s.post("/v1/load/stats", add("m", "r4", "[fd00::0001]:8001", 9));
    // Duplicate add is ignored (even towards another engine); unknown fields are ignored.
    let mut dup = add("m", "r1", "10.0.0.9", 1000);
    dup["extra"] = json!({"x": [1, 2]});
    assert_eq!(s.post("/v1/load/stats", dup).status, 200);
    assert_eq!(s.engine("m", "10.0.0.1"), Some((2, 150)));
    assert_eq!(s.engine("m", "10.0.0.1:8001"), Some((1, 7)));
    assert_eq!(s.engine("m", "[fd00::1]:8001"), Some((1, 9)));
    assert_eq!(s.engine("m", "10.0.0.9"), None);
    let data = s.engines("m");
    let t = data[0]["updated_time"].as_i64().unwrap();
    assert!(t > 1_600_000_000_000_000_000, "unix ns: {t}");
    // Prompt release is exactly once, by either path; aigw's delete body shape.
    let del = |id: &str| json!({"request_id": id, "cluster": "", "ip": ""});
    s.delete("/v1/load/prompt", del("r1"));
    s.delete("/v1/load/prompt", del("r1"));
    assert_eq!(s.engine("m", "10.0.0.1"), Some((2, 50)));
    s.delete("/v1/load/stats", del("r1"));
    assert_eq!(s.engine("m", "10.0.0.1"), Some((1, 50)));
    s.delete("/v1/load/stats", del("r2"));
    s.delete("/v1/load/prompt", del("r2"));
    assert_eq!(s.engine("m", "10.0.0.1"), Some((0, 0)));
    assert_eq!(s.engines("other"), Value::Null);
    // A raw request with a JSON body and no Content-Type at all (like the aigw client).
    raw_no_content_type(&s, "DELETE", "/v1/load/stats", &del("r3").to_string());
    assert_eq!(s.engine("m", "10.0.0.1:8001"), Some((0, 0)));
}

fn raw_no_content_type(s: &Server, method: &str, path: &str, body: &str) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(c, "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains(r#""status":"OK""#), "{out}");
}

#[test]
fn delete_before_add_is_retried_after_one_second() {
    let s = Server::start(&[], &[]);
    s.delete("/v1/load/stats", json!({"request_id": "late"}));
    s.delete("/v1/load/prompt", json!({"request_id": "late-prompt"}));
    s.post("/v1/load/stats", add("m", "late", "10.0.0.1", 10));
    s.post("/v1/load/stats", add("m", "late-prompt", "10.0.0.2", 20));
    assert_eq!(s.engine("m", "10.0.0.1"), Some((1, 10)));
    assert_eq!(s.engine("m", "10.0.0.2"), Some((1, 20)));
    wait_until("delayed retries", Duration::from_secs(3), || {
        s.engine("m", "10.0.0.1") == Some((0, 0)) && s.engine("m", "10.0.0.2") == Some((1, 0))
    });
    let m = s.metrics();
    assert_eq!(
        metric(&m, r#"metadata_center_delete_retries_total{result="hit"}"#),
        Some(2.0),
        "{m}"
    );
}

#[test]
fn cache_save_and_query() {
    let s = Server::start(&[], &[("METADATA_CENTER_CACHE_TOPK", "2")]);
    let r = s.post(
        "/v1/cache/query",
        json!({"cluster": "m", "prompt_hash": [1, 2, 3]}),
    );
    assert_eq!(
        r.json["data"],
        json!({"locations": []}),
        "unknown cluster: empty array, not null"
    );
    for (ip, path) in [
        ("10.0.0.1", json!([1, 2, 3, 4])),
        ("10.0.0.2", json!([1, 2, 3])),
        ("10.0.0.3:8000", json!([1, 2])),
        ("fd00::4", json!([1])),
    ] {
        let r = s.post(
            "/v1/cache/save",
            json!({"cluster": "m", "prompt_hash": path, "ip": ip}),
        );
        assert_eq!(
            (r.status, r.json["status"].as_str()),
            (200, Some("OK")),
            "{}",
            r.text
        );
    }
    let q = |body: Value| -> Vec<(String, i64)> {
        let r = s.post("/v1/cache/query", body);
        assert_eq!(r.status, 200, "{}", r.text);
        r.json["data"]["locations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["ip"].as_str().unwrap().to_string(),
                    l["length"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    let big = u64::MAX;
    // Server default top-K (2 via env).
    assert_eq!(
        q(json!({"cluster":"m","prompt_hash":[1,2,3,4,5]})),
        vec![("10.0.0.1".into(), 4), ("10.0.0.2".into(), 3)]
    );
    // top_k, and the aigw client's misspelled topk.
    assert_eq!(
        q(json!({"cluster":"m","prompt_hash":[1,2,3,4],"top_k":4})).len(),
        4
    );
    // Equal depths: the most recently saved location first.
    let all = q(json!({"cluster":"m","prompt_hash":[1,2,9],"topk":10}));
    assert_eq!(
        all,
        vec![
            ("10.0.0.3:8000".into(), 2),
            ("10.0.0.2".into(), 2),
            ("10.0.0.1".into(), 2),
            ("fd00::4".into(), 1)
        ]
    );
    assert_eq!(q(json!({"cluster":"m","prompt_hash":[]})), vec![]);
    assert_eq!(q(json!({"cluster":"m","prompt_hash":[big]})), vec![]);
    // prompt_hash is required; ip is validated on save.
    assert_eq!(
        s.post("/v1/cache/query", json!({"cluster":"m"})).status,
        400
    );
    assert_eq!(
        s.post(
            "/v1/cache/save",
            json!({"cluster":"m","prompt_hash":[1],"ip":"host"})
        )
        .status,
        400
    );
    let r = s.post(
        "/v1/cache/query",
        json!({"cluster":"m","prompt_hash":[1,"x"]}),
    );
    assert_eq!(
        r.json["error"]["message"],
        "Invalid input parameters: field QueryParam.prompt_hash should be uint64, not string"
    );
}

#[test]
fn a_query_with_max_age_ms_counts_each_locations_younger_claims_only() {
    let s = Server::start(&[], &[]);
    let save = |ip: &str, path: Value| {
        let r = s.post(
            "/v1/cache/save",
            json!({"cluster": "m", "prompt_hash": path, "ip": ip}),
        );
        assert_eq!(r.status, 200, "{}", r.text);
    };
    let q = |body: Value| -> Value {
        let r = s.post("/v1/cache/query", body);
        assert_eq!(r.status, 200, "{}", r.text);
        r.json["data"]["locations"].clone()
    };
    save("10.0.0.1", json!([1, 2, 3]));
    std::thread::sleep(Duration::from_millis(600));
    save("10.0.0.2", json!([1, 2]));
    // the TTL (30 min) alone: both claims
    assert_eq!(
        q(json!({"cluster": "m", "prompt_hash": [1, 2, 3]})),
        json!([{"ip": "10.0.0.1", "length": 3}, {"ip": "10.0.0.2", "length": 2}])
    );
    // 10.0.0.1's claims younger than 300 ms only: its save is 600 ms old; 10.0.0.2's limit
    // (and a location's that saved nothing) change nothing
    let ages = json!({"10.0.0.1": 300, "10.0.0.2": 300, "10.0.0.9:80": 1});
    assert_eq!(
        q(json!({"cluster": "m", "prompt_hash": [1, 2, 3], "max_age_ms": ages})),
        json!([{"ip": "10.0.0.2", "length": 2}])
    );
    // generous limits change nothing
    let ages = json!({"10.0.0.1": 60_000});
    assert_eq!(
        q(json!({"cluster": "m", "prompt_hash": [1, 2, 3], "max_age_ms": ages}))
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    // bad limits name the field
    for (ages, part, says) in [
        (
            json!(200),
            "message",
            "Invalid input parameters: field QueryParam.max_age_ms should be map[string]uint64, not number 200",
        ),
        (
            json!({"10.0.0.1": "soon"}),
            "message",
            "Invalid input parameters: field QueryParam.max_age_ms.10.0.0.1 should be uint64, not string",
        ),
        (
            json!({"a host": 5}),
            "reason",
            "Key: 'QueryParam.MaxAgeMs' Error:Field validation for 'MaxAgeMs' failed on the 'ip' tag",
        ),
    ] {
        let body = json!({"cluster": "m", "prompt_hash": [1], "max_age_ms": ages});
        let r = s.post("/v1/cache/query", body);
        assert_eq!(r.status, 400, "{}", r.text);
        assert_eq!(r.json["error"][part], says, "{}", r.text);
    }
}

#[test]
fn ttls_expire_load_and_cache() {
    let s = Server::start(
        &[],
        &[
            ("METADATA_CENTER_LOAD_REQ_EXPIRE", "1s"),
            ("METADATA_CENTER_LOAD_GC_INTERVAL", "200ms"),
            ("METADATA_CENTER_CACHE_EXPIRE", "1s"),
            ("METADATA_CENTER_CACHE_GC_INTERVAL", "200ms"),
        ],
    );
    s.post("/v1/load/stats", add("m", "r1", "10.0.0.1", 10));
    s.post(
        "/v1/cache/save",
        json!({"cluster":"m","prompt_hash":[1,2],"ip":"10.0.0.1"}),
    );
    assert_eq!(s.engine("m", "10.0.0.1"), Some((1, 10)));
    wait_until("request expiry", Duration::from_secs(4), || {
        s.engine("m", "10.0.0.1") == Some((0, 0))
    });
    let r = s.post(
        "/v1/cache/query",
        json!({"cluster":"m","prompt_hash":[1,2]}),
    );
    assert_eq!(r.json["data"]["locations"], json!([]));
    wait_until("cluster expiry", Duration::from_secs(4), || {
        s.engines("m").is_null()
    });
    wait_until("cache GC", Duration::from_secs(4), || {
        metric(
            &s.metrics(),
            r#"metadata_center_cache_removed_nodes_total{reason="expired"}"#,
        ) == Some(1.0)
    });
}

#[test]
fn auth_token_guards_the_api_but_not_health_or_metrics() {
    let s = Server::start(&["--auth-token", "s3cret"], &[]);
    let r = s.post("/v1/load/stats", add("m", "r1", "10.0.0.1", 1));
    assert_eq!(r.status, 401);
    assert_eq!(r.json["error"]["code"], 40101001);
    // refused before its body was read: the connection is not reused (a client that sent the
    // next request on it could find it closed under it)
    assert_eq!(r.connection.as_deref(), Some("close"));
    let wrong = s.call(
        "GET",
        "/v1/load/stats?cluster=m",
        None,
        &[("Authorization", "Bearer nope")],
    );
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.connection, None, "no body left unread: kept alive");
    let good = s.call(
        "POST",
        "/v1/load/stats",
        Some(&add("m", "r1", "10.0.0.1", 1).to_string()),
        &[("Authorization", "Bearer s3cret")],
    );
    assert_eq!(good.status, 200);
    assert_eq!(s.call("GET", "/health", None, &[]).status, 200);
    assert_eq!(s.call("GET", "/healthz", None, &[]).status, 200);
    assert_eq!(s.call("GET", "/metrics", None, &[]).status, 200);
    // Env var works too.
    let e = Server::start(&[], &[("METADATA_CENTER_AUTH_TOKEN", "t2")]);
    assert_eq!(
        e.call("GET", "/v1/load/stats?cluster=m", None, &[]).status,
        401
    );
}

#[test]
fn replication_between_two_servers() {
    // B first on a free port, then A pointing at B, then B restarted? Simpler: reserve ports.
    let pa = free_port();
    let pb = free_port();
    let a_peer = format!("127.0.0.1:{pb}");
    let b_peer = format!("127.0.0.1:{pa}");
    let a = Server::start(&["--port", &pa.to_string(), "--peers", &a_peer], &[]);
    let b = Server::start(&["--port", &pb.to_string(), "--peers", &b_peer], &[]);
    a.post("/v1/load/stats", add("m", "r1", "10.0.0.1:9000", 100));
    wait_until("add replicated to B", Duration::from_secs(3), || {
        b.engine("m", "10.0.0.1:9000") == Some((1, 100))
    });
    b.delete("/v1/load/prompt", json!({"request_id": "r1"}));
    wait_until(
        "prompt delete replicated to A",
        Duration::from_secs(3),
        || a.engine("m", "10.0.0.1:9000") == Some((1, 0)),
    );
    a.delete("/v1/load/stats", json!({"request_id": "r1"}));
    wait_until("delete replicated", Duration::from_secs(3), || {
        a.engine("m", "10.0.0.1:9000") == Some((0, 0))
            && b.engine("m", "10.0.0.1:9000") == Some((0, 0))
    });
    // No re-broadcast: each server received exactly the events the other one sent. (The
    // sender counts after the peer's answer, which may come after the apply we just saw.)
    let sent = r#"metadata_center_replication_events_total{result="sent"}"#;
    let received = r#"metadata_center_replication_events_total{result="received"}"#;
    wait_until("sender counters", Duration::from_secs(3), || {
        metric(&a.metrics(), sent) == Some(2.0) && metric(&b.metrics(), sent) == Some(1.0)
    });
    std::thread::sleep(Duration::from_millis(100));
    let (ma, mb) = (a.metrics(), b.metrics());
    assert_eq!(metric(&ma, sent), Some(2.0), "{ma}");
    assert_eq!(metric(&ma, received), Some(1.0), "{ma}");
    assert_eq!(metric(&mb, received), Some(2.0), "{mb}");
    assert_eq!(metric(&mb, sent), Some(1.0), "{mb}");
    assert!(mb.contains("replication_latency_ms_count"));
    // Receiver errors.
    let r = a.call("POST", "/v1/replica/event", Some("{}"), &[]);
    assert_eq!(
        (r.status, r.json["error"]["reason"].as_str()),
        (400, Some("missing Event-Type header"))
    );
    let r = a.call(
        "POST",
        "/v1/replica/event",
        Some("{}"),
        &[("Event-Type", "load.other")],
    );
    assert_eq!(r.json["error"]["reason"], "Unsupported event type");
    let r = a.call(
        "POST",
        "/v1/replica/event",
        Some("{}"),
        &[("Event-Type", "load.stats.set")],
    );
    assert_eq!(r.json["error"]["reason"], "handler execute error");
    // A receiver applies without re-broadcasting (B would otherwise send it back to A).
    let r = a.call(
        "POST",
        "/v1/replica/event",
        Some(&add("m", "r9", "10.0.0.2", 5).to_string()),
        &[("Event-Type", "load.stats.set")],
    );
    assert_eq!(r.status, 200);
    assert_eq!(a.engine("m", "10.0.0.2"), Some((1, 5)));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(b.engine("m", "10.0.0.2"), None);
}

#[test]
fn replication_to_a_dead_peer_and_to_itself_stays_bounded() {
    let dead = free_port();
    let own = free_port();
    let s = Server::start(
        &[
            "--port",
            &own.to_string(),
            "--peers",
            &format!("127.0.0.1:{dead},127.0.0.1:{own}"),
        ],
        &[],
    );
    for i in 0..5 {
        s.post("/v1/load/stats", add("m", &format!("r{i}"), "10.0.0.1", 1));
    }
    assert_eq!(s.engine("m", "10.0.0.1"), Some((5, 5)));
    wait_until("dead peer failures counted", Duration::from_secs(5), || {
        metric(
            &s.metrics(),
            r#"metadata_center_replication_events_total{result="failed"}"#,
        ) == Some(5.0)
    });
    // The self-peer answered with our own instance id once and is skipped from then on.
    let self_handled = |m: &str| {
        let sent = metric(
            m,
            r#"metadata_center_replication_events_total{result="sent"}"#,
        )
        .unwrap();
        let skipped = metric(
            m,
            r#"metadata_center_replication_events_total{result="skipped_self"}"#,
        )
        .unwrap();
        (sent, skipped)
    };
    wait_until("self-peer events handled", Duration::from_secs(5), || {
        let (sent, skipped) = self_handled(&s.metrics());
        sent + skipped == 5.0
    });
    let m = s.metrics();
    // Shards send in parallel, so a few may reach itself before the first answer comes back.
    let (sent, _) = self_handled(&m);
    assert!(
        (1.0..=5.0).contains(&sent),
        "sends to itself, then skipped: {m}"
    );
    // Once it knows, later events are never sent to itself.
    for i in 5..10 {
        s.post("/v1/load/stats", add("m", &format!("r{i}"), "10.0.0.1", 1));
    }
    wait_until("later events skipped", Duration::from_secs(5), || {
        let (sent2, skipped) = self_handled(&s.metrics());
        sent2 == sent && sent2 + skipped == 10.0
    });
    assert_eq!(
        metric(
            &m,
            r#"metadata_center_replication_events_total{result="received"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        s.engine("m", "10.0.0.1"),
        Some((10, 10)),
        "no double counting from the self-peer"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn log_level_debug_endpoints_and_sigterm() {
    let mut s = Server::start(&["--debug"], &[]);
    let logged =
        |s: &Server, needle: &str| s.log.lock().unwrap().iter().any(|l| l.contains(needle));
    s.call("GET", "/health", None, &[("TraceId", "before-debug")]);
    let r = s.post("/log/level", json!({"LevelParam": "DEBUG"}));
    assert_eq!(r.json["data"], "log level updated successfully");
    s.call("GET", "/health", None, &[("TraceId", "after-debug")]);
    // The debug access log appears only once the level was raised at run time.
    wait_until("access log line", Duration::from_secs(3), || {
        logged(&s, "after-debug")
    });
    assert!(!logged(&s, "before-debug"));
    let r = s.post("/log/level", json!({"LevelParam": "LOUD"}));
    assert_eq!(r.status, 400);
    s.post(
        "/v1/cache/save",
        json!({"cluster":"m","prompt_hash":[1,2,3],"ip":"10.0.0.1"}),
    );
    s.post(
        "/v1/cache/save",
        json!({"cluster":"m","prompt_hash":[1,2,4,5],"ip":"10.0.0.2"}),
    );
    let r = s.call("GET", "/cache/admin/debug/model_tree?cluster=m", None, &[]);
    assert_eq!(
        r.json["data"]["info"]["1"],
        json!({"nodes_count":1,"prefix_total":2,"max_prefix_len":2,"min_prefix_len":2})
    );
    assert_eq!(r.json["data"]["info"]["2"]["nodes_count"], 2);
    assert_eq!(s.post("/cache/admin/debug/force_gc", json!({})).status, 200);
    // Graceful shutdown on SIGTERM: exits 0.
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            assert!(st.success(), "exit status {st:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Without --debug the debug routes do not exist.
    let plain = Server::start(&[], &[]);
    assert_eq!(
        plain
            .call("GET", "/cache/admin/debug/model_tree?cluster=m", None, &[])
            .status,
        404
    );
}

#[test]
fn config_file_and_bad_settings() {
    let dir = std::env::temp_dir().join(format!("mc-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("mc.toml");
    std::fs::write(
        &f,
        "[HTTP]\nHost = \"127.0.0.1\"\nPort = 1\n[Cache]\nTopK = 1\n",
    )
    .unwrap();
    // --port 0 from the fixture overrides the file's port; TopK=1 from the file applies.
    let s = Server::start(&["--config", f.to_str().unwrap()], &[]);
    s.post(
        "/v1/cache/save",
        json!({"cluster":"m","prompt_hash":[1],"ip":"10.0.0.1"}),
    );
    s.post(
        "/v1/cache/save",
        json!({"cluster":"m","prompt_hash":[1],"ip":"10.0.0.2"}),
    );
    let r = s.post("/v1/cache/query", json!({"cluster":"m","prompt_hash":[1]}));
    assert_eq!(r.json["data"]["locations"].as_array().unwrap().len(), 1);
    // A bad env value is a clear startup error, not a panic; a missing POD_IP is fine.
    let out = Command::new(env!("CARGO_BIN_EXE_llmproxy-metadata-center"))
        .args(["run", "--port", "0"])
        .env("METADATA_CENTER_LOAD_GC_INTERVAL", "often")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("METADATA_CENTER_LOAD_GC_INTERVAL"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn dns_peer_discovery_and_pod_ip_exclusion() {
    // `localhost` resolves to this machine; the target port selects the other server.
    let pa = free_port();
    let pb = free_port();
    let (spa, spb) = (pa.to_string(), pb.to_string());
    let dns = [
        ("META_DATA_CENTER_SVC_DISC_HOST", "localhost"),
        ("REPLICA_DNS_LOOKUP_INTERVAL", "200ms"),
    ];
    let a = Server::start(
        &["--port", &spa],
        &[dns[0], dns[1], ("REPLICA_CLIENT_TARGET_PORT", &spb)],
    );
    let b = Server::start(
        &["--port", &spb],
        &[dns[0], dns[1], ("REPLICA_CLIENT_TARGET_PORT", &spa)],
    );
    // Events before the first lookup completes have no peer to go to; wait for it.
    wait_until("first DNS lookup", Duration::from_secs(3), || {
        metric(&a.metrics(), "metadata_center_replication_peers").unwrap_or(0.0) >= 1.0
    });
    a.post("/v1/load/stats", add("m", "r1", "10.0.0.1", 3));
    wait_until(
        "DNS-discovered peer gets the add",
        Duration::from_secs(3),
        || b.engine("m", "10.0.0.1") == Some((1, 3)),
    );
    let m = a.metrics();
    assert!(
        m.contains(&format!(
            "dns_lookup_hosts{{domain=\"localhost\",host=\"127.0.0.1:{pb}\"}} 1"
        )),
        "{m}"
    );
    // POD_IP excludes this instance's own address from the DNS answer: no peers left.
    let c = Server::start(
        &[],
        &[
            dns[0],
            dns[1],
            ("POD_IP", "127.0.0.1"),
            ("REPLICA_CLIENT_TARGET_PORT", &spb),
        ],
    );
    c.post("/v1/load/stats", add("m", "r2", "10.0.0.2", 3));
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(b.engine("m", "10.0.0.2"), None);
    assert!(!c
        .metrics()
        .contains("dns_lookup_hosts{domain=\"localhost\",host=\"127.0.0.1"));
}

#[test]
fn memory_stays_bounded_by_the_caps() {
    let dir = std::env::temp_dir().join(format!("mc-caps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("caps.json");
    std::fs::write(
        &f,
        r#"{"Load":{"MaxRequests":100,"MaxClusters":3,"MaxEnginesPerCluster":4},
            "Cache":{"MaxEntriesPerCluster":300,"MaxClusters":2,"MaxPromptHashes":64}}"#,
    )
    .unwrap();
    let s = Server::start(&["--config", f.to_str().unwrap()], &[]);
    for i in 0..400 {
        let cluster = format!("c{}", i % 5);
        let ip = format!("10.0.0.{}:80", i % 7);
        s.post("/v1/load/stats", add(&cluster, &format!("r{i}"), &ip, 10));
        let path: Vec<u64> = (0..16).map(|k| (i as u64) * 1000 + k).collect();
        // Two busy cache clusters, and now and then a third that evicts the least recently used.
        let cache_cluster = if i % 50 == 49 {
            format!("x{i}")
        } else {
            format!("k{}", i % 2)
        };
        let r = s.post(
            "/v1/cache/save",
            json!({"cluster": cache_cluster, "prompt_hash": path, "ip": ip}),
        );
        assert_eq!(r.status, 200);
    }
    let too_long: Vec<u64> = (0..65).collect();
    let r = s.post(
        "/v1/cache/save",
        json!({"cluster":"c0","prompt_hash":too_long,"ip":"10.0.0.1"}),
    );
    assert_eq!(r.status, 400);
    let m = s.metrics();
    assert_eq!(
        metric(&m, "metadata_center_load_requests"),
        Some(100.0),
        "{m}"
    );
    assert!(metric(&m, "metadata_center_load_clusters").unwrap() <= 3.0);
    assert_eq!(
        metric(&m, r#"metadata_center_load_evicted_total{kind="request"}"#),
        Some(300.0)
    );
    assert!(metric(&m, r#"metadata_center_load_evicted_total{kind="cluster"}"#).unwrap() > 0.0);
    assert!(metric(&m, "metadata_center_cache_clusters").unwrap() <= 2.0);
    assert!(metric(&m, "metadata_center_cache_evicted_clusters_total").unwrap() > 0.0);
    assert!(metric(&m, "metadata_center_cache_entries").unwrap() <= 600.0);
    assert!(
        metric(
            &m,
            r#"metadata_center_cache_removed_nodes_total{reason="evicted"}"#
        )
        .unwrap()
            > 0.0,
        "{m}"
    );
    for c in 0..5 {
        if let Some(engines) = s.engines(&format!("c{c}")).as_array() {
            assert!(engines.len() <= 4);
        }
    }
    // Threads: a small fixed set whatever the traffic.
    assert!(metric(&m, "process_threads").unwrap() <= 16.0, "{m}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn idle_connections_are_closed_and_shutdown_is_bounded() {
    use std::io::{Read, Write};
    let dir = std::env::temp_dir().join(format!("mc-idle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("idle.yaml");
    std::fs::write(&f, "HTTP:\n  IdleTimeout: 500ms\n  MaxConnections: 64\n").unwrap();
    let mut s = Server::start(&["--config", f.to_str().unwrap()], &[]);
    // A silent connection is closed after the idle timeout.
    let mut quiet = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    quiet
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let n = quiet.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without a response");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // A half-sent request (slowloris) does not hold up SIGTERM beyond the idle timeout.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    slow.write_all(b"POST /v1/load/stats HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    assert_eq!(s.call("GET", "/health", None, &[]).status, 200);
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            assert!(st.success(), "exit status {st:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "SIGTERM shutdown took too long"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(slow);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn concurrent_duplicate_deletes_release_everything_exactly_once() {
    let s = std::sync::Arc::new(Server::start(&[], &[]));
    let n = 150;
    for i in 0..n {
        s.post(
            "/v1/load/stats",
            add("m", &format!("r{i}"), "10.0.0.1:80", 10),
        );
    }
    assert_eq!(s.engine("m", "10.0.0.1:80"), Some((n, 10 * n)));
    // Four clients each send a prompt delete and a full delete for every request, in
    // different orders, at the same time.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for k in 0..n {
                    let i = if t % 2 == 0 { k } else { n - 1 - k };
                    let body = json!({"request_id": format!("r{i}"), "cluster": "", "ip": ""});
                    if t < 2 {
                        s.delete("/v1/load/prompt", body.clone());
                        s.delete("/v1/load/stats", body);
                    } else {
                        s.delete("/v1/load/stats", body.clone());
                        s.delete("/v1/load/prompt", body);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(s.engine("m", "10.0.0.1:80"), Some((0, 0)));
    let m = s.metrics();
    assert_eq!(
        metric(
            &m,
            r#"metadata_center_load_events_total{event="prompt_released"}"#
        ),
        Some(n as f64),
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"metadata_center_load_events_total{event="deleted"}"#),
        Some(n as f64)
    );
    // Misses schedule a retry one second later; they find nothing and change nothing.
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(s.engine("m", "10.0.0.1:80"), Some((0, 0)));
}

#[test]
fn serves_on_ipv6_loopback() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback on this machine; nothing to check");
        return;
    }
    let s = Server::start(&["--listen", "[::1]:0"], &[]);
    assert!(s.base.starts_with("http://[::1]:"), "{}", s.base);
    s.post("/v1/load/stats", add("m", "r1", "[::1]:8000", 4));
    assert_eq!(s.engine("m", "[::1]:8000"), Some((1, 4)));
}

// ---------------------------------------------------------------------------------------------
// Abuse: label floods, slow clients, memory budget

/// How much the server's RSS may still grow once its memory budget is reached by cache saves:
/// the server's allocator (mimalloc) takes memory from the system in 2 MiB segments, and one or
/// two more segments showed up there (2,048 or 4,096 KiB); without the budget the two floods of
/// `memory_budget_bounds_the_stores_and_lookups_still_answer` add at least the 6.9 MB of data
/// they save (6.3 MiB of RSS measured with glibc's malloc).
const CACHE_RSS_SLACK_KIB: u64 = 5 * 1024;

/// Resident set size of a process in KiB (`VmRSS` in /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

/// Number of samples in a Prometheus text page.
fn series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

/// A raw HTTP/1.1 keep-alive connection, for requests no HTTP client library would send.
struct RawConn {
    stream: std::net::TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    fn open(port: u16) -> RawConn {
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Send one request and read its response; returns (status, body).
    fn request(&mut self, method: &str, path: &str, body: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream.write_all(req.as_bytes()).unwrap();
        let mut chunk = [0u8; 65536];
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = self.stream.read(&mut chunk).unwrap();
            assert!(n > 0, "connection closed before a response");
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_string();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while self.buf.len() < head_end + 4 + len {
            let n = self.stream.read(&mut chunk).unwrap();
            assert!(n > 0, "connection closed inside a response");
            self.buf.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8_lossy(&self.buf[head_end + 4..head_end + 4 + len]).to_string();
        self.buf.drain(..head_end + 4 + len);
        (status, body)
    }
}

/// xorshift64: deterministic junk without a dependency.
fn junk(seed: &mut u64, len: usize, alphabet: &[u8]) -> String {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            alphabet[(*seed % alphabet.len() as u64) as usize] as char
        })
        .collect()
}

#[test]
fn method_and_path_floods_leave_metrics_and_memory_flat() {
    // Before the fix every distinct method became a label value of two metric families, kept
    // forever: 5,000 such requests (1,000 of them with 2-4 KB methods) grew the server by
    // ~17 MB and /metrics by 60,000 series (55 MB per scrape).
    let s = Server::start(&["--auth-token", "s3cret"], &[]);
    let pid = s.child.id();
    let mut warm = RawConn::open(s.port);
    for i in 0..300 {
        let path = ["/v1/load/stats", "/v1/cache/save", "/nope", "/health"][i % 4];
        warm.request(["GET", "POST", "DELETE"][i % 3], path, "");
    }
    let before_series = series(&s.metrics());
    std::thread::sleep(Duration::from_millis(200));
    let rss_before = rss_kib(pid);
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let port = s.port;
            std::thread::spawn(move || {
                let mut c = RawConn::open(port);
                let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (t + 1);
                let mut statuses = std::collections::BTreeMap::new();
                for i in 0..2_500 {
                    let len = if i % 5 == 0 { 2048 + i % 2048 } else { 31 };
                    let method = junk(&mut seed, len, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ");
                    let path = match i % 3 {
                        0 => "/v1/load/stats".to_string(),
                        1 => "/v1/cache/save".to_string(),
                        _ => format!("/{}", junk(&mut seed, 24, b"abcdefghijklmnop/")),
                    };
                    let (status, _) = c.request(&method, &path, "");
                    *statuses.entry(status).or_insert(0) += 1;
                }
                statuses
            })
        })
        .collect();
    for t in threads {
        let statuses = t.join().unwrap();
        assert!(
            statuses.keys().all(|s| *s == 401 || *s == 404),
            "{statuses:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    let rss_after = rss_kib(pid);
    // Read raw: before the fix the page was too large for the test's HTTP client.
    let (status, m) = RawConn::open(s.port).request("GET", "/metrics", "");
    assert_eq!(status, 200);
    let after_series = series(&m);
    eprintln!(
        "flood: RSS {rss_before} -> {rss_after} KiB, series {before_series} -> {after_series}"
    );
    assert!(
        rss_after < rss_before + 3 * 1024,
        "RSS grew {} KiB ({rss_before} -> {rss_after} KiB); series {before_series} -> {after_series}",
        rss_after.saturating_sub(rss_before)
    );
    assert!(
        after_series < before_series + 60 && after_series < 400,
        "series {before_series} -> {after_series}"
    );
    assert!(
        m.contains(
            r#"http_request_status_code_total{method="other",status_code="401",url="/v1/load/stats"} "#
        ),
        "{m}"
    );
    assert!(m.contains(r#"method="other",status_code="404",url="other"} "#));
    // The token check still answers, and a good token still passes.
    assert_eq!(warm.request("GET", "/v1/load/stats?cluster=m", "").0, 401);
}

/// Writes `head` then drips `drip` one byte every 300 ms until the server closes the
/// connection. Returns (what the server sent, seconds from the first dripped byte to the close),
/// or the time limit if it never closed.
fn drip(port: u16, head: &str, drip: &[u8], limit: Duration) -> (String, Duration) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(head.as_bytes()).unwrap();
    let mut reader = c.try_clone().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        reader
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match reader.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = tx.send((String::from_utf8_lossy(&got).to_string(), Instant::now()));
    });
    let start = Instant::now();
    for b in drip.iter().cycle() {
        if let Ok((got, closed)) = rx.try_recv() {
            return (got, closed - start);
        }
        if start.elapsed() > limit || c.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    match rx.recv_timeout(Duration::from_secs(1)) {
        Ok((got, closed)) if closed - start <= limit => (got, closed - start),
        _ => (String::new(), limit),
    }
}

#[test]
fn slow_drip_clients_are_cut_off_at_the_header_and_body_deadlines() {
    let dir = std::env::temp_dir().join(format!("mc-drip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("drip.toml");
    std::fs::write(
        &f,
        "[HTTP]\nIdleTimeout = \"30s\"\nHeaderTimeout = \"1s\"\nBodyTimeout = \"1s\"\n",
    )
    .unwrap();
    let s = Server::start(&["--config", f.to_str().unwrap()], &[]);
    let limit = Duration::from_secs(6);
    let slack = Duration::from_millis(1500);
    // Headers, one byte every 300 ms: every byte resets the 30 s idle timer, but the headers
    // are not complete 1 s after they began.
    let (head_got, head_after) = drip(
        s.port,
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ",
        b"abcdefgh",
        limit,
    );
    // A body dripped after complete headers: 408 once the body deadline passes, then closed.
    let (body_got, body_after) = drip(
        s.port,
        "POST /v1/load/stats HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
        b" ",
        limit,
    );
    eprintln!("drip: header cut off after {head_after:?}, body after {body_after:?}");
    let deadline = Duration::from_secs(1) + slack;
    assert!(
        head_after < deadline && body_after < deadline,
        "cut off after: header drip {head_after:?}, body drip {body_after:?} (deadlines 1 s, \
         gave up at {limit:?})"
    );
    assert!(
        head_got.is_empty(),
        "no response to an incomplete request: {head_got:?}"
    );
    assert!(body_got.starts_with("HTTP/1.1 408"), "{body_got:?}");
    // A keep-alive connection that sits idle between complete requests follows the idle timeout
    // (30 s here), not the header deadline.
    let mut c = RawConn::open(s.port);
    assert_eq!(c.request("GET", "/health", "").0, 200);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(c.request("GET", "/health", "").0, 200);
    let body = add("m", "r1", "10.0.0.1", 3).to_string();
    assert_eq!(c.request("POST", "/v1/load/stats", &body).0, 200);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.request("GET", "/v1/load/stats?cluster=m", "").0, 200);
    // The body size limit still answers at once, before any body byte: 413.
    {
        use std::io::{Read, Write};
        let mut big = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        big.write_all(
            b"POST /v1/cache/save HTTP/1.1\r\nHost: x\r\nContent-Length: 9437184\r\n\r\n",
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && big.read(&mut byte).unwrap() == 1 {
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 413"), "{head}");
        // the body was never read: the server closes, and says so
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    }
    let m = s.metrics();
    assert_eq!(
        metric(
            &m,
            r#"metadata_center_connections_closed_total{reason="header_timeout"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"metadata_center_connections_closed_total{reason="body_timeout"}"#
        ),
        Some(1.0)
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn memory_budget_bounds_the_stores_and_lookups_still_answer() {
    // A client that creates clusters without end: the per-cluster caps never bind, so before the
    // budget memory grew with every new cluster.
    let dir = std::env::temp_dir().join(format!("mc-budget-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("budget.toml");
    std::fs::write(
        &f,
        "[Memory]\nMaxMemoryMB = 2\n[Load]\nMaxClusters = 1000000\nMaxRequests = 1000000\n\
         [Cache]\nMaxClusters = 1000000\n",
    )
    .unwrap();
    let s = std::sync::Arc::new(Server::start(&["--config", f.to_str().unwrap()], &[]));
    let pid = s.child.id();
    let budget = 2.0 * 1024.0 * 1024.0;
    // `saves` cache saves (64 hashes) and `adds` load adds from two clients, every one in a new
    // cluster; returns the index of the last save and of the last add.
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let flood = |saves: usize, adds: usize| {
        let base = next.fetch_add(saves.max(adds), std::sync::atomic::Ordering::Relaxed);
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in (t..saves.max(adds)).step_by(2) {
                        let n = base + i;
                        if i < saves {
                            let path: Vec<u64> = (0..64).map(|k| (n as u64) << 20 | k).collect();
                            let save = json!({"cluster": format!("cache-{n}"),
                                              "prompt_hash": path, "ip": "10.0.0.1"});
                            assert_eq!(s.post("/v1/cache/save", save).status, 200);
                        }
                        if i < adds {
                            let a = add(&format!("load-{n}"), &format!("req-{n}"), "10.0.0.2", 7);
                            assert_eq!(s.post("/v1/load/stats", a).status, 200);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        (
            (base + saves).wrapping_sub(1),
            (base + adds).wrapping_sub(1),
        )
    };
    // NaN (fails every bound) when the server does not report it.
    let estimated = |m: &str| {
        metric(m, r#"metadata_center_memory_estimated_bytes{store="load"}"#).unwrap_or(f64::NAN)
            + metric(
                m,
                r#"metadata_center_memory_estimated_bytes{store="cache"}"#,
            )
            .unwrap_or(f64::NAN)
    };
    let evicted = |m: &str, kind: &str| {
        metric(
            m,
            &format!(r#"metadata_center_memory_evicted_total{{kind="{kind}"}}"#),
        )
        .unwrap()
    };
    let cached = |n: usize| {
        let path: Vec<u64> = (0..64).map(|k| (n as u64) << 20 | k).collect();
        let r = s.post(
            "/v1/cache/query",
            json!({"cluster": format!("cache-{n}"), "prompt_hash": path}),
        );
        assert_eq!(r.status, 200, "{}", r.text);
        r.json["data"]["locations"] == json!([{"ip": "10.0.0.1", "length": 64}])
    };
    let loaded = |n: usize| s.engine(&format!("load-{n}"), "10.0.0.2") == Some((1, 7));

    // 1. The cache outgrows the budget (1,500 new clusters of ~2.3 KB each, with a few load
    //    adds): its least recently used entries go, the newest stay, the load store keeps all.
    // RSS is read after a first scrape and before the last one: a scrape's own memory grows
    // with the number of load clusters (one series per engine), which is not measured here.
    let (last_save, last_add) = flood(1_500, 300);
    assert!(cached(last_save) && loaded(last_add));
    let m = s.metrics();
    std::thread::sleep(Duration::from_millis(200));
    let rss_full = rss_kib(pid);
    let entries_full = metric(&m, "metadata_center_cache_entries").unwrap();
    for _ in 0..2 {
        let (last_save, last_add) = flood(1_500, 300);
        assert!(cached(last_save) && loaded(last_add));
    }
    std::thread::sleep(Duration::from_millis(200));
    let rss = rss_kib(pid);
    let m = s.metrics();
    let entries = metric(&m, "metadata_center_cache_entries").unwrap();
    eprintln!(
        "budget, cache: RSS {rss_full} -> {rss} KiB, entries {entries_full} -> {entries}, \
         estimate {} B",
        estimated(&m)
    );
    assert!(
        rss < rss_full + CACHE_RSS_SLACK_KIB && entries <= entries_full * 1.05,
        "once the budget was reached: RSS grew {} KiB ({rss_full} -> {rss} KiB), \
         cache entries {entries_full} -> {entries}",
        rss.saturating_sub(rss_full)
    );
    // The budget, the estimate and the evictions are reported.
    assert_eq!(
        metric(&m, "metadata_center_memory_budget_bytes"),
        Some(budget),
        "{m}"
    );
    assert!(estimated(&m) <= budget, "{m}");
    assert!(evicted(&m, "cache_node") > 1_000.0, "{m}");
    assert!(evicted(&m, "cache_cluster") > 1_000.0, "{m}");
    assert_eq!(evicted(&m, "request"), 0.0, "the cache yields first: {m}");
    assert!(!cached(0), "the oldest cache entries were evicted");
    assert!(loaded(0), "the load store was not touched");

    // 2. New load clusters alone outgrow the budget: the cache gives way entirely, then the
    //    oldest requests and clusters go; the newest are answered.
    let (_, last_add) = flood(0, 3_000);
    assert!(loaded(last_add));
    let _warm_scrape = s.metrics();
    std::thread::sleep(Duration::from_millis(200));
    let rss_full = rss_kib(pid);
    for _ in 0..2 {
        let (_, last_add) = flood(0, 3_000);
        assert!(loaded(last_add));
    }
    std::thread::sleep(Duration::from_millis(200));
    let rss = rss_kib(pid);
    let m = s.metrics();
    eprintln!(
        "budget, load: RSS {rss_full} -> {rss} KiB, estimate {} B",
        estimated(&m)
    );
    assert!(
        rss < rss_full + 2 * 1024,
        "RSS grew {} KiB with load alone at the budget ({rss_full} -> {rss} KiB)",
        rss.saturating_sub(rss_full)
    );
    assert!(estimated(&m) <= budget, "{m}");
    assert_eq!(
        metric(&m, "metadata_center_cache_clusters"),
        Some(0.0),
        "{m}"
    );
    assert!(evicted(&m, "request") > 1_000.0, "{m}");
    assert!(evicted(&m, "cluster") > 1_000.0, "{m}");
    assert!(!loaded(0), "the oldest load entries were evicted");
    // Identifiers are bounded too: 1,024 bytes.
    let long = "x".repeat(1025);
    assert_eq!(
        s.post("/v1/load/stats", add(&long, "r", "10.0.0.1", 1))
            .status,
        400
    );
    assert_eq!(
        s.post("/v1/load/stats", add("m", &long, "10.0.0.1", 1))
            .status,
        400
    );
    assert_eq!(s.call("GET", "/health", None, &[]).status, 200);
    std::fs::remove_dir_all(&dir).ok();
}
