//! Writing a model as an HF directory (`config.json`, `model.safetensors`, tokenizer files), e.g. after merging
//! LoRA into the weights.
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use crate::weights::{save_safetensors, write_atomic};
use tch::Tensor;

/// The HF `config.json` of a resolved config (transformers 4 layout, which transformers 5 also reads).
pub fn hf_config_json(c: &ModelConfig, kind: tch::Kind) -> serde_json::Value {
    let (arch, model_type) = match c.architecture {
        Architecture::Llama => ("LlamaForCausalLM", "llama"),
        Architecture::Mistral => ("MistralForCausalLM", "mistral"),
        Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Architecture::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
    };
    let rope_scaling = rope_json(&c.rope_scaling);
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
        if let Some(g) = &c.gemma3 {
            // transformers 5's Gemma 3 layout: rotary parameters per layer type.
            let with_theta = |scaling: &RopeScaling, theta: f64| {
                let mut r = rope_json(scaling);
                if r.is_null() {
                    r = json!({"rope_type": "default"});
                }
                r["rope_theta"] = json!(theta);
                r
            };
            obj.remove("rope_theta");
            obj.remove("rope_scaling");
            obj.remove("hidden_act");
            obj.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            obj.insert("attention_bias".into(), json!(c.qkv_bias));
            obj.insert("layer_types".into(), json!(g.layer_types));
            obj.insert("sliding_window".into(), json!(g.sliding_window));
            // transformers' Gemma3TextConfig types it `int` and refuses a float.
            let q = g.query_pre_attn_scalar;
            let q = if q.fract() == 0.0 && q.abs() < 1e15 { json!(q as i64) } else { json!(q) };
            obj.insert("query_pre_attn_scalar".into(), q);
            obj.insert("final_logit_softcapping".into(), json!(g.final_logit_softcapping));
            obj.insert("attn_logit_softcapping".into(), serde_json::Value::Null);
            obj.insert(
                "rope_parameters".into(),
                json!({
                    "full_attention": with_theta(&c.rope_scaling, c.rope_theta),
                    "sliding_attention": with_theta(&g.local_rope_scaling, g.local_rope_theta),
                }),
            );
        }
    }
    v
}

/// An HF `rope_scaling` object (`null` for plain RoPE).
fn rope_json(scaling: &RopeScaling) -> serde_json::Value {
    match *scaling {
        RopeScaling::Default => serde_json::Value::Null,
        RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings})
        }
    }
}

/// Largest shard [`save_hf_model`] writes by default: 5 GB, as transformers' `save_pretrained`.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Files copied verbatim from the source model directory when it has them (tokenizer, chat template,
/// generation defaults), so the written directory tokenizes and generates exactly as the source does.
const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// How [`save_hf_model`] writes a directory.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportOptions {
    /// Largest safetensors shard in bytes (a tensor larger than this gets a shard of its own). More than one
    /// shard adds `model.safetensors.index.json`, as transformers writes it.
    pub max_shard_bytes: u64,
    /// The HF directory the model was loaded from, whose tokenizer and generation files are copied verbatim;
    /// `None` (e.g. a GGUF source) writes them from the in-memory tokenizer and config.
    pub source_dir: Option<PathBuf>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions { max_shard_bytes: DEFAULT_MAX_SHARD_BYTES, source_dir: None }
    }
}

/// `generation_config.json` from the model's special tokens (when the source has none to copy).
fn generation_config_json(c: &ModelConfig) -> serde_json::Value {
    let eos = if c.eos_token_ids.len() == 1 { json!(c.eos_token_ids[0]) } else { json!(c.eos_token_ids) };
    let mut v = json!({"bos_token_id": c.bos_token_id, "eos_token_id": eos, "_from_model_config": true});
    if let (Some(obj), Some(pad)) = (v.as_object_mut(), c.pad_token_id) {
        obj.insert("pad_token_id".into(), json!(pad));
    }
    v
}

/// Splits tensors into shards of at most `max` bytes each, in order.
fn plan_shards(tensors: &[(String, Tensor)], max: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut bytes) = (0usize, 0u64);
    for (i, (_, t)) in tensors.iter().enumerate() {
        let size = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        if i > start && bytes + size > max {
            shards.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < tensors.len() {
        shards.push(start..tensors.len());
    }
    shards
}

/// Writes `model` (with whatever LoRA has been merged into it) and `tokenizer` as an HF model directory that
/// transformers' `from_pretrained` loads: `config.json` (the weights' dtype as `torch_dtype`), safetensors in
/// shards of at most `opts.max_shard_bytes` with `model.safetensors.index.json` when there are several,
/// `generation_config.json` and the tokenizer files.
///
/// The directory appears whole or not at all; an existing `out_dir` is refused.
pub fn save_hf_model(model: &Llama, tokenizer: Option<&Tokenizer>, out_dir: &Path, opts: &ExportOptions) -> Result<()> {
    if opts.max_shard_bytes == 0 {
        return Err(ModelError::InvalidArgument("max shard size must be positive".into()));
    }
    let partial = crate::atomic::PartialDir::create(out_dir)?;
    let tmp = partial.path();
    let json_err = |file: &str| {
        let path = out_dir.join(file);
        move |source| ModelError::Json { path, source }
    };
    let cfg =
        serde_json::to_string_pretty(&hf_config_json(model.config(), model.kind())).map_err(json_err("config.json"))?;
    write_atomic(&tmp.join("config.json"), cfg.as_bytes())?;

    let tensors = model.named_weights();
    let shards = plan_shards(&tensors, opts.max_shard_bytes);
    let n = shards.len();
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    if n == 1 {
        save_safetensors(&tmp.join("model.safetensors"), &tensors, Some(meta))?;
    } else {
        let mut weight_map = serde_json::Map::new();
        let mut total = 0u64;
        for (i, range) in shards.into_iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            for (name, t) in &tensors[range.clone()] {
                weight_map.insert(name.clone(), json!(file));
                total += (t.numel() * t.kind().elt_size_in_bytes()) as u64;
            }
            save_safetensors(&tmp.join(&file), &tensors[range], Some(meta.clone()))?;
        }
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let body = serde_json::to_string_pretty(&index).map_err(json_err("model.safetensors.index.json"))?;
        write_atomic(&tmp.join("model.safetensors.index.json"), body.as_bytes())?;
    }

    let mut copied = Vec::new();
    if let Some(src) = &opts.source_dir {
        for f in COPIED_FILES {
            let from = src.join(f);
            if from.is_file() {
                std::fs::copy(&from, tmp.join(f)).map_err(|e| ModelError::io(&from, e))?;
                copied.push(*f);
            }
        }
    }
    if !copied.contains(&"tokenizer.json") {
        if let Some(tk) = tokenizer {
            tk.save_dir(tmp)?;
        }
    }
    if !copied.contains(&"generation_config.json") {
        let body = serde_json::to_string_pretty(&generation_config_json(model.config()))
            .map_err(json_err("generation_config.json"))?;
        write_atomic(&tmp.join("generation_config.json"), body.as_bytes())?;
    }
    Ok(partial.commit()?)
}
