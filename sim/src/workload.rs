//! Seeded workload traces: multi-tenant chat (long shared system prompts, multi-turn sessions
//! that resend the history after a think time), RAG (shared documents, short questions), unique
//! prompts, and two opt-in kinds: `agent` (long-context coding-agent sessions: a shared tool
//! prompt, a private repository context, many turns of tool output with long generated replies)
//! and `burst` (many tenants with their own system prompts, plus episodes where one tenant's
//! traffic exceeds what one server can prefill). The same arguments and seed always give the
//! same trace; the default mix (no agent, no burst) gives the same trace as before they existed.
//!
//! `--tools-field` changes how agent sessions present their shared prompt, as real agent
//! clients (OpenAI SDK agents, Claude Code, Codex, OpenHands) do: instead of the system text,
//! the system message is one line common to every agent prompt ([`AGENT_TOOLS_SYSTEM`]) and the
//! agent prompt's words travel in the request's `tools` ([`Session::tools`]): four function
//! definitions (`read_file`, `edit_file`, `run_tests`, `search`) whose descriptions hold a
//! quarter of the words each. The server's chat template renders them into the system turn, so
//! the prompt is about as long as without the flag, but a router that reads only the messages
//! no longer sees what tells the agent prompts apart. Off, traces and bodies are unchanged; the
//! flag changes nothing in the other workloads.

use crate::engine::CHARS_PER_TOKEN;
use serde::Serialize;
use std::str::FromStr;
use std::sync::Arc;

/// An inclusive integer range "lo:hi" (or a single value).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Range {
    pub lo: u64,
    pub hi: u64,
}

impl Range {
    pub fn mean(&self) -> f64 {
        (self.lo + self.hi) as f64 / 2.0
    }
    fn sample(&self, r: &mut fastrand::Rng) -> u64 {
        r.u64(self.lo..=self.hi)
    }
}

impl FromStr for Range {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |x: &str| {
            x.trim()
                .parse::<u64>()
                .map_err(|e| format!("bad number {x:?} in range {s:?}: {e}"))
        };
        let (lo, hi) = match s.split_once(':') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let v = parse(s)?;
                (v, v)
            }
        };
        if lo > hi {
            return Err(format!("range {s:?}: low end above high end"));
        }
        Ok(Range { lo, hi })
    }
}

