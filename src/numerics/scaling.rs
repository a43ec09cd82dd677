//! Per-tensor scaling state for FP8: a window of recent amax values and the scale they imply.
//!
//! An FP8 tensor is stored as `round(x * scale)` with one f32 `scale` per tensor, chosen so the
//! tensor's largest magnitude (its amax) lands just under the format's max. With delayed scaling
//! the scale for this step comes from the amaxes of the last few steps ([`AmaxHistory`]); with
//! current scaling it comes from this step's own amax. Either way [`scale_from_amax`] turns the
//! amax into a scale.

use std::collections::VecDeque;

use super::dtype::{pow2, DType};

/// Largest exponent [`scale_from_amax`] returns: scales are capped at 2^64, so an all-tiny
/// (or subnormal) tensor is not blown up past what its inverse can faithfully undo.
pub const MAX_SCALE_EXPONENT: i32 = 64;
/// Smallest exponent [`scale_from_amax`] returns: 2^-126, the smallest normal f32, so both the
/// scale and its inverse (2^126) stay finite and normal.
pub const MIN_SCALE_EXPONENT: i32 = -126;

/// Power-of-two scale that maps `amax` into `fmt` with `margin` binades of headroom:
///
/// `scale = 2^(floor(log2(fmt.max_finite() / amax)) - margin)`
///
/// so `amax * scale <= max_finite / 2^margin`. A power of two keeps `x * scale` exact (no
/// extra rounding before the cast) and its inverse exact for dequantization. The exponent is
/// clamped to [`MIN_SCALE_EXPONENT`]..=[`MAX_SCALE_EXPONENT`], so the result is always finite
/// and nonzero. When `amax` is 0, NaN or ±inf there is nothing sensible to fit, and the scale
/// is 1.0 (the tensor passes through unscaled, and saturates if it overflowed). The sign of
/// `amax` is ignored. `margin` may be negative.
pub fn scale_from_amax(amax: f32, fmt: DType, margin: i32) -> f32 {
    let amax = amax.abs();
    if amax == 0.0 || !amax.is_finite() {
        return 1.0;
    }
    // In f64 the quotient of two f32s is far too precise to round across a power of two (two
    // 24-bit significands that differ differ by at least 2^-24 relative), so the floor is exact.
    let ratio = fmt.max_finite() as f64 / amax as f64;
    let floor_log2 = ((ratio.to_bits() >> 52) & 0x7FF) as i64 - 1023;
    let exponent = (floor_log2 - margin as i64)
        .clamp(MIN_SCALE_EXPONENT as i64, MAX_SCALE_EXPONENT as i64) as i32;
    pow2(exponent)
}

/// Sliding window of the most recent per-step amax values of one tensor (delayed scaling).
#[derive(Clone, Debug, PartialEq)]
pub struct AmaxHistory {
    /// Window length: how many recent values are kept.
    len: usize,
    /// Oldest first.
    values: VecDeque<f32>,
}

impl AmaxHistory {
    /// Empty history keeping the last `len` values (at least 1; 0 is treated as 1).
    pub fn new(len: usize) -> Self {
        let len = len.max(1);
        AmaxHistory {
            len,
            values: VecDeque::with_capacity(len),
        }
    }

    /// Records one step's amax, dropping the oldest value once the window is full.
    pub fn push(&mut self, amax: f32) {
        if self.values.len() == self.len {
            self.values.pop_front();
        }
        self.values.push_back(amax);
    }

    /// Largest recorded magnitude; 0.0 when empty. NaN entries (steps that overflowed) are
    /// skipped so one bad step does not reset the scale for the whole window; inf is kept.
    pub fn max(&self) -> f32 {
        self.values
            .iter()
            .filter(|v| !v.is_nan())
            .fold(0.0f32, |m, v| m.max(v.abs()))
    }

    /// Scale for the next step from the window's max, see [`scale_from_amax`].
    pub fn scale(&self, fmt: DType, margin: i32) -> f32 {
        scale_from_amax(self.max(), fmt, margin)
    }

    /// Window length given at construction.
    pub fn capacity(&self) -> usize {
        self.len
    }

    /// Number of values recorded so far (at most [`capacity`](Self::capacity)).
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True before the first [`push`](Self::push).
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Recorded values, oldest first.
    pub fn values(&self) -> impl Iterator<Item = f32> + '_ {
        self.values.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_is_power_of_two_fitting_amax_under_max() {
        // 448 / 1 = 448 -> floor(log2) = 8
        assert_eq!(scale_from_amax(1.0, DType::F8E4M3, 0), 256.0);
        assert_eq!(scale_from_amax(1.0, DType::F8E4M3, 1), 128.0);
        assert_eq!(scale_from_amax(1.0, DType::F8E4M3, -1), 512.0);
        // amax exactly max -> ratio 1 -> scale 1; just above -> 1/2
        assert_eq!(scale_from_amax(448.0, DType::F8E4M3, 0), 1.0);
        assert_eq!(scale_from_amax(448.5, DType::F8E4M3, 0), 0.5);
        // 57344 / 3.5 = 16384 exactly -> 2^14; a hair more amax -> 2^13
        assert_eq!(scale_from_amax(3.5, DType::F8E5M2, 0), 16384.0);
        let above = f32::from_bits(3.5f32.to_bits() + 1);
        assert_eq!(scale_from_amax(above, DType::F8E5M2, 0), 8192.0);
        assert_eq!(scale_from_amax(-1.0, DType::F8E4M3, 0), 256.0);
        for fmt in [DType::F8E4M3, DType::F8E5M2] {
            for bits in (0x3000_0000u32..0x5000_0000).step_by(1_000_003) {
                let amax = f32::from_bits(bits);
                let s = scale_from_amax(amax, fmt, 0);
                assert_eq!(s.to_bits() & 0x007F_FFFF, 0, "power of two");
                assert!(amax * s <= fmt.max_finite(), "{amax} fits");
                assert!(amax * s * 2.0 > fmt.max_finite(), "{amax} uses the range");
            }
        }
    }

