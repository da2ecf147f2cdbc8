//! The `lora-boundary` command line: one binary, subcommands with consistent flags and `--format json` output.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::loading::{load_model, parse_device, resolve_kind, resolve_model, DEFAULT_MODEL};
use crate::scoring::{score_masks, search_boundary, EvalSettings, SearchSetup};
use crate::tasks::{Sample, Task};
use lora_model::{generate, load_adapter, prune_adapter, GenerationConfig, LayerMask, Placement, Sampling};

/// Find the LoRA boundary layer of a fine-tuned LLM and drop LoRA above it.
#[derive(Debug, Parser)]
#[command(name = "lora-boundary", version, about)]
pub struct Cli {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable text.
    Text,
    /// One JSON document on stdout.
    Json,
}

/// Model, device and dtype flags shared by subcommands that load a model.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// HF model directory or `.gguf` file.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// `auto` (the checkpoint's own dtype; GGUF dequantizes to f32), `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

/// `N ≥ 1`.
fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A finite number `> 0`.
fn positive_f64(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        Ok(_) => Err("must be a finite number above 0".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A probability in `(0, 1]`.
fn probability(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 1.0 => Ok(x),
        Ok(_) => Err("must lie in (0, 1]".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A dropout rate in `[0, 1)`.
fn dropout_rate(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..1.0).contains(&x) => Ok(x),
        Ok(_) => Err("must lie in [0, 1)".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A block index below [`lora_model::mask::MAX_BLOCKS`].
fn block_index(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n < lora_model::mask::MAX_BLOCKS => Ok(n),
        Ok(_) => Err(format!("must be below {}", lora_model::mask::MAX_BLOCKS)),
        Err(e) => Err(e.to_string()),
    }
}

/// A byte size: a plain number of bytes or one with a unit (`200KB`, `5GB`, `2GiB`).
fn byte_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num.parse().map_err(|_| format!("`{s}` is not a size (e.g. 5GB, 200KB)"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        u => return Err(format!("unknown size unit `{u}` (B, KB, MB, GB, KiB, MiB, GiB)")),
    };
    let bytes = x * mult;
    if !(1.0..1e18).contains(&bytes) {
        return Err(format!("`{s}`: the size must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

/// Which LoRA blocks are active.
#[derive(Debug, Args)]
pub struct MaskArgs {
    /// LoRA mask: `all`, `none`, `0-14`, `0-9,20-29`, optionally `@attn`/`@mlp`/`@q_proj,v_proj`.
    #[arg(long, conflicts_with = "keep_through")]
    pub mask: Option<String>,
    /// Keep LoRA on blocks `0..=B` only (the paper's pruning).
    #[arg(long, value_parser = block_index)]
    pub keep_through: Option<usize>,
}

impl MaskArgs {
    /// The mask these flags describe (default: all).
    pub fn mask(&self) -> Result<LayerMask> {
        match (&self.mask, self.keep_through) {
            (Some(s), _) => Ok(s.parse()?),
            (None, Some(b)) => Ok(LayerMask::keep_through(b)),
            (None, None) => Ok(LayerMask::all()),
        }
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text for one prompt or a JSONL file of `{"prompt": …}` rows.
    Generate(GenerateArgs),
    /// Write a PEFT adapter holding only the LoRA of blocks `0..=B`.
    Prune(PruneArgs),
    /// Merge (masked) LoRA into the base weights and write an HF model directory.
    Merge(MergeArgs),
    /// Score prediction/reference pairs with a metric that matches its reference implementation.
    Score(ScoreArgs),
    /// Generate on a test set under one or more LoRA masks and score with the task metric.
    Eval(EvalArgs),
    /// Search the boundary on validation samples.
    Search(SearchArgs),
    /// Fine-tune LoRA on `{"prompt", "answer"}` JSONL (or a task file) and save a PEFT adapter.
    Train(TrainArgs),
    /// Per-layer logit-lens probe of the answer tokens under one or more masks.
    Probe(ProbeArgs),
    /// The whole pipeline from one TOML config: probe, detect, search, evaluate, export.
    Run(RunArgs),
}

/// `probe` flags.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Model flags.
    #[command(flatten)]
    pub model: ModelArgs,
    /// `{"prompt", "answer"}` JSONL.
    #[arg(long)]
    pub data: PathBuf,
    /// Wrap prompts in the chat template.
    #[arg(long)]
    pub chat: bool,
    /// Answer tokens probed.
    #[arg(long, default_value_t = 4, value_parser = positive)]
    pub k: usize,
    /// Masks (repeatable); default `all` and `none` with an adapter.
    #[arg(long = "mask")]
    pub masks: Vec<String>,
    /// `teacher` (ground truth) or `free` (the model's own greedy tokens).
    #[arg(long, default_value = "teacher")]
    pub mode: String,
    /// Difference curves `A,B` (repeatable): mask A minus mask B.
    #[arg(long = "diff")]
    pub diffs: Vec<String>,
    /// Write an SVG plot here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Samples per forward pass.
    #[arg(long, default_value_t = 8, value_parser = positive)]
    pub batch_size: usize,
    /// Bootstrap seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Include the per-sample matrices in JSON.
    #[arg(long)]
    pub per_sample: bool,
    /// `text`, `json` or `csv`.
    #[arg(long, default_value = "text")]
    pub format: String,
}

/// `run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The TOML config (see `docs/cli.md`).
    pub config: PathBuf,
    /// `cpu`, `cuda`, `auto`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// `auto` (the checkpoint's own dtype), `f32`, `bf16`, `f16`.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// Where samples come from.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// Data file (format per `--task`).
    #[arg(long)]
    pub data: PathBuf,
    /// `jsonl` (`prompt`, `answer`, optional `references`), `e2e`, `hotpotqa`, `gsm8k`, `scitldr`.
    #[arg(long, default_value = "jsonl")]
    pub task: String,
    /// Skip the first N samples (applied before `--limit`).
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    /// Use the first N samples only (after `--offset`).
    #[arg(long, value_parser = positive)]
    pub limit: Option<usize>,
    /// Wrap prompts in the model's chat template.
    #[arg(long)]
    pub chat: bool,
}

impl DataArgs {
    /// Loads the samples and the task.
    pub fn load(&self) -> Result<(Task, Vec<Sample>)> {
        let task: Task = self.task.parse()?;
        let mut samples = task.load(&self.data)?;
        if self.offset > 0 {
            if self.offset >= samples.len() {
                return Err(Error::Usage(format!(
                    "--offset {} skips all {} samples of {}",
                    self.offset,
                    samples.len(),
                    self.data.display()
                )));
            }
            samples.drain(..self.offset);
        }
        if let Some(n) = self.limit {
            samples.truncate(n);
        }
        Ok((task, samples))
    }
}

/// `merge` flags.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Model flags (`--adapter` required).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Mask flags: which LoRA to merge (default all).
    #[command(flatten)]
    pub mask: MaskArgs,
    /// Output HF model directory (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Largest safetensors shard (`5GB` as transformers; e.g. `200KB`, `2GiB`).
    #[arg(long, default_value = "5GB", value_parser = byte_size)]
    pub max_shard_size: u64,
}

/// `score` flags.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// `em`, `f1`, `hotpot-f1`, `rouge`, `bleu`, `chrf`, `chrf++`, `gsm8k-strict`, `gsm8k-flexible`.
    #[arg(long)]
    pub metric: String,
    /// JSONL with `{"prediction": str, "references": [str, …]}` per line.
    #[arg(long)]
    pub input: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// `eval` flags.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model flags.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Data flags.
    #[command(flatten)]
    pub data: DataArgs,
    /// Masks to compare (repeatable; the first is the reference for the paired bootstrap). Default: `all`.
    #[arg(long = "mask")]
    pub masks: Vec<String>,
    /// Metric name (default: the task's metric).
    #[arg(long)]
    pub metric: Option<String>,
    /// New-token budget.
    #[arg(long, default_value_t = 64, value_parser = positive)]
    pub max_new_tokens: usize,
    /// Generation batch size.
    #[arg(long, default_value_t = 8, value_parser = positive)]
    pub batch_size: usize,
    /// Bootstrap seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// `search` flags.
#[derive(Debug, Args)]
pub struct SearchArgs {
    /// Model flags (`--adapter` required).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Validation data.
    #[command(flatten)]
    pub data: DataArgs,
    /// Metric name, or `logprob` for the teacher-forced proxy alone (default: the task's metric).
    #[arg(long)]
    pub metric: Option<String>,
    /// `proxy-first` (default: the teacher-forced proxy ranks every boundary, the metric decides between the
    /// proxy's plateau edges), `exhaustive`, `coarse-to-fine`, `halving`.
    #[arg(long, default_value = "proxy-first")]
    pub strategy: String,
    /// Candidate boundaries `LO-HI` (default: all blocks).
    #[arg(long)]
    pub range: Option<String>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// New-token budget for generation scoring.
    #[arg(long, default_value_t = 64, value_parser = positive)]
    pub max_new_tokens: usize,
    /// Batch size.
    #[arg(long, default_value_t = 8, value_parser = positive)]
    pub batch_size: usize,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// `train` flags.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Base model (HF directory or `.gguf`).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Training data.
    #[command(flatten)]
    pub data: DataArgs,
    /// Output adapter directory.
    #[arg(long)]
    pub out: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 8, value_parser = positive)]
    pub r: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0, value_parser = positive_f64)]
    pub alpha: f64,
    /// Target modules, comma-separated, or `all-linear`.
    #[arg(long, default_value = "all-linear")]
    pub targets: String,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.0, value_parser = dropout_rate)]
    pub dropout: f64,
    /// Epochs.
    #[arg(long, default_value_t = 1, value_parser = positive)]
    pub epochs: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4, value_parser = positive_f64)]
    pub lr: f64,
    /// Micro-batch size.
    #[arg(long, default_value_t = 4, value_parser = positive)]
    pub batch_size: usize,
    /// Gradient accumulation steps.
    #[arg(long, default_value_t = 1, value_parser = positive)]
    pub grad_accum: usize,
    /// Maximum tokens per sample.
    #[arg(long, default_value_t = 512, value_parser = positive)]
    pub max_len: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save a checkpoint every N steps.
    #[arg(long, value_parser = positive)]
    pub save_every: Option<usize>,
    /// Resume from a checkpoint directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Save the final adapter in bf16.
    #[arg(long)]
    pub bf16_adapter: bool,
    /// `cpu`, `cuda`, `auto` (CUDA trains with bf16 weights, f32 master copies).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// `generate` flags.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model flags.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Mask flags.
    #[command(flatten)]
    pub mask: MaskArgs,
    /// One prompt.
    #[arg(long, conflicts_with = "input")]
    pub prompt: Option<String>,
    /// JSONL with a `prompt` field per line.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Wrap each prompt in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 64, value_parser = positive)]
    pub max_new_tokens: usize,
    /// Greedy decoding (the default unless `--temperature` is given).
    #[arg(long, conflicts_with = "temperature")]
    pub greedy: bool,
    /// Sampling temperature (> 0); without it decoding is greedy.
    #[arg(long, value_parser = positive_f64)]
    pub temperature: Option<f64>,
    /// Nucleus sampling threshold in (0, 1] (needs `--temperature`; default 1.0 = off).
    #[arg(long, value_parser = probability, requires = "temperature")]
    pub top_p: Option<f64>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Prompts per batch.
    #[arg(long, default_value_t = 8, value_parser = positive)]
    pub batch_size: usize,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// `prune` flags.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The PEFT adapter to prune.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Mask flags (`--keep-through B` or `--mask SPEC`).
    #[command(flatten)]
    pub mask: MaskArgs,
    /// Output directory (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

