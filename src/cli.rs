//! The `halfling` command line: `prepare`, `train`, `sample`, `eval`, `bench`, `selftest`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{cuda_available, CudaBackend};
use crate::config::{Config, DeviceKind, TokenizerKind};
use crate::data::{self, PrepareOptions};
use crate::generate::{generate, SampleOptions};
use crate::model::Gpt;
use crate::precision::Recipe;
use crate::{bench, runs, selftest, train};

/// The default config, trained by a bare `halfling train`.
pub const DEFAULT_CONFIG: &str = "configs/shakespeare_char.toml";

#[derive(Parser, Debug)]
#[command(
    name = "halfling",
    version,
    about = "Train transformer language models fast in mixed and low precision"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Turn a text file into train.bin/val.bin token shards plus tokenizer.json.
    Prepare(PrepareArgs),
    /// Train a model (default: the char-level Shakespeare config, on the CPU).
    Train(TrainArgs),
    /// Generate text from a trained run or checkpoint.
    Sample(SampleArgs),
    /// Validation loss of a run over the whole validation split.
    Eval(EvalArgs),
    /// Training throughput on synthetic tokens, as one JSON line.
    Bench(BenchArgs),
    /// Check every backend op against the f64 CPU reference on random inputs.
    Selftest(SelftestArgs),
    /// Numerics of a run trained with precision.monitor_interval > 0: a table and numerics.svg.
    Report(ReportArgs),
    /// Compare runs (e.g. one per precision recipe): final and best val loss, and one loss plot.
    Compare(CompareArgs),
}

#[derive(Args, Debug)]
struct DeviceArg {
    /// Where to compute: auto (CUDA when usable, else CPU), cpu or cuda.
    #[arg(long, value_parser = parse_device)]
    device: Option<DeviceKind>,
    /// CPU threads (0 = all cores).
    #[arg(long)]
    threads: Option<usize>,
}

fn parse_device(s: &str) -> Result<DeviceKind, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}

#[derive(Args, Debug)]
struct PrepareArgs {
    /// The UTF-8 text file.
    input: PathBuf,
    /// Output directory for train.bin, val.bin, tokenizer.json and meta.json.
    #[arg(long)]
    out: PathBuf,
    /// char or bpe.
    #[arg(long, default_value = "char")]
    tokenizer: String,
    /// BPE vocabulary size.
    #[arg(long, default_value_t = 2048)]
    vocab_size: usize,
    /// Fraction of the text kept for validation (taken from the end).
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
}

#[derive(Args, Debug)]
struct TrainArgs {
    /// Config file (TOML).
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Run directory (default: runs/<config file stem>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a config key, e.g. --set train.max_steps=500 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue a run exactly from its checkpoint (a run or checkpoint directory).
    #[arg(long, conflicts_with = "init_from")]
    resume: Option<PathBuf>,
    /// Start from the weights of a checkpoint (halfling or Hugging Face GPT-2), fresh optimizer.
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Stop after this many steps in total, writing a checkpoint (resume later with --resume).
    #[arg(long)]
    stop_at: Option<u64>,
    /// No progress bar, log lines or sample.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args, Debug)]
struct SampleArgs {
    /// Run directory, checkpoint directory or Hugging Face GPT-2 directory.
    #[arg(long)]
    run: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 300)]
    tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample among the k most likely tokens only (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sampling seed.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// Run directory or checkpoint directory.
    #[arg(long)]
    run: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Config file (TOML).
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Override a config key (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// Run directory.
    #[arg(long)]
    run: PathBuf,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// Run directories; the first is the baseline the others are measured against.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Where to write the plot of every run's train and val loss (SVG).
    #[arg(long, default_value = "loss_comparison.svg")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct SelftestArgs {
    /// Seed of the random inputs (default: fresh each run).
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    device: DeviceArg,
}

/// Runs the command line; errors come back for `main` to print.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Prepare(a) => prepare(a),
        Command::Train(a) => train_cmd(a),
        Command::Sample(a) => sample_cmd(a),
        Command::Eval(a) => eval_cmd(a),
        Command::Bench(a) => bench_cmd(a),
        Command::Selftest(a) => selftest_cmd(a),
        Command::Report(a) => report_cmd(a),
        Command::Compare(a) => compare_cmd(a),
    }
}

