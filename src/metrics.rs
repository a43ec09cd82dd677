//! Run outputs for humans and tools: the per-step `metrics.jsonl` log, the end-of-run
//! `summary.json`, and SVG loss plots.
//!
//! `metrics.jsonl` holds one JSON object per logged step (`step`, `tokens`, `lr`, `train_loss`,
//! `grad_norm`, `tokens_per_s`, `ms_per_step`, `val_loss` on evaluation steps, plus any
//! recipe-specific fields flattened in). JSON has no NaN or infinity, so a non-finite number (a
//! diverged loss) is written as `null` and read back as NaN; each line is written with a single
//! `write` so a crash leaves at most one partial last line, which readers skip and
//! [`MetricsWriter::open`] cuts off before appending.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::write_atomic;

/// File name of the per-step log inside a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// File name of the end-of-run summary inside a run directory.
pub const SUMMARY_FILE: &str = "summary.json";

/// One logged training step: a line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps completed.
    pub step: u64,
    /// Training tokens consumed so far.
    pub tokens: u64,
    /// Learning rate used for this step.
    #[serde(with = "number_or_null")]
    pub lr: f64,
    /// Mean training loss of this step's batch (NaN if it diverged).
    #[serde(with = "number_or_null")]
    pub train_loss: f64,
    /// Global gradient norm before clipping.
    #[serde(with = "number_or_null")]
    pub grad_norm: f64,
    /// Training throughput over the last logging interval.
    #[serde(with = "number_or_null")]
    pub tokens_per_s: f64,
    /// Mean wall time per optimizer step over the last logging interval, in milliseconds.
    #[serde(with = "number_or_null")]
    pub ms_per_step: f64,
    /// Validation loss, present only on evaluation steps.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_number"
    )]
    pub val_loss: Option<f64>,
    /// Recipe-specific fields (`loss_scale`, `skipped_steps`, fp8 amax statistics, ...),
    /// written at the top level of the JSON object.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Appends [`StepMetrics`] lines to `<run dir>/metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsWriter {
    file: File,
    path: PathBuf,
}

impl MetricsWriter {
    /// Opens (creating the run directory and file if needed) `<run_dir>/metrics.jsonl` for
    /// appending. A partial last line left by a crash is cut off first, so appended lines stay
    /// well-formed. To resume from a checkpoint, call [`truncate_after`] before this.
    pub fn open(run_dir: impl AsRef<Path>) -> Result<Self> {
        let run_dir = run_dir.as_ref();
        std::fs::create_dir_all(run_dir)
            .map_err(|e| anyhow!("cannot create run directory {}: {e}", run_dir.display()))?;
        let path = run_dir.join(METRICS_FILE);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(|e| anyhow!("cannot open {} for appending: {e}", path.display()))?;
        let existing =
            std::fs::read(&path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
        if !existing.is_empty() && !existing.ends_with(b"\n") {
            let keep = existing
                .iter()
                .rposition(|&byte| byte == b'\n')
                .map_or(0, |newline| newline + 1);
            file.set_len(keep as u64).map_err(|e| {
                anyhow!(
                    "cannot cut the partial last line of {}: {e}",
                    path.display()
                )
            })?;
        }
        Ok(Self { file, path })
    }

    /// Appends one record as a JSON line and flushes it to the file.
    pub fn write(&mut self, metrics: &StepMetrics) -> Result<()> {
        let mut line = serde_json::to_string(metrics)
            .map_err(|e| anyhow!("cannot encode metrics for step {}: {e}", metrics.step))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| anyhow!("cannot append to {}: {e}", self.path.display()))
    }

    /// Path of the file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads every record of a `metrics.jsonl` file. Blank lines and a partial last line (no
/// trailing newline, not valid JSON) are skipped; any other malformed line is an error.
pub fn read_metrics(path: impl AsRef<Path>) -> Result<Vec<StepMetrics>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("cannot read metrics file {}: {e}", path.display()))?;
    let mut records = Vec::new();
    for (index, line, complete) in lines_of(&text) {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<StepMetrics>(line) {
            Ok(record) => records.push(record),
            Err(_) if !complete => break,
            Err(e) => bail!(
                "{}:{}: not a metrics record ({e}); fix or delete that line",
                path.display(),
                index + 1
            ),
        }
    }
    Ok(records)
}

