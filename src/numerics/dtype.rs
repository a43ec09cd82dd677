//! The storage formats halfling knows about and their numeric limits.
//!
//! A [`DType`] names how a tensor's elements are stored; arithmetic always happens in f32 after
//! widening. The limits here are the exact format definitions, so code that picks scales or
//! checks for overflow can rely on them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Element storage format of a tensor.
///
/// Serialized (serde, config files, CLI) as the lowercase names `f32`, `bf16`, `f16`, `f8e4m3`,
/// `f8e5m2`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// bfloat16: 8 exponent bits, 7 mantissa bits (the top half of an f32).
    BF16,
    /// IEEE 754 binary16: 5 exponent bits, 10 mantissa bits.
    F16,
    /// OCP FP8 E4M3FN: bias 7, no infinities, one NaN per sign (0x7F/0xFF), max 448.
    F8E4M3,
    /// OCP FP8 E5M2: bias 15, IEEE-like with infinities and NaNs, max 57344.
    F8E5M2,
}

impl DType {
    /// Every format, widest first.
    pub const ALL: [DType; 5] = [
        DType::F32,
        DType::BF16,
        DType::F16,
        DType::F8E4M3,
        DType::F8E5M2,
    ];

    /// Bytes one element occupies in storage.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::F8E4M3 | DType::F8E5M2 => 1,
        }
    }

    /// Canonical lowercase name, as accepted by [`FromStr`] and used by serde.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F8E4M3 => "f8e4m3",
            DType::F8E5M2 => "f8e5m2",
        }
    }

    /// Number of explicitly stored mantissa (fraction) bits.
    pub fn mantissa_bits(self) -> u32 {
        match self {
            DType::F32 => 23,
            DType::BF16 => 7,
            DType::F16 => 10,
            DType::F8E4M3 => 3,
            DType::F8E5M2 => 2,
        }
    }

    /// Number of exponent bits.
    pub fn exponent_bits(self) -> u32 {
        match self {
            DType::F32 | DType::BF16 => 8,
            DType::F16 | DType::F8E5M2 => 5,
            DType::F8E4M3 => 4,
        }
    }

    /// Largest finite value: f32::MAX, 3.3895314e38, 65504, 448, 57344.
    pub fn max_finite(self) -> f32 {
        match self {
            DType::F32 => f32::MAX,
            // 0x7F7F: (2 - 2^-7) * 2^127
            DType::BF16 => f32::from_bits(0x7F7F_0000),
            DType::F16 => 65504.0,
            DType::F8E4M3 => 448.0,
            DType::F8E5M2 => 57344.0,
        }
    }

    /// Smallest positive normal value (2^-126, 2^-126, 2^-14, 2^-6, 2^-14).
    pub fn min_normal(self) -> f32 {
        pow2(self.min_normal_exponent())
    }

    /// Smallest positive (subnormal) value (2^-149, 2^-133, 2^-24, 2^-9, 2^-16).
    pub fn min_subnormal(self) -> f32 {
        pow2(self.min_normal_exponent() - self.mantissa_bits() as i32)
    }

    /// True for the two 8-bit formats.
    pub fn is_float8(self) -> bool {
        matches!(self, DType::F8E4M3 | DType::F8E5M2)
    }

    /// True when the format can hold ±infinity (all but E4M3FN).
    pub fn has_infinity(self) -> bool {
        !matches!(self, DType::F8E4M3)
    }

    /// Unbiased exponent of the smallest normal value: 1 - bias.
    fn min_normal_exponent(self) -> i32 {
        match self {
            DType::F32 | DType::BF16 => -126,
            DType::F16 | DType::F8E5M2 => -14,
            DType::F8E4M3 => -6,
        }
    }
}

/// 2^e as an f32, exact for e in -149..=127 (subnormal results included).
pub(crate) fn pow2(e: i32) -> f32 {
    if e >= -126 {
        f32::from_bits(((e + 127) as u32) << 23)
    } else {
        f32::from_bits(1u32 << (e + 149))
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = anyhow::Error;

    /// Parses a canonical name, ignoring ASCII case.
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let wanted = s.trim();
        DType::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| {
                let allowed: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
                anyhow::anyhow!("unknown dtype {s:?}; use one of {}", allowed.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_from_str_display_and_serde() {
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
            assert_eq!(d.to_string(), d.name());
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{}\"", d.name()));
            assert_eq!(serde_json::from_str::<DType>(&json).unwrap(), d);
        }
        assert_eq!("BF16".parse::<DType>().unwrap(), DType::BF16);
        assert_eq!(" f8E4M3 ".parse::<DType>().unwrap(), DType::F8E4M3);
    }

    #[test]
    fn unknown_name_error_lists_allowed_names() {
        let err = "fp8".parse::<DType>().unwrap_err().to_string();
        assert!(err.contains("\"fp8\""), "{err}");
        for d in DType::ALL {
            assert!(err.contains(d.name()), "{err}");
        }
        assert!(serde_json::from_str::<DType>("\"F32x\"").is_err());
    }

    #[test]
    fn sizes_and_flags() {
        let sizes: Vec<usize> = DType::ALL.iter().map(|d| d.size_bytes()).collect();
        assert_eq!(sizes, [4, 2, 2, 1, 1]);
        let fp8: Vec<bool> = DType::ALL.iter().map(|d| d.is_float8()).collect();
        assert_eq!(fp8, [false, false, false, true, true]);
        assert!(!DType::F8E4M3.has_infinity());
        assert!(DType::F8E5M2.has_infinity());
        for d in DType::ALL {
            // sign + exponent + mantissa fill the storage exactly
            assert_eq!(
                1 + d.exponent_bits() + d.mantissa_bits(),
                8 * d.size_bytes() as u32
            );
        }
    }

    #[test]
    fn limits_match_format_definitions() {
        assert_eq!(DType::F32.max_finite(), f32::MAX);
        assert_eq!(DType::BF16.max_finite(), 3.389_531_4e38);
        assert_eq!(DType::F16.max_finite(), 65504.0);
        assert_eq!(DType::F8E4M3.max_finite(), 448.0);
        assert_eq!(DType::F8E5M2.max_finite(), 57344.0);

        assert_eq!(DType::F32.min_normal(), f32::MIN_POSITIVE);
        assert_eq!(DType::BF16.min_normal(), f32::MIN_POSITIVE);
        assert_eq!(DType::F16.min_normal(), 6.103_515_6e-5);
        assert_eq!(DType::F8E4M3.min_normal(), 0.015625);
        assert_eq!(DType::F8E5M2.min_normal(), 6.103_515_6e-5);

        assert_eq!(DType::F32.min_subnormal(), f32::from_bits(1));
        assert_eq!(DType::BF16.min_subnormal(), f32::from_bits(0x0001_0000));
        assert_eq!(DType::F16.min_subnormal(), 5.960_464_5e-8);
        assert_eq!(DType::F8E4M3.min_subnormal(), 0.001953125);
        assert_eq!(DType::F8E5M2.min_subnormal(), 1.525_878_9e-5);
    }

    #[test]
    fn pow2_is_exact_over_the_whole_range() {
        for e in -149..=127 {
            assert_eq!(pow2(e) as f64, 2f64.powi(e), "2^{e}");
        }
    }
}
