//! The pick path, top down: [`RouterInner::prepare`] parses the request and matches its rule
//! (parse → rule → subset → upstream rewrites → prefix hashes), then [`RouterInner::choose`]
//! picks and accounts an endpoint (candidates → cache depth → select → account → report).
//! Each step is a named function; nothing here does I/O or waits.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::affinity::session_name;
use super::log_line::{CandidateView, PickView};
use super::{find_header, HeaderRef, RemoteDepth, RouterInner};
use crate::background::{Event, RequestSync};
use crate::balancer::{CandidateLoad, Selection};
use crate::config::{Backend, LbParams, Rule, Subset};
use crate::error::PickError;
use crate::hashing;
use crate::request::{self, RequestKind};
use crate::response::ResponseReader;
use crate::state::{Cluster, Endpoint, EndpointSet, PrefillHold};
use crate::transcode::{self, Transcoder, UpstreamRequest};

/// The routing part of a picked request: what `prepare` found and `choose` decided.
pub(super) struct Routed {
    pub(super) rule: Arc<Rule>,
    pub(super) cluster: Arc<Cluster>,
    /// None after a retry found no other endpoint.
    pub(super) endpoint: Option<Arc<Endpoint>>,
    /// Ids of the endpoints tried so far (a retry never goes back to one).
    pub(super) tried: Vec<u32>,
    pub(super) model: String,
    pub(super) model_slot: usize,
    pub(super) stream: bool,
    pub(super) prompt_chars: u64,
    /// The prefill this request holds on its endpoint until its first token: its prompt
    /// characters and those the endpoint must compute (not expected in its cache).
    pub(super) prefill: PrefillHold,
    pub(super) prefix_hashes: Vec<u64>,
    /// The session's key in the prefix index (`session_affinity`, when the request names one).
    pub(super) session: Option<u64>,
    /// Responses API: the key of the `previous_response_id` it continues
    /// ([`hashing::response_key`]).
    pub(super) chain: Option<u64>,
    /// A request on a stored Responses answer (retrieve, delete, cancel): the key of its id,
    /// to which it is pinned ([`super::stored`]); no prompt, no TTFT, its answer not read.
    pub(super) stored_answer: Option<u64>,
    /// The stored answer is bound to no endpoint here: the Metadata-Center is asked where
    /// it is ([`RouterInner::find_stored_answer`]).
    pub(super) stored_remote: bool,
    /// Responses API: the answer's id was bound to the endpoint ([`RouterInner::bind_response`]).
    pub(super) response_bound: bool,
    /// The Metadata-Center is asked where the chain's answer is (another gateway bound it),
    /// not for the prompt's cache: its answer is read by [`RouterInner::chain_endpoint`].
    pub(super) chain_remote: bool,
    /// Share of the prompt's chunks the prefix index lists for the chosen endpoint.
    pub(super) cache_ratio: f64,
    /// Share of the prompt the pick expected the endpoint's engine to have cached: the
    /// index's `cache_ratio` times the endpoint's cache trust (with `cache_feedback`).
    pub(super) expected_cache_ratio: f64,
    /// What the prefix index listed for the chosen endpoint whatever its age, when its
    /// capacity is being learned: (share of the prompt's chunks, age of the deepest in ms).
    pub(super) claim: Option<(f64, u64)>,
    /// Metadata-Center identity of the current attempt (its prefix was saved with it).
    pub(super) sync: Option<Arc<RequestSync>>,
    /// The model name the backend receives.
    pub(super) upstream_model: String,
    /// Index of the rule subset chosen for this request.
    pub(super) subset: Option<usize>,
    /// Path/body rewrites for the upstream.
    pub(super) upstream: UpstreamRequest,
    /// Response transcoder (also detects the first token).
    pub(super) transcoder: Transcoder,
    /// Reading of the answer: its usage, and its text when it is learned.
    pub(super) answer: ResponseReader,
    /// The prompt's hasher at its end, to learn the next turn's prefix from the answer
    /// (`learn_response_bytes` > 0 and a next turn that extends this prompt).
    pub(super) learn_tail: Option<hashing::PrefixHasher>,
    /// How the last pick decided, for the request log (`log.include_candidates`).
    pub(super) pick_view: Option<Box<PickView>>,
}

