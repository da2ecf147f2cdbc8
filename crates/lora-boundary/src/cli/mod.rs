//! The `lora-boundary` command line: one binary, subcommands with consistent flags and `--format json` output.
//!
//! Arguments are parsed once, by clap, into validated types ([`lora_model::DeviceSpec`], [`lora_model::DtypeSpec`],
//! [`crate::tasks::Task`], [`lora_metrics::Metric`], [`lora_search::Strategy`], [`crate::settings`]); each
//! subcommand's flags and handler live in `crate::commands::<sub>`, over the libraries.
use clap::{Parser, Subcommand, ValueEnum};

use crate::commands;
use crate::error::Result;

mod args;

pub(crate) use args::{
    byte_size, dropout_rate, load_base, load_with_adapter, metric_for, positive, positive_f64, print_json, probability,
    weight_kind,
};
pub use args::{read_jsonl, read_jsonl_lines, read_text, DataArgs, MaskArgs, ModelArgs, PromptArgs};
pub use commands::eval::EvalRow;
pub use commands::{
    compare::CompareArgs, eval::EvalArgs, generate::GenerateArgs, merge::MergeArgs, plot::PlotArgs, probe::ProbeArgs,
    prune::PruneArgs, run::RunArgs, score::ScoreArgs, search::SearchArgs, train::TrainArgs,
};

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
    /// Re-render a run's figures (probe, search, proxy, sweep) from its saved `report.json`.
    Plot(PlotArgs),
    /// Overlay the probe curves of several runs on a normalised depth axis (one SVG).
    Compare(CompareArgs),
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
        Command::Generate(a) => commands::generate::run(a),
        Command::Prune(a) => commands::prune::run(a),
        Command::Merge(a) => commands::merge::run(a),
        Command::Score(a) => commands::score::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Search(a) => commands::search::run(a),
        Command::Train(a) => commands::train::run(a),
        Command::Probe(a) => commands::probe::run(a),
        Command::Run(a) => commands::run::run(a),
        Command::Plot(a) => commands::plot::run(a),
        Command::Compare(a) => commands::compare::run(a),
    }
}
