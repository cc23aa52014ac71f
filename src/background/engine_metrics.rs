//! The engine metrics reader (`engine_metrics`): a thread of its own reads every endpoint's
//! Prometheus page each period and stores in the endpoint, for scoring to read without locks,
//! the requests its engine says it runs and queues beyond the router's own
//! ([`crate::state::Endpoint::engine`]), its KV cache capacity and the tokens it wrote into
//! that cache ([`crate::state::Endpoint::residency`]: every client's writes, not only this
//! router's).
//!
//! Every read has a deadline (`timeout_ms`: connect, request and answer; endpoints are IP
//! literals, so no DNS), answers are read up to [`MAX_PAGE_BYTES`], and an endpoint that fails
//! is left alone for [`BACKOFF_ROUNDS`] periods, so dead or hanging engines cost this thread a
//! bounded time per round and the request path nothing: a reading it cannot get simply goes
//! stale and scoring falls back to the router's own accounting.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, TryRecvError};

use crate::config::EngineMetrics;
use crate::metrics::RouterMetrics;
use crate::state::{Clock, Clusters};

/// The longest metrics page read (vLLM's is ~30 KiB with a few models; the rest is ignored).
pub const MAX_PAGE_BYTES: u64 = 1 << 20;

/// Periods an endpoint is skipped after a failed read.
pub const BACKOFF_ROUNDS: u32 = 8;

/// What the reader thread needs.
pub struct EngineMetricsReader {
    /// The settings.
    pub settings: EngineMetrics,
    /// Every cluster's endpoints (held weakly: nothing to do once the router is gone).
    pub clusters: Weak<Clusters>,
    /// Read counters.
    pub metrics: Arc<RouterMetrics>,
    /// The router's clock (readings are stamped with it).
    pub clock: Clock,
}

impl EngineMetricsReader {
    /// Reads every endpoint each period until `stop` (or the router is gone).
    pub(super) fn run(self, stop: Receiver<()>) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(self.settings.timeout_ms)))
            .http_status_as_error(false)
            .max_idle_connections_per_host(1)
            .build()
            .into();
        let period = Duration::from_millis(self.settings.period_ms);
        let mut backoff: HashMap<SocketAddr, u32> = HashMap::new();
        loop {
            let round = Instant::now() + period;
            let Some(clusters) = self.clusters.upgrade() else {
                return;
            };
            let mut endpoints: Vec<_> = clusters
                .all()
                .iter()
                .flat_map(|c| c.snapshot().endpoints.clone())
                .collect();
            drop(clusters);
            endpoints.sort_by_key(|e| e.addr);
            endpoints.dedup_by_key(|e| e.addr);
            // only endpoints still configured keep their backoff
            let mut previous = std::mem::take(&mut backoff);
            backoff.extend(
                endpoints
                    .iter()
                    .filter_map(|e| Some((e.addr, previous.remove(&e.addr)?))),
            );
            for e in endpoints {
                if let Some(left) = backoff.get_mut(&e.addr) {
                    *left -= 1;
                    if *left == 0 {
                        backoff.remove(&e.addr);
                    }
                    continue;
                }
                let reading = self.read(&agent, e.addr);
                let now_ms = self.clock.now_ms();
                let written = reading.as_ref().and_then(|r| r.written_tokens);
                e.residency.engine_written(written, now_ms);
                match reading {
                    Some(reading) => {
                        if let Some(requests) = reading.requests {
                            e.engine.set(requests, e.in_flight(), now_ms);
                        }
                        if let Some(tokens) = reading.cache_tokens {
                            e.residency.set_capacity(tokens);
                        }
                        self.metrics.engine_reads_ok.fetch_add(1, Relaxed);
                    }
                    None => {
                        self.metrics.engine_reads_failed.fetch_add(1, Relaxed);
                        backoff.insert(e.addr, BACKOFF_ROUNDS);
                    }
                }
                if matches!(stop.try_recv(), Err(TryRecvError::Disconnected)) {
                    return; // the router is being freed: do not finish the round
                }
            }
            select! {
                recv(stop) -> _ => return,
                default(round.saturating_duration_since(Instant::now())) => {}
            }
        }
    }

    /// One endpoint's page: its running + waiting requests, its KV cache capacity and the
    /// tokens it wrote there; `None` when the page could not be read or names none of them.
    fn read(&self, agent: &ureq::Agent, addr: SocketAddr) -> Option<Reading> {
        let url = format!("http://{addr}{}", self.settings.path);
        let mut answer = agent.get(&url).call().ok()?;
        if answer.status() != 200 {
            return None;
        }
        let mut page = String::new();
        answer
            .body_mut()
            .as_reader()
            .take(MAX_PAGE_BYTES)
            .read_to_string(&mut page)
            .ok()?;
        let running = gauge_sum(&page, &self.settings.running);
        let waiting = gauge_sum(&page, &self.settings.waiting);
        let requests = (running.is_some() || waiting.is_some())
            .then(|| (running.unwrap_or(0.0) + waiting.unwrap_or(0.0)).round() as u64);
        let reading = Reading {
            requests,
            cache_tokens: cache_capacity_tokens(&page),
            written_tokens: written_tokens(&page, &self.settings),
        };
        let named = reading.requests.is_some()
            || reading.cache_tokens.is_some()
            || reading.written_tokens.is_some();
        named.then_some(reading)
    }
}