impl RouterInner {
    /// Parses the request and matches its rule: everything but the endpoint choice.
    pub(super) fn prepare(&self, headers: &[HeaderRef], body: &[u8]) -> Result<Routed, PickError> {
        let limit = self.config.max_body_bytes;
        if body.len() as u64 > limit {
            return Err(PickError::PayloadTooLarge {
                size: body.len() as u64,
                limit,
            });
        }
        let kind = find_header(headers, ":path")
            .and_then(|p| std::str::from_utf8(p).ok())
            .and_then(RequestKind::from_path);
        // (a path of no API kind may name a stored answer)
        if let Some(stored) = kind
            .is_none()
            .then(|| self.prepare_stored(headers))
            .flatten()
        {
            return stored;
        }
        let learn_bytes = self.config.learn_response_bytes;
        let affinity = self.config.session_affinity.as_ref();
        let extract = request::Extract {
            tail: learn_bytes > 0,
            user: affinity.is_some_and(|a| a.user_field),
            cache_key: affinity.is_some_and(|a| a.cache_key_field),
            media_part_tokens: self.config.media_part_tokens,
            default_model: match self.model_names.as_slice() {
                [only] => Some(only.as_str()),
                _ => None,
            },
        };
        let (parsed, tail) =
            request::parse_with_tail(body, kind, self.config.hash_chunk_bytes, extract)?;
        let route = self
            .models
            .get(&parsed.model)
            .ok_or_else(|| PickError::ModelNotFound {
                message: format!("the model `{}` does not exist", parsed.model),
            })?;
        let rule = match_rule(&route.rules, headers).ok_or_else(|| PickError::ModelNotFound {
            message: format!(
                "no routing rule of model `{}` matches the request headers",
                parsed.model
            ),
        })?;
        let cluster = self
            .clusters
            .get(&rule.cluster)
            .ok_or_else(|| PickError::NoEndpoint {
                cluster: rule.cluster.clone(),
            })?;
        // A weighted subset (labels / LoRA adapter), then the model the backend serves.
        let subset = pick_subset(&rule.subset);
        let lora = subset.map(|i| rule.subset[i].lora.as_str()).unwrap_or("");
        let upstream_model = if !lora.is_empty() {
            lora
        } else if !rule.target_model.is_empty() {
            rule.target_model.as_str()
        } else {
            parsed.model.as_str()
        };
        let triton = (rule.backend == Backend::Triton).then_some(rule.chat_template);
        let (upstream, transcoder) = transcode::plan(
            body,
            transcode::PlanOptions {
                kind: parsed.kind,
                client_model: &parsed.model,
                upstream_model,
                triton_template: triton,
                stream: parsed.stream,
                force_stream_usage: self.config.force_stream_usage,
            },
        )?;
        let mut prefix_hashes = parsed.prefix_hashes;
        hashing::salt_for_served_model(&mut prefix_hashes, &parsed.model, upstream_model);
        // Every answer is read for its usage; its text only to learn it or to log it.
        let mut text_cap = if tail.is_some() { learn_bytes } else { 0 };
        if self.config.log.enabled && self.config.log.include_prompt {
            text_cap = text_cap.max(self.config.log.prompt_max_bytes);
        }
        let mut answer = ResponseReader::new(parsed.kind, text_cap);
        if parsed.token_prompt {
            answer = answer.reading_token_ids();
        }
        let session = affinity
            .and_then(|a| {
                let fields = [parsed.cache_key.as_deref(), parsed.user.as_deref()];
                session_name(a, headers, fields)
            })
            .map(|name| hashing::session_key(&parsed.model, name));
        let chain = parsed
            .previous_response
            .as_deref()
            .map(hashing::response_key);
        let upstream_model = upstream_model.to_string();
        Ok(Routed {
            rule: Arc::clone(rule),
            cluster,
            endpoint: None,
            tried: Vec::new(),
            model_slot: route.slot,
            model: parsed.model,
            upstream_model,
            subset,
            stream: parsed.stream,
            prompt_chars: parsed.prompt_chars,
            prefill: PrefillHold::default(),
            prefix_hashes,
            session,
            chain,
            stored_answer: None,
            stored_remote: false,
            response_bound: false,
            chain_remote: false,
            cache_ratio: 0.0,
            expected_cache_ratio: 0.0,
            claim: None,
            sync: None,
            upstream,
            transcoder,
            answer,
            learn_tail: tail,
            pick_view: None,
        })
    }

