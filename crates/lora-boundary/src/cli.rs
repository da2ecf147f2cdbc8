//! The `lora-boundary` command line: one binary, subcommands with consistent flags and `--format json` output.
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::loading::{load_model, parse_device, parse_kind, DEFAULT_MODEL};
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
    /// `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Which LoRA blocks are active.
#[derive(Debug, Args)]
pub struct MaskArgs {
    /// LoRA mask: `all`, `none`, `0-14`, `0-9,20-29`, optionally `@attn`/`@mlp`/`@q_proj,v_proj`.
    #[arg(long, conflicts_with = "keep_through")]
    pub mask: Option<String>,
    /// Keep LoRA on blocks `0..=B` only (the paper's pruning).
    #[arg(long)]
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
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Greedy decoding (the default unless `--temperature` is given).
    #[arg(long, conflicts_with = "temperature")]
    pub greedy: bool,
    /// Sampling temperature.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Prompts per batch.
    #[arg(long, default_value_t = 8)]
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

/// Reads a JSONL file into rows, naming the line of any bad row.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut rows = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        rows.push(serde_json::from_str(&line).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?);
    }
    Ok(rows)
}

fn placement(args: &ModelArgs) -> Result<Placement> {
    Ok(Placement {
        device: parse_device(&args.device)?,
        kind: parse_kind(&args.dtype)?,
    })
}

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out).map_err(|source| Error::Io {
        path: "<stdout>".into(),
        source,
    })
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
    let prompts: Vec<String> = match (&a.prompt, &a.input) {
        (Some(p), None) => vec![p.clone()],
        (None, Some(path)) => read_jsonl::<Row>(path)?.into_iter().map(|r| r.prompt).collect(),
        _ => return Err(Error::Usage("give --prompt TEXT or --input FILE.jsonl".into())),
    };
    if a.batch_size == 0 {
        return Err(Error::Usage("--batch-size must be at least 1".into()));
    }
    let mask = a.mask.mask()?;
    let t0 = Instant::now();
    let (mut model, tokenizer) = load_model(&a.model.model, placement(&a.model)?)?;
    if let Some(dir) = &a.model.adapter {
        load_adapter(&mut model, dir)?;
    }
    let load_s = t0.elapsed().as_secs_f64();
    let sampling = match a.temperature {
        Some(t) if !a.greedy => Sampling::Sample {
            temperature: t,
            top_p: a.top_p,
            seed: a.seed,
        },
        _ => Sampling::Greedy,
    };
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        sampling,
        eos_token_ids: tokenizer.eos_token_ids().to_vec(),
        stop_strings: a.stop.clone(),
    };
    let ids: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| tokenizer.encode_prompt(p, a.chat))
        .collect::<std::result::Result<_, _>>()?;
    let mut rows = Vec::with_capacity(ids.len());
    let (mut prefill_tok, mut prefill_s, mut decode_tok, mut decode_s) = (0.0, 0.0, 0.0, 0.0);
    for chunk in ids.chunks(a.batch_size) {
        let (out, timing) = generate(&model, Some(&tokenizer), chunk, &cfg, &mask)?;
        prefill_tok += timing.prefill_tokens_per_s * timing.prefill_s;
        prefill_s += timing.prefill_s;
        decode_tok += timing.decode_tokens_per_s * timing.decode_s;
        decode_s += timing.decode_s;
        for g in out {
            if a.format == Format::Text {
                println!("{}", g.text);
            }
            rows.push(GenerateRow {
                text: g.text,
                token_ids: g.token_ids,
            });
        }
    }
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

/// Runs a parsed command line.
pub fn run(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Generate(a) => run_generate(a),
        Command::Prune(a) => run_prune(a),
    }
}