/// What one metrics page said.
struct Reading {
    /// Requests running plus waiting.
    requests: Option<u64>,
    /// KV cache capacity, tokens.
    cache_tokens: Option<u64>,
    /// Tokens written into the KV cache since the engine started.
    written_tokens: Option<u64>,
}

/// The tokens the engine wrote into its KV cache since it started: prompt tokens it computed
/// (processed minus found cached; none found cached when the page has no such counter) plus
/// tokens generated; `None` unless the page has both the prompt and the generation counters.
pub fn written_tokens(page: &str, settings: &EngineMetrics) -> Option<u64> {
    let prompt = gauge_sum(page, &settings.prompt_tokens)?;
    let generated = gauge_sum(page, &settings.generation_tokens)?;
    let cached = gauge_sum(page, &settings.cached_tokens).unwrap_or(0.0);
    Some(((prompt - cached.min(prompt)) + generated).round() as u64)
}

/// The engine's KV cache capacity in tokens: vLLM's `vllm:cache_config_info` (its labels
/// `num_gpu_blocks` × `block_size`) or SGLang's `sglang:max_total_num_tokens` gauge.
pub fn cache_capacity_tokens(page: &str) -> Option<u64> {
    let sglang = ["sglang:max_total_num_tokens".to_string()];
    if let Some(tokens) = gauge_sum(page, &sglang).filter(|&t| t >= 1.0) {
        return Some(tokens as u64);
    }
    let line = page
        .lines()
        .find(|l| l.starts_with("vllm:cache_config_info{"))?;
    let blocks = label_value(line, "num_gpu_blocks")?.parse::<u64>().ok()?;
    let block_size = label_value(line, "block_size")?.parse::<u64>().ok()?;
    blocks.checked_mul(block_size).filter(|&t| t > 0)
}