pub use crate::tasks::read_text;

/// Reads a JSONL file into rows with their 1-based line numbers, naming the line of any bad row.
pub fn read_jsonl_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>> {
    let text = read_text(path)?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str(line).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?;
        rows.push((i + 1, row));
    }
    Ok(rows)
}

/// Reads a JSONL file into rows, naming the line of any bad row.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    Ok(read_jsonl_lines(path)?.into_iter().map(|(_, r)| r).collect())
}

fn placement(args: &ModelArgs) -> Result<Placement> {
    let model = resolve_model(&args.model);
    Ok(Placement { device: parse_device(&args.device)?, kind: resolve_kind(&args.dtype, &model)? })
}

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out).map_err(|source| Error::Io { path: "<stdout>".into(), source })
}

#[derive(Serialize)]
struct GenerateOutput {
    outputs: Vec<GenerateRow>,
    timing: GenerateTiming,
}

#[derive(Serialize)]
struct GenerateRow {
    text: String,
    token_ids: Vec<i64>,
}

#[derive(Serialize)]
struct GenerateTiming {
    load_s: f64,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
}

fn run_generate(a: &GenerateArgs) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Row {
        prompt: String,
    }
    // (what the prompt is called in errors, the prompt)
    let prompts: Vec<(String, String)> = match (&a.prompt, &a.input) {
        (Some(p), None) => vec![("--prompt".to_string(), p.clone())],
        (None, Some(path)) => {
            let rows = read_jsonl_lines::<Row>(path)?;
            if rows.is_empty() {
                return Err(Error::Data { path: path.clone(), line: 0, message: "no prompts in the file".into() });
            }
            rows.into_iter().map(|(line, r)| (format!("{} line {line}", path.display()), r.prompt)).collect()
        }
        _ => return Err(Error::Usage("give --prompt TEXT or --input FILE.jsonl".into())),
    };
    let mask = a.mask.mask()?;
    let t0 = Instant::now();
    let (mut model, tokenizer) = load_model(&a.model.model, placement(&a.model)?)?;
    mask.validate(model.num_layers())?;
    if let Some(dir) = &a.model.adapter {
        load_adapter(&mut model, dir)?;
    }
    let load_s = t0.elapsed().as_secs_f64();
    let sampling = match a.temperature {
        Some(t) if !a.greedy => Sampling::Sample { temperature: t, top_p: a.top_p.unwrap_or(1.0), seed: a.seed },
        _ => Sampling::Greedy,
    };
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        sampling,
        eos_token_ids: tokenizer.eos_token_ids().to_vec(),
        stop_strings: a.stop.clone(),
    };
    let mut ids: Vec<Vec<i64>> = Vec::with_capacity(prompts.len());
    for (what, p) in &prompts {
        let row = tokenizer.encode_prompt(p, a.chat)?;
        // Checked per row before any compute: the error names the row, its token count and the limit.
        lora_model::generate::check_context(&model, what, row.len(), a.max_new_tokens)?;
        ids.push(row);
    }
    let mut rows = Vec::with_capacity(ids.len());
    let (mut prefill_tok, mut prefill_s, mut decode_tok, mut decode_s) = (0.0, 0.0, 0.0, 0.0);
    let bar = crate::progress::begin("generate", Some(ids.len() as u64), "prompts");
    for chunk in ids.chunks(a.batch_size) {
        let (out, timing) = generate(&model, Some(&tokenizer), chunk, &cfg, &mask)?;
        crate::progress::advance(chunk.len() as u64);
        prefill_tok += timing.prefill_tokens_per_s * timing.prefill_s;
        prefill_s += timing.prefill_s;
        decode_tok += timing.decode_tokens_per_s * timing.decode_s;
        decode_s += timing.decode_s;
        for g in out {
            if a.format == Format::Text {
                println!("{}", g.text);
            }
            rows.push(GenerateRow { text: g.text, token_ids: g.token_ids });
        }
    }
    drop(bar);
    let timing = GenerateTiming {
        load_s,
        prefill_tokens_per_s: prefill_tok / f64::max(prefill_s, 1e-9),
        decode_tokens_per_s: decode_tok / f64::max(decode_s, 1e-9),
    };
    match a.format {
        Format::Json => print_json(&GenerateOutput { outputs: rows, timing }),
        Format::Text => {
            eprintln!(
                "load {:.2}s, prefill {:.1} tok/s, decode {:.1} tok/s",
                timing.load_s, timing.prefill_tokens_per_s, timing.decode_tokens_per_s
            );
            Ok(())
        }
    }
}