/// Drops every record with `step` greater than `step` from a `metrics.jsonl` file (used when
/// resuming from a checkpoint taken at `step`), replacing the file atomically. A partial last line
/// is dropped too. Returns how many lines were dropped; a missing file is not an error.
pub fn truncate_after(path: impl AsRef<Path>, step: u64) -> Result<usize> {
    let path = path.as_ref();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => bail!("cannot read metrics file {}: {e}", path.display()),
    };
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0;
    for (index, line, complete) in lines_of(&text) {
        if line.trim().is_empty() {
            continue;
        }
        let line_step = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|record| record.get("step").and_then(serde_json::Value::as_u64));
        match line_step {
            Some(line_step) if line_step <= step => {
                kept.push_str(line);
                kept.push('\n');
            }
            Some(_) => dropped += 1,
            None if !complete => dropped += 1,
            None => bail!(
                "{}:{}: not a metrics record with a `step`; fix or delete that line before resuming",
                path.display(),
                index + 1
            ),
        }
    }
    write_atomic(path, kept.as_bytes())?;
    Ok(dropped)
}

/// Lines of `text` as (index, line without its newline, whether a newline ended it).
fn lines_of(text: &str) -> impl Iterator<Item = (usize, &str, bool)> {
    let ends_with_newline = text.ends_with('\n');
    let pieces: Vec<&str> = text.split('\n').collect();
    let count = pieces.len();
    pieces
        .into_iter()
        .enumerate()
        // `split` yields an empty piece after a final newline; it is not a line.
        .filter(move |(index, piece)| {
            !(ends_with_newline && *index + 1 == count && piece.is_empty())
        })
        .map(move |(index, piece)| {
            let line = piece.strip_suffix('\r').unwrap_or(piece);
            (index, line, index + 1 < count)
        })
}

/// End-of-run numbers, written as `<run dir>/summary.json`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Last optimizer step completed.
    pub final_step: u64,
    /// Training tokens consumed.
    pub tokens: u64,
    /// Training loss at the last logged step (NaN if it diverged).
    #[serde(with = "number_or_null")]
    pub final_train_loss: f64,
    /// Validation loss of the final evaluation, if one ran.
    #[serde(default, with = "optional_number")]
    pub final_val_loss: Option<f64>,
    /// Lowest validation loss seen, if any evaluation ran.
    #[serde(default, with = "optional_number")]
    pub best_val_loss: Option<f64>,
    /// Wall-clock duration of the run in seconds.
    #[serde(with = "number_or_null")]
    pub wall_s: f64,
    /// Mean training throughput over the run.
    #[serde(with = "number_or_null")]
    pub tokens_per_s: f64,
    /// Model FLOP utilisation (0..1), where the device's peak is known.
    #[serde(default, with = "optional_number")]
    pub mfu: Option<f64>,
    /// Peak device memory in bytes, where measured.
    #[serde(default)]
    pub peak_mem_bytes: Option<u64>,
    /// Device description, e.g. "cpu (2 threads)" or "NVIDIA H100 80GB HBM3".
    pub device: String,
    /// Precision recipe name, e.g. "bf16".
    pub precision: String,
    /// Trainable parameter count.
    pub params: u64,
    /// Further fields, written at the top level of the JSON object.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Summary {
    /// Writes the summary as pretty JSON to `path`, atomically (temporary file + rename).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|e| anyhow!("cannot encode run summary: {e}"))?;
        text.push('\n');
        write_atomic(path, text.as_bytes())
    }

    /// Reads a summary written by [`Summary::write`].
    pub fn read(path: impl AsRef<Path>) -> Result<Summary> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("cannot read run summary {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| {
            anyhow!(
                "{} is not a valid run summary ({e}); re-run training to regenerate it",
                path.display()
            )
        })
    }
}

/// One curve of a loss chart.
pub(crate) struct Curve {
    pub(crate) label: String,
    pub(crate) points: Vec<(f64, f64)>,
    pub(crate) color: RGBColor,
    pub(crate) stroke_width: u32,
    pub(crate) markers: bool,
}

