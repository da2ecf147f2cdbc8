//! Loading a model with its tokenizer: lives in `lora-model` ([`lora_model::loading`]); this module keeps the
//! facade's names and adds the string parsers the library API has always offered.
pub use lora_model::loading::{load_model, resolve_model, DeviceSpec, DtypeSpec, DEFAULT_MODEL};
use lora_model::tch::{Device, Kind};

use crate::error::Result;

/// Parses `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available, else CPU) into a libtorch device.
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(s.parse::<DeviceSpec>()?.resolve()?)
}

/// Parses `auto` (the checkpoint's own dtype; GGUF dequantizes to f32), `f32`, `bf16` or `f16` for the model at
/// `model`.
pub fn resolve_kind(s: &str, model: &std::path::Path) -> Result<Kind> {
    Ok(s.parse::<DtypeSpec>()?.resolve(model)?)
}

/// Parses `f32`, `bf16` or `f16` (`auto` needs a model: see [`resolve_kind`]).
pub fn parse_kind(s: &str) -> Result<Kind> {
    match s.parse::<DtypeSpec>()? {
        DtypeSpec::Auto => Err(crate::Error::Usage("dtype `auto` needs the model path (resolve_kind)".into())),
        d => Ok(d.resolve(std::path::Path::new(""))?),
    }
}
