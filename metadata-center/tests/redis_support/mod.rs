//! Test harness for the Redis store tests: real `redis-server` processes on free 127.0.0.1
//! ports (one server, or a Redis Cluster made with `redis-cli --cluster create`), stopped by PID
//! when dropped, and the metadata-center binary.
//!
//! Without `redis-server` on the PATH the tests skip with a printed reason, unless
//! `LLMPROXY_REQUIRE_REDIS=1` (set by `make test-redis`), where they fail.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Whether the tests can run; panics when Redis is required and missing.
pub fn redis_available(test: &str) -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    if std::env::var("LLMPROXY_REQUIRE_REDIS").is_ok_and(|v| v == "1") {
        panic!(
            "{test}: redis-server is not installed and LLMPROXY_REQUIRE_REDIS=1 \
             (install it: scripts/apt-install.sh redis-server)"
        );
    }
    // Straight to stderr: the test harness captures `eprintln!` of passing tests.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: redis-server is not installed (apt-get install redis-server; \
         `make test-redis` requires it)"
    );
    false
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `redis-server` process.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// A standalone server, no persistence.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// A standalone server on `port` (e.g. to restart one that was stopped).
    pub fn start_on(port: u16) -> RedisServer {
        Self::start_port(port, &[])
    }

    pub fn start_with(extra: &[&str]) -> RedisServer {
        Self::start_port(free_port(), extra)
    }

    fn start_port(port: u16, extra: &[&str]) -> RedisServer {
        let dir =
            std::env::temp_dir().join(format!("llmproxy-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let s = RedisServer {
            child: Some(child),
            port,
            dir,
        };
        s.wait_ready();
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(c) = redis::Client::open(self.url()) {
                if let Ok(mut con) = c.get_connection_with_timeout(Duration::from_millis(200)) {
                    if redis::cmd("PING").query::<String>(&mut con).is_ok() {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of `masters` masters with `replicas` replicas each.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        let ports: Vec<u16> = (0..masters * (1 + replicas)).map(|_| free_port()).collect();
        Self::start_on(&ports, replicas)
    }

    /// A cluster on `ports` (masters first), `replicas` replicas per master.
    pub fn start_on(ports: &[u16], replicas: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = ports
            .iter()
            .map(|&port| {
                RedisServer::start_port(
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                        // Replicas sync at once (the default waits 5 s for more replicas).
                        "--repl-diskless-sync-delay",
                        "0",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let c = RedisCluster { nodes };
        c.wait_ok(Duration::from_secs(20));
        c
    }

    /// `redis+cluster://` URL naming every node.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Waits until every live node reports `cluster_state:ok` and every replica's link to its
    /// master is up (a replica that never synced cannot be promoted).
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        'outer: loop {
            assert!(Instant::now() < deadline, "cluster not ok in {within:?}");
            std::thread::sleep(Duration::from_millis(100));
            for n in self.nodes.iter().filter(|n| n.child.is_some()) {
                let mut con = n.client();
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut con).unwrap();
                if !info.contains("cluster_state:ok") {
                    continue 'outer;
                }
                let repl: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut con)
                    .unwrap();
                if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                    continue 'outer;
                }
            }
            return;
        }
    }

    /// The replica of the master `master` (an index into `nodes`).
    pub fn replica_of(&self, master: usize) -> usize {
        let port = self.nodes[master].port as i64;
        for (i, n) in self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.child.is_some())
        {
            let mut con = n.client();
            let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut con).unwrap();
            let is_replica = matches!(&role[0], redis::Value::BulkString(b) if b == b"slave");
            if is_replica && redis::from_redis_value_ref::<i64>(&role[2]).ok() == Some(port) {
                return i;
            }
        }
        panic!("no replica of node {master}");
    }

    /// The node serving `slot` as master.
    pub fn master_of(&self, slot: u16) -> usize {
        for (i, n) in self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.child.is_some())
        {
            let mut con = n.client();
            let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut con).unwrap();
            let is_master = matches!(&role[0], redis::Value::BulkString(b) if b == b"master");
            if !is_master {
                continue;
            }
            let slots: Vec<Vec<redis::Value>> =
                redis::cmd("CLUSTER").arg("SLOTS").query(&mut con).unwrap();
            for r in slots {
                let lo: i64 = redis::from_redis_value_ref(&r[0]).unwrap();
                let hi: i64 = redis::from_redis_value_ref(&r[1]).unwrap();
                let port: i64 = match &r[2] {
                    redis::Value::Array(a) => redis::from_redis_value_ref(&a[1]).unwrap(),
                    _ => 0,
                };
                if (lo..=hi).contains(&(slot as i64)) && port == n.port as i64 {
                    return i;
                }
            }
        }
        panic!("no master for slot {slot}");
    }
}

/// The metadata-center binary on a free port.
pub struct Mc {
    child: Option<Child>,
    pub base: String,
    agent: ureq::Agent,
}

impl Mc {
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Mc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmproxy-metadata-center"));
        cmd.args(["run", "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn metadata-center");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) else {
            let _ = child.kill();
            panic!("metadata-center did not report its address");
        };
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap()
            .to_string();
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .build()
            .into();
        Mc {
            child: Some(child),
            base: format!("http://{addr}"),
            agent,
        }
    }

    /// The `data` of a JSON API answer (asserting status OK).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> serde_json::Value {
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        let r = match body {
            Some(b) => self.agent.run(req.body(b.to_string()).unwrap()),
            None => self.agent.run(req.body(()).unwrap()),
        };
        let mut resp = r.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let text = resp.body_mut().read_to_string().unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        assert_eq!(v["status"], "OK", "{method} {path}: {text}");
        v["data"].clone()
    }

    pub fn metrics(&self) -> String {
        let mut resp = self
            .agent
            .get(format!("{}/metrics", self.base))
            .call()
            .unwrap();
        resp.body_mut().read_to_string().unwrap()
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Mc {
    fn drop(&mut self) {
        self.kill();
    }
}
