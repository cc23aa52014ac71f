//! One model-server replica and its lock-free counters: in-flight requests, prompt characters
//! still in prefill, passive health (consecutive failures, ejection deadline), the load other
//! gateways reported for it, and its time-to-first-token histograms.
//!
//! The counters ([`EndpointCounters`]) are one struct with one set of update rules whether they
//! live in the endpoint (in-process router) or in a shared-memory slot (nginx workers). In the
//! shared case the load counters ([`Load`]) are kept per router in its ledger and summed when
//! read, so that a worker's death removes exactly its share.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::cells::{saturating_sub, EndpointCounters, Load};
use super::prefill::{HiddenPrefill, PrefillHold};

use crate::prometheus::Histogram;

/// Where an endpoint's counters live.
enum Storage {
    /// In the endpoint itself (in-process router).
    Own(Box<EndpointCounters>),
    /// In a slot of a shared region, with this router's ledger of what it added there.
    Shared(super::shared::SlotLease),
}

/// One model-server replica of a cluster.
pub struct Endpoint {
    /// Router-unique id, used by the prefix index (in shared mode, unique in the region).
    pub id: u32,
    /// Socket address.
    pub addr: SocketAddr,
    /// `ip:port` as hosts need it (IPv6 in brackets).
    pub address: String,
    /// Labels matched by rule subsets (from the config).
    pub labels: std::collections::BTreeMap<String, String>,
    /// LoRA adapters this endpoint serves (from the config).
    pub lora_adapters: Vec<String>,
    storage: Storage,
    /// Time from pick to first token, per model (indexed like `Router` models), made lazily.
    ttft: Box<[OnceLock<Histogram>]>,
    /// What this endpoint's answers reported about themselves (`usage`), this process's share.
    pub answers: AnswerStats,
    /// What the engine's own metrics page said last (`engine_metrics`).
    pub engine: EngineReading,
    /// How long the engine's KV cache keeps a prefix (capacity and turnover).
    pub residency: Residency,
    /// The prefill of this router's requests here whose answers are not streamed.
    pub(super) hidden_prefill: HiddenPrefill,
}

/// How long a prefix stays in the endpoint's KV cache after its last use: an LRU cache of `C`
/// tokens that is written `r` tokens per second keeps what was used within the last `C / r`
/// seconds (Che's approximation of an LRU cache), so a prefix the index lists for the endpoint
/// but last used longer ago than that has most likely been evicted. `C` comes from the
/// engine's metrics page (`engine_metrics`) or the config (`cache_capacity_tokens`); `r` from
/// the engine's own token counters when its metrics page has them (every gateway's and
/// client's writes), else from what this router's answers wrote ([`Endpoint::cache_written`]:
/// prompt tokens computed plus tokens generated), each averaged over windows of
/// [`RATE_WINDOW_MS`]. When neither the engine nor the config gives `C`, it is learned from
/// the engine's answers ([`Residency::learn`]). Unknown capacity or no writes yet: no limit
/// (the index is taken at its word, as before).
#[derive(Default)]
pub struct Residency {
    /// KV cache capacity in tokens the engine reported; 0: not known.
    capacity_tokens: AtomicU64,
    /// Capacity in tokens learned from the answers ([`Residency::learn`]), `f64` bits; 0:
    /// nothing learned yet.
    learned_bits: AtomicU64,
    /// What this router's answers wrote, per ms.
    answers_rate: RateWindow,
    /// What the engine's counters say it wrote (all its traffic), per ms; unset while the
    /// metrics reader has no such counters for it.
    engine_rate: RateWindow,
    /// Tokens written per answer that recompute an evicted claim, moving average
    /// ([`Residency::eviction_share`], `f64` bits).
    lost_bits: AtomicU64,
    /// Tokens written per answer, moving average over the same answers (`f64` bits).
    written_bits: AtomicU64,
    /// Pick-to-first-token time of the recent requests here, a decaying maximum (ms, `f64`
    /// bits): how long a claim made at a pick may still be computing
    /// ([`Residency::settle_ms`]).
    first_token_bits: AtomicU64,
}

/// The shortest window over which the write rate is measured, ms.
pub const RATE_WINDOW_MS: u64 = 2_000;

