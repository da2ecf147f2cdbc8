//! `lora-boundary prune`: a PEFT adapter holding only the kept blocks' LoRA.
#[allow(unused_imports)]
use std::path::PathBuf;

use clap::Args;

use crate::cli::*;
use crate::error::Result;
use lora_model::{prune_adapter, LayerMask};

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

/// `lora-boundary prune`.
pub fn run(a: &PruneArgs) -> Result<()> {
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
