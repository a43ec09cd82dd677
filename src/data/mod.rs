//! The data layer: text in, token batches out.
//!
//! - [`tokenizer`]: char-level and byte-level BPE tokenizers, saved as Hugging Face
//!   `tokenizer.json`.
//! - [`shard`]: the `train.bin` / `val.bin` token files (small fixed header, u16 or u32 tokens),
//!   written atomically and memory-mapped with full validation.
//! - [`prepare`]: `halfling prepare` — text file to tokenizer + shards + `meta.json`, and the
//!   staleness check that lets `train` re-prepare only when the source or options changed.
//! - [`loader`]: seeded random training batches with exact-resume state, and sequential
//!   evaluation batches that cover a split once.
//! - [`rng`]: the small deterministic PRNG used by the loader (and reusable elsewhere).

pub mod loader;
pub mod prepare;
pub mod rng;
pub mod shard;
pub mod tokenizer;

pub use loader::{BatchLoader, EvalBatches, LoaderState};
pub use prepare::{
    is_stale, prepare, stale_reason, PrepareMeta, PrepareOptions, PrepareReport, TokenizerKind,
    META_FILE, TOKENIZER_FILE, TRAIN_FILE, VAL_FILE,
};
pub use rng::Rng;
pub use shard::{read_shard_header, write_shard, Shard, ShardHeader, TokenDtype};
pub use tokenizer::Tokenizer;

/// FNV-1a 64-bit hash of `bytes`: fast, dependency-free content fingerprint for staleness checks
/// (not cryptographic; it only has to notice that a corpus was edited).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(PRIME)
    })
}

/// Files are written with [`crate::checkpoint::write_atomic`] (temp file, fsync, rename).
pub use crate::checkpoint::write_atomic;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_reference_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }
}
