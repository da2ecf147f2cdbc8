//! HF-named weights, config and tokenizer from a GGUF file (dequantized; Llama's q/k rows un-permuted and
//! Gemma 3's norms stored as `1 + w` turned back into `w`, as transformers does on load).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::config::{HfConfig, ModelConfig};
use crate::error::{ModelError, Result};
use crate::gguf::{gguf_chat_template, gguf_tokenizer, hf_tensor_name_for, GgufFile, GgufSpecialTokens};
use crate::kernels::borrow_f32_mut;
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::weights::{check_finite, empty_on_huge_pages, refuse_non_finite, WeightSource};

/// A GGUF file seen through HF tensor names.
pub struct GgufWeights {
    file: GgufFile,
    origin: PathBuf,
    /// HF name → GGUF name.
    names: HashMap<String, String>,
}

impl GgufWeights {
    /// Opens `path` and indexes its tensors by HF name.
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let arch = file.get_str("general.architecture")?;
        let names =
            file.tensor_names().filter_map(|g| hf_tensor_name_for(arch, g).map(|h| (h, g.to_string()))).collect();
        Ok(GgufWeights { file, origin: path.to_path_buf(), names })
    }

    /// The underlying file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

impl WeightSource for GgufWeights {
    fn origin(&self) -> &Path {
        &self.origin
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.names.keys().cloned().collect();
        v.sort();
        v
    }

    fn load(&self, name: &str, expected: Option<&[i64]>) -> Result<Tensor> {
        self.load_as(name, expected, None)
    }

    /// Dequantises straight into the memory of a new f32 tensor on huge pages (one write per value; Llama's query
    /// and key weights are un-permuted through one copy), counting
    /// non-finite values on the way, then converts to `kind` when it is another floating kind.
    fn load_as(&self, name: &str, expected: Option<&[i64]>, kind: Option<Kind>) -> Result<Tensor> {
        let gguf_name = self
            .names
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.to_string(), file: self.origin.clone() })?;
        let shape: Vec<i64> = self.file.dequantized_shape(gguf_name)?.iter().map(|&d| d as i64).collect();
        if let Some(exp) = expected {
            if exp != shape.as_slice() {
                return Err(ModelError::TensorShape {
                    name: format!("{name} (GGUF `{gguf_name}`)"),
                    file: self.origin.clone(),
                    expected: exp.to_vec(),
                    actual: shape,
                });
            }
        }
        let convert = kind.is_some_and(|k| k != Kind::Float);
        // Converted to another kind, the f32 values are a transient: never carved from a load's arena, whose
        // chunks would keep it alive beside the weight.
        let mut t = if convert {
            Tensor::f_empty(shape.as_slice(), (Kind::Float, Device::Cpu))?
        } else {
            empty_on_huge_pages(&shape, Kind::Float)?
        };
        let bad = {
            // SAFETY: aliasing: `t` was created just above; when it was carved from a load's arena its chunk is
            // shared with other weights, but their byte ranges never overlap `t`'s, and `t` itself is not touched
            // otherwise until `out` is gone at the end of this block. Threads: `out` lives on this thread only, and
            // a load's other weights are not reachable from other threads while it runs.
            let out = unsafe { borrow_f32_mut(&mut t) }.ok_or_else(|| {
                ModelError::InvalidArgument(format!("{name}: a new f32 tensor is not a contiguous CPU tensor"))
            })?;
            self.file.load_hf_tensor_into(gguf_name, out)?;
            out.iter().filter(|v| !v.is_finite()).count() as u64
        };
        refuse_non_finite(name, &self.origin, bad)?;
        let Some(k) = kind.filter(|_| convert) else { return Ok(t) };
        let mut to = empty_on_huge_pages(&shape, k)?;
        to.f_copy_(&t)?;
        // A narrower kind may overflow (f16 past 65504).
        check_finite(&to, name, &self.origin)?;
        Ok(to)
    }

    fn checks_finite(&self) -> bool {
        true
    }
}

/// Opens a GGUF file as a config plus a weight source.
pub(crate) fn open(path: &Path) -> Result<(ModelConfig, Box<dyn WeightSource>)> {
    let weights = GgufWeights::open(path)?;
    let json = crate::gguf::hf_config(weights.file())?;
    let raw: HfConfig =
        serde_json::from_value(json).map_err(|source| ModelError::Json { path: path.to_path_buf(), source })?;
    let config = ModelConfig::from_hf(&raw, path)?;
    Ok((config, Box::new(weights)))
}

/// Loads the tokenizer, special tokens and chat template stored in a GGUF file's metadata, as transformers'
/// `AutoTokenizer.from_pretrained(dir, gguf_file=…)` builds them.
pub fn gguf_tokenizer_for(path: &Path) -> Result<Tokenizer> {
    let file = GgufFile::open(path)?;
    let inner = gguf_tokenizer(&file)?;
    let special = GgufSpecialTokens::from_file(&file)?;
    let text_of = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i)).unwrap_or_default();
    let template = gguf_chat_template(&file).map(|t| ChatTemplate::new(t, text_of(special.bos), text_of(special.eos)));
    Ok(Tokenizer::new(
        inner,
        template,
        special.bos.map(i64::from),
        special.eos.map(i64::from).into_iter().collect(),
        special.pad.map(i64::from),
    ))
}