    #[test]
    fn degenerate_amax_gives_safe_finite_scale() {
        for amax in [0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(scale_from_amax(amax, DType::F8E4M3, 0), 1.0, "{amax}");
        }
        let cap = 2f32.powi(MAX_SCALE_EXPONENT);
        assert_eq!(scale_from_amax(f32::from_bits(1), DType::F8E5M2, 0), cap);
        assert_eq!(scale_from_amax(1e-30, DType::F8E4M3, 0), cap);
        assert_eq!(scale_from_amax(1.0, DType::F8E4M3, -1000), cap);
        let floor = f32::MIN_POSITIVE;
        assert_eq!(scale_from_amax(f32::MAX, DType::F8E4M3, 100), floor);
        assert_eq!(scale_from_amax(1.0, DType::F8E4M3, i32::MAX), floor);
        assert_eq!(scale_from_amax(1.0, DType::F8E4M3, i32::MIN), cap);
        // Largest f32 amax still gets the exact answer: 448 / 3.4e38 ~ 2^-119.2 -> 2^-120
        assert_eq!(scale_from_amax(f32::MAX, DType::F8E4M3, 0), 2f32.powi(-120));
    }

    #[test]
    fn history_keeps_a_window_and_ignores_nan() {
        let mut h = AmaxHistory::new(3);
        assert!(h.is_empty());
        assert_eq!(h.max(), 0.0);
        assert_eq!(h.scale(DType::F8E4M3, 0), 1.0);
        for v in [5.0, 1.0, 2.0] {
            h.push(v);
        }
        assert_eq!(h.max(), 5.0);
        h.push(3.0); // drops 5.0
        assert_eq!(h.max(), 3.0);
        assert_eq!(h.values().collect::<Vec<_>>(), [1.0, 2.0, 3.0]);
        assert_eq!((h.len(), h.capacity()), (3, 3));
        h.push(f32::NAN);
        assert_eq!(h.max(), 3.0);
        assert_eq!(h.scale(DType::F8E4M3, 0), 128.0); // 448 / 3 = 149.3 -> 2^7
        h.push(f32::INFINITY);
        assert_eq!(h.max(), f32::INFINITY);
        assert_eq!(h.len(), 3);

        let mut one = AmaxHistory::new(0);
        assert_eq!(one.capacity(), 1);
        one.push(7.0);
        one.push(2.0);
        assert_eq!(one.max(), 2.0);
    }
}

/// What the values of one tensor look like in its storage format (the numerics monitor's raw
/// counts; fractions are counts over `len`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TensorStats {
    /// Number of values.
    pub len: u64,
    /// max |x| over finite values.
    pub amax: f64,
    /// Σ x² over finite values.
    pub sum_sq: f64,
    /// Finite values.
    pub finite: u64,
    /// Values exactly zero.
    pub zero: u64,
    /// Nonzero values below the format's smallest normal.
    pub subnormal: u64,
    /// Values at or beyond the format's largest finite value (infinities included).
    pub saturated: u64,
    /// NaN values.
    pub nan: u64,
}

impl TensorStats {
    /// The statistics of `values` stored as `dtype`.
    pub fn of(values: &[f32], dtype: DType) -> Self {
        let (min_normal, max) = (dtype.min_normal(), dtype.max_finite());
        let mut s = TensorStats {
            len: values.len() as u64,
            ..Default::default()
        };
        for &x in values {
            if x.is_nan() {
                s.nan += 1;
                continue;
            }
            let a = x.abs();
            if a >= max {
                s.saturated += 1;
            }
            if a.is_finite() {
                s.finite += 1;
                s.amax = s.amax.max(f64::from(a));
                s.sum_sq += f64::from(a) * f64::from(a);
            }
            if a == 0.0 {
                s.zero += 1;
            } else if a < min_normal {
                s.subnormal += 1;
            }
        }
        s
    }

    /// √(mean x²) over finite values.
    pub fn rms(&self) -> f64 {
        if self.finite > 0 {
            (self.sum_sq / self.finite as f64).sqrt()
        } else {
            0.0
        }
    }

    /// `count / len` (0 for an empty tensor).
    pub fn fraction(&self, count: u64) -> f64 {
        count as f64 / self.len.max(1) as f64
    }
}
