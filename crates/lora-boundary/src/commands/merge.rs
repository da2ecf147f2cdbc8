//! `lora-boundary merge`: (masked) LoRA folded into the weights, written as an HF model directory.
#[allow(unused_imports)]
use std::path::PathBuf;

use clap::Args;

use crate::cli::*;
use crate::error::{Error, Result};
use crate::loading::resolve_model;
use lora_model::LayerMask;

/// `merge` flags.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Model flags (`--adapter` required).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Mask flags: which LoRA to merge (default all).
    #[command(flatten)]
    pub mask: MaskArgs,
    /// Output HF model directory (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Largest safetensors shard (`5GB` as transformers; e.g. `200KB`, `2GiB`).
    #[arg(long, default_value = "5GB", value_parser = byte_size)]
    pub max_shard_size: u64,
}

/// `lora-boundary merge`.
pub fn run(a: &MergeArgs) -> Result<()> {
    if a.out.exists() {
        return Err(Error::Usage(format!("{}: output path exists; choose a new path", a.out.display())));
    }
    let mask = a.mask.mask()?;
    let (mut model, tokenizer, info) = load_with_adapter(&a.model, true)?;
    mask.validate(model.num_layers())?;
    if let Some(info) = &info {
        if !info.modules.iter().any(|&(l, m, _, _)| mask.is_active(l, m)) {
            return Err(Error::Usage(format!(
                "mask `{mask}` merges no LoRA module of {} (LoRA on blocks {}); the output would be the base model",
                info.path.display(),
                LayerMask::from_layers(info.layers())
            )));
        }
    }
    lora_model::adapter::merge(&mut model, &mask)?;
    let source = resolve_model(&a.model.model);
    let opts =
        lora_model::ExportOptions { max_shard_bytes: a.max_shard_size, source_dir: source.is_dir().then_some(source) };
    lora_model::save_hf_model(&model, Some(&tokenizer), &a.out, &opts)?;
    println!("wrote {} (LoRA merged under mask {mask})", a.out.display());
    Ok(())
}