/// Weight of the newest window in the write rate's moving average.
const RATE_STEP: f64 = 0.3;

/// A claim younger than this says nothing about the capacity: the request that made it may
/// still be computing the prefix (the index records a prefix at the pick). On a loaded
/// endpoint the wait is longer: see [`Residency::settle_ms`].
const LEARN_MIN_AGE_MS: u64 = 1_000;

/// How much the decaying maximum of the pick-to-first-token time forgets per first token
/// (about the last 64 requests count).
const FIRST_TOKEN_DECAY: f64 = 1.0 / 64.0;

/// The engine kept at least this share of a claim: the claim held.
const LEARN_KEPT: f64 = 0.8;

/// The engine kept at most this share of a claim: the claim's prefix was evicted.
const LEARN_EVICTED: f64 = 0.2;

/// How far one answer moves the learned capacity toward what it shows.
const LEARN_STEP: f64 = 0.25;

/// Weight of one answer in the eviction share's moving averages (about the last 64 answers).
const EVICTION_STEP: f64 = 1.0 / 64.0;

impl Residency {
    /// Records the capacity the engine reports, in tokens (0: unknown).
    pub fn set_capacity(&self, tokens: u64) {
        self.capacity_tokens.store(tokens, Ordering::Relaxed);
    }

    /// The capacity the engine reported, if any.
    pub fn capacity(&self) -> Option<u64> {
        Some(self.capacity_tokens.load(Ordering::Relaxed)).filter(|&c| c > 0)
    }

    /// Tokens written per ms, as last averaged: the engine's counters' rate when known, else
    /// the answers'; `None` before a first full window.
    pub fn write_rate(&self) -> Option<f64> {
        self.engine_rate.rate().or_else(|| self.answers_rate.rate())
    }

    /// True while the write rate comes from the engine's own counters.
    pub fn rate_from_engine(&self) -> bool {
        self.engine_rate.rate().is_some()
    }

    /// Records the engine's written-tokens counter as its metrics page showed it `now_ms`
    /// (`None`: the page had no such counters or could not be read, and the rate falls back to
    /// the answers' until it has them again).
    pub fn engine_written(&self, written: Option<u64>, now_ms: u64) {
        match written {
            Some(tokens) => self.engine_rate.advance(tokens, now_ms),
            None => self.engine_rate.reset(),
        }
    }

    /// Records that a request picked here `ms` ago has its first token: its prompt's prefix
    /// is computed. Races may lose an update: a routing hint, never unsafe.
    pub fn note_first_token(&self, ms: f64) {
        let recent = f64::from_bits(self.first_token_bits.load(Ordering::Relaxed));
        let next = (recent * (1.0 - FIRST_TOKEN_DECAY)).max(ms);
        self.first_token_bits
            .store(next.to_bits(), Ordering::Relaxed);
    }

    /// How old a claim must be to say whether the engine kept it, ms: the request that made
    /// it (at its pick) may still be computing the prefix until its first token, which on a
    /// loaded endpoint or for a long prompt comes seconds after the pick. At least
    /// [`LEARN_MIN_AGE_MS`], else the recent pick-to-first-token times' decaying maximum: a
    /// prompt that finds its prefix still being computed is a miss that evicted nothing, and
    /// taken for an eviction it would set the learned capacity to a few seconds of writes.
    pub fn settle_ms(&self) -> u64 {
        let recent = f64::from_bits(self.first_token_bits.load(Ordering::Relaxed));
        LEARN_MIN_AGE_MS.max(recent.ceil() as u64)
    }

    /// The capacity learned from the answers, tokens; `None` before the first eviction seen.
    pub fn learned_capacity(&self) -> Option<f64> {
        Some(f64::from_bits(self.learned_bits.load(Ordering::Relaxed))).filter(|&c| c > 0.0)
    }