/// The value of label `name` in a sample line's label set (`{a="1",name="v"}`), as written
/// (escapes kept: numbers need no unescaping).
fn label_value<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let mut rest = &line[line.find('{')? + 1..];
    loop {
        let eq = rest.find("=\"")?;
        let key = rest[..eq].trim_start_matches([',', ' ']);
        let value = &rest[eq + 2..];
        // the closing quote is the first one not escaped by a backslash
        let mut end = None;
        let mut escaped = false;
        for (i, b) in value.bytes().enumerate() {
            match b {
                b'\\' if !escaped => escaped = true,
                b'"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let end = end?;
        if key == name {
            return Some(&value[..end]);
        }
        rest = &value[end + 1..];
    }
}

/// The sum of every sample of the metrics named in `names` (over all their label sets) in a
/// Prometheus text page; `None` when none of them appears. Samples that are not finite
/// non-negative numbers are ignored.
pub fn gauge_sum(page: &str, names: &[String]) -> Option<f64> {
    let mut sum = None;
    for line in page.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(name) = names.iter().find(|n| {
            line.strip_prefix(n.as_str())
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        }) else {
            continue;
        };
        let rest = &line[name.len()..];
        // the value follows the labels (which may hold spaces inside quotes)
        let after_labels = match rest.strip_prefix('{') {
            Some(labels) => match labels.rfind('}') {
                Some(end) => &labels[end + 1..],
                None => continue,
            },
            None => rest,
        };
        let Some(value) = after_labels.split_whitespace().next() else {
            continue;
        };
        match value.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => *sum.get_or_insert(0.0) += v,
            _ => {}
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sums_every_label_set_of_the_named_gauges_only() {
        let page = "# HELP vllm:num_requests_running Number of requests running.\n\
            # TYPE vllm:num_requests_running gauge\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"a b\"} 3.0\n\
            vllm:num_requests_running{engine=\"1\",model_name=\"x}\"} 2\n\
            vllm:num_requests_running_total 99\n\
            vllm:num_requests_waiting 4.0 1700000000000\n\
            sglang:num_queue_reqs{model=\"m\"} 5\n";
        let running = names(&["vllm:num_requests_running", "sglang:num_running_reqs"]);
        let waiting = names(&["vllm:num_requests_waiting", "sglang:num_queue_reqs"]);
        assert_eq!(gauge_sum(page, &running), Some(5.0));
        assert_eq!(gauge_sum(page, &waiting), Some(9.0));
        assert_eq!(gauge_sum(page, &names(&["other"])), None);
    }

    #[test]
    fn llama_cpp_and_tgi_pages_are_read_by_the_default_names() {
        let settings = EngineMetrics::default();
        let llama = "# TYPE llamacpp:requests_processing gauge\n\
            llamacpp:prompt_tokens_total 5200\n\
            llamacpp:tokens_predicted_total 800\n\
            llamacpp:requests_processing 3\n\
            llamacpp:requests_deferred 7\n";
        assert_eq!(gauge_sum(llama, &settings.running), Some(3.0));
        assert_eq!(gauge_sum(llama, &settings.waiting), Some(7.0));
        // llama.cpp counts the prompt tokens it computed (no cache hit counter)
        assert_eq!(written_tokens(llama, &settings), Some(6_000));
        let tgi = "tgi_queue_size 4\ntgi_batch_current_size 12\n";
        assert_eq!(gauge_sum(tgi, &settings.running), Some(12.0));
        assert_eq!(gauge_sum(tgi, &settings.waiting), Some(4.0));
    }

    #[test]
    fn cache_capacity_from_vllm_config_info_or_sglang_gauge() {
        let vllm = "# TYPE vllm:cache_config_info gauge\n\
            vllm:cache_config_info{block_size=\"16\",cache_dtype=\"auto\",model=\"a\\\"b,c=\\\"\",num_gpu_blocks=\"4096\"} 1.0\n";
        assert_eq!(cache_capacity_tokens(vllm), Some(65_536));
        let sglang = "sglang:max_total_num_tokens{model_name=\"m\"} 161721.0\n";
        assert_eq!(cache_capacity_tokens(sglang), Some(161_721));
        for bad in [
            "vllm:cache_config_info{block_size=\"16\"} 1.0\n",
            "vllm:cache_config_info{block_size=\"x\",num_gpu_blocks=\"4096\"} 1.0\n",
            "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"0\"} 1.0\n",
            "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"4096 1.0\n",
            "sglang:max_total_num_tokens NaN\n",
            "<html>not metrics</html>",
        ] {
            assert_eq!(cache_capacity_tokens(bad), None, "{bad}");
        }
    }

    #[test]
    fn written_tokens_are_prompt_tokens_computed_plus_generated() {
        let settings = EngineMetrics::default();
        let vllm = "vllm:prompt_tokens_total{model_name=\"m\",engine=\"0\"} 10000.0\n\
            vllm:prompt_tokens_total{model_name=\"m\",engine=\"1\"} 2000.0\n\
            vllm:prompt_tokens_created{model_name=\"m\"} 1700000000.0\n\
            vllm:prefix_cache_hits_total{model_name=\"m\"} 7000.0\n\
            vllm:generation_tokens_total{model_name=\"m\"} 500.0\n";
        assert_eq!(written_tokens(vllm, &settings), Some(12_000 - 7_000 + 500));
        let sglang = "sglang:prompt_tokens_total{model_name=\"m\"} 300\n\
            sglang:cached_tokens_total{model_name=\"m\"} 100\n\
            sglang:generation_tokens_total{model_name=\"m\"} 40\n";
        assert_eq!(written_tokens(sglang, &settings), Some(240));
        // no prefix cache counter: every prompt token was computed
        let no_cache = "vllm:prompt_tokens_total 300\nvllm:generation_tokens_total 40\n";
        assert_eq!(written_tokens(no_cache, &settings), Some(340));
        // a half page says nothing (nor does a hit counter above the prompt counter go negative)
        assert_eq!(
            written_tokens("vllm:prompt_tokens_total 300\n", &settings),
            None
        );
        assert_eq!(
            written_tokens("vllm:generation_tokens_total 40\n", &settings),
            None
        );
        let odd = "vllm:prompt_tokens_total 300\nvllm:prefix_cache_hits_total 900\nvllm:generation_tokens_total 40\n";
        assert_eq!(written_tokens(odd, &settings), Some(40));
        // configured names replace the defaults
        let custom = EngineMetrics {
            prompt_tokens: names(&["trt:prompt"]),
            generation_tokens: names(&["trt:gen"]),
            ..EngineMetrics::default()
        };
        assert_eq!(written_tokens(vllm, &custom), None);
        assert_eq!(
            written_tokens("trt:prompt 5\ntrt:gen 6\n", &custom),
            Some(11)
        );
    }

    #[test]
    fn garbage_and_bad_values_give_nothing() {
        let w = names(&["vllm:num_requests_waiting"]);
        assert_eq!(gauge_sum("<html>not metrics</html>", &w), None);
        assert_eq!(gauge_sum("vllm:num_requests_waiting NaN\n", &w), None);
        assert_eq!(gauge_sum("vllm:num_requests_waiting -3\n", &w), None);
        assert_eq!(
            gauge_sum("vllm:num_requests_waiting{unclosed 3\n", &w),
            None
        );
        assert_eq!(gauge_sum("vllm:num_requests_waiting +Inf\n", &w), None);
        assert_eq!(
            gauge_sum(
                "vllm:num_requests_waiting 1\nvllm:num_requests_waiting x\n",
                &w
            ),
            Some(1.0)
        );
    }
}