    /// True when this request's algorithm weighs cache affinity (prefix index, remote
    /// lookups) and the prompt has something to match.
    pub(super) fn wants_cache_depth(&self, r: &Routed) -> bool {
        self.uses_cache_depth(r, &self.config.lb_params(&r.model))
    }

    /// [`RouterInner::wants_cache_depth`] with the model's parameters already at hand.
    fn uses_cache_depth(&self, r: &Routed, params: &LbParams) -> bool {
        self.config.algorithm.uses_prefix_index(params) && !r.prefix_hashes.is_empty()
    }

    /// Chooses an endpoint for `r` among those not tried yet, and accounts it. `remote`
    /// holds cache matches from the Metadata-Center, when asked. A request continuing a stored
    /// answer (`previous_response_id`) goes to the endpoint that stored it while that one is a
    /// candidate, however loaded: no other engine has the conversation. A request of a
    /// session goes where the session went last while that endpoint is a candidate and not
    /// overloaded ([`super::affinity`]); every other choice is the algorithm's.
    pub(super) fn choose(
        &self,
        r: &mut Routed,
        remote: Option<&RemoteDepth>,
    ) -> Result<(), PickError> {
        if let Some(key) = r.stored_answer {
            return self.choose_stored(r, key);
        }
        let set = r.cluster.snapshot();
        let now = self.clock.now_ms();
        let candidates = self.candidates(r, &set, now)?;
        let params = self.config.lb_params(&r.model);
        let use_index = self.uses_cache_depth(r, &params);
        // a chain's lookup answers where its answer is, not what the prompt's cache holds
        let (remote, remote_chain) = match r.chain_remote {
            true => (None, remote),
            false => (remote, None),
        };
        let depth = self.cache_depth(r, &set, use_index, remote, now);
        let session = self.session_endpoint(r.session, &set, &candidates);
        let loads = if self.config.algorithm.uses_loads() || session.is_bound() {
            self.loads(r, &set, &candidates, &depth, now)
        } else {
            Vec::new()
        };
        let kept = self.keeps_session(&session, &loads);
        let pinned = self.chain_endpoint(r.chain, &set, &candidates, remote_chain);
        let at = match pinned.or(kept) {
            Some(at) => at,
            None => self.select(r, &candidates, &loads, &params),
        };
        if self.config.log.enabled && self.config.log.include_candidates {
            let decided_by = match (pinned, kept) {
                (Some(_), _) => "chain",
                (None, Some(_)) => "session",
                (None, None) => "algorithm",
            };
            r.pick_view = Some(self.pick_view(r, &set, &candidates, &loads, &params, decided_by));
        }
        let chosen = candidates[at];
        let endpoint = Arc::clone(&set.endpoints[chosen]);
        self.bind_session(r.session, session, kept, &endpoint, now);
        r.claim = self.claim_to_learn_from(r, &endpoint, use_index, now);
        self.account(r, &endpoint, depth[chosen], use_index, now);
        self.report(r, &endpoint, params.cache_aware);
        r.tried.push(endpoint.id);
        r.endpoint = Some(endpoint);
        Ok(())
    }

