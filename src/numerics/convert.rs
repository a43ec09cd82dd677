//! Exact conversions between f32 and the storage formats, scalar and over slices.
//!
//! Every conversion rounds to nearest, ties to even (RNE). bf16 and f16 follow IEEE 754: values
//! that round past the largest finite value become ±inf, NaN stays NaN (quieted, sign kept).
//!
//! The FP8 formats are written here from the OCP 8-bit floating point specification:
//!
//! - E4M3FN ([`DType::F8E4M3`]): bias 7, no infinities, 0x7F/0xFF are NaN, max 448 (0x7E),
//!   min normal 2^-6 (0x08), min subnormal 2^-9 (0x01).
//! - E5M2 ([`DType::F8E5M2`]): bias 15, ±inf at 0x7C/0xFC, NaNs above, max 57344 (0x7B),
//!   min normal 2^-14 (0x04), min subnormal 2^-16 (0x01).
//!
//! f32 → FP8 is **saturating**, modelling the `.satfinite` conversions of NVIDIA GPUs
//! (`cvt.rn.satfinite.e4m3x2.f32` and friends), which is what our GPU kernels will use: a finite
//! value whose rounded magnitude exceeds the format's max becomes ±max, and ±inf becomes ±max too
//! (for both formats, so E5M2 never produces inf from us). NaN becomes the canonical NaN code
//! with the input's sign: 0x7F for E4M3 (its only NaN), 0x7E for E5M2 (the quiet NaN: all-ones
//! exponent, top mantissa bit set).
//!
//! The slice functions are on the hot path of emulated low-precision training (every activation
//! tensor is rounded), so they round in the f32 domain with branch-free bit arithmetic the
//! compiler vectorizes, and split long slices across rayon threads.

use anyhow::bail;
use rayon::prelude::*;

use super::dtype::{pow2, DType};

/// E4M3 code of NaN (positive sign); the negative NaN is 0xFF.
pub const F8E4M3_NAN: u8 = 0x7F;
/// E4M3 code of the largest finite value, 448.
pub const F8E4M3_MAX: u8 = 0x7E;
/// Canonical E5M2 NaN code we produce (quiet NaN, positive sign); the negative one is 0xFE.
pub const F8E5M2_NAN: u8 = 0x7E;
/// E5M2 code of +inf (decoded, never produced by our saturating encoder).
pub const F8E5M2_INF: u8 = 0x7C;
/// E5M2 code of the largest finite value, 57344.
pub const F8E5M2_MAX: u8 = 0x7B;

/// Elements per rayon task; slices shorter than this are processed on the calling thread.
const PAR_CHUNK: usize = 64 * 1024;

const SIGN_MASK: u32 = 0x8000_0000;
const ABS_MASK: u32 = 0x7FFF_FFFF;
const F32_QUIET_BIT: u32 = 0x0040_0000;

// ---------------------------------------------------------------------------------------------
// bf16 and f16 scalars
// ---------------------------------------------------------------------------------------------

/// Rounds an f32 to bf16 (RNE) and returns the bf16 bits; overflow gives ±inf, NaN stays a
/// quiet NaN with the same sign.
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        // Truncating a signalling NaN could clear every mantissa bit and make it inf.
        return ((bits | F32_QUIET_BIT) >> 16) as u16;
    }
    // Adding 0x7FFF rounds halves down, plus one more when the kept part is odd: ties to even.
    // Carries ripple into the exponent, which is exactly right (including up to inf).
    let round_bias = 0x7FFF + ((bits >> 16) & 1);
    ((bits + round_bias) >> 16) as u16
}

/// Rounds an f32 to bf16 stochastically with the 16 random bits `r`: up (in magnitude) with
/// probability equal to the dropped fraction of an ulp, so the result is unbiased,
/// `E[round(x)] = x`. Values bf16 holds exactly are unchanged; ±inf stays; NaN as in
/// [`f32_to_bf16_bits`]. The carry into the exponent is right, up to ±inf beyond bf16's
/// largest finite value.
#[inline]
pub fn f32_to_bf16_bits_stochastic(x: f32, r: u16) -> u16 {
    if x.is_nan() {
        return f32_to_bf16_bits(x);
    }
    // Sign-magnitude bits: adding to the magnitude bits rounds away from zero for either sign.
    // No u32 overflow: the largest non-NaN pattern (-inf, 0xFF80_0000) plus 0xFFFF fits.
    ((x.to_bits() + u32::from(r)) >> 16) as u16
}

/// Widens bf16 bits to the f32 of the same value (exact).
#[inline]
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Rounds an f32 to IEEE binary16 (RNE) and returns its bits; overflow gives ±inf.
#[inline]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// Widens binary16 bits to the f32 of the same value (exact).
#[inline]
pub fn f16_bits_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

// ---------------------------------------------------------------------------------------------
// FP8 scalars
// ---------------------------------------------------------------------------------------------

