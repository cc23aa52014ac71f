//! Prefix hashing of the canonical prompt.
//!
//! The prompt is cut into fixed-size chunks (`hash_chunk_bytes`, default 512). Hashes are
//! chained: `hash[i]` is xxh3-64 of chunk `i` seeded with `hash[i-1]` (the first seeded with the
//! model name's hash), so it names the whole prefix `[0, (i+1)·chunk)` (the last chunk may be
//! short): two prompts that share their first k full chunks share their first k hashes, and
//! different models never share entries. Each chunk is hashed once, in one call: O(n), with
//! no streaming state to read after every chunk. What continues a prompt later (the answer's
//! learning) is the last hash and the current partial chunk, under `chunk` bytes.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Bytes reserved for the partial chunk when a prompt starts (its chunk size, at most this).
const PENDING_RESERVE: usize = 4096;

/// Characters of text in one token, about (English text, BPE tokenizers): the unit the router
/// converts tokens to when it needs characters, and back.
pub const CHARS_PER_TOKEN: u64 = 4;

/// Incremental chained chunk hasher: feed the prompt in pieces, get one hash per chunk.
pub struct PrefixHasher {
    /// The hash of the prompt up to its last full chunk (the model's hash before the first).
    chain: u64,
    chunk_bytes: usize,
    /// The current partial chunk: fewer than `chunk_bytes` bytes.
    pending: Vec<u8>,
    hashes: Vec<u64>,
    chars: u64,
    /// Full chunks completed since the start of the prompt.
    full_chunks: usize,
    /// Media parts fed ([`PrefixHasher::feed_media`]).
    media_parts: u64,
}

impl PrefixHasher {
    /// Starts hashing a prompt of `model` with chunks of `chunk_bytes` bytes.
    pub fn new(model: &str, chunk_bytes: usize) -> Self {
        assert!(chunk_bytes > 0, "chunk_bytes must be positive");
        Self {
            chain: xxh3_64(model.as_bytes()),
            chunk_bytes,
            pending: Vec::new(),
            hashes: Vec::new(),
            chars: 0,
            full_chunks: 0,
            media_parts: 0,
        }
    }

    /// Puts the prompt in a cache domain of its own before any of it is fed: `value` of the
    /// request's `field` (vLLM's `cache_salt`, SGLang's `extra_key` or `lora_path`), which the
    /// engine keeps the cache of apart from every other value's, so that the same prompt under
    /// another value shares no hash with it.
    pub fn isolate(&mut self, field: &[u8], value: &[u8]) {
        debug_assert!(
            self.full_chunks == 0 && self.pending.is_empty(),
            "isolate before feeding"
        );
        self.chain = xxh3_64_with_seed(value, self.chain ^ xxh3_64(field));
    }

    /// Appends `bytes` to the prompt.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.chars += bytecount::num_chars(bytes) as u64;
        self.push(bytes);
    }

    /// Appends a prompt given as token ids: each as its 4 bytes (little-endian), counted as
    /// [`CHARS_PER_TOKEN`] characters (the router's loads are in characters of text).
    pub fn feed_tokens(&mut self, tokens: &[u32]) {
        self.chars += CHARS_PER_TOKEN * tokens.len() as u64;
        // 64 ids per push, not one: a long prompt of ids is chunked and hashed like text
        let mut bytes = [0u8; 256];
        for ids in tokens.chunks(bytes.len() / 4) {
            for (b, id) in bytes.chunks_exact_mut(4).zip(ids) {
                b.copy_from_slice(&id.to_le_bytes());
            }
            self.push(&bytes[..4 * ids.len()]);
        }
    }

    /// Appends `bytes` to the chunks, without counting characters.
    fn push(&mut self, mut bytes: &[u8]) {
        if self.pending.capacity() == 0 {
            // room for a whole chunk at once (up to 4 KiB: larger chunks grow as they fill)
            self.pending
                .reserve_exact(self.chunk_bytes.min(PENDING_RESERVE));
        }
        if !self.pending.is_empty() {
            let take = (self.chunk_bytes - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() < self.chunk_bytes {
                return;
            }
            let chunk = std::mem::take(&mut self.pending);
            self.complete(&chunk);
            self.pending = chunk;
            self.pending.clear();
        }
        // whole chunks straight from the input; only a remainder is copied
        let mut whole = bytes.chunks_exact(self.chunk_bytes);
        for chunk in &mut whole {
            self.complete(chunk);
        }
        self.pending.extend_from_slice(whole.remainder());
    }

    /// A full chunk: the next link of the chain.
    fn complete(&mut self, chunk: &[u8]) {
        self.chain = xxh3_64_with_seed(chunk, self.chain);
        self.hashes.push(self.chain);
        self.full_chunks += 1;
    }

    /// Appends a string to the prompt.
    pub fn feed_str(&mut self, s: &str) {
        self.feed(s.as_bytes());
    }

    /// Appends a media part of the prompt (an image, audio clip or video), identified by
    /// `reference` (its URL, data or file id): a marker and the reference's hash, so that
    /// prompts showing different media differ from there on. Counted in
    /// [`PrefixHasher::media_parts`], not in characters.
    pub fn feed_media(&mut self, reference: &[u8]) {
        self.media_parts += 1;
        self.push(b"<|media|>");
        self.push(&xxh3_64(reference).to_le_bytes());
    }

    /// Media parts fed so far.
    pub fn media_parts(&self) -> u64 {
        self.media_parts
    }

    /// Full chunks completed since the start of the prompt (also those before
    /// [`PrefixHasher::take_hashes`]).
    pub fn full_chunks(&self) -> usize {
        self.full_chunks
    }

    /// Hashes of the full chunks completed so far (since [`PrefixHasher::take_hashes`], if it
    /// was called).
    pub fn full_chunk_hashes(&self) -> &[u64] {
        &self.hashes
    }

    /// Finishes: the hash of every chunk, the last (short) one included, and the prompt's
    /// length in characters.
    pub fn finish(mut self) -> (Vec<u64>, u64) {
        self.take_hashes()
    }

    /// [`PrefixHasher::finish`] that keeps the hasher: it gives the same hashes and length and
    /// leaves the hasher at the end of the prompt without them, so that feeding it more text
    /// continues the same prompt and its hashes are those of the chunks completed after it.
    pub fn take_hashes(&mut self) -> (Vec<u64>, u64) {
        let mut hashes = std::mem::take(&mut self.hashes);
        if !self.pending.is_empty() {
            hashes.push(xxh3_64_with_seed(&self.pending, self.chain));
        }
        (hashes, self.chars)
    }
}