fn run_prune(a: &PruneArgs) -> Result<()> {
    let mask = a.mask.mask()?;
    let kept = prune_adapter(&a.adapter, &mask, &a.out)?;
    match a.format {
        Format::Json => print_json(&serde_json::json!({"out": a.out, "mask": mask.to_string(), "kept_layers": kept})),
        Format::Text => {
            println!("wrote {} (LoRA on blocks {})", a.out.display(), LayerMask::from_layers(kept));
            Ok(())
        }
    }
}

fn load_with_adapter(
    args: &ModelArgs,
    required: bool,
) -> Result<(lora_model::Llama, lora_model::Tokenizer, Option<lora_model::AdapterInfo>)> {
    let (mut model, tokenizer) = load_model(&args.model, placement(args)?)?;
    let info = match &args.adapter {
        Some(dir) => Some(load_adapter(&mut model, dir)?),
        None if required => return Err(Error::Usage("--adapter DIR is required".into())),
        None => None,
    };
    Ok((model, tokenizer, info))
}

fn run_merge(a: &MergeArgs) -> Result<()> {
    if a.out.exists() {
        return Err(Error::Usage(format!("{}: output path exists; choose a new path", a.out.display())));
    }
    let mask = a.mask.mask()?;
    let (mut model, tokenizer, info) = load_with_adapter(&a.model, true)?;
    mask.validate(model.num_layers())?;
    if let Some(info) = &info {
        if !info.modules.iter().any(|&(l, m, _, _)| mask.is_active(l, m)) {
            return Err(Error::Usage(format!(
                "mask `{mask}` merges no LoRA module of {} (LoRA on blocks {}); the output would be the base model",
                info.path.display(),
                LayerMask::from_layers(info.layers())
            )));
        }
    }
    lora_model::adapter::merge(&mut model, &mask)?;
    let source = resolve_model(&a.model.model);
    let opts =
        lora_model::ExportOptions { max_shard_bytes: a.max_shard_size, source_dir: source.is_dir().then_some(source) };
    lora_model::save_hf_model(&model, Some(&tokenizer), &a.out, &opts)?;
    println!("wrote {} (LoRA merged under mask {mask})", a.out.display());
    Ok(())
}