/// Request shares of the workloads, e.g. "chat=0.6,rag=0.3,unique=0.1" or "agent=1".
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Mix {
    pub chat: f64,
    pub rag: f64,
    pub unique: f64,
    #[serde(skip_serializing_if = "is_zero")]
    pub agent: f64,
    #[serde(skip_serializing_if = "is_zero")]
    pub burst: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn is_false(x: &bool) -> bool {
    !*x
}

impl Mix {
    fn total(&self) -> f64 {
        self.chat + self.rag + self.unique + self.agent + self.burst
    }
}

impl FromStr for Mix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut m = Mix {
            chat: 0.0,
            rag: 0.0,
            unique: 0.0,
            agent: 0.0,
            burst: 0.0,
        };
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("mix entry {part:?} is not name=weight"))?;
            let v: f64 = v
                .trim()
                .parse()
                .map_err(|e| format!("mix weight {v:?}: {e}"))?;
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("mix weight {v} must be >= 0"));
            }
            match k.trim() {
                "chat" => m.chat = v,
                "rag" => m.rag = v,
                "unique" => m.unique = v,
                "agent" => m.agent = v,
                "burst" => m.burst = v,
                other => {
                    return Err(format!(
                        "unknown workload {other:?} (chat, rag, unique, agent, burst)"
                    ))
                }
            }
        }
        if m.total() <= 0.0 {
            return Err("mix has no positive weight".into());
        }
        Ok(m)
    }
}

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct WorkloadArgs {
    /// Mean request rate (requests/s, all turns included); arrivals are open-loop (Poisson).
    /// The default keeps 4 default servers ~75-80 % busy under round robin.
    #[arg(long, default_value_t = 6.0)]
    pub rate: f64,
    /// Seconds during which requests are sent.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Trace seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Request shares of the workloads.
    #[arg(long, default_value = "chat=0.5,rag=0.4,unique=0.1")]
    pub mix: Mix,
    /// Model name sent in requests.
    #[arg(long, default_value = "sim-llama-3-8b")]
    pub model: String,
    /// Chat: number of tenants, each with its own long system prompt.
    #[arg(long, default_value_t = 8)]
    pub tenants: u64,
    /// Chat: system prompt length (tokens).
    #[arg(long, default_value = "2000:6000")]
    pub system_tokens: Range,
    /// Chat: turns per conversation.
    #[arg(long, default_value = "2:6")]
    pub turns: Range,
    /// Chat: user message length (tokens).
    #[arg(long, default_value = "50:300")]
    pub user_tokens: Range,
    /// Chat: mean think time between a reply and the next turn (s, exponential).
    #[arg(long, default_value_t = 3.0)]
    pub think_s: f64,
    /// RAG: number of shared documents (popularity is Zipf-like).
    #[arg(long, default_value_t = 48)]
    pub docs: u64,
    /// RAG: document length (tokens).
    #[arg(long, default_value = "2000:6000")]
    pub doc_tokens: Range,
    /// RAG: Zipf exponent of document popularity.
    #[arg(long, default_value_t = 1.0)]
    pub doc_zipf: f64,
    /// RAG: question length (tokens).
    #[arg(long, default_value = "10:40")]
    pub question_tokens: Range,
    /// Unique prompts: length (tokens).
    #[arg(long, default_value = "500:4000")]
    pub unique_tokens: Range,
    /// Output length of every request (max_tokens) of chat, rag, unique and burst.
    #[arg(long, default_value = "32:160")]
    pub output_tokens: Range,
    /// Agent: number of shared tool/agent system prompts (one per agent product or tenant).
    #[arg(long, default_value_t = 4)]
    pub agent_prompts: u64,
    /// Agent: shared system prompt (tool definitions) length (tokens).
    #[arg(long, default_value = "2000:5000")]
    pub agent_system_tokens: Range,
    /// Agent: the session's private context (repository files, task) in its first turn (tokens).
    #[arg(long, default_value = "2000:8000")]
    pub agent_context_tokens: Range,
    /// Agent: turns per session (every turn resends the whole history, replies included).
    #[arg(long, default_value = "4:10")]
    pub agent_turns: Range,
    /// Agent: tool output sent as the user message of every later turn (tokens).
    #[arg(long, default_value = "100:800")]
    pub agent_tool_tokens: Range,
    /// Agent: generated reply length of every turn (max_tokens; long: code, plans).
    #[arg(long, default_value = "150:600")]
    pub agent_output_tokens: Range,
    /// Agent: mean pause between a reply and the next turn (tool execution, s, exponential).
    #[arg(long, default_value_t = 1.0)]
    pub agent_think_s: f64,
    /// Agent: send the shared agent prompt in the request's `tools` field, as real agent
    /// clients do, instead of as the system message's text: the system message becomes one
    /// line common to every agent prompt, and every turn carries four function tools
    /// (read_file, edit_file, run_tests, search) whose descriptions hold the agent prompt's
    /// words (chat: `{"type":"function","function":{...}}`; responses APIs: the Responses
    /// shape; generate APIs: rendered into the text as the server's chat template would). Other
    /// workloads are unchanged.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub tools_field: bool,
    /// Burst: number of tenants, each with its own system prompt.
    #[arg(long, default_value_t = 32)]
    pub burst_tenants: u64,
    /// Burst: tenant system prompt length (tokens).
    #[arg(long, default_value = "1000:3000")]
    pub burst_system_tokens: Range,
    /// Burst: user message length (tokens; uncached work per request).
    #[arg(long, default_value = "400:1200")]
    pub burst_user_tokens: Range,
    /// Burst: share of the burst workload's requests that come in hot-tenant episodes (the
    /// rest is background traffic spread uniformly over the tenants).
    #[arg(long, default_value_t = 0.5)]
    pub burst_fraction: f64,
    /// Burst: requests in one episode (all to one tenant's system prompt).
    #[arg(long, default_value_t = 80)]
    pub burst_requests: u64,
    /// Burst: length of one episode (s); burst-requests / burst-len-s is the hot tenant's rate.
    #[arg(long, default_value_t = 4.0)]
    pub burst_len_s: f64,
    /// Replay a recorded trace in the Mooncake format (JSON lines of `timestamp` ms,
    /// `input_length`, `output_length`, `hash_ids`) instead of generating one: its arrival
    /// pattern with the clock scaled to `--rate`, its shared prefixes as shared filler text
    /// (see `replay`). `--mix` and the workload options above are then ignored.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<std::path::PathBuf>,
    /// Replay: prompt tokens per hash id in the trace (Mooncake's traces: 512).
    #[arg(long, default_value_t = 512)]
    pub replay_block_tokens: u64,
    /// Replay: every length (blocks, prompts, outputs) times this, within (0, 1], to fit the
    /// trace to the simulated servers' KV cache and context window.
    #[arg(long, default_value_t = 1.0)]
    pub replay_token_scale: f64,
    /// Replay: longest prompt after scaling (tokens); the blocks past it are left out.
    #[arg(long, default_value_t = 30_000)]
    pub replay_max_prompt_tokens: u64,
    /// Replay: skip the trace's first seconds (its own clock), e.g. to replay another window.
    #[arg(long, default_value_t = 0.0)]
    pub replay_start_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Chat,
    Rag,
    Unique,
    Agent,
    Burst,
    /// A request of a replayed trace (`--replay`).
    Replay,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Chat,
        Kind::Rag,
        Kind::Unique,
        Kind::Agent,
        Kind::Burst,
        Kind::Replay,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Rag => "rag",
            Kind::Unique => "unique",
            Kind::Agent => "agent",
            Kind::Burst => "burst",
            Kind::Replay => "replay",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Turn {
    pub user: String,
    pub max_tokens: u64,
    /// Think time before this turn (0 for the first).
    pub think_s: f64,
}

/// The system message of agent sessions under `--tools-field` (the same for every agent
/// prompt: what differs is in the tools).
pub const AGENT_TOOLS_SYSTEM: &str = "You are a coding agent. Use the tools to complete the task.";

/// The names of the function tools of an agent prompt under `--tools-field`.
pub const AGENT_TOOL_NAMES: [&str; 4] = ["read_file", "edit_file", "run_tests", "search"];

/// A function tool a session declares in its requests' `tools` (`--tools-field`); its
/// parameters are one required string, `path`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: &'static str,
    pub description: String,
}