/// The CPU backend with the requested thread count.
fn cpu(threads: usize) -> CpuBackend<f32> {
    if threads > 0 {
        // Fails only if the pool was already built (tests); the existing pool is then used.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }
    CpuBackend::new()
}

/// The backend a command runs on.
enum Device {
    Cpu(CpuBackend<f32>),
    Cuda(Box<CudaBackend>),
}

/// Runs `$body` with `$be` bound to the selected backend (the model code is generic over it).
macro_rules! on_device {
    ($device:expr, $be:ident => $body:expr) => {
        match &$device {
            Device::Cpu(cpu) => {
                let $be = cpu;
                $body
            }
            Device::Cuda(cuda) => {
                let $be = &**cuda;
                $body
            }
        }
    };
}

/// Resolves the device: `auto` takes the GPU when one is usable, `cuda` insists on it.
fn device(arg: &DeviceArg, cfg_device: DeviceKind, cfg_threads: usize) -> Result<Device> {
    let threads = arg.threads.unwrap_or(cfg_threads);
    match arg.device.unwrap_or(cfg_device) {
        DeviceKind::Cuda => Ok(Device::Cuda(Box::new(CudaBackend::new(0)?))),
        DeviceKind::Auto if cuda_available() => match CudaBackend::new(0) {
            Ok(be) => Ok(Device::Cuda(Box::new(be))),
            Err(e) => {
                eprintln!("warning: a GPU is present but unusable ({e:#}); running on the CPU");
                Ok(Device::Cpu(cpu(threads)))
            }
        },
        DeviceKind::Auto | DeviceKind::Cpu => Ok(Device::Cpu(cpu(threads))),
    }
}

fn prepare(a: PrepareArgs) -> Result<()> {
    let kind: TokenizerKind = a.tokenizer.parse().context("--tokenizer")?;
    let opts = PrepareOptions {
        input: a.input,
        out_dir: a.out.clone(),
        tokenizer: match kind {
            TokenizerKind::Char => data::prepare::TokenizerKind::Char,
            TokenizerKind::Bpe => data::prepare::TokenizerKind::Bpe {
                vocab_size: a.vocab_size,
            },
        },
        val_fraction: a.val_fraction,
    };
    let r = data::prepare(&opts)?;
    println!(
        "{}: {} train + {} val tokens, {} tokenizer with {} tokens ({:.1}s)",
        a.out.display(),
        r.train_tokens,
        r.val_tokens,
        r.tokenizer_kind,
        r.vocab_size,
        r.seconds
    );
    Ok(())
}

fn load_config(path: &Path, overrides: &[String]) -> Result<Config> {
    if !path.is_file() {
        bail!(
            "config file {} not found (run from the repository root, or pass --config FILE)",
            path.display()
        );
    }
    Config::load_with_overrides(path, overrides)
}

fn train_cmd(a: TrainArgs) -> Result<()> {
    // A resumed run keeps its own config unless one is given explicitly.
    let config_path = match (&a.resume, a.config.as_path() == Path::new(DEFAULT_CONFIG)) {
        (Some(dir), true) => runs::checkpoint_dir(dir).join(runs::CONFIG_TOML),
        _ => a.config.clone(),
    };
    let cfg = load_config(&config_path, &a.overrides)?;
    let out_dir = match (&a.out, &a.resume) {
        (Some(out), _) => out.clone(),
        (None, Some(dir)) if dir.join(runs::CHECKPOINT_DIR).is_dir() => dir.clone(),
        _ => {
            let stem = a
                .config
                .file_stem()
                .map_or("run".into(), |s| s.to_string_lossy().into_owned());
            PathBuf::from("runs").join(stem)
        }
    };
    let device = device(&a.device, cfg.device.device, cfg.device.threads)?;
    let opts = train::TrainOptions {
        out_dir,
        resume: a.resume,
        init_from: a.init_from,
        stop_at: a.stop_at,
        quiet: a.quiet,
    };
    on_device!(device, be => train::train(be, cfg, &opts))?;
    Ok(())
}

fn sample_cmd(a: SampleArgs) -> Result<()> {
    let ck = runs::load_checkpoint(&a.run)?;
    let device = device(&a.device, DeviceKind::Auto, 0)?;
    let opts = SampleOptions {
        prompt: a.prompt,
        tokens: a.tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        seed: a.seed,
    };
    let recipe = Recipe::from_config(&ck.config);
    let text = on_device!(device, be => {
        recipe.check_backend(be)?;
        let model = Gpt::from_values(be, ck.gpt.clone(), recipe.clone(), 0.0, &ck.params_for(&recipe))?;
        generate(be, &model, &ck.tokenizer, &opts)?
    });
    println!("{text}");
    Ok(())
}

fn eval_cmd(a: EvalArgs) -> Result<()> {
    let ck = runs::load_checkpoint(&a.run)?;
    let device = device(&a.device, DeviceKind::Auto, 0)?;
    let data = train::load_data(&ck.config, true)?;
    if data.tokenizer.vocab_size() != ck.gpt.vocab_size {
        bail!(
            "the run's data.dir = {:?} has a different tokenizer than the checkpoint",
            ck.config.data.dir
        );
    }
    let recipe = Recipe::from_config(&ck.config);
    let batch = ck.config.train.batch_size;
    let val_loss = on_device!(device, be => {
        recipe.check_backend(be)?;
        let model = Gpt::from_values(be, ck.gpt.clone(), recipe.clone(), 0.0, &ck.params_for(&recipe))?;
        let mut acts = model.activations(be, batch, ck.gpt.block_size, false)?;
        train::evaluate(be, &model, &mut acts, &data.val, 0, 0)?
    });
    if a.json {
        let out = serde_json::json!({ "val_loss": val_loss, "val_tokens": data.val.len(), "checkpoint": ck.dir });
        println!("{out}");
    } else {
        println!(
            "val loss {val_loss:.4} over {} tokens ({})",
            data.val.len(),
            ck.dir.display()
        );
    }
    Ok(())
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    let cfg = load_config(&a.config, &a.overrides)?;
    let device = device(&a.device, cfg.device.device, cfg.device.threads)?;
    let result = on_device!(device, be => bench::bench(be, &cfg, a.steps, a.warmup))?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

fn selftest_cmd(a: SelftestArgs) -> Result<()> {
    let device = device(&a.device, DeviceKind::Auto, 0)?;
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let rows = on_device!(device, be => {
        println!(
            "selftest on {} against the f64 CPU reference (seed {seed})",
            crate::backend::Backend::describe(be)
        );
        selftest::run(be, seed)?
    });
    print!("{}", selftest::format_table(&rows));
    let failed = rows.iter().filter(|r| !r.passed()).count();
    if failed > 0 {
        bail!("{failed} of {} checks failed", rows.len());
    }
    println!("all {} checks passed", rows.len());
    Ok(())
}

fn compare_cmd(a: CompareArgs) -> Result<()> {
    let runs = crate::metrics::load_runs(&a.runs)?;
    print!("{}", crate::metrics::comparison_table(&runs));
    let curves: Vec<(String, Vec<crate::metrics::StepMetrics>)> =
        runs.into_iter().map(|r| (r.label, r.metrics)).collect();
    crate::metrics::plot_runs(&curves, &a.out)?;
    println!("plot: {}", a.out.display());
    Ok(())
}

fn report_cmd(a: ReportArgs) -> Result<()> {
    let records = crate::monitor::read_records(&a.run.join(crate::monitor::NUMERICS_FILE))?;
    print!("{}", crate::monitor::report_table(&records));
    let plot = a.run.join("numerics.svg");
    crate::monitor::plot_layers(&records, &plot)?;
    println!("plot: {}", plot.display());
    Ok(())
}
