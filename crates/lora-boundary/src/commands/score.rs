//! `lora-boundary score`: prediction/reference pairs scored by a metric that matches its reference.
#[allow(unused_imports)]
use std::path::PathBuf;

use clap::Args;

use crate::cli::*;
use crate::error::Result;
use lora_metrics::MetricGroup;

/// `score` flags.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// `em`, `f1`, `hotpot-f1`, `rouge`, `bleu`, `chrf`, `chrf++`, `gsm8k-strict`, `gsm8k-flexible`.
    #[arg(long)]
    pub metric: MetricGroup,
    /// JSONL with `{"prediction": str, "references": [str, …]}` per line.
    #[arg(long)]
    pub input: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// `lora-boundary score`.
pub fn run(a: &ScoreArgs) -> Result<()> {
    let report = lora_metrics::score_jsonl(a.metric, &a.input)?;
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