/// Parameters of an 8-bit format, enough to encode and decode it.
struct Fp8Format {
    mantissa_bits: u32,
    /// Unbiased exponent of the smallest normal value (1 - bias).
    min_normal_exp: i32,
    /// Code of the largest finite magnitude; every code above it (sign aside) is inf or NaN.
    max_code: u8,
    nan_code: u8,
    /// Whether `max_code + 1` is infinity (E5M2) rather than NaN (E4M3FN).
    has_infinity: bool,
}

const E4M3: Fp8Format = Fp8Format {
    mantissa_bits: 3,
    min_normal_exp: -6,
    max_code: F8E4M3_MAX,
    nan_code: F8E4M3_NAN,
    has_infinity: false,
};

const E5M2: Fp8Format = Fp8Format {
    mantissa_bits: 2,
    min_normal_exp: -14,
    max_code: F8E5M2_MAX,
    nan_code: F8E5M2_NAN,
    has_infinity: true,
};

impl Fp8Format {
    fn encode(&self, x: f32) -> u8 {
        let bits = x.to_bits();
        let sign = ((bits >> 24) & 0x80) as u8;
        if x.is_nan() {
            return sign | self.nan_code;
        }
        let abs = bits & ABS_MASK;
        let biased_exp = abs >> 23;
        if biased_exp == 0xFF {
            return sign | self.max_code; // ±inf saturates (satfinite)
        }
        if biased_exp == 0 {
            // Zero or an f32 subnormal: below 2^-126, far under half the smallest FP8 step.
            return sign;
        }
        let exp = biased_exp as i32 - 127;
        let significand = (abs & 0x007F_FFFF) | 0x0080_0000; // value = significand * 2^(exp-23)
        let m = self.mantissa_bits as i32;
        // Exponent of the last mantissa bit we keep: fixed below the normal range (subnormals).
        let kept_exp = exp.max(self.min_normal_exp);
        // Bits to drop. Beyond 25 everything is below half a step and rounds to zero anyway, so
        // clamping keeps the shifts in range without changing the result.
        let shift = (kept_exp - m - (exp - 23)).min(25) as u32;
        let kept = significand >> shift;
        let dropped = significand & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        let round_up = dropped > half || (dropped == half && kept & 1 == 1);
        let rounded = kept + round_up as u32;
        // In a normal binade `rounded` carries the implicit bit at position m, which adds one
        // to the exponent field; a carry out of the mantissa moves to the next binade. Below
        // the normal range the code is just the count of 2^(min_normal_exp - m) steps.
        let code = (((kept_exp - self.min_normal_exp) as u32) << m) + rounded;
        sign | code.min(self.max_code as u32) as u8
    }

    fn decode(&self, code: u8) -> f32 {
        let magnitude = code & 0x7F;
        let value = if magnitude > self.max_code {
            if self.has_infinity && magnitude == self.max_code + 1 {
                f32::INFINITY
            } else {
                f32::NAN
            }
        } else {
            let m = self.mantissa_bits;
            let exp_field = (magnitude >> m) as i32;
            let fraction = (magnitude & ((1 << m) - 1)) as u32;
            if exp_field == 0 {
                fraction as f32 * pow2(self.min_normal_exp - m as i32)
            } else {
                (fraction | 1 << m) as f32 * pow2(self.min_normal_exp + exp_field - 1 - m as i32)
            }
        };
        if code & 0x80 != 0 {
            -value
        } else {
            value
        }
    }
}

/// Rounds an f32 to FP8 E4M3FN (RNE, saturating to ±448, ±inf → ±448, NaN → 0x7F | sign).
pub fn f32_to_f8e4m3_bits(x: f32) -> u8 {
    E4M3.encode(x)
}

/// Decodes an FP8 E4M3FN code to its exact f32 value (0x7F and 0xFF are NaN).
pub fn f8e4m3_bits_to_f32(code: u8) -> f32 {
    E4M3.decode(code)
}

/// Rounds an f32 to FP8 E5M2 (RNE, saturating to ±57344, ±inf → ±57344, NaN → 0x7E | sign).
pub fn f32_to_f8e5m2_bits(x: f32) -> u8 {
    E5M2.encode(x)
}

/// Decodes an FP8 E5M2 code to its exact f32 value (0x7C/0xFC are ±inf, codes above NaN).
pub fn f8e5m2_bits_to_f32(code: u8) -> f32 {
    E5M2.decode(code)
}

// ---------------------------------------------------------------------------------------------
// Rounding in the f32 domain (the fast path)
// ---------------------------------------------------------------------------------------------

/// Rounds to bf16 and back, without leaving f32.
#[inline(always)]
fn round_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    let rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000;
    let nan = (bits | F32_QUIET_BIT) & 0xFFFF_0000;
    // Written as a select of two computed values so the loop stays branch-free and vectorizes.
    f32::from_bits(if x.is_nan() { nan } else { rounded })
}

