//! A vLLM-like engine step model: FCFS waiting queue, continuous batching, chunked prefill with
//! a per-step token budget (only uncached prompt tokens are computed), one decode token per
//! running request per step, prefix caching over 16-token blocks, preemption by recompute when
//! the KV cache is full. Time is not simulated here: `schedule` returns the duration of the next
//! step and the caller (the server loop, or a test) lets that time pass before `complete`.

use crate::kv::{Block, BlockHash, KvCache};
use std::collections::{HashMap, VecDeque};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Characters per token (the simulator's tokenizer: tokens = ceil(chars / 4)).
pub const CHARS_PER_TOKEN: usize = 4;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV cache capacity in blocks.
    pub num_gpu_blocks: usize,
    /// Token budget per step (chunked prefill).
    pub max_num_batched_tokens: usize,
    /// Maximum running requests.
    pub max_num_seqs: usize,
    /// Longest prompt + output accepted, in tokens.
    pub max_model_len: usize,
    /// Step time = step_base_s + prefill_token_s * prefill tokens + decode_seq_s * decoding requests.
    pub step_base_s: f64,
    pub prefill_token_s: f64,
    pub decode_seq_s: f64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: 16,
            num_gpu_blocks: 4096,
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            max_model_len: 32768,
            step_base_s: 0.007,
            prefill_token_s: 0.000_1,
            decode_seq_s: 0.000_1,
        }
    }
}

pub fn tokens_of(chars: usize) -> usize {
    chars.div_ceil(CHARS_PER_TOKEN)
}

/// Something the caller must deliver after a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Emission {
    pub id: u64,
    pub text: String,
    pub first: bool,
    pub finished: bool,
    /// Usage so far (complete when `finished`).
    pub usage: Usage,
}

/// Per-request accounting reported back at the end (OpenAI `usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug)]
struct Seq {
    text: String,
    prompt_tokens: usize,
    max_output: usize,
    generated: usize,
    computed: usize,
    blocks: Vec<Block>,
    /// Chained hashes of the full blocks of `text`.
    hashes: Vec<BlockHash>,
    /// Blocks below this index have been offered to the cache.
    registered: usize,
    admitted_once: bool,
    cached_tokens: usize,
    out_rng: fastrand::Rng,
}

impl Seq {
    fn num_tokens(&self) -> usize {
        self.prompt_tokens + self.generated
    }

    fn extend_hashes(&mut self, block_chars: usize) {
        let full = self.text.len() / block_chars;
        while self.hashes.len() < full {
            let i = self.hashes.len();
            let prev = if i == 0 { 0 } else { self.hashes[i - 1] };
            let chunk = &self.text.as_bytes()[i * block_chars..(i + 1) * block_chars];
            self.hashes.push(xxh3_64_with_seed(chunk, prev));
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    id: u64,
    tokens: usize,
    decode: bool,
}

/// The work of one step, to be passed back to `complete` once its duration has elapsed.
#[derive(Debug)]
pub struct Step {
    slots: Vec<Slot>,
    pub prefill_tokens: usize,
    pub decode_requests: usize,
    pub duration_s: f64,
}

/// Cumulative counters (the `/metrics` and `/sim/stats` sources).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    pub requests: u64,
    pub finished: u64,
    pub aborted: u64,
    pub rejected: u64,
    pub preemptions: u64,
    /// Prompt tokens and prefix-cache hits at first admission.
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    /// vLLM-style prefix cache counters (every admission, including re-admission after
    /// preemption).
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub generation_tokens: u64,
    pub computed_prefill_tokens: u64,
    pub steps: u64,
    pub busy_s: f64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    TooLong { prompt_tokens: usize, limit: usize },
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::TooLong {
                prompt_tokens,
                limit,
            } => write!(
                f,
                "This model's maximum context length is {limit} tokens. However, you requested {prompt_tokens} tokens in the messages."
            ),
        }
    }
}