fn run_score(a: &ScoreArgs) -> Result<()> {
    let group = lora_metrics::MetricGroup::from_name(&a.metric).map_err(Error::from)?;
    let report = lora_metrics::score_jsonl(group, &a.input).map_err(Error::from)?;
    match a.format {
        Format::Json => print_json(&report),
        Format::Text => {
            for (k, v) in &report.scores {
                println!("{k:>12}  {v:.6}");
            }
            if let Some(sig) = &report.signature {
                println!("{sig}");
            }
            Ok(())
        }
    }
}

fn metric_for(task: Task, name: &Option<String>) -> Result<lora_metrics::Metric> {
    match name {
        Some(n) => lora_metrics::Metric::from_name(n).map_err(Error::from),
        None => Ok(task.primary_metric()),
    }
}

/// One mask's result in `eval`.
#[derive(Debug, Serialize)]
pub struct EvalRow {
    /// The mask.
    pub mask: String,
    /// Corpus score of the metric.
    pub score: f64,
    /// Mean of per-item scores.
    pub item_mean: f64,
    /// Paired-bootstrap 95% CI of the per-item difference to the first mask.
    pub ci_vs_first: Option<[f64; 2]>,
    /// Fraction of the adapter's LoRA parameters active.
    pub lora_params_kept: Option<f64>,
    /// Predictions.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub predictions: Vec<String>,
}