    /// Learns the capacity from one answer: the index claimed the share `claimed` of the
    /// prompt for this endpoint, the deepest chunk of that claim last used there `age_ms` ago,
    /// and the engine had the share `engine` cached; it kept `engine / claimed` of the claim
    /// (claims under a quarter of the prompt say little and are skipped). In an LRU cache a
    /// prefix survives while fewer than `C` tokens were written after its last use, here about
    /// `age_ms` × the write rate: a claim evicted after fewer writes than the estimate lowers
    /// it, one kept after more raises it, each a [`LEARN_STEP`] of the way; the first
    /// eviction sets it. Claims younger than [`Residency::settle_ms`] (perhaps still being
    /// computed), partly kept claims and claims before a write rate is known teach nothing.
    /// Racing updates may lose one step: a routing hint, never unsafe.
    pub fn learn(&self, age_ms: u64, claimed: f64, engine: f64) {
        let Some(rate) = self.write_rate() else {
            return;
        };
        if age_ms < self.settle_ms() || !(claimed >= TRUST_MIN_CLAIM && engine.is_finite()) {
            return;
        }
        let kept = (engine / claimed).clamp(0.0, 1.0);
        let written = age_ms as f64 * rate;
        let next = match self.learned_capacity() {
            None if kept <= LEARN_EVICTED => written,
            Some(c) if kept <= LEARN_EVICTED && written < c => c + LEARN_STEP * (written - c),
            Some(c) if kept >= LEARN_KEPT && written > c => c + LEARN_STEP * (written - c),
            _ => return,
        };
        self.learned_bits.store(next.to_bits(), Ordering::Relaxed);
    }