/// One run of a comparison (`halfling compare`).
pub struct ComparedRun {
    /// The run directory's name and its recipe, e.g. `fp8 (fp8)`.
    pub label: String,
    /// Its `summary.json`.
    pub summary: Summary,
    /// Its `metrics.jsonl`.
    pub metrics: Vec<StepMetrics>,
}

/// Reads `summary.json` and `metrics.jsonl` of each finished run directory.
pub fn load_runs(dirs: &[PathBuf]) -> Result<Vec<ComparedRun>> {
    dirs.iter()
        .map(|dir| {
            let summary_path = dir.join(SUMMARY_FILE);
            if !summary_path.exists() {
                bail!(
                    "{} has no {SUMMARY_FILE}: pass the directories of finished training runs",
                    dir.display()
                );
            }
            let summary = Summary::read(&summary_path)?;
            let metrics = read_metrics(dir.join(METRICS_FILE))?;
            let name = dir
                .file_name()
                .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
            let label = if name == summary.precision {
                name
            } else {
                format!("{name} ({})", summary.precision)
            };
            Ok(ComparedRun {
                label,
                summary,
                metrics,
            })
        })
        .collect()
}

/// A table of each run's final and best validation loss, the final one also relative to the
/// first run's (the baseline).
pub fn comparison_table(runs: &[ComparedRun]) -> String {
    let base = runs.first().and_then(|r| r.summary.final_val_loss);
    let width = runs.iter().map(|r| r.label.len()).max().unwrap_or(3).max(3);
    let mut out = format!(
        "{:<width$}  {:>6}  {:>10}  {:>10}  {:>9}\n",
        "run", "steps", "final val", "best val", "vs first"
    );
    let num = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.4}"));
    for r in runs {
        let rel = match (r.summary.final_val_loss, base) {
            (Some(v), Some(b)) if b != 0.0 => format!("{:+.2}%", 100.0 * (v - b) / b),
            _ => "-".to_string(),
        };
        out.push_str(&format!(
            "{:<width$}  {:>6}  {:>10}  {:>10}  {:>9}\n",
            r.label,
            r.summary.final_step,
            num(r.summary.final_val_loss),
            num(r.summary.best_val_loss),
            rel
        ));
    }
    out
}

/// Colors for successive runs in [`plot_runs`]; they repeat after the last.
pub(crate) const RUN_COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// Draws the train loss (line) and validation loss (line with markers) of one run against the
/// step into an SVG file.
pub fn plot_losses(metrics: &[StepMetrics], path_svg: impl AsRef<Path>) -> Result<()> {
    let curves = vec![
        Curve {
            label: "train loss".to_string(),
            points: train_points(metrics),
            color: RUN_COLORS[0],
            stroke_width: 2,
            markers: false,
        },
        Curve {
            label: "val loss".to_string(),
            points: val_points(metrics),
            color: RUN_COLORS[1],
            stroke_width: 2,
            markers: true,
        },
    ];
    draw_chart("Loss", "step", "loss", curves, path_svg.as_ref())
}

/// Draws several runs' curves into one SVG for comparison: per run, a thin train-loss line and
/// a thicker validation-loss line with markers, in the run's color.
pub fn plot_runs(runs: &[(String, Vec<StepMetrics>)], path_svg: impl AsRef<Path>) -> Result<()> {
    let mut curves = Vec::new();
    for (index, (label, metrics)) in runs.iter().enumerate() {
        let color = RUN_COLORS[index % RUN_COLORS.len()];
        curves.push(Curve {
            label: format!("{label} train"),
            points: train_points(metrics),
            color,
            stroke_width: 1,
            markers: false,
        });
        curves.push(Curve {
            label: format!("{label} val"),
            points: val_points(metrics),
            color,
            stroke_width: 3,
            markers: true,
        });
    }
    draw_chart("Loss by run", "step", "loss", curves, path_svg.as_ref())
}

/// (step, train loss) for every record with a finite train loss.
fn train_points(metrics: &[StepMetrics]) -> Vec<(f64, f64)> {
    metrics
        .iter()
        .filter(|m| m.train_loss.is_finite())
        .map(|m| (m.step as f64, m.train_loss))
        .collect()
}