fn run_eval(a: &EvalArgs) -> Result<()> {
    let (task, samples) = a.data.load()?;
    let metric = metric_for(task, &a.metric)?;
    let (model, tokenizer, info) = load_with_adapter(&a.model, false)?;
    let masks: Vec<LayerMask> = if a.masks.is_empty() {
        vec![LayerMask::all()]
    } else {
        a.masks.iter().map(|m| m.parse()).collect::<std::result::Result<_, _>>()?
    };
    for m in &masks {
        m.validate(model.num_layers())?;
    }
    let settings =
        EvalSettings { max_new_tokens: a.max_new_tokens, chat: a.data.chat, batch_size: a.batch_size, seed: a.seed };
    let distinct = crate::scoring::distinct_masks(&masks);
    let bar = crate::progress::begin("eval", Some((distinct * samples.len()) as u64), "answers");
    let scored = score_masks(&model, &tokenizer, &samples, &masks, &[metric], settings)?;
    drop(bar);
    let rows: Vec<EvalRow> = masks
        .iter()
        .zip(scored)
        .map(|(mask, s)| EvalRow {
            mask: mask.to_string(),
            score: s.corpus.first().map_or(f64::NAN, |c| c.1),
            item_mean: s.item_mean(),
            ci_vs_first: s.ci_vs_first,
            lora_params_kept: info.as_ref().map(|i| i.kept_fraction(mask)),
            predictions: if a.format == Format::Json { s.predictions } else { Vec::new() },
        })
        .collect();
    match a.format {
        Format::Json => print_json(&serde_json::json!({"metric": metric.name(), "n": samples.len(), "results": rows})),
        Format::Text => {
            println!("{:<16} {:>10} {:>22} {:>10}", "mask", metric.name(), "95% CI vs first", "LoRA kept");
            for r in &rows {
                let ci = r.ci_vs_first.map_or("-".to_string(), |c| format!("[{:+.4}, {:+.4}]", c[0], c[1]));
                let kept = r.lora_params_kept.map_or("-".to_string(), |k| format!("{:.0}%", k * 100.0));
                println!("{:<16} {:>10.4} {:>22} {:>10}", r.mask, r.score, ci, kept);
            }
            Ok(())
        }
    }
}

