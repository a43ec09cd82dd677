//! Batches of (input, target) token windows from a [`Shard`].
//!
//! - [`BatchLoader`]: training batches of B windows at seeded, uniformly random offsets. Its
//!   whole state ([`LoaderState`]) is serializable, so a resumed run draws exactly the batches
//!   the interrupted run would have drawn.
//! - [`EvalBatches`]: evaluation batches of non-overlapping windows that walk the split in
//!   order and cover it once, so a validation loss is a deterministic function of the weights.
//!
//! A window is T+1 consecutive tokens: inputs are the first T, targets the last T (the inputs
//! shifted by one). Buffers are row-major `[B][T]`.

use super::rng::Rng;
use super::shard::Shard;
use anyhow::bail;
use serde::{Deserialize, Serialize};

/// The split's name for error messages: the shard's file stem ("train", "val").
fn split_name(shard: &Shard) -> String {
    shard
        .path()
        .file_stem()
        .map_or_else(|| "data".to_string(), |s| s.to_string_lossy().into_owned())
}

/// Checks sizes and that the shard holds at least one full window.
fn check_shape(shard: &Shard, batch_size: usize, context: usize) -> anyhow::Result<()> {
    if batch_size == 0 || context == 0 {
        bail!(
            "batch size ({batch_size}) and context length ({context}) must both be at least 1; \
             fix the training batch size / model.block_size"
        );
    }
    if shard.len() <= context {
        bail!(
            "{} split has {} tokens, fewer than context+1 = {}: lower model.block_size or use \
             more text",
            split_name(shard),
            shard.len(),
            context + 1
        );
    }
    Ok(())
}

/// Splits one window of T+1 tokens into a row of inputs and a row of targets.
fn fill_row(window: &[u32], inputs: &mut [u32], targets: &mut [u32]) {
    let t = inputs.len();
    inputs.copy_from_slice(&window[..t]);
    targets.copy_from_slice(&window[1..=t]);
}

/// Everything needed to continue a [`BatchLoader`] exactly where it stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Seed the loader was created with.
    pub seed: u64,
    /// Windows per batch.
    pub batch_size: usize,
    /// Tokens per window input (T).
    pub context: usize,
    /// Tokens in the shard it was drawing from (a changed shard cannot be resumed exactly).
    pub shard_tokens: u64,
    /// Batches drawn so far.
    pub batches_drawn: u64,
    /// Generator state after the last batch.
    pub rng: Rng,
}

/// Seeded random training batches over one shard.
#[derive(Clone, Debug)]
pub struct BatchLoader {
    shard: Shard,
    batch_size: usize,
    context: usize,
    seed: u64,
    rng: Rng,
    batches_drawn: u64,
    /// Scratch for one T+1 window, reused across batches.
    window: Vec<u32>,
}

impl BatchLoader {
    /// A loader drawing `batch_size` windows of `context` (+1) tokens per batch from `shard`,
    /// with offsets determined by `seed`. Fails if the shard is shorter than one window.
    pub fn new(shard: Shard, batch_size: usize, context: usize, seed: u64) -> anyhow::Result<Self> {
        check_shape(&shard, batch_size, context)?;
        Ok(BatchLoader {
            shard,
            batch_size,
            context,
            seed,
            rng: Rng::new(seed),
            batches_drawn: 0,
            window: vec![0; context + 1],
        })
    }

    /// Windows per batch (B).
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Input tokens per window (T).
    pub fn context(&self) -> usize {
        self.context
    }

    /// Batches drawn so far.
    pub fn batches_drawn(&self) -> u64 {
        self.batches_drawn
    }

    /// The shard being sampled.
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// Fills `inputs` and `targets` (each exactly B*T long, row-major `[B][T]`) with B windows at
    /// random offsets uniform in `[0, len - T - 1]`; `targets` is `inputs` shifted by one token.
    /// Panics if a buffer has the wrong length (a caller bug).
    pub fn next_batch(&mut self, inputs: &mut [u32], targets: &mut [u32]) {
        let (b, t) = (self.batch_size, self.context);
        assert_eq!(
            inputs.len(),
            b * t,
            "inputs must hold batch_size * context tokens"
        );
        assert_eq!(
            targets.len(),
            b * t,
            "targets must hold batch_size * context tokens"
        );
        // Offsets 0..=len-T-1, so the last window ends exactly at the last token.
        let offsets = (self.shard.len() - t) as u64;
        for (in_row, tgt_row) in inputs.chunks_exact_mut(t).zip(targets.chunks_exact_mut(t)) {
            let start = self.rng.below(offsets) as usize;
            self.shard.copy_range(start, t + 1, &mut self.window);
            fill_row(&self.window, in_row, tgt_row);
        }
        self.batches_drawn += 1;
    }

