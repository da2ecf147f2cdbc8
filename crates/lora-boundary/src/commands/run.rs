//! `lora-boundary run`: the whole pipeline from one TOML config.
#[allow(unused_imports)]
use std::path::PathBuf;

use clap::Args;

use crate::cli::*;
use crate::error::{Error, Result};
use lora_model::{DeviceSpec, DtypeSpec, Placement};

/// `run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The TOML config (see `docs/cli.md`).
    pub config: PathBuf,
    /// `cpu`, `cuda`, `cuda:N`, `auto`.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// `auto` (the checkpoint's own dtype), `f32`, `bf16`, `f16`.
    #[arg(long, default_value = "auto")]
    pub dtype: DtypeSpec,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// `lora-boundary run`.
pub fn run(a: &RunArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config).map_err(|source| Error::Io { path: a.config.clone(), source })?;
    let cfg: crate::pipeline::PipelineConfig = toml::from_str(&text).map_err(|e| Error::Data {
        path: a.config.clone(),
        // 1-based: the newlines before the span's start, plus one.
        line: e
            .span()
            .map_or(0, |s| text.as_bytes()[..s.start.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1),
        message: e.message().to_string(),
    })?;
    let place = Placement { device: a.device.resolve()?, kind: a.dtype.resolve(&cfg.model)? };
    let quiet = a.format == Format::Json;
    let report = crate::pipeline::run_pipeline(&cfg, place, |line| {
        if !quiet {
            crate::progress::println(line);
        }
    })?;
    match a.format {
        Format::Json => print_json(&report),
        Format::Text => {
            print!("{}", crate::pipeline::markdown(&report));
            Ok(())
        }
    }
}
