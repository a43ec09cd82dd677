//! Text generation: autoregressive sampling with temperature and top-k.
//!
//! Each new token runs one forward pass over the last `block_size` tokens (no KV cache yet) and
//! samples from the logits of the last position. Causal attention means the padding after the
//! prompt never influences that position.

use anyhow::{bail, Result};

use crate::backend::Backend;
use crate::data::{Rng, Tokenizer};
use crate::model::Gpt;

/// How to sample.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOptions {
    /// Text the sample continues ("" starts from the end-of-text token, or a newline).
    pub prompt: String,
    /// Number of tokens to generate.
    pub tokens: usize,
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Sampling seed.
    pub seed: u64,
}

/// Picks the next token from `logits` per `opts`, drawing from `rng`.
pub fn sample_token(logits: &[f32], temperature: f32, top_k: usize, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 {
                    (i, x)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if top_k > 0 && top_k < logits.len() {
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        order.truncate(top_k);
    }
    let max = order
        .iter()
        .map(|&i| logits[i])
        .fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| f64::from((logits[i] - max) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    if !total.is_finite() || total <= 0.0 {
        return argmax();
    }
    let mut target = rng.next_f64() * total;
    for (&i, &w) in order.iter().zip(&weights) {
        target -= w;
        if target < 0.0 {
            return i as u32;
        }
    }
    order[order.len() - 1] as u32
}

/// Generates `opts.tokens` tokens after `opts.prompt` and returns prompt + continuation.
pub fn generate<B: Backend>(
    backend: &B,
    model: &Gpt<B>,
    tokenizer: &Tokenizer,
    opts: &SampleOptions,
) -> Result<String> {
    let t = model.config().block_size;
    let mut ids = if opts.prompt.is_empty() {
        match tokenizer.eot_token() {
            Some(eot) => vec![eot],
            None => tokenizer.encode("\n")?,
        }
    } else {
        tokenizer.encode(&opts.prompt)?
    };
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens; give a non-empty --prompt");
    }
    let mut acts = model.activations(backend, 1, t, false)?;
    let mut window = vec![0u32; t];
    let mut rng = Rng::new(opts.seed);
    for _ in 0..opts.tokens {
        let start = ids.len().saturating_sub(t);
        let ctx = &ids[start..];
        window.fill(0);
        window[..ctx.len()].copy_from_slice(ctx);
        model.forward(backend, &mut acts, &window, None)?;
        let logits = model.logits_row(backend, &acts, ctx.len() - 1)?;
        ids.push(sample_token(
            &logits,
            opts.temperature,
            opts.top_k,
            &mut rng,
        ));
    }
    let skip_eot = usize::from(opts.prompt.is_empty() && tokenizer.eot_token().is_some());
    Ok(tokenizer.decode(&ids[skip_eot..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_temperature_is_argmax() {
        let mut rng = Rng::new(1);
        assert_eq!(sample_token(&[0.1, 3.0, -1.0, 2.9], 0.0, 0, &mut rng), 1);
    }

    #[test]
    fn top_k_one_is_argmax_and_never_samples_outside_top_k() {
        let mut rng = Rng::new(7);
        let logits = [1.0, 0.9, 0.8, -5.0, 0.95];
        for _ in 0..200 {
            assert_eq!(sample_token(&logits, 1.0, 1, &mut rng), 0);
            let tok = sample_token(&logits, 1.0, 2, &mut rng);
            assert!(tok == 0 || tok == 4, "sampled {tok} outside the top 2");
        }
    }

    #[test]
    fn sampling_follows_the_softmax() {
        let mut rng = Rng::new(3);
        // p = softmax([ln 3, 0]) = [0.75, 0.25].
        let logits = [3f32.ln(), 0.0];
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| sample_token(&logits, 1.0, 0, &mut rng) == 1)
            .count();
        let frac = ones as f64 / n as f64;
        assert!(
            (frac - 0.25).abs() < 0.015,
            "token 1 drawn with frequency {frac}, expected 0.25"
        );
    }
}