/// Moves a prompt's hashes into the domain of the model the backend actually serves, when it
/// differs from the client's model (a LoRA adapter, a `target_model` alias): another served
/// model has KV caches of its own, so the same prompt must not match across them. The one
/// place the hash domain is defined: seeded by the client model ([`PrefixHasher::new`]) and the
/// request's cache isolation fields ([`PrefixHasher::isolate`]), salted by the served model here.
pub fn salt_for_served_model(hashes: &mut [u64], client_model: &str, served_model: &str) {
    if served_model != client_model {
        let salt = xxh3_64(served_model.as_bytes());
        hashes.iter_mut().for_each(|h| *h ^= salt);
    }
}

/// Seed of the session keys' domain (a prefix hash is seeded by the model name alone).
const SESSION_SEED: u64 = 0x5e55_1011_a77f_1417;

/// The prefix-index key of a session (`session_affinity`): the session's name (a header's
/// value, the `user` field) hashed in a domain of its own per model, so that two models'
/// sessions never share a binding and a session key equals a prompt's prefix hash only by a
/// 64-bit collision. Never 0 (the index's empty marker).
pub fn session_key(model: &str, session: &[u8]) -> u64 {
    let seed = xxh3_64(model.as_bytes()) ^ SESSION_SEED;
    xxh3_64_with_seed(session, seed).max(1)
}

/// Seed of the response keys' domain.
const RESPONSE_SEED: u64 = 0x7e5b_0a5e_c4a1_2b3d;

/// The prefix-index key of a Responses API answer's id: the endpoint that stored the answer
/// is bound to it, and a request naming it as `previous_response_id` goes there. Ids are
/// unique across models, so the key is the id's alone. Never 0.
pub fn response_key(response_id: &str) -> u64 {
    xxh3_64_with_seed(response_id.as_bytes(), RESPONSE_SEED).max(1)
}