    /// The state to save in a checkpoint.
    pub fn state(&self) -> LoaderState {
        LoaderState {
            seed: self.seed,
            batch_size: self.batch_size,
            context: self.context,
            shard_tokens: self.shard.len() as u64,
            batches_drawn: self.batches_drawn,
            rng: self.rng.clone(),
        }
    }

    /// Continues from a saved state. Fails if it was saved with another batch size, context or
    /// shard length, because the batches would then not be the ones the original run drew.
    pub fn restore(&mut self, state: LoaderState) -> anyhow::Result<()> {
        if state.batch_size != self.batch_size || state.context != self.context {
            bail!(
                "the checkpoint's data loader used batch size {} and context {}, but this run \
                 uses {} and {}; resume with the same batch size and model.block_size",
                state.batch_size,
                state.context,
                self.batch_size,
                self.context
            );
        }
        if state.shard_tokens != self.shard.len() as u64 {
            bail!(
                "the checkpoint was trained on a {} split of {} tokens, but {} has {}; the data \
                 was re-prepared since: restore the original text or start a fresh run",
                split_name(&self.shard),
                state.shard_tokens,
                self.shard.path().display(),
                self.shard.len()
            );
        }
        self.seed = state.seed;
        self.batches_drawn = state.batches_drawn;
        self.rng = state.rng;
        Ok(())
    }
}

/// Sequential, non-overlapping evaluation windows covering a split once, in order.
///
/// Window k covers tokens `k*T ..= k*T + T` (stride T, so every token except the first is a
/// target exactly once). There are `(len - 1) / T` windows; the last `(len - 1) % T` targets,
/// fewer than one window, are not evaluated.
#[derive(Clone, Debug)]
pub struct EvalBatches {
    shard: Shard,
    batch_size: usize,
    context: usize,
    next_window: usize,
    num_windows: usize,
    window: Vec<u32>,
}

impl EvalBatches {
    /// Evaluation batches of `batch_size` windows of `context` (+1) tokens over `shard`.
    pub fn new(shard: Shard, batch_size: usize, context: usize) -> anyhow::Result<Self> {
        check_shape(&shard, batch_size, context)?;
        let num_windows = (shard.len() - 1) / context;
        Ok(EvalBatches {
            shard,
            batch_size,
            context,
            next_window: 0,
            num_windows,
            window: vec![0; context + 1],
        })
    }

    /// Total windows in the split.
    pub fn num_windows(&self) -> usize {
        self.num_windows
    }

    /// Batches needed to cover every window (the last may be partial).
    pub fn num_batches(&self) -> usize {
        self.num_windows.div_ceil(self.batch_size)
    }

    /// Start again from the first window.
    pub fn reset(&mut self) {
        self.next_window = 0;
    }

    /// Fills the next batch and returns how many rows are valid windows (1..=B), or `None` when
    /// every window has been produced. Rows past the valid ones (only in the last batch) are
    /// zero-filled and must be ignored. Buffers are B*T long, row-major; panics otherwise.
    pub fn next_batch(&mut self, inputs: &mut [u32], targets: &mut [u32]) -> Option<usize> {
        let (b, t) = (self.batch_size, self.context);
        assert_eq!(
            inputs.len(),
            b * t,
            "inputs must hold batch_size * context tokens"
        );
        assert_eq!(
            targets.len(),
            b * t,
            "targets must hold batch_size * context tokens"
        );
        if self.next_window >= self.num_windows {
            return None;
        }
        let valid = (self.num_windows - self.next_window).min(b);
        let rows = inputs.chunks_exact_mut(t).zip(targets.chunks_exact_mut(t));
        for (row, (in_row, tgt_row)) in rows.enumerate() {
            if row < valid {
                let start = (self.next_window + row) * t;
                self.shard.copy_range(start, t + 1, &mut self.window);
                fill_row(&self.window, in_row, tgt_row);
            } else {
                in_row.fill(0);
                tgt_row.fill(0);
            }
        }
        self.next_window += valid;
        Some(valid)
    }
}

#[cfg(test)]
mod tests {
    use super::super::shard::write_shard;
    use super::*;

    /// A shard whose token i is i % vocab, so a token's value reveals its position.
    fn counting_shard(dir: &std::path::Path, name: &str, len: usize) -> Shard {
        let path = dir.join(name);
        let tokens: Vec<u32> = (0..len as u32).collect();
        write_shard(&path, &tokens, len.max(1)).unwrap();
        Shard::open(&path).unwrap()
    }

