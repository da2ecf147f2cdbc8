//! Flags shared by several subcommands, the flag value parsers, and small helpers of the handlers.
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::loading::{resolve_model, DEFAULT_MODEL};
use crate::tasks::{Sample, Task};
use lora_metrics::Metric;
use lora_model::{load_adapter, load_model_on, DeviceSpec, DtypeSpec, LayerMask, PromptFormat};

/// Model, device and dtype flags shared by subcommands that load a model.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// HF model directory or `.gguf` file.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// `cpu`, `cuda`, `cuda:N`, a list such as `cuda:0,cuda:1` or `cuda:0,cpu` (blocks in order over the
    /// devices by free memory, norm and LM head with the last block), or `auto` (every CUDA device, then the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// `auto` (the checkpoint's own dtype; GGUF dequantizes to f32), `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "auto")]
    pub dtype: DtypeSpec,
}

/// `N ≥ 1`.
pub(crate) fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A finite number `> 0`.
pub(crate) fn positive_f64(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        Ok(_) => Err("must be a finite number above 0".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A probability in `(0, 1]`.
pub(crate) fn probability(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 1.0 => Ok(x),
        Ok(_) => Err("must lie in (0, 1]".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A dropout rate in `[0, 1)`.
pub(crate) fn dropout_rate(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..1.0).contains(&x) => Ok(x),
        Ok(_) => Err("must lie in [0, 1)".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A block index below [`lora_model::mask::MAX_BLOCKS`].
pub(crate) fn block_index(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n < lora_model::mask::MAX_BLOCKS => Ok(n),
        Ok(_) => Err(format!("must be below {}", lora_model::mask::MAX_BLOCKS)),
        Err(e) => Err(e.to_string()),
    }
}

/// A byte size: a plain number of bytes or one with a unit (`200KB`, `5GB`, `2GiB`).
pub(crate) fn byte_size(s: &str) -> std::result::Result<u64, String> {
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

/// Where samples come from.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// Data file (format per `--task`).
    #[arg(long)]
    pub data: PathBuf,
    /// `jsonl` (`prompt`, `answer`, optional `references`), `e2e`, `hotpotqa`, `gsm8k`, `scitldr`.
    #[arg(long, default_value = "jsonl")]
    pub task: Task,
    /// Skip the first N samples (applied before `--limit`).
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    /// Use the first N samples only (after `--offset`).
    #[arg(long, value_parser = positive)]
    pub limit: Option<usize>,
    /// `--chat` and `--system`.
    #[command(flatten)]
    pub prompt: PromptArgs,
}

/// How prompts are rendered: `--chat` and `--system` (shared by every subcommand that builds prompts).
#[derive(Debug, Args)]
pub struct PromptArgs {
    /// Wrap prompts in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message the chat template places before every prompt (needs `--chat`).
    #[arg(long, requires = "chat", value_name = "TEXT")]
    pub system: Option<String>,
}

impl PromptArgs {
    /// The [`PromptFormat`] these flags describe.
    pub fn format(&self) -> Result<PromptFormat> {
        PromptFormat::from_flags(self.chat, self.system.clone()).map_err(|_| {
            Error::Usage("--system needs --chat (the system message goes through the chat template)".into())
        })
    }
}

impl DataArgs {
    /// Loads the samples and the task.
    pub fn load(&self) -> Result<(Task, Vec<Sample>)> {
        let task = self.task;
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

pub use crate::tasks::read_text;

/// Reads a JSONL file into rows with their 1-based line numbers, naming the line of any bad row.
pub fn read_jsonl_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>> {
    Ok(lora_common::text::read_jsonl_lines(path)?)
}

/// Reads a JSONL file into rows, naming the line of any bad row.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    Ok(read_jsonl_lines(path)?.into_iter().map(|(_, r)| r).collect())
}

/// The weights' kind for the model of `args` (`auto` read from the checkpoint).
pub(crate) fn weight_kind(args: &ModelArgs) -> Result<lora_model::tch::Kind> {
    Ok(args.dtype.resolve(&resolve_model(&args.model))?)
}

/// Loads the model of `args` and its tokenizer, placed over `--device`.
pub(crate) fn load_base(args: &ModelArgs) -> Result<(lora_model::Llama, lora_model::Tokenizer)> {
    let (model, tokenizer) = load_model_on(&args.model, weight_kind(args)?, &args.device)?;
    if !model.device_map().is_single() {
        crate::progress::println(&format!("placed: {}", model.device_map()));
    }
    Ok((model, tokenizer))
}

/// Prints one JSON document on stdout.
pub(crate) fn print_json<T: Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out).map_err(|source| Error::Io { path: "<stdout>".into(), source })
}

/// Loads the model of `args` and its adapter (`required`: refuse a missing `--adapter`).
pub(crate) fn load_with_adapter(
    args: &ModelArgs,
    required: bool,
) -> Result<(lora_model::Llama, lora_model::Tokenizer, Option<lora_model::AdapterInfo>)> {
    let (mut model, tokenizer) = load_base(args)?;
    let info = match &args.adapter {
        Some(dir) => Some(load_adapter(&mut model, dir)?),
        None if required => return Err(Error::Usage("--adapter DIR is required".into())),
        None => None,
    };
    Ok((model, tokenizer, info))
}

/// The metric a command scores by: the one given, else the task's primary metric.
pub(crate) fn metric_for(task: Task, given: Option<Metric>) -> Metric {
    given.unwrap_or_else(|| task.primary_metric())
}