    /// The share of what this endpoint's answers write into its KV cache that recomputes a
    /// prefix the index listed there and the engine had evicted, as a moving average over
    /// recent answers (0 until answers tell): in a full cache every token written evicts one,
    /// so this is about how often an evicted token is requested again. Near 0 where the cache
    /// keeps what is reused, high where it is too small for the traffic it gets.
    pub fn eviction_share(&self) -> f64 {
        let written = f64::from_bits(self.written_bits.load(Ordering::Relaxed));
        let lost = f64::from_bits(self.lost_bits.load(Ordering::Relaxed));
        if written > 0.0 {
            (lost / written).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    /// Folds one answer into the eviction share: it wrote `written` tokens (prompt tokens
    /// computed plus generated); its prompt had `prompt_tokens`, of which the index claimed
    /// the share `claimed` for this endpoint (0: nothing listed), last used there `age_ms`
    /// ago, and the engine had the share `engine` cached. A claim younger than
    /// [`Residency::settle_ms`] may still have been computing: it counts as kept.
    pub fn note_writes(
        &self,
        written: u64,
        prompt_tokens: u64,
        claimed: f64,
        age_ms: u64,
        engine: f64,
    ) {
        let lost = if age_ms >= self.settle_ms() && engine.is_finite() {
            (claimed - engine).max(0.0) * prompt_tokens as f64
        } else {
            0.0
        };
        step_toward(&self.written_bits, written as f64, EVICTION_STEP);
        step_toward(&self.lost_bits, lost, EVICTION_STEP);
    }

    /// Capacity (this endpoint's reported one, else `default_capacity`, else the learned one;
    /// 0: unknown) over the write rate as last averaged, ms; `None` when either is unknown.
    fn current_ms(&self, default_capacity: u64) -> Option<f64> {
        let capacity = match self.capacity().unwrap_or(default_capacity) {
            0 => self.learned_capacity()?,
            c => c as f64,
        };
        let rate = self.write_rate()?;
        Some(capacity / rate)
    }

    /// True when the capacity comes from the engine or the config: nothing to learn.
    pub fn capacity_given(&self, default_capacity: u64) -> bool {
        self.capacity().is_some() || default_capacity > 0
    }

    /// The horizon as last measured (no new window), seconds; `None` when capacity or rate
    /// is unknown.
    pub fn horizon_secs(&self, default_capacity: u64) -> Option<f64> {
        self.current_ms(default_capacity).map(|ms| ms / 1000.0)
    }

    /// How long after its last use a prefix is likely still cached, ms (see
    /// [`Residency::horizon_secs`]), after folding in the writes of a window that is over;
    /// `u64::MAX` when capacity or rate is unknown. `written` is the endpoint's written
    /// tokens now.
    pub fn horizon_ms(&self, written: u64, now_ms: u64, default_capacity: u64) -> u64 {
        self.answers_rate.advance(written, now_ms);
        self.current_ms(default_capacity)
            .map_or(u64::MAX, |ms| ms.min(u64::MAX as f64) as u64)
    }
}

/// A write rate measured from a growing counter of written tokens: the counter's growth over
/// windows of at least [`RATE_WINDOW_MS`], as a moving average.
#[derive(Default)]
struct RateWindow {
    /// Router ms when the current window opened; 0: never.
    window_ms: AtomicU64,
    /// The counter when it opened.
    window_tokens: AtomicU64,
    /// Tokens written per ms, moving average (`f64` bits; 0: none measured).
    rate_bits: AtomicU64,
}

impl RateWindow {
    /// Tokens per ms as last averaged; `None` before a first full window.
    fn rate(&self) -> Option<f64> {
        Some(f64::from_bits(self.rate_bits.load(Ordering::Relaxed))).filter(|&r| r > 0.0)
    }

    /// Folds the growth since the window opened into the rate once the window is
    /// [`RATE_WINDOW_MS`] long; `written` is the counter now. Racing callers: one wins the
    /// window, the others leave it.
    fn advance(&self, written: u64, now_ms: u64) {
        let opened = self.window_ms.load(Ordering::Relaxed);
        if opened != 0 && now_ms.saturating_sub(opened) < RATE_WINDOW_MS {
            return;
        }
        if self
            .window_ms
            .compare_exchange(opened, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let before = self.window_tokens.swap(written, Ordering::Relaxed);
        if opened == 0 || written < before {
            return; // the first window, or the counter was reset: start over
        }
        let rate = (written - before) as f64 / (now_ms - opened) as f64;
        let next = match self.rate() {
            Some(old) => old + RATE_STEP * (rate - old),
            None => rate,
        };
        self.rate_bits.store(next.to_bits(), Ordering::Relaxed);
    }

    /// Forgets the rate and the window: the next [`RateWindow::advance`] opens a first one.
    fn reset(&self) {
        self.window_ms.store(0, Ordering::Relaxed);
        self.rate_bits.store(0, Ordering::Relaxed);
    }
}

/// Moves the moving average held as `f64` bits in `bits` a `step` of the way toward `value`.
/// Racing updates may lose one step: the averages are routing hints, never unsafe.
fn step_toward(bits: &AtomicU64, value: f64, step: f64) {
    let old = f64::from_bits(bits.load(Ordering::Relaxed));
    bits.store((old + step * (value - old)).to_bits(), Ordering::Relaxed);
}

/// What the endpoint's engine reported running plus waiting beyond this router's own requests
/// at that moment (other gateways', other clients'), and when (written by the metrics reader
/// thread, read by scoring without locks). Kept as that excess, not as the engine's total, so
/// the router's later picks add to it at once instead of vanishing under a stale total.
#[derive(Default)]
pub struct EngineReading {
    others: AtomicU64,
    /// Router clock ms of the reading; 0: never read.
    at_ms: AtomicU64,
}

impl EngineReading {
    /// Records a reading at `now_ms`: the engine runs and queues `requests`, of which `own`
    /// are this router's (its in-flight count when the reading arrived).
    pub fn set(&self, requests: u64, own: u64, now_ms: u64) {
        self.others
            .store(requests.saturating_sub(own), Ordering::Relaxed);
        self.at_ms.store(now_ms.max(1), Ordering::Relaxed);
    }

    /// Requests of others at the last reading, unless it is older than `stale_ms` (or there
    /// is none).
    pub fn others(&self, now_ms: u64, stale_ms: u64) -> Option<u64> {
        let at = self.at_ms.load(Ordering::Relaxed);
        (at != 0 && now_ms.saturating_sub(at) <= stale_ms)
            .then(|| self.others.load(Ordering::Relaxed))
    }
}

/// Per-endpoint counts from the answers' `usage`, beside what the router predicted for the same
/// requests: the engine's own prefix-cache hit rate (cached / prompt tokens) next to the
/// router's estimate (predicted cached / prompt characters), and time per output token.
pub struct AnswerStats {
    /// Answers that reported `usage`.
    pub answers: AtomicU64,
    /// Per model slot: `usage.prompt_tokens`, `completion_tokens` and
    /// `prompt_tokens_details.cached_tokens` summed (in [`TOKEN_KINDS`] order).
    pub tokens: Box<[[AtomicU64; 3]]>,
    /// Prompt characters of the answers that reported `cached_tokens`.
    pub prompt_chars: AtomicU64,
    /// Of those, the characters the router expected the endpoint to hold at pick.
    pub predicted_cached_chars: AtomicU64,
    /// (last byte − first byte) / (completion tokens − 1), per answer with ≥ 2 tokens.
    pub time_per_output_token: OnceLock<Histogram>,
    /// How far the prefix index's claims for this endpoint hold ([`Self::cache_trust`]), as
    /// `f64` bits.
    cache_trust: AtomicU64,
}

/// An answer corrects the cache trust only when the index claimed at least this share of its
/// prompt (a small claim says little about what the engine keeps).
const TRUST_MIN_CLAIM: f64 = 0.25;

/// Weight of one answer in the cache trust's moving average (about the last 32 answers).
const TRUST_STEP: f64 = 1.0 / 32.0;

/// The `kind` labels of `llmproxy_tokens_total`, in the order of [`AnswerStats::tokens`].
pub const TOKEN_KINDS: [&str; 3] = ["prompt", "completion", "cached"];

impl AnswerStats {
    /// Zeroed counts for `models` model slots.
    pub fn new(models: usize) -> Self {
        Self {
            answers: AtomicU64::new(0),
            tokens: (0..models).map(|_| Default::default()).collect(),
            prompt_chars: AtomicU64::new(0),
            predicted_cached_chars: AtomicU64::new(0),
            time_per_output_token: OnceLock::new(),
            cache_trust: AtomicU64::new(1f64.to_bits()),
        }
    }

    /// True once an answer from this endpoint reported cached tokens (`cached_tokens` > 0).
    /// Until then its `cached_tokens` are not taken as the engine's word on its cache: an
    /// engine, fork, simulator or proxy that fills the field with 0 whatever it holds would
    /// otherwise teach the router that the endpoint keeps nothing (trust, capacity and
    /// eviction share all at their worst) and end cache-aware routing to it. An engine that
    /// really keeps nothing never passes this test either and is routed as one that does
    /// not report: its claims cost some affinity, not the fleet's cache.
    pub fn reports_cache_hits(&self) -> bool {
        // the cached tokens counted per model (one slot per configured model: a few loads)
        (self.tokens.iter()).any(|t| t[2].load(Ordering::Relaxed) > 0)
    }

    /// `usage` as the engine's word on its cache: its `cached_tokens` only when the endpoint
    /// [reports cache hits](Self::reports_cache_hits).
    pub fn cache_word(&self, usage: crate::response::Usage) -> crate::response::Usage {
        if self.reports_cache_hits() {
            usage
        } else {
            crate::response::Usage {
                cached_tokens: None,
                ..usage
            }
        }
    }

    /// The share of what the prefix index claims for this endpoint that its engine really
    /// had cached, as a moving average over recent answers (1 until answers tell otherwise):
    /// the engine evicts what the index still lists when its KV cache is smaller than the
    /// index. Scoring multiplies the index's cache ratio by it (`cache_feedback`).
    pub fn cache_trust(&self) -> f64 {
        f64::from_bits(self.cache_trust.load(Ordering::Relaxed))
    }

    /// Corrects the cache trust with one answer: the index claimed `claimed` of its prompt
    /// (cache ratio at pick), the engine reported `engine` (cached / prompt tokens). An
    /// engine holding more than claimed (other gateways' traffic) counts as a kept claim.
    /// Racing updates may lose one answer's step: a routing hint, never unsafe.
    pub fn correct_cache_trust(&self, claimed: f64, engine: f64) {
        if !(claimed >= TRUST_MIN_CLAIM && engine.is_finite()) {
            return;
        }
        let kept = (engine / claimed).clamp(0.0, 1.0);
        step_toward(&self.cache_trust, kept, TRUST_STEP);
    }

    /// Counts one answer's usage for the model in `slot`; `predicted_cached_chars` of its
    /// `prompt_chars` were expected in the cache; `decode_secs` is the time from its first
    /// byte to its end, if known.
    pub fn record(
        &self,
        slot: usize,
        usage: &crate::response::Usage,
        prompt_chars: u64,
        predicted_cached_chars: u64,
        decode_secs: Option<f64>,
    ) {
        self.answers.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = self.tokens.get(slot) {
            t[0].fetch_add(usage.prompt_tokens, Ordering::Relaxed);
            t[1].fetch_add(usage.completion_tokens, Ordering::Relaxed);
            t[2].fetch_add(usage.cached_tokens.unwrap_or(0), Ordering::Relaxed);
        }
        if usage.cached_tokens.is_some() {
            self.prompt_chars.fetch_add(prompt_chars, Ordering::Relaxed);
            self.predicted_cached_chars
                .fetch_add(predicted_cached_chars, Ordering::Relaxed);
        }
        if let (Some(secs), true) = (decode_secs, usage.completion_tokens >= 2) {
            self.time_per_output_token
                .get_or_init(Histogram::latency)
                .observe(secs / (usage.completion_tokens - 1) as f64);
        }
    }
}

impl Endpoint {
    /// A fresh endpoint with zeroed counters of its own; `models` is the number of TTFT
    /// histogram slots.
    pub fn new(id: u32, addr: SocketAddr, models: usize) -> Self {
        Self::with_storage(
            id,
            addr,
            models,
            Storage::Own(Box::new(EndpointCounters::new())),
        )
    }

    /// An endpoint whose counters live in a shared region slot.
    pub(super) fn shared(addr: SocketAddr, models: usize, lease: super::shared::SlotLease) -> Self {
        Self::with_storage(lease.endpoint_id(), addr, models, Storage::Shared(lease))
    }

    fn with_storage(id: u32, addr: SocketAddr, models: usize, storage: Storage) -> Self {
        Self {
            id,
            addr,
            address: addr.to_string(),
            labels: Default::default(),
            lora_adapters: Vec::new(),
            storage,
            ttft: (0..models).map(|_| OnceLock::new()).collect(),
            answers: AnswerStats::new(models),
            engine: EngineReading::default(),
            residency: Residency::default(),
            hidden_prefill: HiddenPrefill::default(),
        }
    }

    fn c(&self) -> &EndpointCounters {
        match &self.storage {
            Storage::Own(c) => c,
            Storage::Shared(lease) => lease.counters(),
        }
    }

    /// The endpoint's `which` load: its own counter, or the sum of every router's share.
    fn load(&self, which: Load) -> u64 {
        match &self.storage {
            Storage::Own(c) => c.load_cell(which).load(Ordering::Relaxed),
            Storage::Shared(lease) => lease.load(which),
        }
    }

    /// Adds `v` to this router's part of the `which` load.
    fn add(&self, which: Load, v: u64) {
        match &self.storage {
            Storage::Own(c) => {
                c.load_cell(which).fetch_add(v, Ordering::Relaxed);
            }
            Storage::Shared(lease) => lease.add(which, v),
        }
    }

    /// Takes `v` back from this router's part of the `which` load (never below zero).
    fn sub(&self, which: Load, v: u64) {
        match &self.storage {
            Storage::Own(c) => saturating_sub(c.load_cell(which), v),
            Storage::Shared(lease) => lease.sub(which, v),
        }
    }

    /// Counts `tokens` written into the endpoint's KV cache by an answer (see [`Residency`]).
    pub fn cache_written(&self, tokens: u64) {
        self.c()
            .cache_written_tokens
            .fetch_add(tokens, Ordering::Relaxed);
    }

    /// Tokens written into the endpoint's KV cache by the answers of every router sharing
    /// its counters.
    pub fn cache_written_tokens(&self) -> u64 {
        self.c().cache_written_tokens.load(Ordering::Relaxed)
    }

    /// How long after its last use a prefix is likely still in this endpoint's KV cache, ms
    /// (`u64::MAX`: no limit known); see [`Residency`].
    pub fn cache_horizon_ms(&self, now_ms: u64, default_capacity: u64) -> u64 {
        self.residency
            .horizon_ms(self.cache_written_tokens(), now_ms, default_capacity)
    }

    /// True when the counters live in a shared region.
    pub fn is_shared(&self) -> bool {
        !matches!(self.storage, Storage::Own(_))
    }

    /// Requests picked for this endpoint and not yet finished.
    pub fn in_flight(&self) -> u64 {
        self.load(Load::InFlight)
    }

    /// Prompt characters of requests that have not produced their first token yet.
    pub fn prefill_chars(&self) -> u64 {
        self.load(Load::Prefill)
    }

    /// Prompt characters still in prefill that the endpoint must compute (not cached).
    pub fn uncached_prefill_chars(&self) -> u64 {
        self.load(Load::Uncached)
    }

    /// Total picks of this endpoint.
    pub fn picks(&self) -> u64 {
        self.c().picks.load(Ordering::Relaxed)
    }

    /// Total failed requests (502/503/504 from upstream).
    pub fn failures(&self) -> u64 {
        self.c().failures.load(Ordering::Relaxed)
    }

    /// Total times this endpoint was ejected.
    pub fn ejections(&self) -> u64 {
        self.c().ejections.load(Ordering::Relaxed)
    }

    /// Accounts a new request with `prompt_chars` of prompt, `uncached_chars` of which the
    /// endpoint must compute; `streamed` when its answer is. Its prefill is held until
    /// [`Endpoint::first_token`] or [`Endpoint::drop_prefill`] (or, not streamed, until a later
    /// pick's first token: `prefill.rs`).
    pub fn acquire(&self, prompt_chars: u64, uncached_chars: u64, streamed: bool) -> PrefillHold {
        let pick = self.c().picks.fetch_add(1, Ordering::Relaxed) + 1;
        self.add(Load::InFlight, 1);
        self.add(Load::Prefill, prompt_chars);
        self.add(Load::Uncached, uncached_chars);
        let hold = PrefillHold {
            pick,
            prompt_chars,
            uncached_chars,
            streamed,
        };
        if !streamed {
            self.hidden_prefill.keep(hold);
        }
        hold
    }

    /// The request of `hold` has its first token: its prefill is over, and so is that of
    /// every non-streamed request picked here before it.
    pub fn first_token(&self, hold: PrefillHold) {
        self.drop_prefill(hold);
        self.c()
            .first_token_pick
            .fetch_max(hold.pick, Ordering::Relaxed);
        self.sweep_prefill();
    }

    /// The request of `hold` ends (or moves) before its first token: its prefill no longer
    /// counts (a no-op when a later first token already released it).
    pub fn drop_prefill(&self, hold: PrefillHold) {
        if hold.streamed {
            self.release_prefill(hold.prompt_chars, hold.uncached_chars);
        } else if let Some(h) = self.hidden_prefill.take(hold.pick) {
            self.release_prefill(h.prompt_chars, h.uncached_chars);
        }
    }

    /// Releases the prefill of this router's non-streamed requests that a later pick's first
    /// token (from any router sharing the counters) has shown to be over. Lock-free when
    /// there is nothing to release.
    pub fn sweep_prefill(&self) {
        let done = self.c().first_token_pick.load(Ordering::Relaxed);
        for h in self.hidden_prefill.take_up_to(done) {
            self.release_prefill(h.prompt_chars, h.uncached_chars);
        }
    }

    /// Releases prefill counted by [`Endpoint::acquire`].
    pub fn release_prefill(&self, prompt_chars: u64, uncached_chars: u64) {
        self.sub(Load::Prefill, prompt_chars);
        self.sub(Load::Uncached, uncached_chars);
    }

    /// Releases the request itself (finished).
    pub fn release_request(&self) {
        self.sub(Load::InFlight, 1);
    }

    /// True when the endpoint is ejected at `now_ms`.
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.c().ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Records a failed request; ejects the endpoint for `eject_ms` after `threshold`
    /// consecutive failures. Returns true when this failure ejected it.
    pub fn record_failure(&self, now_ms: u64, threshold: u32, eject_ms: u64) -> bool {
        let c = self.c();
        c.failures.fetch_add(1, Ordering::Relaxed);
        let n = c.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if threshold == 0 || n < threshold {
            return false;
        }
        let until = c.ejected_until_ms.load(Ordering::Relaxed);
        // Of the failures racing past the threshold on different workers, one ejects
        // (found by tests/loom/tests/state.rs: a plain store ejected, and counted, once per worker).
        if until > now_ms
            || c.ejected_until_ms
                .compare_exchange(
                    until,
                    now_ms + eject_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return false;
        }
        // After the ejection ends, one more failure ejects again (half-open).
        c.consecutive_failures
            .store(threshold.saturating_sub(1), Ordering::Relaxed);
        c.ejections.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Records a successful request: the failure streak ends.
    pub fn record_success(&self) {
        self.c().consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// The endpoint's name on the Metadata-Center wire.
    pub fn wire_id(&self, identity: crate::config::EndpointIdentity) -> String {
        match identity {
            crate::config::EndpointIdentity::IpPort => self.address.clone(),
            crate::config::EndpointIdentity::Ip => self.addr.ip().to_string(),
        }
    }

    /// The sync thread delivered an add of `prompt_chars`.
    pub fn reported_add(&self, prompt_chars: u64) {
        self.add(Load::ReportedInFlight, 1);
        self.add(Load::ReportedPrefill, prompt_chars);
    }

    /// The sync thread delivered a release of `requests` and `prompt_chars`.
    pub fn reported_release(&self, requests: u64, prompt_chars: u64) {
        self.sub(Load::ReportedInFlight, requests);
        self.sub(Load::ReportedPrefill, prompt_chars);
    }

    /// Stores a polled total, minus what this gateway itself reported (so its own requests,
    /// counted live in the local atomics, are not counted twice).
    pub fn set_remote_load(&self, total_in_flight: u64, total_prefill: u64, at_ms: u64) {
        let c = self.c();
        let (orphan_q, orphan_l) = c.orphans(at_ms);
        let own_q = self.load(Load::ReportedInFlight) + orphan_q;
        let own_l = self.load(Load::ReportedPrefill) + orphan_l;
        c.remote_in_flight
            .store(total_in_flight.saturating_sub(own_q), Ordering::Relaxed);
        c.remote_prefill
            .store(total_prefill.saturating_sub(own_l), Ordering::Relaxed);
        c.remote_at_ms.store(at_ms.max(1), Ordering::Relaxed);
    }

    /// Requests other gateways had in flight here at the last poll (0 when never polled).
    pub fn remote_in_flight(&self) -> u64 {
        self.c().remote_in_flight.load(Ordering::Relaxed)
    }

    /// Load other gateways put here, if polled within `stale_ms` of `now_ms`.
    pub fn remote_load(&self, now_ms: u64, stale_ms: u64) -> Option<(u64, u64)> {
        let c = self.c();
        let at = c.remote_at_ms.load(Ordering::Relaxed);
        (at != 0 && now_ms.saturating_sub(at) <= stale_ms).then(|| {
            (
                c.remote_in_flight.load(Ordering::Relaxed),
                c.remote_prefill.load(Ordering::Relaxed),
            )
        })
    }

    /// Histogram of time to first token for model slot `model`.
    pub fn ttft(&self, model: usize) -> Option<&Histogram> {
        self.ttft
            .get(model)
            .map(|slot| slot.get_or_init(Histogram::latency))
    }

    /// TTFT histograms that have been used, by model slot.
    pub fn ttft_histograms(&self) -> impl Iterator<Item = (usize, &Histogram)> {
        self.ttft
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.get().map(|h| (i, h)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_trust_follows_the_engines_word_on_substantial_claims() {
        let a = AnswerStats::new(1);
        assert_eq!(
            a.cache_trust(),
            1.0,
            "the index is trusted until answers say otherwise"
        );
        // claims below a quarter of the prompt, or garbage, say nothing
        a.correct_cache_trust(0.2, 0.0);
        a.correct_cache_trust(0.9, f64::NAN);
        a.correct_cache_trust(f64::NAN, 0.0);
        assert_eq!(a.cache_trust(), 1.0);
        // the engine holds more than claimed (another gateway's traffic): a kept claim
        a.correct_cache_trust(0.5, 0.9);
        assert_eq!(a.cache_trust(), 1.0);
        // the engine keeps half of each claim: the trust converges to 1/2
        for _ in 0..400 {
            a.correct_cache_trust(0.8, 0.4);
        }
        assert!((a.cache_trust() - 0.5).abs() < 1e-3, "{}", a.cache_trust());
        // one answer moves it by 1/32 of the difference
        a.correct_cache_trust(0.8, 0.8);
        assert!((a.cache_trust() - (0.5 + 0.5 / 32.0)).abs() < 1e-3);
    }
}