/// (step, val loss) for every record with a finite validation loss.
fn val_points(metrics: &[StepMetrics]) -> Vec<(f64, f64)> {
    metrics
        .iter()
        .filter_map(|m| m.val_loss.map(|loss| (m.step as f64, loss)))
        .filter(|(_, loss)| loss.is_finite())
        .collect()
}

/// Renders the curves (empty ones are left out of chart and legend) to an SVG file.
pub(crate) fn draw_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    curves: Vec<Curve>,
    path: &Path,
) -> Result<()> {
    let curves: Vec<Curve> = curves
        .into_iter()
        .filter(|c| !c.points.is_empty())
        .collect();
    let all_points = || curves.iter().flat_map(|c| c.points.iter().copied());
    let Some((x_min, x_max, y_min, y_max)) = all_points().fold(None, |range, (x, y)| {
        let (x0, x1, y0, y1) = range.unwrap_or((x, x, y, y));
        Some((x0.min(x), x1.max(x), y0.min(y), y1.max(y)))
    }) else {
        bail!(
            "nothing to plot into {}: no finite loss values",
            path.display()
        );
    };
    let x_range = if x_max > x_min {
        x_min..x_max
    } else {
        x_min - 1.0..x_max + 1.0
    };
    let y_pad = if y_max > y_min {
        (y_max - y_min) * 0.05
    } else {
        0.5
    };
    let y_range = (y_min - y_pad)..(y_max + y_pad);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 600)).into_drawing_area();
        let plot_error = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
        root.fill(&WHITE).map_err(|e| plot_error(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 26))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range, y_range)
            .map_err(|e| plot_error(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .axis_desc_style(("sans-serif", 18))
            .label_style(("sans-serif", 14))
            .x_label_formatter(&|step| format!("{step:.0}"))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| plot_error(&e))?;
        for curve in &curves {
            let style = ShapeStyle::from(&curve.color).stroke_width(curve.stroke_width);
            chart
                .draw_series(LineSeries::new(curve.points.iter().copied(), style))
                .map_err(|e| plot_error(&e))?
                .label(curve.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
            if curve.markers {
                let marker = ShapeStyle::from(&curve.color).filled();
                chart
                    .draw_series(
                        curve
                            .points
                            .iter()
                            .map(|&point| Circle::new(point, 3, marker)),
                    )
                    .map_err(|e| plot_error(&e))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()
            .map_err(|e| plot_error(&e))?;
        root.present().map_err(|e| plot_error(&e))?;
    }
    write_atomic(path, svg.as_bytes())
        .with_context(|| format!("cannot save the loss plot {}", path.display()))
}

/// Formats a duration for progress lines: "0.4s", "42s", "1m 23s", "2h 05m", "3d 04h";
/// "?" for negative or non-finite input.
pub fn format_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".to_string();
    }
    if secs < 10.0 {
        return format!("{secs:.1}s");
    }
    let whole = secs.round() as u64;
    let (days, hours, minutes, seconds) = (
        whole / 86_400,
        whole / 3600 % 24,
        whole / 60 % 60,
        whole % 60,
    );
    if whole < 60 {
        format!("{seconds}s")
    } else if whole < 3600 {
        format!("{minutes}m {seconds:02}s")
    } else if whole < 86_400 {
        format!("{hours}h {minutes:02}m")
    } else {
        format!("{days}d {hours:02}h")
    }
}

/// Serde for an `f64` that may be non-finite: written as `null` when NaN or infinite (JSON has
/// neither), read back as NaN.
mod number_or_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        if value.is_finite() {
            serializer.serialize_f64(*value)
        } else {
            serializer.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
    }
}

