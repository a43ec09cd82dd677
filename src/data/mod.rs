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

use anyhow::Context;
use std::io::Write;
use std::path::{Path, PathBuf};

/// FNV-1a 64-bit hash of `bytes`: fast, dependency-free content fingerprint for staleness checks
/// (not cryptographic; it only has to notice that a corpus was edited).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(PRIME)
    })
}

/// `path` with `.tmp` appended to its file name (same directory, so the final rename is atomic).
fn temp_path_for(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `bytes` to `path` atomically: write `path.tmp`, fsync it, rename it over `path`, then
/// fsync the directory (best effort) so the rename itself survives a crash.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = temp_path_for(path);
    let result = (|| -> anyhow::Result<()> {
        let mut file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("cannot flush {} to disk", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        // Do not leave a half-written temp file behind; the original error is what matters.
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| {
        format!(
            "failed to write {} (check free disk space and permissions)",
            path.display()
        )
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

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

    #[test]
    fn write_atomic_replaces_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!dir.path().join("x.json.tmp").exists());
        let err = write_atomic(&dir.path().join("no/such/dir/x"), b"z")
            .unwrap_err()
            .to_string();
        assert!(err.contains("failed to write"), "{err}");
    }
}
