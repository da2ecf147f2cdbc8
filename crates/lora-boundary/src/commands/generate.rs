//! `lora-boundary generate`: text for one prompt or a JSONL file of prompts.
#[allow(unused_imports)]
use std::path::PathBuf;

use clap::Args;

use crate::cli::*;
use crate::error::{Error, Result};
use std::time::Instant;

use serde::Serialize;

use lora_model::{generate_stream, load_adapter, GenerationConfig, Sampling};

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
    /// `--chat` and `--system`.
    #[command(flatten)]
    pub prompt_format: PromptArgs,
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
    /// Prompts decoded together (continuous batching: a finished prompt's place goes to the next one).
    #[arg(long, default_value_t = 8, value_parser = positive)]
    pub batch_size: usize,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
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

/// `lora-boundary generate`.
pub fn run(a: &GenerateArgs) -> Result<()> {
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
    let format = a.prompt_format.format()?;
    let t0 = Instant::now();
    let (mut model, tokenizer) = load_base(&a.model)?;
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
        let row = tokenizer.encode_prompt(p, &format)?;
        // Checked per row before any compute: the error names the row, its token count and the limit.
        lora_model::generate::check_context(&model, what, row.len(), a.max_new_tokens)?;
        ids.push(row);
    }
    let bar = crate::progress::begin("generate", Some(ids.len() as u64), "prompts");
    // Continuous batching: at most --batch-size prompts at a time, a finished one's place going to the next.
    let (out, timing) =
        generate_stream(&model, Some(&tokenizer), &ids, &cfg, &mask, a.batch_size, |_, _| crate::progress::advance(1))?;
    drop(bar);
    let mut rows = Vec::with_capacity(out.len());
    for g in out {
        if a.format == Format::Text {
            println!("{}", g.text);
        }
        rows.push(GenerateRow { text: g.text, token_ids: g.token_ids });
    }
    let timing = GenerateTiming {
        load_s,
        prefill_tokens_per_s: timing.prefill_tokens_per_s,
        decode_tokens_per_s: timing.decode_tokens_per_s,
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
