//! `lora-boundary probe`: the per-layer logit-lens probe of the answer tokens under one or more masks.
#[allow(unused_imports)]
use std::path::PathBuf;

use clap::Args;

use crate::cli::*;
use crate::error::{Error, Result};
use crate::loading::resolve_model;
use crate::settings::ProbeFormat;
use lora_probe::{ProbeError, ProbeMode};

/// `probe` flags.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Model flags.
    #[command(flatten)]
    pub model: ModelArgs,
    /// `{"prompt", "answer"}` JSONL.
    #[arg(long)]
    pub data: PathBuf,
    /// `--chat` and `--system`.
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Answer tokens probed.
    #[arg(long, default_value_t = 4, value_parser = positive)]
    pub k: usize,
    /// Masks (repeatable); default `all` and `none` with an adapter.
    #[arg(long = "mask")]
    pub masks: Vec<String>,
    /// `teacher` (ground truth) or `free` (the model's own greedy tokens).
    #[arg(long, default_value = "teacher")]
    pub mode: ProbeMode,
    /// Difference curves `A,B` (repeatable): mask A minus mask B (in the text and JSON output, and the plot).
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
    /// Include the per-sample matrices (JSON output only).
    #[arg(long)]
    pub per_sample: bool,
    /// `text`, `json` or `csv`.
    #[arg(long, value_enum, default_value = "text")]
    pub format: ProbeFormat,
}

/// `lora-boundary probe`: loads the model (and adapter), reads and tokenizes the data, probes every mask, adds the
/// requested difference curves and writes the plot.
pub fn run(a: &ProbeArgs) -> Result<()> {
    // Refused before any work rather than accepted and left out of the output.
    if a.per_sample && a.format != ProbeFormat::Json {
        return Err(Error::Usage(
            "--per-sample adds the per-sample matrices to JSON: use it with --format json".into(),
        ));
    }
    if !a.diffs.is_empty() && a.format == ProbeFormat::Csv && a.plot.is_none() {
        return Err(Error::Usage(
            "--diff curves are written in the text and JSON output and the plot, not in CSV: use --format text|json \
             or --plot"
                .into(),
        ));
    }
    let specs: Vec<String> = if !a.masks.is_empty() {
        a.masks.clone()
    } else if a.model.adapter.is_some() {
        vec!["all".into(), "none".into()]
    } else {
        vec!["none".into()]
    };
    let masks = lora_probe::parse_masks(&specs)?;
    let differences: Vec<(String, String)> = a
        .diffs
        .iter()
        .map(|d| {
            d.split_once(',')
                .map(|(x, y)| (x.trim().to_string(), y.trim().to_string()))
                .ok_or_else(|| Error::Usage(format!("--diff `{d}`: expected MASK_A,MASK_B")))
        })
        .collect::<Result<_>>()?;
    let prompt_format = a.prompt.format()?;
    let samples = lora_probe::data::read_jsonl(&a.data)?;
    let model_path = resolve_model(&a.model.model);
    let tokenizer = lora_model::load_tokenizer(&model_path)?;
    let config = lora_probe::ProbeConfig {
        k: a.k,
        mode: a.mode,
        prompt_format,
        batch_size: a.batch_size,
        seed: a.seed,
        ..Default::default()
    };
    let require_answer = config.mode == ProbeMode::Teacher;
    let tokenized =
        lora_probe::data::tokenize_samples(&tokenizer, &samples, &config.prompt_format, require_answer, Some(&a.data))?;
    let mut model = lora_model::Llama::load_across(&model_path, weight_kind(&a.model)?, &a.model.device.devices()?)?;
    if let Some(dir) = &a.model.adapter {
        lora_model::load_adapter(&mut model, dir)?;
    }
    let bar = crate::progress::begin("probe", None, "");
    let mut result = lora_probe::Probe::new(config).run_labelled(&model, &tokenized, &masks).map_err(|e| match e {
        // Rows of in-memory samples are the data file's non-blank rows in order.
        ProbeError::Row { row, message, .. } => ProbeError::Row {
            file: a.data.clone(),
            row,
            message: format!("{message} (row = n-th sample, blank lines not counted)"),
        },
        other => other,
    })?;
    drop(bar);
    for (x, y) in &differences {
        result.add_difference(x, y)?;
    }
    if let Some(p) = &a.plot {
        result.plot_svg(p)?;
    }
    match a.format {
        ProbeFormat::Json => print_json(&result.to_json(a.per_sample)?),
        ProbeFormat::Csv => {
            print!("{}", result.to_csv());
            Ok(())
        }
        ProbeFormat::Text => {
            for c in &result.curves {
                println!("mask {}: gt_prob per point (state after i blocks)", c.mask);
                let row: Vec<String> = c.gt_prob.iter().map(|p| format!("{p:.3}")).collect();
                println!("  {}", row.join(" "));
            }
            for d in &result.differences {
                println!("{} − {}: gt_prob difference per point [95% paired bootstrap CI]", d.a, d.b);
                let row: Vec<String> = d
                    .gt_prob
                    .iter()
                    .zip(d.gt_prob_ci_low.iter().zip(&d.gt_prob_ci_high))
                    .map(|(m, (lo, hi))| format!("{m:+.3} [{lo:+.3}, {hi:+.3}]"))
                    .collect();
                println!("  {}", row.join(" "));
            }
            Ok(())
        }
    }
}
