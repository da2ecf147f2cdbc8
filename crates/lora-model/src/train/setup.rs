//! A LoRA fine-tune from settings to adapter: the one place the command line and the pipeline set training up.
use std::path::Path;

use tch::{Device, Kind};

use crate::adapter::{LoraConfig, ModuleSelector};
use crate::error::Result;
use crate::loading::{load_model, resolve_model};
use crate::weights::Placement;

use super::{train, TrainConfig, TrainProgress, TrainSample, TrainSummary};

/// A LoRA fine-tune's settings: the adapter's shape and the trainer's.
#[derive(Debug, Clone, PartialEq)]
pub struct FineTune {
    /// LoRA rank.
    pub r: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// Dropout on the LoRA branch.
    pub dropout: f64,
    /// Modules to wrap (default `all-linear`: the seven projections of every block).
    pub targets: ModuleSelector,
    /// Optimiser, schedule, batching, checkpoints.
    pub train: TrainConfig,
}

impl FineTune {
    /// The PEFT config of the adapter this fine-tune writes, naming `base` as its base model.
    pub fn lora_config(&self, base: &Path) -> LoraConfig {
        LoraConfig {
            r: self.r,
            lora_alpha: self.alpha,
            lora_dropout: self.dropout,
            target_modules: Some(self.targets.clone()),
            base_model_name_or_path: Some(resolve_model(base).display().to_string()),
            ..Default::default()
        }
    }
}

impl ModuleSelector {
    /// `all-linear`, or comma-separated module names (`q_proj,v_proj`).
    pub fn parse_targets(s: &str) -> Self {
        if s == "all-linear" {
            ModuleSelector::Regex("all-linear".into())
        } else {
            ModuleSelector::List(s.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_string).collect())
        }
    }
}

/// The weight kind training uses on `device`: bf16 weights on CUDA (with f32 master copies of the LoRA), f32 on
/// the CPU.
pub fn training_kind(device: Device) -> Kind {
    if matches!(device, Device::Cuda(_)) {
        Kind::BFloat16
    } else {
        Kind::Float
    }
}

/// Loads the base model at `model` (placed by `place`), fine-tunes fresh LoRA on `samples` and writes the PEFT
/// adapter (and checkpoints) into `out_dir`, which must be new or empty (checked before loading anything).
pub fn fine_tune(
    model: &Path,
    place: Placement,
    samples: &[TrainSample],
    ft: &FineTune,
    out_dir: &Path,
    progress: impl FnMut(&TrainProgress),
) -> Result<TrainSummary> {
    super::check_out_dir(out_dir, ft.train.resume_from.as_deref())?;
    let (mut m, tokenizer) = load_model(model, place)?;
    train(&mut m, &tokenizer, samples, &ft.lora_config(model), &ft.train, out_dir, progress)
}
