//! Writing a model as an HF directory (`config.json`, `model.safetensors`, tokenizer files), e.g. after merging
//! LoRA into the weights.
use std::path::Path;

use serde_json::json;

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use crate::weights::{save_safetensors, tmp_path, write_atomic};

/// The HF `config.json` of a resolved config (transformers 4 layout, which transformers 5 also reads).
pub fn hf_config_json(c: &ModelConfig, kind: tch::Kind) -> serde_json::Value {
    let (arch, model_type) = match c.architecture {
        Architecture::Llama => ("LlamaForCausalLM", "llama"),
        Architecture::Mistral => ("MistralForCausalLM", "mistral"),
        Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
    };
    let rope_scaling = match c.rope_scaling {
        RopeScaling::Default => serde_json::Value::Null,
        RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings})
        }
    };
    let dtype = match kind {
        tch::Kind::BFloat16 => "bfloat16",
        tch::Kind::Half => "float16",
        _ => "float32",
    };
    let mut v = json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "torch_dtype": dtype,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": if c.eos_token_ids.len() == 1 { json!(c.eos_token_ids[0]) } else { json!(c.eos_token_ids) },
        "pad_token_id": c.pad_token_id,
    });
    if let Some(obj) = v.as_object_mut() {
        if c.architecture == Architecture::Llama {
            obj.insert("attention_bias".into(), json!(c.qkv_bias));
            obj.insert("mlp_bias".into(), json!(c.mlp_bias));
        }
        if let Some(w) = c.sliding_window {
            obj.insert("sliding_window".into(), json!(w));
            if c.architecture == Architecture::Qwen2 {
                obj.insert("use_sliding_window".into(), json!(true));
            }
        }
    }
    v
}

/// Writes `model` (with whatever LoRA has been merged into it) and `tokenizer` as an HF model directory.
///
/// The directory appears whole or not at all; an existing `out_dir` is refused.
pub fn save_hf_model(model: &Llama, tokenizer: Option<&Tokenizer>, out_dir: &Path) -> Result<()> {
    if out_dir.exists() {
        return Err(ModelError::InvalidArgument(format!(
            "{}: output directory exists; choose a new path",
            out_dir.display()
        )));
    }
    let parent = out_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    let tmp = tmp_path(out_dir);
    std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let result = (|| {
        let json_err = |source| ModelError::Json { path: out_dir.join("config.json"), source };
        let cfg = serde_json::to_string_pretty(&hf_config_json(model.config(), model.kind())).map_err(json_err)?;
        write_atomic(&tmp.join("config.json"), cfg.as_bytes())?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        save_safetensors(&tmp.join("model.safetensors"), &model.named_weights(), Some(meta))?;
        if let Some(tk) = tokenizer {
            tk.save_dir(&tmp)?;
        }
        std::fs::rename(&tmp, out_dir).map_err(|e| ModelError::io(out_dir, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
