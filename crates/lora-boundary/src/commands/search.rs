//! `lora-boundary search`: the boundary searched on validation samples.
#[allow(unused_imports)]
use std::path::PathBuf;

use clap::Args;

use crate::cli::*;
use crate::error::Result;
use crate::scoring::{search_boundary, SearchSetup};
use crate::settings::{BoundaryRange, SearchMetric};
use lora_search::Strategy;

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
    pub metric: Option<SearchMetric>,
    /// `proxy-first` (default: the teacher-forced proxy ranks the boundaries, the metric decides between the
    /// proxy's plateau edges), `exhaustive`, `coarse-to-fine`, `halving`.
    #[arg(long, default_value = "proxy-first")]
    pub strategy: Strategy,
    /// `proxy-first`: the proxy scores every N-th boundary from the top first, then the ones around its plateau's
    /// edges and its best (default: round(√K / 2) for K candidates, 3 for 30); 1 scores every boundary.
    #[arg(long, value_parser = positive)]
    pub proxy_stride: Option<usize>,
    /// Candidate boundaries `LO-HI` (default: all blocks).
    #[arg(long)]
    pub range: Option<BoundaryRange>,
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

/// `lora-boundary search`.
pub fn run(a: &SearchArgs) -> Result<()> {
    let (task, samples) = a.data.load()?;
    let (model, tokenizer, info) = load_with_adapter(&a.model, true)?;
    let metric = match a.metric {
        Some(SearchMetric::LogProb) => None,
        Some(SearchMetric::Metric(m)) => Some(m),
        None => Some(task.primary_metric()),
    };
    let setup = SearchSetup {
        strategy: a.strategy,
        proxy_stride: a.proxy_stride,
        seed: a.seed,
        range: a.range,
        params_per_layer: info.as_ref().map(|i| i.params_per_layer.as_slice()),
        metric,
        max_new_tokens: a.max_new_tokens,
        prompt_format: a.data.prompt.format()?,
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