/// Serde for an `Option<f64>`: `None` and non-finite values are written as `null`; `null` is read
/// back as `None` (absent keys are handled by `#[serde(default)]` at the field).
mod optional_number {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<f64>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(number) if number.is_finite() => serializer.serialize_f64(*number),
            _ => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<f64>, D::Error> {
        Option::<f64>::deserialize(deserializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64, val_loss: Option<f64>) -> StepMetrics {
        StepMetrics {
            step,
            tokens: step * 768,
            lr: 1e-3,
            train_loss: 4.0 - step as f64 * 0.01,
            grad_norm: 0.5,
            tokens_per_s: 12_345.6,
            ms_per_step: 62.2,
            val_loss,
            extra: serde_json::Map::new(),
        }
    }

    fn sample_run(steps: u64) -> Vec<StepMetrics> {
        (0..=steps)
            .step_by(10)
            .map(|step| record(step, (step % 50 == 0).then_some(4.1 - step as f64 * 0.009)))
            .collect()
    }

    #[test]
    fn jsonl_round_trip_with_extra_fields() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = record(10, Some(3.5));
        first
            .extra
            .insert("loss_scale".into(), serde_json::json!(65536.0));
        first
            .extra
            .insert("skipped_steps".into(), serde_json::json!(2));
        let second = record(20, None);
        {
            let mut writer = MetricsWriter::open(dir.path()).unwrap();
            writer.write(&first).unwrap();
            writer.write(&second).unwrap();
        }
        // Reopening appends rather than overwriting.
        let third = record(30, None);
        MetricsWriter::open(dir.path())
            .unwrap()
            .write(&third)
            .unwrap();
        let path = dir.path().join(METRICS_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"loss_scale\":65536.0"), "{text}");
        assert_eq!(read_metrics(&path).unwrap(), vec![first, second, third]);
    }

    #[test]
    fn val_loss_is_omitted_when_none_and_nan_survives() {
        let line = serde_json::to_string(&record(5, None)).unwrap();
        assert!(!line.contains("val_loss"), "{line}");
        let line = serde_json::to_string(&record(5, Some(2.0))).unwrap();
        assert!(line.contains("\"val_loss\":2.0"), "{line}");
        let mut diverged = record(6, None);
        diverged.train_loss = f64::NAN;
        diverged.grad_norm = f64::INFINITY;
        let line = serde_json::to_string(&diverged).unwrap();
        assert!(line.contains("\"train_loss\":null"), "{line}");
        let back: StepMetrics = serde_json::from_str(&line).unwrap();
        assert!(back.train_loss.is_nan() && back.grad_norm.is_nan());
        assert_eq!(back.step, 6);
    }

    #[test]
    fn partial_last_line_is_skipped_and_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let whole = serde_json::to_string(&record(10, None)).unwrap();
        std::fs::write(&path, format!("{whole}\n{{\"step\": 20, \"tok")).unwrap();
        assert_eq!(read_metrics(&path).unwrap().len(), 1);
        MetricsWriter::open(dir.path())
            .unwrap()
            .write(&record(20, None))
            .unwrap();
        let steps: Vec<u64> = read_metrics(&path)
            .unwrap()
            .iter()
            .map(|m| m.step)
            .collect();
        assert_eq!(steps, vec![10, 20]);
        // A malformed line in the middle is an error naming the line.
        std::fs::write(&path, format!("{whole}\ngarbage\n{whole}\n")).unwrap();
        let message = read_metrics(&path).unwrap_err().to_string();
        assert!(message.contains(":2:"), "{message}");
    }

    #[test]
    fn truncate_after_drops_later_steps() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut writer = MetricsWriter::open(dir.path()).unwrap();
            for metrics in sample_run(100) {
                writer.write(&metrics).unwrap();
            }
        }
        let path = dir.path().join(METRICS_FILE);
        assert_eq!(truncate_after(&path, 55).unwrap(), 5);
        let steps: Vec<u64> = read_metrics(&path)
            .unwrap()
            .iter()
            .map(|m| m.step)
            .collect();
        assert_eq!(steps, vec![0, 10, 20, 30, 40, 50]);
        assert_eq!(truncate_after(&path, 1000).unwrap(), 0);
        assert_eq!(truncate_after(dir.path().join("none.jsonl"), 5).unwrap(), 0);
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn summary_is_written_and_parses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SUMMARY_FILE);
        let mut summary = Summary {
            final_step: 2000,
            tokens: 1_536_000,
            final_train_loss: 1.7,
            final_val_loss: Some(1.88),
            best_val_loss: Some(1.87),
            wall_s: 321.5,
            tokens_per_s: 4777.0,
            mfu: None,
            peak_mem_bytes: Some(123_456_789),
            device: "cpu".into(),
            precision: "fp32".into(),
            params: 800_000,
            extra: serde_json::Map::new(),
        };
        summary
            .extra
            .insert("recipe_note".into(), serde_json::json!("x"));
        summary.write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\n  \"final_val_loss\": 1.88"), "{text}");
        assert!(text.contains("\"mfu\": null"), "{text}");
        assert_eq!(Summary::read(&path).unwrap(), summary);
        std::fs::write(&path, "{").unwrap();
        assert!(Summary::read(&path).is_err());
    }

    /// The trimmed contents of every `<text>` element of an SVG document.
    fn svg_texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|element| {
                let body = element.split_once('>')?.1;
                Some(body.split_once("</text>")?.0.trim().to_string())
            })
            .collect()
    }

    #[test]
    fn loss_plot_has_text_and_curves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        plot_losses(&sample_run(500), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        let texts = svg_texts(&svg);
        for text in ["Loss", "step", "loss", "train loss", "val loss"] {
            assert!(
                texts.iter().any(|t| t == text),
                "missing {text} in {texts:?}"
            );
        }
        // One polyline per curve plus the legend samples, and a marker per val point.
        assert!(svg.matches("<polyline").count() >= 2);
        assert!(svg.matches("<circle").count() >= 11);
        assert!(svg.len() > 5000);
    }

    #[test]
    fn comparison_reads_runs_and_measures_against_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut dirs = Vec::new();
        for (name, precision, val) in [("base", "bf16", 2.0), ("fp8", "fp8", 2.02)] {
            let run = dir.path().join(name);
            std::fs::create_dir_all(&run).unwrap();
            let mut log = MetricsWriter::open(&run).unwrap();
            for m in sample_run(100) {
                log.write(&m).unwrap();
            }
            let summary = Summary {
                final_step: 100,
                final_val_loss: Some(val),
                best_val_loss: Some(val - 0.01),
                precision: precision.into(),
                ..Summary::default()
            };
            summary.write(run.join(SUMMARY_FILE)).unwrap();
            dirs.push(run);
        }
        let runs = load_runs(&dirs).unwrap();
        assert_eq!(runs[0].label, "base (bf16)");
        assert_eq!(runs[1].label, "fp8");
        assert_eq!(runs[1].metrics.len(), 11);
        let table = comparison_table(&runs);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[1].contains("2.0000") && lines[1].ends_with("+0.00%"),
            "{table}"
        );
        assert!(
            lines[2].contains("2.0200") && lines[2].ends_with("+1.00%"),
            "{table}"
        );
        // A directory without a summary is named in the error.
        let missing = dir.path().join("unfinished");
        std::fs::create_dir_all(&missing).unwrap();
        let err = load_runs(&[missing]).err().unwrap().to_string();
        assert!(
            err.contains("unfinished") && err.contains(SUMMARY_FILE),
            "{err}"
        );
    }

    #[test]
    fn run_comparison_plot_labels_every_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("compare.svg");
        let mut bf16 = sample_run(300);
        for m in &mut bf16 {
            m.train_loss += 0.1;
        }
        let runs = vec![
            ("fp32".to_string(), sample_run(300)),
            ("bf16".to_string(), bf16),
        ];
        plot_runs(&runs, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let texts = svg_texts(&svg);
        for text in [
            "Loss by run",
            "fp32 train",
            "fp32 val",
            "bf16 train",
            "bf16 val",
        ] {
            assert!(
                texts.iter().any(|t| t == text),
                "missing {text} in {texts:?}"
            );
        }
        assert!(svg.matches("<polyline").count() >= 4);
        let empty = plot_runs(&[], dir.path().join("empty.svg")).unwrap_err();
        assert!(empty.to_string().contains("nothing to plot"), "{empty}");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(0.42), "0.4s");
        assert_eq!(format_duration(42.0), "42s");
        assert_eq!(format_duration(83.0), "1m 23s");
        assert_eq!(format_duration(7500.0), "2h 05m");
        assert_eq!(format_duration(3.0 * 86_400.0 + 4.0 * 3600.0), "3d 04h");
        assert_eq!(format_duration(f64::NAN), "?");
        assert_eq!(format_duration(-1.0), "?");
    }
}
