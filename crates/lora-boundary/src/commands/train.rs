//! `lora-boundary train`: a LoRA fine-tune written as a PEFT adapter.
#[allow(unused_imports)]
use std::path::PathBuf;

use clap::Args;

use crate::cli::*;
use crate::error::Result;
use crate::loading::DEFAULT_MODEL;
use lora_model::{DeviceSpec, Placement};

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
    /// LoRA rank (with `--resume`, the checkpoint's).
    #[arg(long, default_value_t = 8, value_parser = positive, conflicts_with = "resume")]
    pub r: usize,
    /// LoRA alpha (with `--resume`, the checkpoint's).
    #[arg(long, default_value_t = 16.0, value_parser = positive_f64, conflicts_with = "resume")]
    pub alpha: f64,
    /// Target modules, comma-separated, or `all-linear` (with `--resume`, the checkpoint's).
    #[arg(long, default_value = "all-linear", conflicts_with = "resume")]
    pub targets: String,
    /// LoRA dropout (with `--resume`, the checkpoint's).
    #[arg(long, default_value_t = 0.0, value_parser = dropout_rate, conflicts_with = "resume")]
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
    pub device: DeviceSpec,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// `lora-boundary train`.
pub fn run(a: &TrainArgs) -> Result<()> {
    let format = a.data.prompt.format()?;
    let (_, samples) = a.data.load()?;
    let device = a.device.resolve()?;
    let ft = lora_model::train::FineTune {
        r: a.r,
        alpha: a.alpha,
        dropout: a.dropout,
        targets: lora_model::adapter::ModuleSelector::parse_targets(&a.targets),
        train: lora_model::TrainConfig {
            learning_rate: a.lr,
            epochs: a.epochs,
            batch_size: a.batch_size,
            grad_accum: a.grad_accum,
            max_len: a.max_len,
            seed: a.seed,
            chat: format.is_chat(),
            system: format.system().map(str::to_string),
            save_every: a.save_every,
            save_bf16: a.bf16_adapter,
            resume_from: a.resume.clone(),
            ..Default::default()
        },
    };
    let place = Placement { device, kind: lora_model::train::training_kind(device) };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if a.format == Format::Json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let summary = lora_model::train::fine_tune(&a.model, place, &samples, &ft, &a.out, |p| {
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