/// Rounds `x` to a binary format with `MANT` mantissa bits whose smallest normal is
/// 2^`MIN_EXP` (and whose exponent range otherwise covers what f32 needs), staying in f32.
/// Magnitudes that round above `max` become `overflow` (±inf for IEEE formats, ±max for
/// saturating FP8). NaN stays NaN (quieted, sign kept).
#[inline(always)]
fn round_small_format<const MANT: u32, const MIN_EXP: i32>(x: f32, max: f32, overflow: f32) -> f32 {
    let bits = x.to_bits();
    let abs_bits = bits & ABS_MASK;
    let drop = 23 - MANT;
    // Normal range: the bf16 trick with a wider cut, RNE on the bit pattern.
    let normal =
        (abs_bits + ((1 << (drop - 1)) - 1) + ((abs_bits >> drop) & 1)) & !((1 << drop) - 1);
    // Subnormal range: adding 2^(MIN_EXP - MANT + 23), whose f32 ulp is the format's subnormal
    // step, makes the f32 adder do the RNE for us; subtracting it back is exact.
    let magic = pow2(MIN_EXP - MANT as i32 + 23);
    let subnormal = ((f32::from_bits(abs_bits) + magic) - magic).to_bits();
    let min_normal_bits = pow2(MIN_EXP).to_bits();
    let magnitude = f32::from_bits(if abs_bits < min_normal_bits {
        subnormal
    } else {
        normal
    });
    let magnitude = if magnitude > max { overflow } else { magnitude };
    let signed = f32::from_bits(magnitude.to_bits() | (bits & SIGN_MASK));
    if x.is_nan() {
        f32::from_bits(bits | F32_QUIET_BIT)
    } else {
        signed
    }
}

#[inline(always)]
fn round_f16(x: f32) -> f32 {
    round_small_format::<10, -14>(x, 65504.0, f32::INFINITY)
}

#[inline(always)]
fn round_f8e4m3(x: f32) -> f32 {
    round_small_format::<3, -6>(x, 448.0, 448.0)
}

#[inline(always)]
fn round_f8e5m2(x: f32) -> f32 {
    round_small_format::<2, -14>(x, 57344.0, 57344.0)
}

/// The value `x` has after a round trip through `dtype` (identity for F32); same rounding as
/// [`encode`] (RNE; FP8 saturates, see the module doc).
#[inline]
pub fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::BF16 => round_bf16(x),
        DType::F16 => round_f16(x),
        DType::F8E4M3 => round_f8e4m3(x),
        DType::F8E5M2 => round_f8e5m2(x),
    }
}

/// Applies `f` to every element, in parallel chunks when the slice is long.
#[inline(always)]
fn map_in_place(xs: &mut [f32], f: impl Fn(f32) -> f32 + Sync + Send + Copy) {
    let run = move |chunk: &mut [f32]| {
        for x in chunk {
            *x = f(*x);
        }
    };
    if xs.len() > PAR_CHUNK {
        xs.par_chunks_mut(PAR_CHUNK).for_each(run);
    } else {
        run(xs);
    }
}

/// Replaces every element by [`round_to`]`(dtype, x)`; parallel over rayon for long slices.
pub fn round_slice_in_place(dtype: DType, xs: &mut [f32]) {
    match dtype {
        DType::F32 => {}
        DType::BF16 => map_in_place(xs, round_bf16),
        DType::F16 => map_in_place(xs, round_f16),
        DType::F8E4M3 => map_in_place(xs, round_f8e4m3),
        DType::F8E5M2 => map_in_place(xs, round_f8e5m2),
    }
}

// ---------------------------------------------------------------------------------------------
// Bytes
// ---------------------------------------------------------------------------------------------

/// Rounds each value to `dtype` and returns the little-endian storage bytes
/// (`xs.len() * dtype.size_bytes()` of them).
pub fn encode(dtype: DType, xs: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * dtype.size_bytes());
    match dtype {
        DType::F32 => xs.iter().for_each(|x| out.extend(x.to_le_bytes())),
        DType::BF16 => xs
            .iter()
            .for_each(|&x| out.extend(f32_to_bf16_bits(x).to_le_bytes())),
        DType::F16 => xs
            .iter()
            .for_each(|&x| out.extend(f32_to_f16_bits(x).to_le_bytes())),
        DType::F8E4M3 => out.extend(xs.iter().map(|&x| f32_to_f8e4m3_bits(x))),
        DType::F8E5M2 => out.extend(xs.iter().map(|&x| f32_to_f8e5m2_bits(x))),
    }
    out
}

/// Widens little-endian storage bytes of `dtype` to f32 values (exact). Fails when the length
/// is not a whole number of elements.
pub fn decode(dtype: DType, bytes: &[u8]) -> anyhow::Result<Vec<f32>> {
    let size = dtype.size_bytes();
    let leftover = bytes.len() % size;
    if leftover != 0 {
        bail!(
            "{} bytes cannot hold {dtype} data ({size} bytes per element, {leftover} left over); \
             the buffer is truncated or has the wrong dtype",
            bytes.len()
        );
    }
    let values = match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        DType::F8E4M3 => bytes.iter().map(|&b| f8e4m3_bits_to_f32(b)).collect(),
        DType::F8E5M2 => bytes.iter().map(|&b| f8e5m2_bits_to_f32(b)).collect(),
    };
    Ok(values)
}

// ---------------------------------------------------------------------------------------------
// amax and scaled casts
// ---------------------------------------------------------------------------------------------

