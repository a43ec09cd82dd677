//! Element conversions the checkpoint files need: f32 to bf16 bytes when saving, and bf16 / f16 /
//! f64 bytes to f32 when loading (the scalar conversions are `numerics`'), plus the transpose
//! between our `[out, in]` and Hugging Face's Conv1D `[in, out]` layouts. All little-endian, as
//! safetensors stores them.

pub use crate::numerics::{bf16_bits_to_f32, f32_to_bf16_bits};

/// Appends the little-endian bytes of `values` in the given file dtype to `out`.
pub fn push_f32_as(values: &[f32], bf16: bool, out: &mut Vec<u8>) {
    if bf16 {
        out.reserve(values.len() * 2);
        for &value in values {
            out.extend_from_slice(&f32_to_bf16_bits(value).to_le_bytes());
        }
    } else {
        out.reserve(values.len() * 4);
        for &value in values {
            out.extend_from_slice(&value.to_le_bytes());
        }
    }
}

/// Transposes a row-major `[rows, cols]` matrix into a row-major `[cols, rows]` one.
///
/// Works in square tiles so both the reads and the writes stay within a few cache lines.
pub fn transpose(source: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    debug_assert_eq!(source.len(), rows * cols);
    let mut out = vec![0.0f32; rows * cols];
    for row_start in (0..rows).step_by(TILE) {
        let row_end = (row_start + TILE).min(rows);
        for col_start in (0..cols).step_by(TILE) {
            let col_end = (col_start + TILE).min(cols);
            for row in row_start..row_end {
                for col in col_start..col_end {
                    out[col * rows + row] = source[row * cols + col];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::f16_bits_to_f32;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3F80);
        assert_eq!(f32_to_bf16_bits(-2.0), 0xC000);
        assert_eq!(f32_to_bf16_bits(-0.0), 0x8000);
        // Exactly half-way between 0x3F80 and 0x3F81: ties go to the even one (0x3F80).
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8000)), 0x3F80);
        // Half-way between 0x3F81 and 0x3F82: ties go to the even one (0x3F82).
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F81_8000)), 0x3F82);
        // Just above / below half-way round to the nearer neighbour.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8001)), 0x3F81);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F81_7FFF)), 0x3F81);
        // pi = 0x40490FDB rounds down to 0x4049 (3.140625).
        assert_eq!(f32_to_bf16_bits(std::f32::consts::PI), 0x4049);
        assert_eq!(bf16_bits_to_f32(0x4049), 3.140625);
        // The largest f32 is past bf16's largest finite value plus half an ulp: infinity.
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7F80);
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7F80);
        assert_eq!(f32_to_bf16_bits(f32::NEG_INFINITY), 0xFF80);
        // The smallest subnormal f32 rounds to zero; a NaN whose payload sits only in the low
        // bits must stay NaN.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(1)), 0x0000);
        let nan_low_payload = f32::from_bits(0x7F80_0001);
        assert!(nan_low_payload.is_nan());
        assert!(bf16_bits_to_f32(f32_to_bf16_bits(nan_low_payload)).is_nan());
        assert!(bf16_bits_to_f32(f32_to_bf16_bits(f32::NAN)).is_nan());
    }

    #[test]
    fn f16_widens_exactly() {
        assert_eq!(f16_bits_to_f32(0x3C00), 1.0);
        assert_eq!(f16_bits_to_f32(0xC000), -2.0);
        assert_eq!(f16_bits_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_bits_to_f32(0x7BFF), 65504.0);
        assert_eq!(f16_bits_to_f32(0x0001), 2.0f32.powi(-24));
        assert_eq!(f16_bits_to_f32(0x03FF), 1023.0 * 2.0f32.powi(-24));
        assert_eq!(f16_bits_to_f32(0x0400), 2.0f32.powi(-14));
        assert_eq!(f16_bits_to_f32(0x7C00), f32::INFINITY);
        assert_eq!(f16_bits_to_f32(0xFC00), f32::NEG_INFINITY);
        assert!(f16_bits_to_f32(0x7E00).is_nan());
        assert!(f16_bits_to_f32(0x7C01).is_nan());
        assert_eq!(f16_bits_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn transpose_moves_every_element() {
        let (rows, cols) = (37, 70);
        let source: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let out = transpose(&source, rows, cols);
        for row in 0..rows {
            for col in 0..cols {
                assert_eq!(out[col * rows + row], source[row * cols + col]);
            }
        }
        assert_eq!(transpose(&out, cols, rows), source);
    }
}
