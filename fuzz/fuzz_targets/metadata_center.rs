//! The metadata-center server's request handling: arbitrary bodies through the wire decoder of
//! every API (envelope errors, never a panic), and decoded cache saves / queries applied to a
//! bounded radix-tree pool.
#![no_main]
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use llmproxy_metadata_center::cache::{CacheConfig, CachePool};
use llmproxy_metadata_center::endpoint::Endpoint;
use llmproxy_metadata_center::envelope::decode;
use llmproxy_metadata_center::wire::{CacheQuery, CacheSave, DeleteRequest, InferenceRequest};

fn pool() -> &'static CachePool {
    static P: OnceLock<CachePool> = OnceLock::new();
    P.get_or_init(|| CachePool::new(CacheConfig::default()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else { return };
    let now = Duration::from_secs(u64::from(sel));
    match sel % 4 {
        0 => {
            let _ = decode::<InferenceRequest>(body).map_err(|e| e.http_status());
        }
        1 => {
            let _ = decode::<DeleteRequest>(body).map_err(|e| e.http_status());
        }
        2 => {
            if let Ok(save) = decode::<CacheSave>(body) {
                let loc = save.ip.as_deref().and_then(|ip| ip.parse::<Endpoint>().ok());
                if let (Some(cluster), Some(keys), Some(loc)) = (save.cluster, save.prompt_hash, loc) {
                    pool().save(&cluster, &keys, loc, now);
                }
            }
        }
        _ => {
            if let Ok(q) = decode::<CacheQuery>(body) {
                if let (Some(cluster), Some(keys)) = (q.cluster, q.prompt_hash) {
                    let k = q.top_k.or(q.topk).unwrap_or(5).clamp(1, 64) as usize;
                    let found = pool().query(&cluster, &keys, k, now);
                    assert!(found.len() <= k);
                    assert!(found.iter().all(|(_, depth)| *depth <= keys.len()));
                }
            }
        }
    }
});