    /// Positions (in `set`) of the endpoints `r` may go to: not tried yet, serving its subset,
    /// not ejected — or, when every such endpoint is ejected, all of them (fail open rather
    /// than refuse all traffic).
    fn candidates(&self, r: &Routed, set: &EndpointSet, now: u64) -> Result<Vec<usize>, PickError> {
        let subset = r.subset.map(|i| &r.rule.subset[i]);
        let adapters_declared = set.endpoints.iter().any(|e| !e.lora_adapters.is_empty());
        let eligible = |e: &Endpoint| {
            !r.tried.contains(&e.id)
                && subset.is_none_or(|s| serves_subset(e, s, adapters_declared))
        };
        let mut candidates: Vec<usize> = (0..set.endpoints.len())
            .filter(|&i| eligible(&set.endpoints[i]) && !set.endpoints[i].is_ejected(now))
            .collect();
        if candidates.is_empty() {
            candidates = (0..set.endpoints.len())
                .filter(|&i| eligible(&set.endpoints[i]))
                .collect();
        }
        if candidates.is_empty() {
            return Err(PickError::NoEndpoint {
                cluster: r.cluster.name.clone(),
            });
        }
        Ok(candidates)
    }

    /// For each endpoint of `set`, the leading prompt chunks it is known to hold: the local
    /// prefix index (when `use_index`; with `cache_residency`, only what each endpoint likely
    /// still holds), raised by what the Metadata-Center answered (`remote`).
    fn cache_depth(
        &self,
        r: &Routed,
        set: &EndpointSet,
        use_index: bool,
        remote: Option<&RemoteDepth>,
        now: u64,
    ) -> Vec<usize> {
        let mut depth = if use_index && self.config.cache_residency {
            let capacity = self.config.cache_capacity_tokens;
            let horizon: Vec<u64> = (set.endpoints.iter())
                .map(|e| e.cache_horizon_ms(now, capacity))
                .collect();
            (self.index).resident_chunks(&r.prefix_hashes, set, now, &horizon)
        } else if use_index {
            self.index.matched_chunks(&r.prefix_hashes, set)
        } else {
            vec![0; set.endpoints.len()]
        };
        if let Some(remote) = remote {
            let identity = self.config.metadata_center.identity;
            for (d, e) in depth.iter_mut().zip(&set.endpoints) {
                if let Some(&m) = remote.get(&e.wire_id(identity)) {
                    *d = (*d).max(m.min(r.prefix_hashes.len()));
                }
            }
        }
        depth
    }

    /// Per endpoint of `set` (its wire name), how long ago another gateway's claim
    /// may have been saved and still count, ms: the cache query's `max_age_ms`, the endpoint's
    /// residency ([`Endpoint::cache_horizon_ms`]), so the Metadata-Center's claims are aged as
    /// the local index's are. Endpoints whose residency is not known yet are left out (their
    /// claims count for the server's TTL, 30 min by default); empty with residency off.
    pub(super) fn remote_claim_max_ages(&self, set: &EndpointSet) -> BTreeMap<String, u64> {
        let mut ages = BTreeMap::new();
        if !self.config.cache_residency {
            return ages;
        }
        let now = self.clock.now_ms();
        let capacity = self.config.cache_capacity_tokens;
        let identity = self.config.metadata_center.identity;
        for e in &set.endpoints {
            let horizon = e.cache_horizon_ms(now, capacity);
            if horizon != u64::MAX {
                // endpoints named by their bare IP may share a name: the longest counts
                let age = ages.entry(e.wire_id(identity)).or_insert(horizon);
                *age = (*age).max(horizon);
            }
        }
        ages
    }

    /// The candidates' loads, as scoring sees them ([`loads_of`]).
    fn loads(
        &self,
        r: &Routed,
        set: &EndpointSet,
        candidates: &[usize],
        depth: &[usize],
        now: u64,
    ) -> Vec<CandidateLoad> {
        let total_chunks = r.prefix_hashes.len().max(1) as f64;
        let engines = &self.config.engine_metrics;
        let remote = RemoteScale {
            stale_ms: self.config.metadata_center.load_stale_ms,
            uncached_share: uncached_share(
                self.metrics.prompt_chars.load(Ordering::Relaxed),
                self.metrics.cached_prompt_chars.load(Ordering::Relaxed),
            ),
            engine_stale_ms: engines.enabled.then_some(engines.stale_ms),
        };
        loads_of(
            set,
            candidates,
            depth,
            total_chunks,
            now,
            remote,
            self.corrections(),
        )
    }