fn run_search(a: &SearchArgs) -> Result<()> {
    let (task, samples) = a.data.load()?;
    let (model, tokenizer, info) = load_with_adapter(&a.model, true)?;
    let metric = match a.metric.as_deref() {
        Some("logprob") => None,
        _ => Some(metric_for(task, &a.metric)?),
    };
    let setup = SearchSetup {
        strategy: &a.strategy,
        seed: a.seed,
        range: a.range.as_deref(),
        params_per_layer: info.as_ref().map(|i| i.params_per_layer.as_slice()),
        metric,
        max_new_tokens: a.max_new_tokens,
        chat: a.data.chat,
        batch_size: a.batch_size,
    };
    let bar = crate::progress::begin("search", None, "samples scored");
    let report = search_boundary(&model, &tokenizer, &samples, &setup)?;
    drop(bar);
    match a.format {
        Format::Json => print_json(&report),
        Format::Text => {
            println!(
                "boundary {} ({} strategy, {} scorer calls)",
                report.boundary, report.strategy, report.scorer_calls
            );
            for c in &report.candidates {
                println!(
                    "  b={:>3}  score {:>9.4}  CI vs full [{:+.4}, {:+.4}]  LoRA kept {:>5.1}%",
                    c.boundary, c.score, c.ci[0], c.ci[1], c.lora_params_kept
                );
            }
            Ok(())
        }
    }
}

fn run_train(a: &TrainArgs) -> Result<()> {
    // Before loading anything: an output path the run would clobber is refused now, not after training.
    lora_model::train::check_out_dir(&a.out, a.resume.as_deref())?;
    let (_, samples) = a.data.load()?;
    let device = parse_device(&a.device)?;
    let kind = if matches!(device, lora_model::tch::Device::Cuda(_)) {
        lora_model::tch::Kind::BFloat16
    } else {
        lora_model::tch::Kind::Float
    };
    let (mut model, tokenizer) = load_model(&a.model, Placement { device, kind })?;
    let targets = if a.targets == "all-linear" {
        lora_model::adapter::ModuleSelector::Regex("all-linear".into())
    } else {
        lora_model::adapter::ModuleSelector::List(a.targets.split(',').map(|s| s.trim().to_string()).collect())
    };
    let lora = lora_model::LoraConfig {
        r: a.r,
        lora_alpha: a.alpha,
        lora_dropout: a.dropout,
        target_modules: Some(targets),
        base_model_name_or_path: Some(resolve_model(&a.model).display().to_string()),
        ..Default::default()
    };
    let cfg = lora_model::TrainConfig {
        learning_rate: a.lr,
        epochs: a.epochs,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        max_len: a.max_len,
        seed: a.seed,
        chat: a.data.chat,
        save_every: a.save_every,
        save_bf16: a.bf16_adapter,
        resume_from: a.resume.clone(),
        ..Default::default()
    };
    let train_samples: Vec<lora_model::TrainSample> = samples
        .iter()
        .map(|s| lora_model::TrainSample { prompt: s.prompt.clone(), answer: s.answer.clone() })
        .collect();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if a.format == Format::Json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let summary = lora_model::train(&mut model, &tokenizer, &train_samples, &lora, &cfg, &a.out, |p| {
        bar.set_length(p.total_steps as u64);
        bar.set_position(p.step as u64);
        bar.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s", p.loss, p.lr, p.tokens_per_sec));
    })?;
    bar.finish_and_clear();
    match a.format {
        Format::Json => print_json(&serde_json::json!({
            "out": a.out, "steps": summary.steps, "final_loss": summary.final_loss,
            "samples": summary.samples, "dropped_samples": summary.dropped_samples,
        })),
        Format::Text => {
            println!(
                "trained {} steps on {} samples (final loss {:.4}); adapter in {}",
                summary.steps,
                summary.samples,
                summary.final_loss,
                a.out.display()
            );
            Ok(())
        }
    }
}