    #[test]
    fn targets_are_inputs_shifted_by_one_and_in_range() {
        let dir = tempfile::tempdir().unwrap();
        let shard = counting_shard(dir.path(), "train.bin", 100);
        let (b, t) = (4, 8);
        let mut loader = BatchLoader::new(shard, b, t, 1).unwrap();
        let mut inputs = vec![0; b * t];
        let mut targets = vec![0; b * t];
        let mut starts_seen = std::collections::HashSet::new();
        for _ in 0..500 {
            loader.next_batch(&mut inputs, &mut targets);
            for (x, y) in inputs.chunks(t).zip(targets.chunks(t)) {
                starts_seen.insert(x[0]);
                for j in 0..t {
                    // Consecutive positions in the counting shard.
                    assert_eq!(x[j], x[0] + j as u32);
                    assert_eq!(y[j], x[j] + 1);
                }
                assert!(y[t - 1] <= 99);
            }
        }
        // Offsets are uniform over 0..=len-T-1 = 0..=91: both ends are reachable.
        assert!(starts_seen.contains(&0) && starts_seen.contains(&91));
        assert_eq!(starts_seen.len(), 92);
        assert_eq!(loader.batches_drawn(), 500);
    }

    #[test]
    fn same_seed_same_batches_and_exact_resume() {
        let dir = tempfile::tempdir().unwrap();
        let shard = counting_shard(dir.path(), "train.bin", 1000);
        let (b, t) = (3, 16);
        let draw = |loader: &mut BatchLoader, n: usize| {
            let mut all = Vec::new();
            let mut inputs = vec![0; b * t];
            let mut targets = vec![0; b * t];
            for _ in 0..n {
                loader.next_batch(&mut inputs, &mut targets);
                all.extend_from_slice(&inputs);
            }
            all
        };
        let mut a = BatchLoader::new(shard.clone(), b, t, 7).unwrap();
        let mut same = BatchLoader::new(shard.clone(), b, t, 7).unwrap();
        let mut other = BatchLoader::new(shard.clone(), b, t, 8).unwrap();
        let first = draw(&mut a, 5);
        assert_eq!(first, draw(&mut same, 5));
        assert_ne!(first, draw(&mut other, 5));

        // Save after 5 batches (through JSON, as a checkpoint would), restore into a fresh
        // loader, and both continue identically.
        let saved = serde_json::to_string(&a.state()).unwrap();
        let mut resumed = BatchLoader::new(shard.clone(), b, t, 999).unwrap();
        resumed
            .restore(serde_json::from_str(&saved).unwrap())
            .unwrap();
        assert_eq!(draw(&mut a, 5), draw(&mut resumed, 5));
        assert_eq!(resumed.batches_drawn(), 10);

        let mut wrong_shape = BatchLoader::new(shard, b, t + 1, 7).unwrap();
        let err = wrong_shape
            .restore(serde_json::from_str(&saved).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("context"), "{err}");
        let shorter = counting_shard(dir.path(), "other.bin", 999);
        let mut wrong_data = BatchLoader::new(shorter, b, t, 7).unwrap();
        let err = wrong_data
            .restore(serde_json::from_str(&saved).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("1000 tokens"), "{err}");
    }

    #[test]
    fn too_short_split_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let shard = counting_shard(dir.path(), "val.bin", 8);
        let err = BatchLoader::new(shard.clone(), 2, 8, 0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("val split has 8 tokens, fewer than context+1 = 9"),
            "{err}"
        );
        assert!(err.contains("model.block_size"), "{err}");
        assert!(EvalBatches::new(shard.clone(), 2, 8).is_err());
        // Exactly T+1 tokens is enough for one window.
        assert!(BatchLoader::new(shard.clone(), 2, 7, 0).is_ok());
        assert!(BatchLoader::new(shard, 0, 7, 0).is_err());
    }

    #[test]
    fn eval_covers_every_window_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let len = 103;
        let shard = counting_shard(dir.path(), "val.bin", len);
        let (b, t) = (4, 10);
        let mut eval = EvalBatches::new(shard, b, t).unwrap();
        // (103 - 1) / 10 = 10 windows, in batches of 4, 4, 2.
        assert_eq!(eval.num_windows(), 10);
        assert_eq!(eval.num_batches(), 3);
        let mut inputs = vec![0; b * t];
        let mut targets = vec![0; b * t];
        for pass in 0..2 {
            let mut target_counts = vec![0u32; len];
            let mut valid_per_batch = Vec::new();
            while let Some(valid) = eval.next_batch(&mut inputs, &mut targets) {
                valid_per_batch.push(valid);
                for row in 0..b {
                    let (x, y) = (&inputs[row * t..][..t], &targets[row * t..][..t]);
                    if row < valid {
                        for j in 0..t {
                            assert_eq!(y[j], x[j] + 1);
                            target_counts[y[j] as usize] += 1;
                        }
                    } else {
                        assert!(x.iter().chain(y).all(|&v| v == 0));
                    }
                }
            }
            assert_eq!(valid_per_batch, vec![4, 4, 2], "pass {pass}");
            // Every target position 1..=100 exactly once; the 2 leftover tokens never.
            assert_eq!(target_counts[0], 0);
            assert!(target_counts[1..=100].iter().all(|&c| c == 1));
            assert!(target_counts[101..].iter().all(|&c| c == 0));
            eval.reset();
        }
    }
}