/// The tools of an agent prompt `text` under `--tools-field`: [`AGENT_TOOL_NAMES`], the words of
/// `text` split into four parts of (within one) the same number of words, in order.
pub fn agent_tools(text: &str) -> Vec<Tool> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let n = AGENT_TOOL_NAMES.len();
    AGENT_TOOL_NAMES
        .iter()
        .enumerate()
        .map(|(k, &name)| Tool {
            name,
            description: words[k * words.len() / n..(k + 1) * words.len() / n].join(" "),
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct Session {
    pub id: usize,
    pub kind: Kind,
    pub start_s: f64,
    pub system: Option<Arc<str>>,
    /// The tools every request of the session declares (agent sessions under `--tools-field`).
    pub tools: Option<Arc<[Tool]>>,
    pub turns: Vec<Turn>,
    /// Tenant (chat, burst) or agent prompt (agent) index; None for rag and unique.
    pub tenant: Option<usize>,
    /// Burst: the index of the hot-tenant episode this request belongs to.
    pub episode: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Trace {
    pub sessions: Vec<Session>,
    pub duration_s: f64,
    pub model: String,
}

impl Trace {
    /// Requests the trace would send if every turn fits in the duration.
    pub fn max_requests(&self) -> usize {
        self.sessions.iter().map(|s| s.turns.len()).sum()
    }
}

const LETTERS: &[u8] = b"etaoinshrdlucmfwypvbgkjqxz";

/// Seeded filler text of exactly `tokens` tokens (tokens * CHARS_PER_TOKEN chars).
pub fn words(r: &mut fastrand::Rng, tokens: u64) -> String {
    let n = tokens as usize * CHARS_PER_TOKEN;
    let mut s = String::with_capacity(n + 8);
    while s.len() < n {
        let len = r.usize(2..=8);
        for _ in 0..len {
            // Skewed letter frequencies: a little more text-like than uniform.
            let i = (r.f64().powi(2) * LETTERS.len() as f64) as usize;
            s.push(LETTERS[i.min(LETTERS.len() - 1)] as char);
        }
        s.push(if r.u8(0..12) == 0 { '.' } else { ' ' });
    }
    s.truncate(n);
    s
}

fn text_of(r: &mut fastrand::Rng, len: Range) -> String {
    let n = len.sample(r);
    words(r, n)
}

fn exp(r: &mut fastrand::Rng, mean: f64) -> f64 {
    -mean * (1.0 - r.f64()).ln()
}

pub fn generate(a: &WorkloadArgs) -> Result<Trace, String> {
    if !(a.rate > 0.0 && a.rate.is_finite()) {
        return Err("--rate must be > 0".into());
    }
    if !(a.duration > 0.0 && a.duration.is_finite()) {
        return Err("--duration must be > 0".into());
    }
    if a.replay.is_some() {
        return crate::replay::trace(a);
    }
    if a.mix.chat > 0.0 && (a.tenants == 0 || a.turns.lo == 0) {
        return Err("chat needs --tenants >= 1 and --turns >= 1".into());
    }
    if a.mix.rag > 0.0 && a.docs == 0 {
        return Err("rag needs --docs >= 1".into());
    }
    if a.mix.agent > 0.0 && (a.agent_prompts == 0 || a.agent_turns.lo == 0) {
        return Err("agent needs --agent-prompts >= 1 and --agent-turns >= 1".into());
    }
    if a.mix.burst > 0.0 {
        if a.burst_tenants == 0 || a.burst_requests == 0 {
            return Err("burst needs --burst-tenants >= 1 and --burst-requests >= 1".into());
        }
        if !(0.0..=1.0).contains(&a.burst_fraction) {
            return Err("--burst-fraction must be within 0..1".into());
        }
        if !(a.burst_len_s > 0.0 && a.burst_len_s.is_finite()) {
            return Err("--burst-len-s must be > 0".into());
        }
    }
    let mut r = fastrand::Rng::with_seed(a.seed);
    let systems: Vec<Arc<str>> = (0..a.tenants)
        .map(|t| {
            let n = a.system_tokens.sample(&mut r);
            let head = format!("You are the assistant of tenant {t}. Follow the policies below. ");
            let body = words(&mut r, n.saturating_sub(head.len() as u64 / 4));
            Arc::from(format!("{head}{body}"))
        })
        .collect();
    let docs: Vec<String> = (0..a.docs)
        .map(|d| format!("Document {d}. {}", text_of(&mut r, a.doc_tokens)))
        .collect();
    let rag_system: Arc<str> = Arc::from(
        "You answer questions using only the document the user provides. Quote it when you can.",
    );
    // Zipf weights for document popularity.
    let zipf: Vec<f64> = (1..=a.docs)
        .map(|k| 1.0 / (k as f64).powf(a.doc_zipf))
        .collect();
    let zsum: f64 = zipf.iter().sum();
    // The opt-in workloads' shared prompts come from their own generators, so that the main
    // generator (and with it every trace without agent or burst) is unchanged.
    let agent_systems: Vec<Arc<str>> = if a.mix.agent > 0.0 {
        let mut ra = fastrand::Rng::with_seed(a.seed ^ 0x6167_656e_745f_7379);
        (0..a.agent_prompts)
            .map(|t| {
                let head = format!(
                    "You are coding agent {t}. You can call these tools: read_file, edit_file, run_tests, search. "
                );
                let n = a.agent_system_tokens.sample(&mut ra);
                let body = words(&mut ra, n.saturating_sub(head.len() as u64 / 4));
                Arc::from(format!("{head}{body}"))
            })
            .collect()
    } else {
        Vec::new()
    };
    // `--tools-field`: the agent prompts travel as tools under one common system line.
    let agent_tool_sets: Option<Vec<Arc<[Tool]>>> = a.tools_field.then(|| {
        agent_systems
            .iter()
            .map(|t| agent_tools(t).into())
            .collect()
    });
    let tools_system: Arc<str> = Arc::from(AGENT_TOOLS_SYSTEM);
    let burst_systems: Vec<Arc<str>> = if a.mix.burst > 0.0 {
        let mut rb = fastrand::Rng::with_seed(a.seed ^ 0x6275_7273_745f_7379);
        (0..a.burst_tenants)
            .map(|t| {
                let head = format!("You are the support assistant of customer {t}. ");
                let n = a.burst_system_tokens.sample(&mut rb);
                let body = words(&mut rb, n.saturating_sub(head.len() as u64 / 4));
                Arc::from(format!("{head}{body}"))
            })
            .collect()
    } else {
        Vec::new()
    };

    // Session kinds are drawn so that the *request* shares match the mix. Burst episodes are
    // generated apart (below) and take `burst_fraction` of the burst share.
    let per_session = [a.turns.mean(), 1.0, 1.0];
    let agent_w = if a.mix.agent > 0.0 {
        a.mix.agent / a.agent_turns.mean()
    } else {
        0.0
    };
    let burst_w = if a.mix.burst > 0.0 {
        a.mix.burst * (1.0 - a.burst_fraction)
    } else {
        0.0
    };
    let w = [
        a.mix.chat / per_session[0],
        a.mix.rag,
        a.mix.unique,
        agent_w,
        burst_w,
    ];
    let wsum: f64 = w.iter().sum();
    let mean_requests: f64 = a.mix.total() / wsum;
    let session_rate = a.rate / mean_requests;
    let opt_in = agent_w + burst_w > 0.0;

    let mut sessions = Vec::new();
    let mut t = if wsum > 0.0 {
        exp(&mut r, 1.0 / session_rate)
    } else {
        f64::INFINITY
    };
    while t < a.duration {
        let x = r.f64() * wsum;
        let kind = if x < w[0] {
            Kind::Chat
        } else if x < w[0] + w[1] {
            Kind::Rag
        } else if !opt_in || x < w[0] + w[1] + w[2] {
            Kind::Unique
        } else if x < w[0] + w[1] + w[2] + w[3] || burst_w == 0.0 {
            Kind::Agent
        } else {
            Kind::Burst
        };
        let id = sessions.len();
        let s = match kind {
            Kind::Chat => {
                let tenant = r.usize(0..systems.len());
                let n = a.turns.sample(&mut r) as usize;
                let turns = (0..n)
                    .map(|i| Turn {
                        user: format!("[{id}.{i}] {}", text_of(&mut r, a.user_tokens)),
                        max_tokens: a.output_tokens.sample(&mut r).max(1),
                        think_s: if i == 0 { 0.0 } else { exp(&mut r, a.think_s) },
                    })
                    .collect();
                Session {
                    id,
                    kind,
                    start_s: t,
                    system: Some(systems[tenant].clone()),
                    tools: None,
                    turns,
                    tenant: Some(tenant),
                    episode: None,
                }
            }
            Kind::Rag => {
                let mut x = r.f64() * zsum;
                let mut d = 0;
                while d + 1 < zipf.len() && x >= zipf[d] {
                    x -= zipf[d];
                    d += 1;
                }
                let q = text_of(&mut r, a.question_tokens);
                Session {
                    id,
                    kind,
                    start_s: t,
                    system: Some(rag_system.clone()),
                    tools: None,
                    turns: vec![Turn {
                        user: format!("{}\n\nQuestion [{id}]: {q}?", docs[d]),
                        max_tokens: a.output_tokens.sample(&mut r).max(1),
                        think_s: 0.0,
                    }],
                    tenant: None,
                    episode: None,
                }
            }
            Kind::Unique => Session {
                id,
                kind,
                start_s: t,
                system: None,
                tools: None,
                turns: vec![Turn {
                    user: format!("[{id}] {}", text_of(&mut r, a.unique_tokens)),
                    max_tokens: a.output_tokens.sample(&mut r).max(1),
                    think_s: 0.0,
                }],
                tenant: None,
                episode: None,
            },
            Kind::Agent => {
                let prompt = r.usize(0..agent_systems.len());
                let n = a.agent_turns.sample(&mut r) as usize;
                let turns = (0..n)
                    .map(|i| Turn {
                        user: if i == 0 {
                            format!(
                                "[{id}] Task and repository context:\n{}",
                                text_of(&mut r, a.agent_context_tokens)
                            )
                        } else {
                            format!(
                                "[{id}.{i}] Tool result:\n{}",
                                text_of(&mut r, a.agent_tool_tokens)
                            )
                        },
                        max_tokens: a.agent_output_tokens.sample(&mut r).max(1),
                        think_s: if i == 0 {
                            0.0
                        } else {
                            exp(&mut r, a.agent_think_s)
                        },
                    })
                    .collect();
                let (system, tools) = match &agent_tool_sets {
                    Some(sets) => (tools_system.clone(), Some(sets[prompt].clone())),
                    None => (agent_systems[prompt].clone(), None),
                };
                Session {
                    id,
                    kind,
                    start_s: t,
                    system: Some(system),
                    tools,
                    turns,
                    tenant: Some(prompt),
                    episode: None,
                }
            }
            // (`Replay` is never drawn: replayed traces come from `replay`.)
            Kind::Burst | Kind::Replay => {
                let tenant = r.usize(0..burst_systems.len());
                burst_session(a, &mut r, id, t, &burst_systems, tenant, None)
            }
        };
        sessions.push(s);
        t += exp(&mut r, 1.0 / session_rate);
    }
    // Hot-tenant episodes: evenly spaced (with jitter) so that every run of a few gaps has
    // some; each sends `burst_requests` requests of one tenant over `burst_len_s` seconds.
    if a.mix.burst > 0.0 && a.burst_fraction > 0.0 {
        let episode_requests_per_s = a.rate * a.mix.burst / a.mix.total() * a.burst_fraction;
        let gap = a.burst_requests as f64 / episode_requests_per_s;
        let mut rb = fastrand::Rng::with_seed(a.seed ^ 0x6275_7273_745f_6570);
        let mut k = 0usize;
        loop {
            let start = (k as f64 + 0.5 + (rb.f64() - 0.5) * 0.5) * gap;
            if start >= a.duration {
                break;
            }
            let tenant = rb.usize(0..burst_systems.len());
            let mut times: Vec<f64> = (0..a.burst_requests)
                .map(|_| start + rb.f64() * a.burst_len_s)
                .collect();
            times.sort_by(f64::total_cmp);
            for at in times.into_iter().filter(|&at| at < a.duration) {
                let id = sessions.len();
                let s = burst_session(a, &mut rb, id, at, &burst_systems, tenant, Some(k));
                sessions.push(s);
            }
            k += 1;
        }
    }
    Ok(Trace {
        sessions,
        duration_s: a.duration,
        model: a.model.clone(),
    })
}

fn burst_session(
    a: &WorkloadArgs,
    r: &mut fastrand::Rng,
    id: usize,
    start_s: f64,
    systems: &[Arc<str>],
    tenant: usize,
    episode: Option<usize>,
) -> Session {
    Session {
        id,
        kind: Kind::Burst,
        start_s,
        system: Some(systems[tenant].clone()),
        tools: None,
        turns: vec![Turn {
            user: format!("[{id}] {}", text_of(r, a.burst_user_tokens)),
            max_tokens: a.output_tokens.sample(r).max(1),
            think_s: 0.0,
        }],
        tenant: Some(tenant),
        episode,
    }
}

/// The workload options of a command line `extra` (tests).
#[cfg(test)]
pub(crate) fn args_from(extra: &[&str]) -> WorkloadArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        w: WorkloadArgs,
    }
    P::parse_from(std::iter::once("x").chain(extra.iter().copied())).w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> WorkloadArgs {
        args_from(extra)
    }

    #[test]
    fn same_seed_same_trace_and_mix_respected() {
        let a = args(&["--rate", "20", "--duration", "200"]);
        let t1 = generate(&a).unwrap();
        let t2 = generate(&a).unwrap();
        assert_eq!(t1.sessions.len(), t2.sessions.len());
        for (x, y) in t1.sessions.iter().zip(&t2.sessions) {
            assert_eq!(x.start_s, y.start_s);
            assert_eq!(x.turns[0].user, y.turns[0].user);
        }
        let n = t1.max_requests() as f64;
        assert!((n / 200.0 - 20.0).abs() < 2.0, "request rate {}", n / 200.0);
        let chat: usize = t1
            .sessions
            .iter()
            .filter(|s| s.kind == Kind::Chat)
            .map(|s| s.turns.len())
            .sum();
        assert!((chat as f64 / n - 0.5).abs() < 0.05);
        let other = generate(&args(&["--rate", "20", "--duration", "200", "--seed", "2"])).unwrap();
        assert_ne!(
            other.sessions[0].turns[0].user,
            t1.sessions[0].turns[0].user
        );
    }

    #[test]
    fn parsing_and_text_lengths() {
        assert_eq!("5:9".parse::<Range>().unwrap(), Range { lo: 5, hi: 9 });
        assert!("9:5".parse::<Range>().is_err());
        assert!("chat=1,bogus=2".parse::<Mix>().is_err());
        let m: Mix = "rag=1".parse().unwrap();
        assert_eq!((m.chat, m.rag, m.unique), (0.0, 1.0, 0.0));
        let mut r = fastrand::Rng::with_seed(3);
        assert_eq!(words(&mut r, 100).len(), 100 * CHARS_PER_TOKEN);
    }

    /// A digest of everything a trace sends (times, texts, lengths, think times).
    fn fingerprint(t: &Trace) -> u64 {
        let mut s = String::new();
        for x in &t.sessions {
            s.push_str(&format!("{}|{:?}|{}|", x.id, x.kind, x.start_s.to_bits()));
            if let Some(sys) = &x.system {
                s.push_str(sys);
            }
            for turn in &x.turns {
                s.push_str(&format!(
                    "|{}|{}|{}",
                    turn.user,
                    turn.max_tokens,
                    turn.think_s.to_bits()
                ));
            }
            s.push('\n');
        }
        xxhash_rust::xxh3::xxh3_64(s.as_bytes())
    }

    /// The traces of the original workloads (chat, rag, unique) must not change when workloads
    /// are added: the digests below were taken from the generator before agent and burst
    /// existed (checked against a copy of it), and published benchmark numbers used these traces.
    #[test]
    fn the_original_workloads_give_the_same_traces_as_before() {
        for (extra, digest) in [
            (&[][..], 0x0b55_6676_bf4f_0516u64),
            (&["--seed", "2"][..], 0x2541_702f_0278_3585),
            (
                &["--mix", "chat=1", "--seed", "3"][..],
                0x8fb9_3535_f326_aeac,
            ),
            (
                &["--mix", "rag=0.3,unique=0.7", "--rate", "11"][..],
                0x9f48_053b_1f34_07f2,
            ),
            (
                &["--mix", "chat=0.2,rag=0.2,unique=0.6", "--turns", "1:3"][..],
                0x8ace_5350_8627_6cf3,
            ),
        ] {
            assert_eq!(
                fingerprint(&generate(&args(extra)).unwrap()),
                digest,
                "{extra:?}"
            );
        }
    }

    #[test]
    fn agent_sessions_are_long_multi_turn_and_deterministic() {
        let a = args(&["--mix", "agent=1", "--rate", "4", "--duration", "300"]);
        let t = generate(&a).unwrap();
        assert_eq!(fingerprint(&t), fingerprint(&generate(&a).unwrap()));
        let other = args(&[
            "--mix",
            "agent=1",
            "--rate",
            "4",
            "--duration",
            "300",
            "--seed",
            "9",
        ]);
        assert_ne!(fingerprint(&t), fingerprint(&generate(&other).unwrap()));
        assert!(t.sessions.iter().all(|s| s.kind == Kind::Agent));
        let n = t.max_requests() as f64;
        assert!((n / 300.0 - 4.0).abs() < 0.8, "request rate {}", n / 300.0);
        let cfg = crate::engine::EngineConfig::default();
        let mut prompts = std::collections::BTreeSet::new();
        for s in &t.sessions {
            assert!(s.turns.len() >= 4 && s.turns.len() <= 10);
            prompts.insert(s.tenant.unwrap());
            // The first turn carries the private context, later ones tool output.
            assert!(s.turns[0].user.len() >= 2000 * CHARS_PER_TOKEN);
            assert!(s.turns[1..].iter().all(|x| x.user.contains("Tool result")));
            assert!(s.turns.iter().all(|x| (150..=600).contains(&x.max_tokens)));
            assert!(s.turns[1..].iter().all(|x| x.think_s > 0.0));
            // The whole history with every reply stays below the model length.
            let chars = s.system.as_ref().unwrap().len()
                + s.turns.iter().map(|x| x.user.len() + 40).sum::<usize>()
                + s.turns
                    .iter()
                    .map(|x| x.max_tokens as usize * CHARS_PER_TOKEN)
                    .sum::<usize>();
            assert!(chars / CHARS_PER_TOKEN < cfg.max_model_len, "{chars} chars");
        }
        assert_eq!(
            prompts.len(),
            4,
            "the agent prompts are shared by the sessions"
        );
    }

    #[test]
    fn agent_tools_split_the_prompt_words_into_four_parts_in_order() {
        let tools = agent_tools("a b  c d e f g h i j");
        let names: Vec<&str> = tools.iter().map(|t| t.name).collect();
        assert_eq!(names, AGENT_TOOL_NAMES);
        let parts: Vec<&str> = tools.iter().map(|t| t.description.as_str()).collect();
        assert_eq!(parts, ["a b", "c d e", "f g", "h i j"]);
        assert_eq!(agent_tools("x")[3].description, "x");
        assert!(agent_tools("x")[..3]
            .iter()
            .all(|t| t.description.is_empty()));
    }

    #[test]
    fn the_tools_field_moves_the_agent_prompts_into_tools_and_changes_nothing_else() {
        let agent = ["--mix", "agent=1", "--rate", "4", "--duration", "120"];
        let plain = generate(&args(&agent)).unwrap();
        let with = generate(&args(&[&agent[..], &["--tools-field"]].concat())).unwrap();
        assert_eq!(plain.sessions.len(), with.sessions.len());
        for (p, w) in plain.sessions.iter().zip(&with.sessions) {
            assert_eq!(
                (p.start_s, p.tenant, p.turns.len()),
                (w.start_s, w.tenant, w.turns.len())
            );
            assert!(p.turns.iter().zip(&w.turns).all(|(a, b)| a.user == b.user));
            assert!(p.tools.is_none());
            // One system line for every agent prompt; the prompt's words in the tools.
            assert_eq!(w.system.as_deref(), Some(AGENT_TOOLS_SYSTEM));
            let tools = w.tools.as_ref().unwrap();
            assert_eq!(tools.len(), 4);
            let text = p.system.as_deref().unwrap();
            let words: Vec<&str> = text.split_whitespace().collect();
            let descriptions: Vec<&str> = tools.iter().map(|t| t.description.as_str()).collect();
            assert_eq!(descriptions.join(" "), words.join(" "));
            let sizes: Vec<usize> = tools.iter().map(|t| t.description.len()).collect();
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(hi - lo < text.len() / 10, "{sizes:?}");
        }
        // Other workloads: the same traces, no tools.
        for mix in ["chat=0.5,rag=0.4,unique=0.1", "chat=0.4,burst=0.6"] {
            let a = ["--mix", mix, "--duration", "60"];
            let t = generate(&args(&a)).unwrap();
            let f = generate(&args(&[&a[..], &["--tools-field"]].concat())).unwrap();
            assert_eq!(fingerprint(&t), fingerprint(&f), "{mix}");
            assert!(f.sessions.iter().all(|s| s.tools.is_none()));
        }
        // Off, it is left out of the workload's JSON (as it was before it existed).
        let json = serde_json::to_value(args(&[])).unwrap();
        assert!(json.get("tools_field").is_none(), "{json}");
        let json = serde_json::to_value(args(&["--tools-field"])).unwrap();
        assert_eq!(json["tools_field"], true);
    }

    #[test]
    fn burst_episodes_overload_one_server_with_one_tenant() {
        let a = args(&["--mix", "burst=1", "--rate", "8", "--duration", "120"]);
        let t = generate(&a).unwrap();
        assert_eq!(fingerprint(&t), fingerprint(&generate(&a).unwrap()));
        let n = t.max_requests() as f64;
        assert!((n / 120.0 - 8.0).abs() < 1.0, "request rate {}", n / 120.0);
        let in_episodes = t.sessions.iter().filter(|s| s.episode.is_some()).count() as f64;
        assert!((in_episodes / n - 0.5).abs() < 0.1, "{in_episodes} of {n}");
        let tenants: std::collections::BTreeSet<usize> =
            t.sessions.iter().filter_map(|s| s.tenant).collect();
        assert!(tenants.len() > 20, "many tenants: {}", tenants.len());
        // One server prefills ~1/prefill_token_s tokens/s; a burst request's uncached part is
        // its user message (the tenant's system prompt is cached after the first request).
        let cfg = crate::engine::EngineConfig::default();
        let one_server = 1.0 / (cfg.prefill_token_s * a.burst_user_tokens.mean());
        let episodes = t.sessions.iter().filter_map(|s| s.episode).max().unwrap() + 1;
        assert!(episodes >= 4, "{episodes} episodes in 120 s");
        for e in 0..episodes {
            let reqs: Vec<&Session> = t.sessions.iter().filter(|s| s.episode == Some(e)).collect();
            let tenant = reqs[0].tenant;
            assert!(reqs
                .iter()
                .all(|s| s.tenant == tenant && s.kind == Kind::Burst));
            let t0 = reqs.iter().map(|s| s.start_s).fold(f64::INFINITY, f64::min);
            let t1 = reqs.iter().map(|s| s.start_s).fold(0.0, f64::max);
            assert!(t1 - t0 <= a.burst_len_s);
            if reqs.len() as u64 == a.burst_requests {
                let hot_rate = reqs.len() as f64 / a.burst_len_s;
                assert!(
                    hot_rate > 1.4 * one_server,
                    "episode {e}: {hot_rate} req/s vs one server's {one_server}"
                );
            }
        }
        // Mixed with the old workloads: the request shares hold.
        let m = generate(&args(&[
            "--mix",
            "chat=0.4,rag=0.2,unique=0.1,agent=0.1,burst=0.2",
            "--rate",
            "20",
            "--duration",
            "300",
        ]))
        .unwrap();
        let total = m.max_requests() as f64;
        for (kind, share) in [(Kind::Chat, 0.4), (Kind::Agent, 0.1), (Kind::Burst, 0.2)] {
            let k: usize = m
                .sessions
                .iter()
                .filter(|s| s.kind == kind)
                .map(|s| s.turns.len())
                .sum();
            assert!(
                (k as f64 / total - share).abs() < 0.05,
                "{kind:?}: {k} of {total}"
            );
        }
        assert!((total / 300.0 - 20.0).abs() < 2.0);
        let p: Mix = "agent=1,burst=2".parse().unwrap();
        assert_eq!((p.agent, p.burst, p.chat), (1.0, 2.0, 0.0));
    }
}