    /// What the answers correct in a pick, as configured.
    fn corrections(&self) -> AnswerCorrections {
        AnswerCorrections {
            cache_trust: self.config.cache_feedback,
            eviction_pressure: self.config.eviction_pressure,
        }
    }

    /// Runs the configured algorithm over the candidates (`loads`: theirs, when the
    /// algorithm reads them); returns a position in `candidates`.
    fn select(
        &self,
        r: &Routed,
        candidates: &[usize],
        loads: &[CandidateLoad],
        params: &LbParams,
    ) -> usize {
        let algorithm = self.config.algorithm;
        let draw = self.rng_counter.fetch_add(1, Ordering::Relaxed);
        let mut rng =
            fastrand::Rng::with_seed(self.rng_seed ^ draw.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let selection = selection_of(r, candidates.len(), loads, params);
        algorithm.select(&selection, &mut rng)
    }

    /// The request log's view of a pick: every candidate's load, cache and score.
    fn pick_view(
        &self,
        r: &Routed,
        set: &EndpointSet,
        candidates: &[usize],
        loads: &[CandidateLoad],
        params: &LbParams,
        decided_by: &'static str,
    ) -> Box<PickView> {
        let selection = selection_of(r, candidates.len(), loads, params);
        let scores = match loads.len() == candidates.len() {
            true => self.config.algorithm.scores(&selection),
            false => None,
        };
        let round = |x: f64, scale: f64| (x * scale).round() / scale;
        let candidates = (candidates.iter().enumerate())
            .map(|(k, &i)| {
                let load = loads.get(k);
                CandidateView {
                    endpoint: set.endpoints[i].address.clone(),
                    cache_ratio: load.map(|l| round(l.cache_ratio, 1e4)),
                    in_flight: load.map(|l| l.in_flight),
                    uncached_prefill_chars: load.map(|l| l.uncached_prefill_chars),
                    eviction_share: load.map(|l| round(l.eviction_share, 1e4)),
                    score: scores.as_ref().map(|s| round(s[k], 1e2)),
                }
            })
            .collect();
        Box::new(PickView {
            decided_by,
            candidates,
        })
    }

    /// The index's claim for the chosen endpoint, whatever its age (share of the prompt's
    /// chunks, age of the deepest in ms), for the answer to teach the endpoint's capacity
    /// ([`RouterInner::learns_capacity`], `Residency::learn`) or its eviction share
    /// (`eviction_pressure`, `Residency::note_writes`): only once the endpoint's answers report
    /// cache hits (an engine that never does costs no walk). Read before the pick records
    /// the prompt (which makes every chunk fresh).
    fn claim_to_learn_from(
        &self,
        r: &Routed,
        endpoint: &Endpoint,
        use_index: bool,
        now: u64,
    ) -> Option<(f64, u64)> {
        let reports_cache = endpoint.answers.reports_cache_hits();
        let wanted = self.learns_capacity(endpoint) || self.config.eviction_pressure;
        if !use_index || !reports_cache || !wanted {
            return None;
        }
        let (chunks, age_ms) = self.index.claim_of(&r.prefix_hashes, endpoint.id, now);
        let total_chunks = r.prefix_hashes.len().max(1) as f64;
        Some((chunks as f64 / total_chunks, age_ms))
    }

    /// True when `endpoint`'s capacity is learned from its answers: with `cache_residency`
    /// and `cache_feedback`, while neither its engine nor the config gives one.
    pub(super) fn learns_capacity(&self, endpoint: &Endpoint) -> bool {
        let c = &self.config;
        c.cache_residency
            && c.cache_feedback
            && !endpoint.residency.capacity_given(c.cache_capacity_tokens)
    }

    /// Accounts the choice: the endpoint's load, the router's counters, and (when `use_index`)
    /// the prefix index learns that the endpoint now holds this prompt.
    fn account(
        &self,
        r: &mut Routed,
        endpoint: &Arc<Endpoint>,
        depth: usize,
        use_index: bool,
        now: u64,
    ) {
        let total_chunks = r.prefix_hashes.len().max(1) as f64;
        r.cache_ratio = depth as f64 / total_chunks;
        r.expected_cache_ratio = r.cache_ratio * self.corrections().cache_trust(endpoint);
        let uncached = (r.prompt_chars as f64 * (1.0 - r.expected_cache_ratio)).round() as u64;
        r.prefill = endpoint.acquire(r.prompt_chars, uncached, r.stream);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        if use_index {
            self.index.record(&r.prefix_hashes, endpoint.id, now);
        }
        self.metrics.decision_cache_ratio.observe(r.cache_ratio);
        self.metrics
            .prompt_chars
            .fetch_add(r.prompt_chars, Ordering::Relaxed);
        self.metrics.cached_prompt_chars.fetch_add(
            (r.prompt_chars as f64 * r.expected_cache_ratio) as u64,
            Ordering::Relaxed,
        );
        r.cluster.touch(now);
    }

    /// Tells the sync thread (when the Metadata-Center is on): the request's load and, when
    /// `cache_aware`, that the endpoint holds the prompt's prefix from now on. The prefix is
    /// claimed at the pick, as the local index records it, so that the other gateways route
    /// it there at once rather than after this request's prefill (when the answer first
    /// speaks): in that window they would send the same document to another endpoint. A claim
    /// the endpoint does not keep (the attempt failed) expires with the server's TTL, and
    /// `cache_feedback` lowers the trust in an endpoint that does not keep what is claimed. A
    /// dropped add means the server never hears of this request: no releases, no claim.
    fn report(&self, r: &mut Routed, endpoint: &Arc<Endpoint>, cache_aware: bool) {
        if self.events.get().is_none() {
            return;
        }
        let req = RequestSync::new(self.next_request_id());
        // a copy: a retry picks from these hashes again, a learned answer extends them
        let claim = (cache_aware && !r.prefix_hashes.is_empty()).then(|| r.prefix_hashes.clone());
        if self.send(Event::Add {
            req: Arc::clone(&req),
            cluster: Arc::clone(&r.cluster),
            endpoint: Arc::clone(endpoint),
            prompt_chars: r.prompt_chars,
            claim,
        }) {
            r.sync = Some(req);
        }
    }
}

/// What the algorithm sees of `r`'s pick among `candidates` endpoints.
fn selection_of<'a>(
    r: &'a Routed,
    candidates: usize,
    loads: &'a [CandidateLoad],
    params: &'a LbParams,
) -> Selection<'a> {
    Selection {
        loads,
        candidates,
        prompt_chars: r.prompt_chars,
        params,
        rr_cursor: &r.cluster.rr_cursor,
    }
}

