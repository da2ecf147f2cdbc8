//! `lora-boundary eval`: generation on a test set under several masks, scored, with paired-bootstrap CIs.
#[allow(unused_imports)]
use std::path::PathBuf;

use clap::Args;

use crate::cli::*;
use crate::error::Result;
use serde::Serialize;

use crate::scoring::{score_masks, EvalSettings};
use lora_metrics::Metric;
use lora_model::LayerMask;

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
    pub metric: Option<Metric>,
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

/// `lora-boundary eval`.
pub fn run(a: &EvalArgs) -> Result<()> {
    let (task, samples) = a.data.load()?;
    let metric = metric_for(task, a.metric);
    let (model, tokenizer, info) = load_with_adapter(&a.model, false)?;
    let masks: Vec<LayerMask> = if a.masks.is_empty() {
        vec![LayerMask::all()]
    } else {
        a.masks.iter().map(|m| m.parse()).collect::<std::result::Result<_, _>>()?
    };
    for m in &masks {
        m.validate(model.num_layers())?;
    }
    let settings = EvalSettings {
        max_new_tokens: a.max_new_tokens,
        prompt_format: a.data.prompt.format()?,
        batch_size: a.batch_size,
        seed: a.seed,
    };
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