/// Largest |x| of a chunk as f32 bits. Comparing magnitude bit patterns as integers orders
/// them like the values and puts every NaN above inf, so NaN wins without a branch.
#[inline(always)]
fn amax_bits(xs: &[f32]) -> u32 {
    xs.iter().fold(0, |m, x| m.max(x.to_bits() & ABS_MASK))
}

/// Largest absolute value in `xs` (0.0 when empty); NaN if any element is NaN.
pub fn amax(xs: &[f32]) -> f32 {
    let bits = if xs.len() > PAR_CHUNK {
        xs.par_chunks(PAR_CHUNK).map(amax_bits).max().unwrap_or(0)
    } else {
        amax_bits(xs)
    };
    f32::from_bits(bits)
}

/// Scaled cast, as the GPU's FP8 quantization does it: writes `round_to(dtype, x * scale)`
/// for every `x` into `out` and returns the amax of the *input* (max |x|, NaN if any NaN).
///
/// # Panics
/// If `out.len() != xs.len()` (a programming error, not a data error).
pub fn cast_scaled(dtype: DType, xs: &[f32], scale: f32, out: &mut [f32]) -> f32 {
    assert_eq!(
        xs.len(),
        out.len(),
        "cast_scaled needs an output slice as long as its input"
    );
    match dtype {
        DType::F32 => cast_scaled_with(xs, scale, out, |x| x),
        DType::BF16 => cast_scaled_with(xs, scale, out, round_bf16),
        DType::F16 => cast_scaled_with(xs, scale, out, round_f16),
        DType::F8E4M3 => cast_scaled_with(xs, scale, out, round_f8e4m3),
        DType::F8E5M2 => cast_scaled_with(xs, scale, out, round_f8e5m2),
    }
}