/// The first rule whose header conditions all hold (rules are sorted most specific first).
fn match_rule<'r>(rules: &'r [Arc<Rule>], headers: &[HeaderRef]) -> Option<&'r Arc<Rule>> {
    rules.iter().find(|r| {
        r.headers
            .iter()
            .all(|h| find_header(headers, &h.key) == Some(h.value.as_bytes()))
    })
}

/// Chooses one of a rule's subsets by weight (None when the rule has none).
fn pick_subset(subsets: &[Subset]) -> Option<usize> {
    let total: u64 = subsets.iter().map(|s| s.weight as u64).sum();
    if total == 0 {
        return None;
    }
    let mut ticket = fastrand::u64(..total);
    subsets.iter().position(|s| {
        if ticket < s.weight as u64 {
            true
        } else {
            ticket -= s.weight as u64;
            false
        }
    })
}

/// True when endpoint `e` may serve a request routed to `subset`: its labels include the
/// subset's labels and, when adapters are declared in the cluster, it serves the adapter.
fn serves_subset(e: &Endpoint, subset: &Subset, adapters_declared: bool) -> bool {
    subset
        .labels
        .iter()
        .all(|(k, v)| e.labels.get(k) == Some(v))
        && (subset.lora.is_empty() || !adapters_declared || e.lora_adapters.contains(&subset.lora))
}

