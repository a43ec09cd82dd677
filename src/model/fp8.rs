//! Delayed FP8 scaling: one amax history per FP8 GEMM operand of each transformer block.
//!
//! Each block has four linear layers (attention qkv and projection, MLP fc and projection), and
//! each of their GEMMs reads up to three tensors: the input activation `x` (e4m3), the weight `w`
//! (e4m3) and the output gradient `dy` (e5m2). Every one of those tensors gets its own slot: an
//! [`AmaxHistory`] here, and a cell of the per-step amax buffer the backend max-accumulates into
//! while the step runs (over all micro-batches). The scale used at step n comes from the history
//! of steps before n; after the step its amaxes are pushed ([`Fp8State::record`]), so the scale
//! lags the data by exactly one step. With an empty history (the first step, or a model loaded
//! for evaluation) the operand is current-scaled instead: its own amax decides, which is what the
//! history would have said had it seen this step.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Result};

use crate::backend::{GemmOperand, OperandScale};
use crate::numerics::{AmaxHistory, DType};

/// The four linear layers of a block, in slot order.
pub const LINEARS: usize = 4;
/// Slot offsets of a linear layer's three operand tensors.
pub const X: usize = 0;
/// The weight.
pub const W: usize = 1;
/// The output gradient.
pub const DY: usize = 2;

/// Slot of operand `operand` (X, W or DY) of linear layer `linear` (0..4) of block `layer`.
pub fn slot(layer: usize, linear: usize, operand: usize) -> usize {
    (layer * LINEARS + linear) * 3 + operand
}

/// A fresh version or amax epoch for a [`crate::backend::KeepToken`]: unique in the process, so
/// the tokens of different models and activation sets never collide.
pub fn fresh_epoch() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The amax histories of all FP8 operands of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8State {
    histories: Vec<AmaxHistory>,
    margin: i32,
}

impl Fp8State {
    /// Empty histories of `len` steps for a model of `n_layer` blocks.
    pub fn new(n_layer: usize, len: usize, margin: i32) -> Self {
        Self {
            histories: vec![AmaxHistory::new(len); n_layer * LINEARS * 3],
            margin,
        }
    }

    /// Number of operand slots.
    pub fn slots(&self) -> usize {
        self.histories.len()
    }

    /// The FP8 format of a slot: e5m2 for gradients, e4m3 for weights and activations.
    pub fn format(slot: usize) -> DType {
        if slot % 3 == DY {
            DType::F8E5M2
        } else {
            DType::F8E4M3
        }
    }

    /// How a GEMM reads the tensor of `slot` this step: the history's scale, or current
    /// scaling while the history is empty; its amax is recorded into `slot`.
    pub fn operand(&self, slot: usize) -> GemmOperand {
        let format = Self::format(slot);
        let scale = match self.histories.get(slot) {
            Some(h) if !h.is_empty() => OperandScale::Fixed(h.scale(format, self.margin)),
            _ => OperandScale::Current {
                margin: self.margin,
            },
        };
        GemmOperand {
            format,
            scale,
            amax_slot: Some(slot),
            keep: None,
        }
    }

    /// Pushes one step's amaxes (one per slot) into the histories.
    pub fn record(&mut self, amaxes: &[f32]) -> Result<()> {
        if amaxes.len() != self.histories.len() {
            bail!(
                "internal error: {} amaxes for {} FP8 operands",
                amaxes.len(),
                self.histories.len()
            );
        }
        for (h, &a) in self.histories.iter_mut().zip(amaxes) {
            h.push(a);
        }
        Ok(())
    }

    /// The histories as a `[slots, recorded]` tensor (oldest first), for checkpoints. All slots
    /// are pushed together, so they hold the same number of values.
    pub fn to_tensor(&self) -> (Vec<usize>, Vec<f32>) {
        let len = self.histories.first().map_or(0, AmaxHistory::len);
        let data = self.histories.iter().flat_map(|h| h.values()).collect();
        (vec![self.histories.len(), len], data)
    }

    /// Restores histories saved by [`Fp8State::to_tensor`]; when the configured length is
    /// shorter than what was saved, the most recent values are kept.
    pub fn restore(&mut self, shape: &[usize], data: &[f32]) -> Result<()> {
        let [slots, len] = shape else {
            bail!("FP8 amax history has shape {shape:?}, expected [operands, steps]");
        };
        if *slots != self.histories.len() || slots * len != data.len() {
            bail!(
                "FP8 amax history holds {slots} operands, the model has {} (was the checkpoint made for another model size?)",
                self.histories.len()
            );
        }
        for (i, h) in self.histories.iter_mut().enumerate() {
            *h = AmaxHistory::new(h.capacity());
            for &v in &data[i * len..(i + 1) * len] {
                h.push(v);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_comes_from_earlier_steps_only() {
        let mut s = Fp8State::new(1, 2, 0);
        let x = slot(0, 1, X);
        let dy = slot(0, 1, DY);
        assert_eq!(Fp8State::format(x), DType::F8E4M3);
        assert_eq!(Fp8State::format(dy), DType::F8E5M2);
        // Step 1: nothing recorded yet, current scaling.
        assert_eq!(s.operand(x).scale, OperandScale::Current { margin: 0 });
        let mut amax = vec![1.0; s.slots()];
        amax[x] = 3.0;
        s.record(&amax).unwrap();
        // Step 2 uses step 1's amax: 448/3 -> 2^7.
        assert_eq!(s.operand(x).scale, OperandScale::Fixed(128.0));
        assert_eq!(s.operand(dy).scale, OperandScale::Fixed(32768.0));
        amax[x] = 0.5;
        s.record(&amax).unwrap();
        assert_eq!(
            s.operand(x).scale,
            OperandScale::Fixed(128.0),
            "max of window"
        );
        s.record(&amax).unwrap();
        assert_eq!(
            s.operand(x).scale,
            OperandScale::Fixed(512.0),
            "3.0 left the window"
        );
        // All-zero history: a finite, sane scale (1), never inf.
        let mut z = Fp8State::new(1, 3, 0);
        z.record(&vec![0.0; z.slots()]).unwrap();
        assert_eq!(z.operand(x).scale, OperandScale::Fixed(1.0));
        assert!(z.record(&[1.0]).is_err());
    }

    #[test]
    fn histories_round_trip_through_a_tensor() {
        let mut s = Fp8State::new(2, 3, 1);
        for step in 0..5 {
            let amax: Vec<f32> = (0..s.slots()).map(|i| (i * 7 + step) as f32).collect();
            s.record(&amax).unwrap();
        }
        let (shape, data) = s.to_tensor();
        assert_eq!(shape, vec![s.slots(), 3]);
        let mut back = Fp8State::new(2, 3, 1);
        back.restore(&shape, &data).unwrap();
        assert_eq!(back, s);
        // A shorter configured window keeps the newest values.
        let mut short = Fp8State::new(2, 1, 1);
        short.restore(&shape, &data).unwrap();
        assert_eq!(short.operand(0).scale, OperandScale::Fixed(32.0)); // amax 4: 448/4 -> 2^6, margin 1
        assert!(Fp8State::new(1, 3, 1).restore(&shape, &data).is_err());
    }
}