#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    kv: KvCache,
    seqs: HashMap<u64, Seq>,
    waiting: VecDeque<u64>,
    running: Vec<u64>,
    next_id: u64,
    pub counters: Counters,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        let kv = KvCache::new(cfg.num_gpu_blocks);
        Engine {
            cfg,
            kv,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 1,
            counters: Counters::default(),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    fn block_chars(&self) -> usize {
        self.cfg.block_size * CHARS_PER_TOKEN
    }

    /// Largest prompt (tokens) this engine accepts.
    pub fn prompt_limit(&self) -> usize {
        // The whole prompt plus one token must fit in the cache, else it could never run.
        let cache_tokens = self.cfg.num_gpu_blocks * self.cfg.block_size;
        self.cfg
            .max_model_len
            .min(cache_tokens.saturating_sub(self.cfg.block_size))
    }

    /// Queue a request. `max_output` is clamped to at least 1 and to the model length.
    pub fn submit(&mut self, prompt: String, max_output: usize) -> Result<u64, SubmitError> {
        let prompt_tokens = tokens_of(prompt.len()).max(1);
        let limit = self.prompt_limit();
        if prompt_tokens >= limit {
            self.counters.rejected += 1;
            return Err(SubmitError::TooLong {
                prompt_tokens,
                limit,
            });
        }
        let cache_tokens = self.cfg.num_gpu_blocks * self.cfg.block_size;
        let max_len = self.cfg.max_model_len.min(cache_tokens);
        let max_output = max_output.clamp(1, max_len - prompt_tokens);
        let id = self.next_id;
        self.next_id += 1;
        let mut seq = Seq {
            out_rng: fastrand::Rng::with_seed(xxh3_64(prompt.as_bytes())),
            text: prompt,
            prompt_tokens,
            max_output,
            generated: 0,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            registered: 0,
            admitted_once: false,
            cached_tokens: 0,
        };
        seq.extend_hashes(self.block_chars());
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
        self.counters.requests += 1;
        Ok(id)
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Fraction of KV blocks referenced by requests (vLLM's kv_cache_usage_perc, 0..1).
    pub fn kv_usage(&self) -> f64 {
        self.kv.used() as f64 / self.kv.capacity().max(1) as f64
    }

    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    /// Tokens held by running and waiting requests (SGLang's `num_tokens`).
    pub fn tokens_in_flight(&self) -> usize {
        self.seqs.values().map(|s| s.num_tokens()).sum()
    }

    pub fn usage(&self, id: u64) -> Option<Usage> {
        self.seqs.get(&id).map(|s| Usage {
            prompt_tokens: s.prompt_tokens,
            cached_tokens: s.cached_tokens,
            completion_tokens: s.generated,
        })
    }

    /// Forget the cached prefix blocks and zero the counters (in-flight requests go on).
    pub fn reset(&mut self) {
        self.kv.flush_unreferenced();
        self.counters = Counters::default();
    }

    pub fn flush_cache(&mut self) {
        self.kv.flush_unreferenced();
    }

    /// Remove a request (client went away).
    pub fn abort(&mut self, id: u64) {
        let Some(mut seq) = self.seqs.remove(&id) else {
            return;
        };
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        self.release_blocks(&mut seq);
        self.counters.aborted += 1;
    }

    fn release_blocks(&mut self, seq: &mut Seq) {
        // Tail blocks first, so that they are evicted before the shared head of the prefix.
        for b in seq.blocks.drain(..).rev() {
            self.kv.release(b);
        }
        seq.registered = 0;
    }

    fn preempt_last(&mut self) -> Option<u64> {
        let id = self.running.pop()?;
        let mut seq = self.seqs.remove(&id).expect("running seq exists");
        self.release_blocks(&mut seq);
        seq.computed = 0;
        self.seqs.insert(id, seq);
        self.waiting.push_front(id);
        self.counters.preemptions += 1;
        Some(id)
    }

    /// Plan the next step. None when there is nothing to do.
    pub fn schedule(&mut self) -> Option<Step> {
        let bs = self.cfg.block_size;
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut slots: Vec<Slot> = Vec::new();
        let mut preempted = false;

        // 1. Running requests, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let (need, computed, decode) = {
                let s = &self.seqs[&id];
                (
                    s.num_tokens() - s.computed,
                    s.computed,
                    s.computed >= s.prompt_tokens,
                )
            };
            let n = need.min(budget);
            let want_blocks = (computed + n).div_ceil(bs);
            let mut ok = true;
            while self.seqs[&id].blocks.len() < want_blocks {
                if self.kv.alloc() {
                    self.seqs.get_mut(&id).unwrap().blocks.push(Block::Anon);
                    continue;
                }
                preempted = true;
                match self.preempt_last() {
                    Some(v) if v == id => {
                        ok = false;
                        break;
                    }
                    Some(v) => slots.retain(|s| s.id != v),
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            if !ok {
                break;
            }
            budget -= n;
            slots.push(Slot {
                id,
                tokens: n,
                decode: decode && n == 1,
            });
            i += 1;
        }

        // 2. Waiting requests, first come first served (head-of-line blocking).
        while !preempted
            && budget > 0
            && self.running.len() < self.cfg.max_num_seqs
            && !self.waiting.is_empty()
        {
            let id = self.waiting[0];
            let s = &self.seqs[&id];
            let total = s.num_tokens();
            let mut hit_blocks = self.kv.match_prefix(&s.hashes);
            if hit_blocks * bs >= total {
                // At least one token must be computed to produce logits.
                hit_blocks = (total - 1) / bs;
            }
            let hit_tokens = hit_blocks * bs;
            let n = (total - hit_tokens).min(budget);
            let new_blocks = (hit_tokens + n).div_ceil(bs) - hit_blocks;
            let unreferenced_hits = self.kv.count_unreferenced(&s.hashes[..hit_blocks]);
            if self.kv.available() < new_blocks + unreferenced_hits {
                break;
            }
            let hashes: Vec<BlockHash> = s.hashes[..hit_blocks].to_vec();
            let first = !s.admitted_once;
            let prompt_tokens = s.prompt_tokens;
            let mut blocks = Vec::with_capacity(new_blocks + hit_blocks);
            for h in hashes {
                let ok = self.kv.acquire(h);
                debug_assert!(ok);
                blocks.push(Block::Hashed(h));
            }
            for _ in 0..new_blocks {
                let ok = self.kv.alloc();
                debug_assert!(ok);
                blocks.push(Block::Anon);
            }
            self.counters.prefix_queries += total as u64;
            self.counters.prefix_hits += hit_tokens as u64;
            if first {
                self.counters.prompt_tokens += prompt_tokens as u64;
                self.counters.cached_tokens += hit_tokens.min(prompt_tokens) as u64;
            }
            let s = self.seqs.get_mut(&id).unwrap();
            if first {
                s.cached_tokens = hit_tokens.min(prompt_tokens);
                s.admitted_once = true;
            }
            s.blocks = blocks;
            s.registered = hit_blocks;
            s.computed = hit_tokens;
            self.waiting.pop_front();
            self.running.push(id);
            budget -= n;
            slots.push(Slot {
                id,
                tokens: n,
                decode: false,
            });
        }

        if slots.is_empty() {
            return None;
        }
        let decode_requests = slots.iter().filter(|s| s.decode).count();
        let prefill_tokens: usize = slots.iter().filter(|s| !s.decode).map(|s| s.tokens).sum();
        let duration_s = self.cfg.step_base_s
            + self.cfg.prefill_token_s * prefill_tokens as f64
            + self.cfg.decode_seq_s * decode_requests as f64;
        Some(Step {
            slots,
            prefill_tokens,
            decode_requests,
            duration_s,
        })
    }

    /// Apply a step once its time has passed: advance computed tokens, register full blocks
    /// in the prefix cache, sample one token for every request that caught up, finish requests.
    pub fn complete(&mut self, step: Step) -> Vec<Emission> {
        let bs = self.cfg.block_size;
        let block_chars = self.block_chars();
        self.counters.steps += 1;
        self.counters.busy_s += step.duration_s;
        self.counters.computed_prefill_tokens += step.prefill_tokens as u64;
        let mut out = Vec::new();
        for slot in step.slots {
            let Some(seq) = self.seqs.get_mut(&slot.id) else {
                continue; // aborted meanwhile
            };
            seq.computed += slot.tokens;
            // Offer newly completed full blocks to the prefix cache.
            let full = (seq.computed / bs).min(seq.hashes.len());
            while seq.registered < full {
                let k = seq.registered;
                if seq.blocks[k] == Block::Anon {
                    seq.blocks[k] = self.kv.register(seq.hashes[k]);
                }
                seq.registered += 1;
            }
            if seq.computed < seq.num_tokens() {
                continue; // prefill chunk, no token yet
            }
            // Sample one token: a space and three letters, exactly CHARS_PER_TOKEN chars.
            let mut tok = String::with_capacity(CHARS_PER_TOKEN);
            tok.push(' ');
            for _ in 1..CHARS_PER_TOKEN {
                tok.push(seq.out_rng.lowercase());
            }
            seq.text.push_str(&tok);
            seq.generated += 1;
            seq.extend_hashes(block_chars);
            self.counters.generation_tokens += 1;
            let finished = seq.generated >= seq.max_output;
            out.push(Emission {
                id: slot.id,
                text: tok,
                first: seq.generated == 1,
                finished,
                usage: Usage {
                    prompt_tokens: seq.prompt_tokens,
                    cached_tokens: seq.cached_tokens,
                    completion_tokens: seq.generated,
                },
            });
            if finished {
                let mut seq = self.seqs.remove(&slot.id).unwrap();
                self.running.retain(|&r| r != slot.id);
                self.release_blocks(&mut seq);
                self.counters.finished += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(seed: u64, tokens: usize) -> String {
        let mut r = fastrand::Rng::with_seed(seed);
        (0..tokens * CHARS_PER_TOKEN)
            .map(|_| r.lowercase())
            .collect()
    }

    fn cfg(blocks: usize) -> EngineConfig {
        EngineConfig {
            num_gpu_blocks: blocks,
            max_num_batched_tokens: 2048,
            ..EngineConfig::default()
        }
    }

    /// Runs steps in simulated time until idle; returns (id -> (ttft, e2e, usage)), end time.
    fn drain(e: &mut Engine, t0: f64) -> (HashMap<u64, (f64, f64, Usage)>, f64) {
        let mut t = t0;
        let mut res: HashMap<u64, (f64, f64, Usage)> = HashMap::new();
        let mut guard = 0;
        while let Some(step) = e.schedule() {
            t += step.duration_s;
            for em in e.complete(step) {
                let ent = res.entry(em.id).or_insert((f64::NAN, f64::NAN, em.usage));
                if em.first {
                    ent.0 = t - t0;
                }
                if em.finished {
                    ent.1 = t - t0;
                    ent.2 = em.usage;
                }
            }
            guard += 1;
            assert!(guard < 1_000_000, "engine does not make progress");
        }
        (res, t)
    }

    #[test]
    fn repeated_prompt_hits_the_cache() {
        let mut e = Engine::new(cfg(1024));
        let p = text(1, 1000);
        let a = e.submit(p.clone(), 8).unwrap();
        let (r1, _) = drain(&mut e, 0.0);
        assert_eq!(r1[&a].2.cached_tokens, 0);
        let b = e.submit(p.clone(), 8).unwrap();
        let (r2, _) = drain(&mut e, 0.0);
        let u = r2[&b].2;
        assert_eq!(u.prompt_tokens, 1000);
        // All full blocks but the last (one token must be computed) come from the cache.
        assert_eq!(u.cached_tokens, 992);
        assert!(
            r2[&b].0 < r1[&a].0 / 4.0,
            "cached prompt must be much faster"
        );
        assert_eq!(e.counters.prompt_tokens, 2000);
        assert_eq!(e.counters.cached_tokens, 992);
        // A prompt extending the first one (next conversation turn) reuses its prefix and
        // the generated tokens' full blocks.
        let c = e.submit(format!("{p}{}", text(2, 100)), 8).unwrap();
        let (r3, _) = drain(&mut e, 0.0);
        assert_eq!(r3[&c].2.cached_tokens, 992);
        // A different prompt does not hit.
        let d = e.submit(text(3, 1000), 8).unwrap();
        let (r4, _) = drain(&mut e, 0.0);
        assert_eq!(r4[&d].2.cached_tokens, 0);
    }

    #[test]
    fn eviction_under_pressure_is_lru() {
        // 200 blocks = 3200 tokens: room for two 1600-token prompts, not three.
        let mut e = Engine::new(cfg(200));
        let (a, b, c) = (text(10, 1500), text(11, 1500), text(12, 1500));
        for p in [&a, &b] {
            e.submit(p.clone(), 4).unwrap();
            drain(&mut e, 0.0);
        }
        // Touch A again so B becomes least recently used.
        let id = e.submit(a.clone(), 4).unwrap();
        assert!(drain(&mut e, 0.0).0[&id].2.cached_tokens > 1400);
        e.submit(c.clone(), 4).unwrap();
        drain(&mut e, 0.0);
        assert!(e.kv().evictions() > 0);
        let ida = e.submit(a.clone(), 4).unwrap();
        let ra = drain(&mut e, 0.0).0;
        assert!(
            ra[&ida].2.cached_tokens > 1400,
            "A was recently used and must survive"
        );
        let idb = e.submit(b.clone(), 4).unwrap();
        let rb = drain(&mut e, 0.0).0;
        assert!(
            rb[&idb].2.cached_tokens < 400,
            "B was least recently used and must be evicted (its tail first): {:?} evictions {}",
            rb[&idb].2,
            e.kv().evictions()
        );
    }

    #[test]
    fn ttft_grows_with_uncached_tokens() {
        let mut last = 0.0;
        for tokens in [100, 1000, 4000, 12000] {
            let mut e = Engine::new(cfg(4096));
            let id = e.submit(text(tokens as u64, tokens), 4).unwrap();
            let ttft = drain(&mut e, 0.0).0[&id].0;
            assert!(ttft > last, "{tokens} tokens: ttft {ttft} <= {last}");
            last = ttft;
        }
        // 12000 tokens at a 2048-token budget: 6 prefill steps.
        let c = EngineConfig::default();
        let expect = 6.0 * c.step_base_s + 12000.0 * c.prefill_token_s;
        assert!((last - expect).abs() < 1e-9, "{last} vs {expect}");
    }

    #[test]
    fn chunked_prefill_interleaves_decode_of_running_requests() {
        let mut e = Engine::new(cfg(4096));
        let short = e.submit(text(20, 100), 50).unwrap();
        let s = e.schedule().unwrap();
        assert_eq!(s.prefill_tokens, 100);
        e.complete(s);
        let long = e.submit(text(21, 5000), 2).unwrap();
        let s = e.schedule().unwrap();
        // The decode of the running request comes first, the budget goes to the new prompt.
        assert_eq!(s.decode_requests, 1);
        assert_eq!(s.prefill_tokens, 2047);
        e.complete(s);
        let s = e.schedule().unwrap();
        assert_eq!((s.decode_requests, s.prefill_tokens), (1, 2047));
        e.complete(s);
        let (r, _) = drain(&mut e, 0.0);
        assert_eq!(r[&short].2.completion_tokens, 50);
        assert_eq!(r[&long].2.completion_tokens, 2);
    }

    #[test]
    fn fcfs_queue_waits_for_cache_space_and_preemption_finishes_everything() {
        // 64 blocks = 1024 tokens; eight 300-token prompts with long outputs cannot all run.
        let mut e = Engine::new(cfg(64));
        let ids: Vec<u64> = (0..8)
            .map(|i| e.submit(text(100 + i, 300), 200).unwrap())
            .collect();
        let s = e.schedule().unwrap();
        assert!(e.num_running() < 8 && e.num_waiting() > 0);
        e.complete(s);
        let (r, _) = drain(&mut e, 0.0);
        for id in ids {
            assert_eq!(r[&id].2.completion_tokens, 200);
        }
        assert!(e.counters.preemptions > 0);
        assert!(e.is_idle());
        assert_eq!(e.kv().used(), 0);
    }

    #[test]
    fn too_long_prompt_is_rejected_and_abort_frees_blocks() {
        let mut e = Engine::new(cfg(64));
        assert!(matches!(
            e.submit(text(1, 2000), 1),
            Err(SubmitError::TooLong { .. })
        ));
        let id = e.submit(text(2, 500), 100).unwrap();
        let s = e.schedule().unwrap();
        e.complete(s);
        assert!(e.kv().used() > 0);
        e.abort(id);
        assert_eq!(e.kv().used(), 0);
        assert!(e.is_idle());
        assert!(e.schedule().is_none());
    }

    #[test]
    fn generated_text_is_a_function_of_the_prompt() {
        // Routers that record replies can predict the next turn's prompt only if the same
        // prompt generates the same text on any server, cached or not.
        let collect = |e: &mut Engine, id: u64| {
            let mut out = String::new();
            while let Some(step) = e.schedule() {
                for em in e.complete(step) {
                    if em.id == id {
                        out.push_str(&em.text);
                    }
                }
            }
            out
        };
        let p = text(5, 300);
        let mut a = Engine::new(cfg(1024));
        let ia = a.submit(p.clone(), 12).unwrap();
        let ra = collect(&mut a, ia);
        let ib = a.submit(p.clone(), 12).unwrap();
        let rb = collect(&mut a, ib);
        let mut other = Engine::new(cfg(64));
        let ic = other.submit(p.clone(), 12).unwrap();
        let rc = collect(&mut other, ic);
        assert_eq!(ra.len(), 12 * CHARS_PER_TOKEN);
        assert_eq!(ra, rb);
        assert_eq!(ra, rc);
        let id = a.submit(text(6, 300), 12).unwrap();
        assert_ne!(collect(&mut a, id), ra);
    }
}