/// What the answers' `cached_tokens` correct in a pick, as configured.
#[derive(Clone, Copy, Default)]
struct AnswerCorrections {
    /// `cache_feedback`: the index's claims times each endpoint's cache trust.
    cache_trust: bool,
    /// `eviction_pressure`: a miss priced by each endpoint's eviction share.
    eviction_pressure: bool,
}

impl AnswerCorrections {
    /// The factor on what the prefix index claims for `e`: its cache trust with
    /// `cache_feedback`, else 1 (the index taken at its word).
    fn cache_trust(self, e: &Endpoint) -> f64 {
        if self.cache_trust {
            e.answers.cache_trust()
        } else {
            1.0
        }
    }

    /// `e`'s eviction share with `eviction_pressure`, else 0.
    fn eviction_share(self, e: &Endpoint) -> f64 {
        if self.eviction_pressure {
            e.residency.eviction_share()
        } else {
            0.0
        }
    }
}

/// How other gateways' load (from the Metadata-Center, from the engines' metrics) counts in
/// a pick.
#[derive(Clone, Copy)]
struct RemoteScale {
    /// Remote load older than this is ignored.
    stale_ms: u64,
    /// The share of the remote prompt characters in prefill taken as uncached.
    uncached_share: f64,
    /// With `engine_metrics`: engine readings older than this are ignored.
    engine_stale_ms: Option<u64>,
}

/// The share of the prompt characters this router routed that it expected uncached (1 before
/// any): the wire protocol reports other gateways' prompts at their whole length, and they
/// route the same traffic with the same policy, so their uncached share is taken to be ours.
fn uncached_share(prompt_chars: u64, cached_prompt_chars: u64) -> f64 {
    if prompt_chars == 0 {
        return 1.0;
    }
    (1.0 - cached_prompt_chars as f64 / prompt_chars as f64).clamp(0.0, 1.0)
}