#[inline(always)]
fn cast_scaled_with(
    xs: &[f32],
    scale: f32,
    out: &mut [f32],
    round: impl Fn(f32) -> f32 + Sync + Send + Copy,
) -> f32 {
    let run = move |(src, dst): (&[f32], &mut [f32])| -> u32 {
        let mut max_bits = 0;
        for (&x, y) in src.iter().zip(dst.iter_mut()) {
            max_bits = max_bits.max(x.to_bits() & ABS_MASK);
            *y = round(x * scale);
        }
        max_bits
    };
    let bits = if xs.len() > PAR_CHUNK {
        xs.par_chunks(PAR_CHUNK)
            .zip(out.par_chunks_mut(PAR_CHUNK))
            .map(run)
            .max()
            .unwrap_or(0)
    } else {
        run((xs, out))
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every finite non-negative value of a format with its code, sorted, plus the value one
    /// step past max (the code after max, in the format's unbounded extension). Built from the
    /// format definition in f64, independent of the code under test.
    struct Reference {
        values: Vec<(f64, u32)>,
        saturating: bool,
    }

    impl Reference {
        fn new(exp_bits: u32, mant_bits: u32, max_code: u32, saturating: bool) -> Self {
            let bias = (1i32 << (exp_bits - 1)) - 1;
            let value_of = |code: u32| {
                let e = (code >> mant_bits) as i32;
                let f = (code & ((1 << mant_bits) - 1)) as f64 / (1u64 << mant_bits) as f64;
                if e == 0 {
                    f * 2f64.powi(1 - bias)
                } else {
                    (1.0 + f) * 2f64.powi(e - bias)
                }
            };
            let values = (0..=max_code + 1).map(|c| (value_of(c), c)).collect();
            Reference { values, saturating }
        }

        /// Nearest representable value to `x` (ties to even code), then overflow handling;
        /// returns (code with sign bit at `sign_bit`, value).
        fn round(&self, x: f32, sign_bit: u32) -> (u32, f64) {
            let sign = if x.is_sign_negative() {
                1 << sign_bit
            } else {
                0
            };
            let s = if x.is_sign_negative() { -1.0 } else { 1.0 };
            let a = (x as f64).abs();
            let (max, max_code) = self.values[self.values.len() - 2];
            let (beyond, beyond_code) = self.values[self.values.len() - 1];
            let (v, c) = if a >= beyond {
                (beyond, beyond_code)
            } else {
                let hi = self.values.partition_point(|&(v, _)| v < a);
                let (hv, hc) = self.values[hi];
                if hv == a || hi == 0 {
                    (hv, hc)
                } else {
                    let (lv, lc) = self.values[hi - 1];
                    let (dl, dh) = (a - lv, hv - a);
                    if dl < dh || (dl == dh && lc % 2 == 0) {
                        (lv, lc)
                    } else {
                        (hv, hc)
                    }
                }
            };
            if c == beyond_code {
                if self.saturating {
                    (sign | max_code, s * max)
                } else {
                    (sign | beyond_code, s * f64::INFINITY)
                }
            } else {
                (sign | c, s * v)
            }
        }
    }

    fn reference(dtype: DType) -> Reference {
        match dtype {
            DType::BF16 => Reference::new(8, 7, 0x7F7F, false),
            DType::F16 => Reference::new(5, 10, 0x7BFF, false),
            DType::F8E4M3 => Reference::new(4, 3, 0x7E, true),
            DType::F8E5M2 => Reference::new(5, 2, 0x7B, true),
            DType::F32 => unreachable!("f32 is not rounded"),
        }
    }

    fn encode_bits(dtype: DType, x: f32) -> u32 {
        match dtype {
            DType::BF16 => f32_to_bf16_bits(x) as u32,
            DType::F16 => f32_to_f16_bits(x) as u32,
            DType::F8E4M3 => f32_to_f8e4m3_bits(x) as u32,
            DType::F8E5M2 => f32_to_f8e5m2_bits(x) as u32,
            DType::F32 => x.to_bits(),
        }
    }

    fn same(a: f32, b: f32) -> bool {
        (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
    }

    /// Sweep values: a stride through all f32 bit patterns, a denser stride through the range
    /// the small formats cover, and every midpoint between neighbours of each format ± 1 ulp.
    fn sweep_values() -> Vec<f32> {
        let mut xs: Vec<f32> = (0..=u32::MAX).step_by(4099).map(f32::from_bits).collect();
        let lo = 2f32.powi(-26).to_bits();
        let hi = 70000f32.to_bits();
        xs.extend((lo..hi).step_by(257).map(f32::from_bits));
        for dtype in [DType::F16, DType::F8E4M3, DType::F8E5M2, DType::BF16] {
            let values = reference(dtype).values;
            let stride = if dtype == DType::BF16 { 7 } else { 1 };
            for pair in values.windows(2).step_by(stride) {
                let mid = ((pair[0].0 + pair[1].0) / 2.0) as f32;
                assert_eq!(mid as f64, (pair[0].0 + pair[1].0) / 2.0, "midpoint exact");
                for m in [
                    mid,
                    f32::from_bits(mid.to_bits() - 1),
                    f32::from_bits(mid.to_bits() + 1),
                ] {
                    xs.push(m);
                    xs.push(-m);
                }
            }
        }
        xs.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
        ]);
        xs.extend([
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0xFFA0_0000),
        ]);
        xs
    }

    #[test]
    fn e4m3_known_bit_patterns() {
        let cases: &[(f32, u8)] = &[
            (0.0, 0x00),
            (-0.0, 0x80),
            (1.0, 0x38),
            (-2.0, 0xC0),
            (0.0625, 0x18),
            (240.0, 0x77),
            (448.0, 0x7E),
            (-448.0, 0xFE),
            (2f32.powi(-6), 0x08),        // min normal
            (2f32.powi(-9), 0x01),        // min subnormal
            (7.0 * 2f32.powi(-9), 0x07),  // max subnormal
            (2f32.powi(-10), 0x00),       // tie between 0 and 0x01 -> even 0
            (-2f32.powi(-10), 0x80),      // ... keeping the sign
            (1.5 * 2f32.powi(-10), 0x01), // above the tie
            (3.0 * 2f32.powi(-10), 0x02), // tie between 0x01 and 0x02 -> even
            (7.5 * 2f32.powi(-9), 0x08),  // tie at the subnormal/normal boundary
            (15.5 * 2f32.powi(-9), 0x10), // tie into the next binade
            (17.0, 0x58),                 // tie 16 | 18 -> 16 (even mantissa)
            (19.0, 0x5A),                 // tie 18 | 20 -> 20
            (455.0, 0x7E),                // rounds to 448
            (464.0, 0x7E),                // tie 448 | 480: 448 even; 480 would be NaN
            (470.0, 0x7E),                // rounds to 480 = NaN code: saturates
            (1.0e6, 0x7E),                // saturates
            (-1.0e30, 0xFE),
            (f32::INFINITY, 0x7E), // satfinite
            (f32::NEG_INFINITY, 0xFE),
            (f32::NAN, 0x7F),
            (-f32::NAN, 0xFF),
            (f32::from_bits(1), 0x00), // f32 subnormal
        ];
        for &(x, code) in cases {
            assert_eq!(f32_to_f8e4m3_bits(x), code, "encode {x:e}");
        }
        assert_eq!(f8e4m3_bits_to_f32(0x7E), 448.0);
        assert_eq!(f8e4m3_bits_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(f8e4m3_bits_to_f32(0x77), 240.0);
        assert!(f8e4m3_bits_to_f32(0x7F).is_nan() && f8e4m3_bits_to_f32(0xFF).is_nan());
        assert_eq!(f8e4m3_bits_to_f32(0x80).to_bits(), (-0.0f32).to_bits());
        // 0x78..=0x7E are normal in E4M3FN (no infinity): 256, 288, ..., 448
        assert_eq!(f8e4m3_bits_to_f32(0x78), 256.0);
    }

    #[test]
    fn e5m2_known_bit_patterns() {
        let cases: &[(f32, u8)] = &[
            (0.0, 0x00),
            (1.0, 0x3C),
            (-2.0, 0xC0),
            (1.25, 0x3D),
            (1.5, 0x3E),
            (1.125, 0x3C), // tie 1.0 | 1.25 -> 1.0
            (1.375, 0x3E), // tie 1.25 | 1.5 -> 1.5
            (57344.0, 0x7B),
            (-57344.0, 0xFB),
            (2f32.powi(-14), 0x04),       // min normal
            (2f32.powi(-16), 0x01),       // min subnormal
            (2f32.powi(-17), 0x00),       // tie -> 0
            (3.5 * 2f32.powi(-16), 0x04), // tie at the subnormal/normal boundary -> 0x04
            (61440.0, 0x7B),              // tie 57344 | 65536 -> 65536 = inf: saturates
            (60000.0, 0x7B),
            (1.0e9, 0x7B),
            (f32::INFINITY, 0x7B), // satfinite
            (f32::NEG_INFINITY, 0xFB),
            (f32::NAN, 0x7E),
            (-f32::NAN, 0xFE),
        ];
        for &(x, code) in cases {
            assert_eq!(f32_to_f8e5m2_bits(x), code, "encode {x:e}");
        }
        assert_eq!(f8e5m2_bits_to_f32(0x7C), f32::INFINITY);
        assert_eq!(f8e5m2_bits_to_f32(0xFC), f32::NEG_INFINITY);
        for code in [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF] {
            assert!(f8e5m2_bits_to_f32(code).is_nan(), "{code:#x}");
        }
        assert_eq!(f8e5m2_bits_to_f32(0x7B), 57344.0);
        assert_eq!(f8e5m2_bits_to_f32(0x03), 3.0 * 2f32.powi(-16));
    }

    #[test]
    fn bf16_known_bit_patterns_and_agreement_with_half() {
        let cases: &[(f32, u16)] = &[
            (1.0, 0x3F80),
            (-0.0, 0x8000),
            (1.0 + 2f32.powi(-8), 0x3F80),       // tie -> even
            (1.0 + 3.0 * 2f32.powi(-8), 0x3F82), // tie -> even (up)
            (1.0 + 2f32.powi(-8) + 2f32.powi(-20), 0x3F81),
            (3.389_531_4e38, 0x7F7F), // max
            (f32::from_bits(0x7F7F_7FFF), 0x7F7F),
            (f32::from_bits(0x7F7F_8000), 0x7F80), // tie past max -> inf
            (f32::MAX, 0x7F80),
            (f32::NEG_INFINITY, 0xFF80),
            (f32::from_bits(0x0001_0000), 0x0001), // min subnormal
            (f32::from_bits(0x0000_8000), 0x0000), // tie -> 0
            (f32::from_bits(0x0001_8000), 0x0002), // tie -> even
            (f32::from_bits(0x007F_FFFF), 0x0080), // largest f32 subnormal -> min normal
            (f32::NAN, 0x7FC0),
        ];
        for &(x, bits) in cases {
            assert_eq!(f32_to_bf16_bits(x), bits, "encode {x:e}");
            assert!(
                same(bf16_bits_to_f32(bits), round_to(DType::BF16, x)),
                "{x:e}"
            );
        }
        // A signalling NaN whose payload is all in the low half must not become inf.
        let snan = f32::from_bits(0x7F80_0001);
        assert_eq!(f32_to_bf16_bits(snan), 0x7FC0);
        assert_eq!(f32_to_bf16_bits(-snan), 0xFFC0);
        assert!(round_to(DType::BF16, snan).is_nan());
        for x in sweep_values() {
            let ours = f32_to_bf16_bits(x);
            let theirs = half::bf16::from_f32(x).to_bits();
            if x.is_nan() {
                assert!(half::bf16::from_bits(ours).is_nan());
            } else {
                assert_eq!(ours, theirs, "{x:e} ({:#010x})", x.to_bits());
            }
        }
    }

    #[test]
    fn f16_known_bit_patterns() {
        let cases: &[(f32, u16)] = &[
            (1.0, 0x3C00),
            (-0.0, 0x8000),
            (65504.0, 0x7BFF),
            (65519.0, 0x7BFF),
            (65520.0, 0x7C00), // tie past max -> inf
            (2f32.powi(-14), 0x0400),
            (2f32.powi(-24), 0x0001),
            (2f32.powi(-25), 0x0000), // tie -> 0
            (1.5 * 2f32.powi(-24), 0x0002),
            (f32::NEG_INFINITY, 0xFC00),
        ];
        for &(x, bits) in cases {
            assert_eq!(f32_to_f16_bits(x), bits, "encode {x:e}");
            assert_eq!(round_to(DType::F16, x), f16_bits_to_f32(bits), "{x:e}");
        }
        assert!(f16_bits_to_f32(f32_to_f16_bits(f32::NAN)).is_nan());
        assert!(round_to(DType::F16, f32::NAN).is_nan());
    }

    #[test]
    fn every_fp8_code_decodes_to_its_definition_and_round_trips() {
        for (dtype, exp_bits, mant_bits) in [(DType::F8E4M3, 4, 3), (DType::F8E5M2, 5, 2)] {
            let bias = (1 << (exp_bits - 1)) - 1;
            for code in 0..=255u8 {
                let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
                let e = ((code >> mant_bits) & ((1 << exp_bits) - 1)) as i32;
                let m = (code & ((1 << mant_bits) - 1)) as f64;
                let all_ones = e == (1 << exp_bits) - 1;
                let expected = match dtype {
                    DType::F8E4M3 if all_ones && m == 7.0 => f64::NAN,
                    DType::F8E5M2 if all_ones && m == 0.0 => sign * f64::INFINITY,
                    DType::F8E5M2 if all_ones => f64::NAN,
                    _ if e == 0 => sign * m / (1 << mant_bits) as f64 * 2f64.powi(1 - bias),
                    _ => sign * (1.0 + m / (1 << mant_bits) as f64) * 2f64.powi(e - bias),
                };
                let decoded = decode(dtype, &[code]).unwrap()[0];
                if expected.is_nan() {
                    assert!(decoded.is_nan(), "{dtype} {code:#04x}");
                    let nan = encode(dtype, &[decoded])[0];
                    assert!(decode(dtype, &[nan]).unwrap()[0].is_nan());
                    continue;
                }
                assert_eq!(decoded as f64, expected, "{dtype} {code:#04x}");
                assert_eq!(
                    decoded.is_sign_negative(),
                    sign < 0.0,
                    "{dtype} {code:#04x}"
                );
                let re = encode(dtype, &[decoded])[0];
                if expected.is_infinite() {
                    assert_eq!(re, code - 1, "inf saturates to max: {dtype} {code:#04x}");
                } else {
                    assert_eq!(re, code, "{dtype} {code:#04x}");
                    assert_eq!(round_to(dtype, decoded).to_bits(), decoded.to_bits());
                }
            }
        }
    }

    #[test]
    fn conversions_match_brute_force_reference_on_a_sweep() {
        let xs = sweep_values();
        for dtype in [DType::BF16, DType::F16, DType::F8E4M3, DType::F8E5M2] {
            let reference = reference(dtype);
            let sign_bit = 8 * dtype.size_bytes() as u32 - 1;
            for &x in &xs {
                let rounded = round_to(dtype, x);
                let code = encode_bits(dtype, x);
                let widened = decode(dtype, &encode(dtype, &[x])).unwrap()[0];
                if x.is_nan() {
                    assert!(rounded.is_nan() && widened.is_nan(), "{dtype} NaN");
                    continue;
                }
                let (ref_code, ref_value) = reference.round(x, sign_bit);
                let ctx = format!("{dtype} x={x:e} ({:#010x})", x.to_bits());
                assert_eq!(code, ref_code, "code {ctx}");
                assert_eq!(rounded as f64, ref_value, "round_to {ctx}");
                assert_eq!(rounded.is_sign_negative(), x.is_sign_negative(), "{ctx}");
                assert_eq!(widened.to_bits(), rounded.to_bits(), "decode(encode) {ctx}");
            }
        }
    }

    #[test]
    fn slice_rounding_matches_scalar_for_every_dtype() {
        // Long enough to take the parallel path, with the sweep's special values in it.
        let mut base = sweep_values();
        base.truncate(3 * PAR_CHUNK + 123);
        for dtype in DType::ALL {
            for len in [0, 1, 17, base.len()] {
                let mut xs = base[..len].to_vec();
                round_slice_in_place(dtype, &mut xs);
                for (&x, &r) in base.iter().zip(&xs) {
                    assert!(same(r, round_to(dtype, x)), "{dtype} {x:e}");
                }
            }
        }
    }

    #[test]
    fn encode_decode_bytes_are_little_endian_and_length_checked() {
        let xs = [1.0f32, -2.5, 448.0];
        assert_eq!(encode(DType::F32, &xs[..1]), 1.0f32.to_le_bytes());
        assert_eq!(
            encode(DType::BF16, &xs),
            [0x80, 0x3F, 0x20, 0xC0, 0xE0, 0x43]
        );
        assert_eq!(encode(DType::F16, &xs[..2]), [0x00, 0x3C, 0x00, 0xC1]);
        assert_eq!(encode(DType::F8E4M3, &xs), [0x38, 0xC2, 0x7E]);
        assert_eq!(encode(DType::F8E5M2, &xs), [0x3C, 0xC1, 0x5F]);
        for dtype in DType::ALL {
            let bytes = encode(dtype, &xs);
            assert_eq!(bytes.len(), xs.len() * dtype.size_bytes());
            assert_eq!(decode(dtype, &bytes).unwrap(), xs, "{dtype}");
        }
        assert!(decode(DType::F8E4M3, &[]).unwrap().is_empty());
        let err = decode(DType::F32, &[0; 7]).unwrap_err().to_string();
        assert!(err.contains("7 bytes") && err.contains("f32"), "{err}");
        assert!(decode(DType::BF16, &[0; 3]).is_err());
    }

    #[test]
    fn amax_is_nan_aware() {
        assert_eq!(amax(&[]), 0.0);
        assert_eq!(amax(&[1.0, -3.0, 2.0]), 3.0);
        assert_eq!(amax(&[-0.0]), 0.0);
        assert_eq!(amax(&[1.0, f32::NEG_INFINITY]), f32::INFINITY);
        assert!(amax(&[1.0, f32::NAN, f32::INFINITY]).is_nan());
        let mut long: Vec<f32> = (0..5 * PAR_CHUNK).map(|i| (i as f32).sin()).collect();
        long[4 * PAR_CHUNK + 7] = -9.5;
        assert_eq!(amax(&long), 9.5);
        long[3] = -f32::NAN;
        assert!(amax(&long).is_nan());
    }

    #[test]
    fn cast_scaled_rounds_scaled_values_and_returns_input_amax() {
        let xs = [0.5f32, -3.0, 100.0, 1e-3];
        let mut out = [0.0; 4];
        let amax_in = cast_scaled(DType::F8E4M3, &xs, 8.0, &mut out);
        assert_eq!(amax_in, 100.0);
        // 4, -24, 800 -> saturates to 448, 0.008 -> nearest multiple of 2^-9 is 4*2^-9
        assert_eq!(out, [4.0, -24.0, 448.0, 4.0 * 2f32.powi(-9)]);
        assert!(cast_scaled(DType::BF16, &[1.0, f32::NAN], 1.0, &mut [0.0; 2]).is_nan());

        let long: Vec<f32> = (0..3 * PAR_CHUNK + 5)
            .map(|i| (i as f32 * 0.37).cos() * 600.0)
            .collect();
        for dtype in DType::ALL {
            let mut out = vec![0.0; long.len()];
            let got = cast_scaled(dtype, &long, 0.75, &mut out);
            assert_eq!(got, amax(&long));
            for (&x, &y) in long.iter().zip(&out) {
                assert_eq!(
                    y.to_bits(),
                    round_to(dtype, x * 0.75).to_bits(),
                    "{dtype} {x}"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "as long as its input")]
    fn cast_scaled_rejects_mismatched_lengths() {
        cast_scaled(DType::F8E5M2, &[1.0, 2.0], 1.0, &mut [0.0]);
    }

    /// Throughput of the hot path: `cargo test --release -- --ignored --nocapture bench`.
    /// Rounding is idempotent and branch-free, so re-rounding one buffer measures the same work
    /// each repetition; the best of several repetitions is reported (the machine is shared).
    #[test]
    #[ignore]
    fn bench_round_slice_in_place() {
        let n = 4 << 20;
        let base: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.618).sin() * 300.0).collect();
        let best_ns = |f: &mut dyn FnMut()| {
            f(); // warm up pages and threads
            (0..10)
                .map(|_| {
                    let start = std::time::Instant::now();
                    f();
                    start.elapsed().as_secs_f64() * 1e9 / n as f64
                })
                .fold(f64::INFINITY, f64::min)
        };
        for dtype in DType::ALL {
            let mut xs = base.clone();
            let parallel = best_ns(&mut || round_slice_in_place(dtype, &mut xs));
            let mut ys = base.clone();
            let one_thread = best_ns(&mut || {
                for chunk in ys.chunks_mut(PAR_CHUNK) {
                    round_slice_in_place(dtype, chunk);
                }
            });
            let mut out = vec![0.0; n];
            let scaled = best_ns(&mut || {
                std::hint::black_box(cast_scaled(dtype, &base, 0.5, &mut out));
            });
            println!(
                "{dtype:>7}: round_slice_in_place {parallel:.3} ns/elem ({} threads), \
                 {one_thread:.3} ns/elem on one thread; cast_scaled {scaled:.3} ns/elem",
                rayon::current_num_threads()
            );
        }
    }

    #[test]
    fn stochastic_bf16_rounding_is_unbiased_and_picks_a_neighbour() {
        // Exact bf16 values, inf and the sign are kept for every r.
        for x in [0.0f32, -0.0, 1.0, -3.5, f32::INFINITY, f32::NEG_INFINITY] {
            for r in [0u16, 1, 0x7FFF, 0xFFFF] {
                assert_eq!(
                    f32_to_bf16_bits_stochastic(x, r),
                    f32_to_bf16_bits(x),
                    "{x} {r}"
                );
            }
        }
        assert!(bf16_bits_to_f32(f32_to_bf16_bits_stochastic(f32::NAN, 0x1234)).is_nan());
        // x = 1 + 0.3 ulp(bf16): rounds up for exactly the r that push the dropped bits past
        // 2^16, i.e. with probability 0.3 over all r, and otherwise down.
        let ulp = 2f32.powi(-7);
        for x in [
            1.0 + 0.3 * ulp,
            -(1.0 + 0.3 * ulp),
            1.0e-3 * (1.0 + 0.7 * ulp),
        ] {
            let down = bf16_bits_to_f32(f32_to_bf16_bits(x.abs() - 0.49 * ulp * x.abs()));
            let mut mean = 0.0f64;
            for r in 0..=u16::MAX {
                let y = bf16_bits_to_f32(f32_to_bf16_bits_stochastic(x, r));
                assert!(
                    y.abs() >= down && y.abs() <= down * (1.0 + ulp) * 1.0001,
                    "{x} -> {y}"
                );
                mean += f64::from(y);
            }
            mean /= 65536.0;
            let rel = ((mean - f64::from(x)) / f64::from(x)).abs();
            assert!(
                rel < 1e-6,
                "mean of stochastic rounding of {x} is {mean} (rel {rel})"
            );
        }
    }
}
