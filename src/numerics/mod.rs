//! Storage formats and the exact numerics of low precision.
//!
//! halfling keeps tensors in f32, bf16, f16 or FP8 (E4M3FN / E5M2) but always computes in f32:
//! values are widened, combined, and rounded back to the storage format. This module is that
//! rounding, bit-exact and identical to what the GPU does, so CPU runs model GPU numerics:
//!
//! - [`DType`]: the formats and their limits (max, min normal, min subnormal).
//! - Scalar conversions to and from raw bits, all round-to-nearest-even; FP8 conversion is
//!   saturating ("satfinite"), see `convert`'s module doc for the exact NaN/inf rules.
//! - Slice operations: [`round_to`], [`round_slice_in_place`] (the hot path of emulated
//!   low-precision training), [`encode`]/[`decode`] to little-endian bytes, [`amax`] and the
//!   scaled FP8 cast [`cast_scaled`].
//! - Per-tensor FP8 scaling state: [`AmaxHistory`] and [`scale_from_amax`].
//! - Dynamic loss scaling for fp16: [`LossScaler`].

mod convert;
mod dtype;
mod loss_scale;
mod scaling;

pub use convert::*;
pub use dtype::*;
pub use loss_scale::LossScaler;
pub use scaling::*;