/// Candidate loads: this router's live counts plus, when fresh, what other gateways put on
/// each endpoint (from the Metadata-Center; their prefill at [`RemoteScale::uncached_share`]
/// counts as uncached), and the requests the engine itself reports beyond all that (its own
/// metrics, `engine_metrics`: traffic of gateways and clients nobody told us of); the cache
/// ratios as the pick expects them (the index's, times each endpoint's cache trust with
/// `cache_feedback`) and each endpoint's eviction share (`eviction_pressure`).
fn loads_of(
    set: &EndpointSet,
    candidates: &[usize],
    depth: &[usize],
    total_chunks: f64,
    now_ms: u64,
    remote: RemoteScale,
    corrections: AnswerCorrections,
) -> Vec<CandidateLoad> {
    candidates
        .iter()
        .map(|&i| {
            let e = &set.endpoints[i];
            e.sweep_prefill(); // non-streamed prefill a later first token has shown to be over
            let (rq, rl) = e.remote_load(now_ms, remote.stale_ms).unwrap_or((0, 0));
            let rl_uncached = (rl as f64 * remote.uncached_share).round() as u64;
            // Others' requests, as the Metadata-Center and as the engine saw them last: the
            // larger (the engine also sees clients that report to nobody).
            let engine_others = remote
                .engine_stale_ms
                .and_then(|stale| e.engine.others(now_ms, stale))
                .unwrap_or(0);
            CandidateLoad {
                in_flight: e.in_flight() + rq.max(engine_others),
                prefill_chars: e.prefill_chars() + rl,
                cache_ratio: depth[i] as f64 / total_chunks * corrections.cache_trust(e),
                uncached_prefill_chars: e.uncached_prefill_chars() + rl_uncached,
                eviction_share: corrections.eviction_share(e),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_gateways_prefill_counts_at_this_routers_uncached_share() {
        assert_eq!(uncached_share(0, 0), 1.0, "no history: all of it");
        assert!((uncached_share(1000, 800) - 0.2).abs() < 1e-12);
        assert_eq!(uncached_share(1000, 1200), 0.0, "never negative");
        let e = Arc::new(Endpoint::new(1, "127.0.0.1:1".parse().unwrap(), 0));
        e.acquire(500, 100, true); // this router: 500 chars in prefill, 100 of them uncached
        e.set_remote_load(4, 10_000, 50); // other gateways: 4 requests, 10,000 chars
        let set = EndpointSet::new(vec![e]);
        let remote = RemoteScale {
            stale_ms: 1000,
            uncached_share: 0.2,
            engine_stale_ms: None,
        };
        let l = loads_of(
            &set,
            &[0],
            &[0],
            1.0,
            100,
            remote,
            AnswerCorrections::default(),
        )[0];
        assert_eq!((l.in_flight, l.prefill_chars), (5, 10_500));
        assert_eq!(l.uncached_prefill_chars, 100 + 2000);
        // stale remote load counts for nothing
        let l = loads_of(
            &set,
            &[0],
            &[0],
            1.0,
            2000,
            remote,
            AnswerCorrections::default(),
        )[0];
        assert_eq!((l.in_flight, l.uncached_prefill_chars), (1, 100));
    }

    #[test]
    fn a_pick_sees_the_eviction_share_and_the_cache_trust_only_as_configured() {
        let e = Arc::new(Endpoint::new(1, "127.0.0.1:1".parse().unwrap(), 0));
        for _ in 0..500 {
            e.residency.note_writes(1_000, 1_000, 0.5, 2_000, 0.0); // half recomputes a loss
            e.answers.correct_cache_trust(1.0, 0.5);
        }
        let set = EndpointSet::new(vec![e]);
        let remote = RemoteScale {
            stale_ms: 1000,
            uncached_share: 1.0,
            engine_stale_ms: None,
        };
        let load = |c| loads_of(&set, &[0], &[1], 1.0, 100, remote, c)[0];
        let off = load(AnswerCorrections::default());
        assert_eq!((off.eviction_share, off.cache_ratio), (0.0, 1.0));
        let on = load(AnswerCorrections {
            cache_trust: true,
            eviction_pressure: true,
        });
        assert!(
            (on.eviction_share - 0.5).abs() < 1e-3,
            "{}",
            on.eviction_share
        );
        assert!((on.cache_ratio - 0.5).abs() < 1e-3, "{}", on.cache_ratio);
    }

    #[test]
    fn engine_readings_count_only_what_the_router_does_not_know_and_only_while_fresh() {
        let e = Arc::new(Endpoint::new(1, "127.0.0.1:1".parse().unwrap(), 0));
        e.acquire(500, 100, true); // this router: 1 request
        e.set_remote_load(3, 0, 50); // other gateways through the Metadata-Center: 3
        let set = EndpointSet::new(vec![Arc::clone(&e)]);
        let on = RemoteScale {
            stale_ms: 1000,
            uncached_share: 1.0,
            engine_stale_ms: Some(1000),
        };
        let in_flight = |now, scale| {
            loads_of(
                &set,
                &[0],
                &[0],
                1.0,
                now,
                scale,
                AnswerCorrections::default(),
            )[0]
            .in_flight
        };
        assert_eq!(in_flight(100, on), 4, "no reading yet");
        // the engine runs and queues 10, 1 of them ours: 9 others, 6 more than reported
        e.engine.set(10, e.in_flight(), 100);
        assert_eq!(in_flight(100, on), 10);
        // a pick of ours after the reading counts at once (the reading is not a ceiling)
        e.acquire(500, 100, true);
        assert_eq!(in_flight(100, on), 11);
        e.release_prefill(500, 100);
        e.release_request();
        // an engine that has not seen the others' yet: the Metadata-Center's word stands
        e.engine.set(2, e.in_flight(), 100);
        assert_eq!(in_flight(100, on), 4);
        e.engine.set(10, e.in_flight(), 100);
        assert_eq!(
            in_flight(1101, on),
            1,
            "stale reading and stale remote load: local only"
        );
        let off = RemoteScale {
            engine_stale_ms: None,
            ..on
        };
        assert_eq!(in_flight(100, off), 4, "engine_metrics off");
    }
}
