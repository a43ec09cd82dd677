//! The numerics monitor: what the storage formats do to a run's tensors.
//!
//! Every `precision.monitor_interval` steps the trainer hands every weight (compute copy),
//! gradient and saved activation to [`record`], which reads it back and appends one line per
//! tensor to `numerics.jsonl`: absolute max, RMS, and the fractions of values that are zero,
//! subnormal (below the format's smallest normal: precision is being lost, and the next step down
//! is zero) and saturated (at the format's largest finite value or beyond). `halfling report RUN`
//! prints the latest step's table and draws `numerics.svg`, the underflow fraction per layer, so a
//! user sees which layer is losing precision.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::metrics::{draw_chart, Curve, RUN_COLORS};
use crate::model::{Activations, Gpt};
use crate::numerics::DType;

/// The monitor's file in a run directory.
pub const NUMERICS_FILE: &str = "numerics.jsonl";

/// Statistics of one tensor at one step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorRecord {
    /// Optimizer step.
    pub step: u64,
    /// Tensor name.
    pub name: String,
    /// `weight`, `grad` or `activation`.
    pub role: String,
    /// Transformer block, if inside one.
    pub layer: Option<usize>,
    /// Storage format.
    pub dtype: DType,
    /// max |x| over finite values.
    pub amax: f64,
    /// √(mean x²) over finite values.
    pub rms: f64,
    /// Fraction of values that are exactly zero.
    pub zero: f64,
    /// Fraction of nonzero values below the format's smallest normal.
    pub subnormal: f64,
    /// Fraction of values at or beyond the format's largest finite value (inf included).
    pub saturated: f64,
    /// Fraction of NaN values.
    pub nan: f64,
}

/// Reads back every probed tensor of `model` and appends its statistics to
/// `run_dir/numerics.jsonl`; returns the records.
pub fn record<B: Backend>(
    backend: &B,
    model: &Gpt<B>,
    acts: &Activations<B>,
    step: u64,
    run_dir: &Path,
) -> Result<Vec<TensorRecord>> {
    let probed = model.probe_tensors(acts);
    let bufs: Vec<&B::Buf> = probed.iter().map(|t| t.buf).collect();
    let stats = backend.tensor_stats(&bufs)?;
    let records: Vec<TensorRecord> = probed
        .iter()
        .zip(stats)
        .map(|(t, s)| TensorRecord {
            step,
            name: t.name.clone(),
            role: t.role.to_string(),
            layer: t.layer,
            dtype: backend.dtype(t.buf),
            amax: s.amax,
            rms: s.rms(),
            zero: s.fraction(s.zero),
            subnormal: s.fraction(s.subnormal),
            saturated: s.fraction(s.saturated),
            nan: s.fraction(s.nan),
        })
        .collect();
    let path = run_dir.join(NUMERICS_FILE);
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut text = String::new();
    for r in &records {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot append to {}", path.display()))?;
    Ok(records)
}

/// Reads `numerics.jsonl`.
pub fn read_records(path: &Path) -> Result<Vec<TensorRecord>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {} (was the run trained with precision.monitor_interval > 0?)",
            path.display()
        )
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| anyhow!("{}:{}: not a numerics record: {e}", path.display(), i + 1))
        })
        .collect()
}

/// The latest step's records as a table, worst underflow first within each role.
pub fn report_table(records: &[TensorRecord]) -> String {
    let Some(last) = records.iter().map(|r| r.step).max() else {
        return "no numerics records\n".into();
    };
    let mut latest: Vec<&TensorRecord> = records.iter().filter(|r| r.step == last).collect();
    latest.sort_by(|a, b| {
        a.role
            .cmp(&b.role)
            .then((b.zero + b.subnormal).total_cmp(&(a.zero + a.subnormal)))
    });
    let mut s = format!(
        "numerics at step {last}\n{:<28} {:<10} {:<6} {:>10} {:>10} {:>8} {:>10} {:>10}\n",
        "tensor", "role", "dtype", "amax", "rms", "zero%", "subnorm%", "saturated%"
    );
    for r in latest {
        s.push_str(&format!(
            "{:<28} {:<10} {:<6} {:>10.3e} {:>10.3e} {:>8.3} {:>10.4} {:>10.4}\n",
            r.name,
            r.role,
            r.dtype.to_string(),
            r.amax,
            r.rms,
            100.0 * r.zero,
            100.0 * r.subnormal,
            100.0 * r.saturated
        ));
    }
    s
}

/// Draws the latest step's mean subnormal fraction per layer, one line per role.
pub fn plot_layers(records: &[TensorRecord], path: &Path) -> Result<()> {
    let last = records.iter().map(|r| r.step).max().unwrap_or(0);
    let mut curves = Vec::new();
    for (i, role) in ["weight", "grad", "activation"].iter().enumerate() {
        let mut by_layer: std::collections::BTreeMap<usize, (f64, usize)> = Default::default();
        for r in records.iter().filter(|r| r.step == last && r.role == *role) {
            if let Some(l) = r.layer {
                let e = by_layer.entry(l).or_insert((0.0, 0));
                e.0 += 100.0 * r.subnormal;
                e.1 += 1;
            }
        }
        let points = by_layer
            .into_iter()
            .map(|(l, (sum, n))| (l as f64, sum / n as f64))
            .collect();
        curves.push(Curve {
            label: role.to_string(),
            points,
            color: RUN_COLORS[i],
            stroke_width: 2,
            markers: true,
        });
    }
    draw_chart(
        &format!("Subnormal values by layer, step {last}"),
        "layer",
        "% subnormal",
        curves,
        path,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::TensorStats;

    #[test]
    fn stats_count_zero_subnormal_saturated_and_nan() {
        let bf16_min_normal = DType::BF16.min_normal();
        let values = [
            0.0,
            1.0,
            -2.0,
            bf16_min_normal / 4.0,
            f32::INFINITY,
            f32::NAN,
            3.0e38,
            -0.5,
        ];
        let s = TensorStats::of(&values, DType::BF16);
        assert_eq!(s.amax, 3.0e38f32 as f64);
        assert_eq!((s.zero, s.subnormal, s.nan, s.finite), (1, 1, 1, 6));
        // 3e38 is below bf16's largest finite value (3.39e38): only the infinity saturates.
        assert_eq!(s.fraction(s.saturated), 1.0 / 8.0);
        let s8 = TensorStats::of(&[448.0, 500.0, 1.0, -448.0], DType::F8E4M3);
        assert_eq!(s8.fraction(s8.saturated), 0.75);
        assert!((TensorStats::of(&[3.0, 4.0], DType::F32).rms() - 12.5f64.sqrt()).abs() < 1e-12);
    }
}
