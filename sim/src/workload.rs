//! Seeded workload traces: multi-tenant chat (long shared system prompts, multi-turn sessions
//! that resend the history after a think time), RAG (shared documents, short questions) and
//! unique prompts. The same arguments and seed always give the same trace.

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

/// Request shares of the three workloads, e.g. "chat=0.6,rag=0.3,unique=0.1".
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Mix {
    pub chat: f64,
    pub rag: f64,
    pub unique: f64,
}

impl FromStr for Mix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut m = Mix {
            chat: 0.0,
            rag: 0.0,
            unique: 0.0,
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
                other => return Err(format!("unknown workload {other:?} (chat, rag, unique)")),
            }
        }
        if m.chat + m.rag + m.unique <= 0.0 {
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
    /// Output length of every request (max_tokens).
    #[arg(long, default_value = "32:160")]
    pub output_tokens: Range,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Chat,
    Rag,
    Unique,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Rag => "rag",
            Kind::Unique => "unique",
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

#[derive(Debug, Clone)]
pub struct Session {
    pub id: usize,
    pub kind: Kind,
    pub start_s: f64,
    pub system: Option<Arc<str>>,
    pub turns: Vec<Turn>,
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
    if a.mix.chat > 0.0 && (a.tenants == 0 || a.turns.lo == 0) {
        return Err("chat needs --tenants >= 1 and --turns >= 1".into());
    }
    if a.mix.rag > 0.0 && a.docs == 0 {
        return Err("rag needs --docs >= 1".into());
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

    // Session kinds are drawn so that the *request* shares match the mix.
    let per_session = [a.turns.mean(), 1.0, 1.0];
    let w = [a.mix.chat / per_session[0], a.mix.rag, a.mix.unique];
    let wsum: f64 = w.iter().sum();
    let mean_requests: f64 = (a.mix.chat + a.mix.rag + a.mix.unique) / wsum;
    let session_rate = a.rate / mean_requests;

    let mut sessions = Vec::new();
    let mut t = exp(&mut r, 1.0 / session_rate);
    while t < a.duration {
        let x = r.f64() * wsum;
        let kind = if x < w[0] {
            Kind::Chat
        } else if x < w[0] + w[1] {
            Kind::Rag
        } else {
            Kind::Unique
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
                    turns,
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
                    turns: vec![Turn {
                        user: format!("{}\n\nQuestion [{id}]: {q}?", docs[d]),
                        max_tokens: a.output_tokens.sample(&mut r).max(1),
                        think_s: 0.0,
                    }],
                }
            }
            Kind::Unique => Session {
                id,
                kind,
                start_s: t,
                system: None,
                turns: vec![Turn {
                    user: format!("[{id}] {}", text_of(&mut r, a.unique_tokens)),
                    max_tokens: a.output_tokens.sample(&mut r).max(1),
                    think_s: 0.0,
                }],
            },
        };
        sessions.push(s);
        t += exp(&mut r, 1.0 / session_rate);
    }
    Ok(Trace {
        sessions,
        duration_s: a.duration,
        model: a.model.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        w: WorkloadArgs,
    }

    fn args(extra: &[&str]) -> WorkloadArgs {
        let mut v = vec!["x"];
        v.extend_from_slice(extra);
        P::parse_from(v).w
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
}