/// Hashes a whole prompt at once (convenience for tests and tools).
pub fn prefix_hashes(model: &str, prompt: &[u8], chunk_bytes: usize) -> Vec<u64> {
    let mut h = PrefixHasher::new(model, chunk_bytes);
    h.feed(prompt);
    h.finish().0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn token_ids_hash_as_their_little_endian_bytes_at_four_characters_each() {
        let ids: Vec<u32> = (0..1000u32)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect();
        let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
        let mut tokens = PrefixHasher::new("m", 512);
        tokens.feed_tokens(&ids[..3]);
        tokens.feed_tokens(&ids[3..]);
        let (hashes, chars) = tokens.finish();
        let mut text = PrefixHasher::new("m", 512);
        text.feed(&bytes);
        assert_eq!(hashes, text.finish().0);
        assert_eq!(chars, 4_000);
    }

    #[test]
    fn hash_i_chains_chunk_i_to_the_hash_before_it() {
        let prompt: Vec<u8> = (0..1300u32).map(|i| (i % 251) as u8).collect();
        let hashes = prefix_hashes("m", &prompt, 512);
        assert_eq!(hashes.len(), 3);
        let mut chain = xxh3_64(b"m");
        for (i, chunk) in prompt.chunks(512).enumerate() {
            chain = xxh3_64_with_seed(chunk, chain);
            assert_eq!(hashes[i], chain, "chunk {i}");
        }
    }

    #[test]
    fn a_short_last_chunk_names_only_prompts_that_end_there() {
        let text: Vec<u8> = (0..1300u32).map(|i| (i % 97) as u8 + 32).collect();
        let short = prefix_hashes("m", &text[..700], 512);
        let long = prefix_hashes("m", &text, 512);
        assert_eq!(short[0], long[0]);
        assert_ne!(short[1], long[1], "700 bytes vs the first 1,024");
    }

    #[test]
    fn empty_prompt_has_no_hashes() {
        assert!(prefix_hashes("m", b"", 512).is_empty());
    }

    #[test]
    fn models_never_share_hashes() {
        assert_ne!(
            prefix_hashes("a", b"hello", 512),
            prefix_hashes("b", b"hello", 512)
        );
    }

    #[test]
    fn session_keys_are_per_model_and_apart_from_prefix_hashes() {
        let k = session_key("m", b"conversation-1");
        assert_eq!(k, session_key("m", b"conversation-1"));
        assert_ne!(k, session_key("m", b"conversation-2"));
        assert_ne!(k, session_key("other", b"conversation-1"));
        // the same text as a prompt hashes elsewhere
        assert_ne!(k, prefix_hashes("m", b"conversation-1", 512)[0]);
        assert_ne!(session_key("m", b""), 0);
    }

    #[test]
    fn counts_characters_not_bytes() {
        let mut h = PrefixHasher::new("m", 4);
        h.feed_str("héllo wörld ✓");
        let (hashes, chars) = h.finish();
        assert_eq!(chars, 13);
        assert_eq!(hashes.len(), "héllo wörld ✓".len().div_ceil(4));
    }

    #[test]
    fn take_hashes_finishes_and_leaves_the_prompts_continuation() {
        let text: Vec<u8> = (0..2000u32).map(|i| (i % 89) as u8 + 32).collect();
        let whole = prefix_hashes("m", &text, 64);
        let mut h = PrefixHasher::new("m", 64);
        h.feed(&text[..700]);
        let (hashes, chars) = h.take_hashes();
        assert_eq!(hashes, prefix_hashes("m", &text[..700], 64));
        assert_eq!(chars, 700);
        // What is left continues the same prompt.
        assert!(h.full_chunk_hashes().is_empty());
        assert_eq!(h.full_chunks(), 10);
        h.feed(&text[700..]);
        assert_eq!(h.full_chunks(), 31);
        // Chunks 11.. complete after byte 700 (the last one, short, is not a full chunk).
        assert_eq!(h.full_chunk_hashes(), &whole[10..31]);
    }

    proptest! {
        // A prompt that extends another shares all of the shorter one's full-chunk hashes.
        #[test]
        fn prefix_property(base in proptest::collection::vec(any::<u8>(), 0..3000),
                           ext in proptest::collection::vec(any::<u8>(), 0..3000),
                           chunk in 16usize..700) {
            let short = prefix_hashes("m", &base, chunk);
            let mut long_prompt = base.clone();
            long_prompt.extend_from_slice(&ext);
            let long = prefix_hashes("m", &long_prompt, chunk);
            let full = base.len() / chunk;
            prop_assert_eq!(&short[..full], &long[..full]);
        }

        // Feeding in arbitrary pieces gives the same hashes as feeding at once.
        #[test]
        fn piecewise_feeding_is_identical(data in proptest::collection::vec(any::<u8>(), 0..4000),
                                          cuts in proptest::collection::vec(0usize..4000, 0..10)) {
            let whole = prefix_hashes("m", &data, 100);
            let mut h = PrefixHasher::new("m", 100);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort();
            let mut start = 0;
            for c in cuts { h.feed(&data[start..c]); start = c; }
            h.feed(&data[start..]);
            prop_assert_eq!(h.finish().0, whole);
        }

        // A different byte inside the first chunk changes every hash.
        #[test]
        fn change_in_first_chunk_changes_all(data in proptest::collection::vec(any::<u8>(), 1..2000), pos in 0usize..64) {
            let pos = pos % data.len().min(64);
            let mut other = data.clone();
            other[pos] ^= 1;
            let a = prefix_hashes("m", &data, 64);
            let b = prefix_hashes("m", &other, 64);
            for (x, y) in a.iter().zip(b.iter()) { prop_assert_ne!(x, y); }
        }
    }
}