fn run_probe(a: &ProbeArgs) -> Result<()> {
    let mode = match a.mode.as_str() {
        "teacher" => lora_probe::ProbeMode::Teacher,
        "free" => lora_probe::ProbeMode::Free,
        m => return Err(Error::Usage(format!("unknown probe mode `{m}` (teacher, free)"))),
    };
    let mut opts = lora_probe::ProbeOptions::new(resolve_model(&a.model.model), &a.data);
    opts.adapter = a.model.adapter.clone();
    opts.masks = a.masks.clone();
    opts.plot = a.plot.clone();
    opts.placement = placement(&a.model)?;
    opts.config.k = a.k;
    opts.config.mode = mode;
    opts.config.chat = a.chat;
    opts.config.batch_size = a.batch_size;
    opts.config.seed = a.seed;
    opts.differences = a
        .diffs
        .iter()
        .map(|d| {
            d.split_once(',')
                .map(|(x, y)| (x.trim().to_string(), y.trim().to_string()))
                .ok_or_else(|| Error::Usage(format!("--diff `{d}`: expected MASK_A,MASK_B")))
        })
        .collect::<Result<_>>()?;
    let bar = crate::progress::begin("probe", None, "");
    let result = lora_probe::run_probe_command(&opts).map_err(Error::from)?;
    drop(bar);
    match a.format.as_str() {
        "json" => print_json(&result.to_json(a.per_sample).map_err(Error::from)?),
        "csv" => {
            print!("{}", result.to_csv());
            Ok(())
        }
        "text" => {
            for c in &result.curves {
                println!("mask {}: gt_prob per point (state after i blocks)", c.mask);
                let row: Vec<String> = c.gt_prob.iter().map(|p| format!("{p:.3}")).collect();
                println!("  {}", row.join(" "));
            }
            Ok(())
        }
        f => Err(Error::Usage(format!("unknown format `{f}` (text, json, csv)"))),
    }
}

fn run_run(a: &RunArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config).map_err(|source| Error::Io { path: a.config.clone(), source })?;
    let cfg: crate::pipeline::PipelineConfig = toml::from_str(&text).map_err(|e| Error::Data {
        path: a.config.clone(),
        line: e.span().map_or(0, |s| text[..s.start.min(text.len())].lines().count()),
        message: e.message().to_string(),
    })?;
    let place =
        Placement { device: parse_device(&a.device)?, kind: resolve_kind(&a.dtype, &resolve_model(&cfg.model))? };
    let quiet = a.format == Format::Json;
    let report = crate::pipeline::run_pipeline(&cfg, place, |line| {
        if !quiet {
            crate::progress::println(line);
        }
    })?;
    match a.format {
        Format::Json => print_json(&report),
        Format::Text => {
            print!("{}", crate::pipeline::markdown(&report));
            Ok(())
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: &Cli) -> Result<()> {
    let json = match &cli.command {
        Command::Generate(a) => a.format == Format::Json,
        Command::Score(a) => a.format == Format::Json,
        Command::Eval(a) => a.format == Format::Json,
        Command::Search(a) => a.format == Format::Json,
        Command::Run(a) => a.format == Format::Json,
        _ => false,
    };
    crate::progress::enable(!json);
    match &cli.command {
        Command::Generate(a) => run_generate(a),
        Command::Prune(a) => run_prune(a),
        Command::Merge(a) => run_merge(a),
        Command::Score(a) => run_score(a),
        Command::Eval(a) => run_eval(a),
        Command::Search(a) => run_search(a),
        Command::Train(a) => run_train(a),
        Command::Probe(a) => run_probe(a),
        Command::Run(a) => run_run(a),
    }
}
