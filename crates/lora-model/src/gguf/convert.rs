//! From llama.cpp's layout to Hugging Face's: tensor names, q/k row order, and `config.json`.

use serde_json::{json, Value};

use super::GgufFile;
use crate::error::Result;

/// Which attention projection [`unpermute_qk`] is undoing, which decides the head count it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkKind {
    /// `attn_q`: permuted per query head (`n_head`).
    Query,
    /// `attn_k`: permuted per key/value head (`n_head_kv`).
    Key,
}

/// The Hugging Face (transformers Llama) name of a GGUF tensor, or `None` for a name with no HF
/// counterpart (such as `rope_freqs.weight`) or one this mapping does not know.
///
/// `token_embd.weight` → `model.embed_tokens.weight`, `blk.N.attn_q.weight` →
/// `model.layers.N.self_attn.q_proj.weight` (likewise `attn_k`, `attn_v`, `attn_output` → `o_proj`,
/// `ffn_gate`/`ffn_up`/`ffn_down` → `mlp.*_proj`, `attn_norm` → `input_layernorm`, `ffn_norm` →
/// `post_attention_layernorm`), `output_norm.weight` → `model.norm.weight`, `output.weight` →
/// `lm_head.weight`. Biases (`.bias`) map the same way.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    hf_tensor_name_for("llama", gguf_name)
}

/// The Hugging Face name of a GGUF tensor of a file whose `general.architecture` is `arch`: as
/// [`hf_tensor_name`] for `llama`; for `gemma3` the block norms map to Gemma's four (`attn_norm` →
/// `input_layernorm`, `post_attention_norm` → `post_attention_layernorm`, `ffn_norm` →
/// `pre_feedforward_layernorm`, `post_ffw_norm` → `post_feedforward_layernorm`) plus `attn_q_norm` /
/// `attn_k_norm` → `self_attn.q_norm` / `k_norm`.
pub fn hf_tensor_name_for(arch: &str, gguf_name: &str) -> Option<String> {
    let gemma = arch == "gemma3";
    let (stem, suffix) = if let Some(s) = gguf_name.strip_suffix(".weight") {
        (s, "weight")
    } else if let Some(s) = gguf_name.strip_suffix(".bias") {
        (s, "bias")
    } else {
        return None;
    };
    let top = match stem {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(format!("{t}.{suffix}"));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, leaf) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let hf = match leaf {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" if gemma => "post_attention_layernorm",
        "post_ffw_norm" if gemma => "post_feedforward_layernorm",
        "attn_q_norm" if gemma => "self_attn.q_norm",
        "attn_k_norm" if gemma => "self_attn.k_norm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's rotary row permutation of an `attn_q` / `attn_k` weight (or bias), as
/// transformers does when it loads a GGUF.
///
/// `data` is row-major with `shape` in PyTorch order (`[out_features, in_features]`, or
/// `[out_features]` for a bias); `n_head` is the number of heads of this projection (query heads for
/// `attn_q`, key/value heads for `attn_k`). With `d = rows / n_head / 2`, llama.cpp stores HF row
/// `h·2d + a·d + i` at row `h·2d + 2i + a` (`a ∈ {0, 1}`); this moves each row back. In numpy terms:
/// `w.reshape(n_head, d, 2, -1).swapaxes(1, 2).reshape(w.shape)`.
///
/// Fails with [`crate::error::ModelError::InvalidArgument`] when the shape does not match the data
/// or the row count is not a multiple of `2 * n_head`.
pub fn unpermute_qk(data: &[f32], shape: &[usize], n_head: usize) -> Result<Vec<f32>> {
    let bad = |m: String| crate::error::ModelError::InvalidArgument(m);
    let rows = *shape.first().ok_or_else(|| bad("unpermute_qk: empty shape".into()))?;
    let cols = shape.iter().skip(1).try_fold(1usize, |a, &d| a.checked_mul(d));
    let cols = cols.ok_or_else(|| bad(format!("unpermute_qk: shape {shape:?} overflows")))?;
    if rows.checked_mul(cols) != Some(data.len()) {
        return Err(bad(format!("unpermute_qk: shape {shape:?} does not match {} values", data.len())));
    }
    if n_head.checked_mul(2).is_none_or(|d| d == 0 || rows % d != 0) {
        return Err(bad(format!("unpermute_qk: {rows} rows do not split into {n_head} heads of even size")));
    }
    let d = rows / n_head / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for a in 0..2 {
            for i in 0..d {
                let dst = (h * 2 * d + a * d + i) * cols;
                let src = (h * 2 * d + 2 * i + a) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    Ok(out)
}

impl GgufFile {
    /// Dequantizes a tensor by its GGUF name and returns it the way transformers holds it: for
    /// `llama`, the row permutation of `attn_q` / `attn_k` undone with the head counts from the
    /// metadata; for `gemma3` (whose converter does not permute), every norm weight less 1 (the file
    /// stores Gemma's `1 + w`, HF holds `w`). Returns the HF name with the data and the shape
    /// (PyTorch order).
    pub fn load_hf_tensor(&self, gguf_name: &str) -> Result<(String, Vec<f32>, Vec<usize>)> {
        let shape = self.dequantized_shape(gguf_name)?;
        let mut data = vec![0f32; shape.iter().product()];
        let hf = self.load_hf_tensor_into(gguf_name, &mut data)?;
        Ok((hf, data, shape))
    }

    /// [`GgufFile::load_hf_tensor`] into `out`, which must hold exactly the tensor's values (its shape is
    /// [`GgufFile::dequantized_shape`]); returns the HF name. The values are written into `out` once (a Llama
    /// query or key weight is un-permuted through one copy of itself).
    ///
    /// # Errors
    /// As [`GgufFile::load_hf_tensor`], and [`ModelError::Gguf`](crate::ModelError::Gguf) when `out` has another
    /// length.
    pub fn load_hf_tensor_into(&self, gguf_name: &str, out: &mut [f32]) -> Result<String> {
        let arch = self.get_str("general.architecture")?;
        let hf = hf_tensor_name_for(arch, gguf_name)
            .ok_or_else(|| self.err(format!("tensor `{gguf_name}` has no Hugging Face name")))?;
        let shape = self.dequantize_into(gguf_name, out)?;
        if arch == "gemma3" {
            if hf.ends_with("norm.weight") {
                out.iter_mut().for_each(|v| *v -= 1.0);
            }
            return Ok(hf);
        }
        let kind = if gguf_name.contains(".attn_q.") {
            Some(QkKind::Query)
        } else if gguf_name.contains(".attn_k.") {
            Some(QkKind::Key)
        } else {
            None
        };
        let Some(kind) = kind else {
            return Ok(hf);
        };
        let n_head = self.get_u64(&format!("{arch}.attention.head_count"))?;
        let n_kv = self.get_u64_opt(&format!("{arch}.attention.head_count_kv"))?.unwrap_or(n_head);
        let heads = if kind == QkKind::Query { n_head } else { n_kv };
        let heads =
            usize::try_from(heads).map_err(|_| self.err(format!("head count {heads} does not fit in memory")))?;
        let data = unpermute_qk(out, &shape, heads).map_err(|e| self.err(format!("tensor `{gguf_name}`: {e}")))?;
        out.copy_from_slice(&data);
        Ok(hf)
    }
}

/// An HF-style `config.json` (`LlamaForCausalLM`) built from a GGUF file's metadata.
///
/// Reads `general.architecture` (only `llama` is supported; others fail naming it) and the
/// `llama.*` hyper-parameters: `block_count`, `embedding_length`, `feed_forward_length`,
/// `attention.head_count`, `attention.head_count_kv` (default: `head_count`), `rope.freq_base`
/// (default 10000), `attention.layer_norm_rms_epsilon`, `context_length`. `vocab_size` comes from
/// `llama.vocab_size`, else the length of `tokenizer.ggml.tokens`, else `token_embd.weight`.
/// `tie_word_embeddings` is true when there is no `output.weight`; `head_dim` comes from
/// `attention.key_length` or `rope.dimension_count` when present (as transformers does). Token ids
/// come from `tokenizer.ggml.{bos,eos,unknown,padding}_token_id` when present.
///
/// For `gemma3` see [`gemma3_hf_config`].
pub fn hf_config(file: &GgufFile) -> Result<Value> {
    let arch = file.get_str("general.architecture")?;
    if arch == "gemma3" {
        return gemma3_hf_config(file);
    }
    if arch != "llama" {
        return Err(file.err(format!("unsupported GGUF architecture `{arch}` (supported: llama, gemma3)")));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = file.get_u64(&key("embedding_length"))?;
    let n_head = file.get_u64(&key("attention.head_count"))?;
    let n_kv = file.get_u64_opt(&key("attention.head_count_kv"))?.unwrap_or(n_head);
    let vocab = vocab_size(file, arch)?;
    let rope_theta = file.get_f32_opt(&key("rope.freq_base"))?.unwrap_or(10_000.0);
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": file.get_u64(&key("feed_forward_length"))?,
        "num_hidden_layers": file.get_u64(&key("block_count"))?,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": short_f64(file.get_f32(&key("attention.layer_norm_rms_epsilon"))?),
        "rope_theta": short_f64(rope_theta),
        "max_position_embeddings": file.get_u64(&key("context_length"))?,
        "vocab_size": vocab,
        "tie_word_embeddings": file.tensor_info("output.weight").is_none(),
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
    });
    let head_dim = match file.get_u64_opt(&key("attention.key_length"))? {
        Some(d) => Some(d),
        None => file.get_u64_opt(&key("rope.dimension_count"))?,
    };
    if let Some(head_dim) = head_dim {
        config["head_dim"] = json!(head_dim);
    }
    let rope_dim = head_dim.unwrap_or(hidden / n_head.max(1));
    if let Some(scaling) = rope_scaling(file, &key, f64::from(rope_theta), rope_dim)? {
        config["rope_scaling"] = scaling;
    }
    for (gguf, hf) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.unknown_token_id", "unk_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = file.get_u64_opt(gguf)? {
            config[hf] = json!(id);
        }
    }
    Ok(config)
}

/// The vocabulary size of a file of architecture `arch`: `{arch}.vocab_size`, else the length of
/// `tokenizer.ggml.tokens`, else the rows of `token_embd.weight`.
fn vocab_size(file: &GgufFile, arch: &str) -> Result<u64> {
    if let Some(v) = file.get_u64_opt(&format!("{arch}.vocab_size"))? {
        return Ok(v);
    }
    if let Some(tokens) = file.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
        return Ok(tokens.len() as u64);
    }
    let t = file.tensor_info("token_embd.weight").ok_or_else(|| {
        file.err(format!(
            "cannot tell the vocabulary size: no `{arch}.vocab_size`, `tokenizer.ggml.tokens` or `token_embd.weight`"
        ))
    })?;
    Ok(*t.dims.get(1).ok_or_else(|| file.err("`token_embd.weight` is not 2-D"))?)
}

/// An HF `config.json` (`Gemma3ForCausalLM`, `model_type` `gemma3_text`) from a `gemma3` GGUF's metadata, as
/// transformers derives it: `context_length` → `max_position_embeddings`, `block_count`, `feed_forward_length`,
/// `embedding_length`, `rope.freq_base` → the full-attention `rope_theta` (default 1 000 000),
/// `attention.key_length` → `head_dim` (default 256), `attention.head_count` / `head_count_kv`,
/// `attention.layer_norm_rms_epsilon`, `attention.sliding_window`; what the file does not hold takes Gemma 3's
/// defaults: sliding-layer `rope_theta` 10 000, `query_pre_attn_scalar` 256, `gelu_pytorch_tanh`, block `i` full
/// attention when `(i + 1) % 6 == 0`, no soft-capping. The head is tied when there is no `output.weight`.
pub fn gemma3_hf_config(file: &GgufFile) -> Result<Value> {
    let arch = "gemma3";
    let key = |k: &str| format!("{arch}.{k}");
    let n_head = file.get_u64(&key("attention.head_count"))?;
    let n_kv = file.get_u64_opt(&key("attention.head_count_kv"))?.unwrap_or(n_head);
    let layers = file.get_u64(&key("block_count"))?;
    if layers == 0 || layers > crate::mask::MAX_BLOCKS as u64 {
        return Err(file.err(format!("`{arch}.block_count` is {layers}; supported: 1 to {}", crate::mask::MAX_BLOCKS)));
    }
    let theta = file.get_f32_opt(&key("rope.freq_base"))?.map_or(1_000_000.0, short_f64);
    let layer_types: Vec<&str> =
        (0..layers).map(|i| if (i + 1) % 6 == 0 { "full_attention" } else { "sliding_attention" }).collect();
    let mut config = json!({
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": file.get_u64(&key("embedding_length"))?,
        "intermediate_size": file.get_u64(&key("feed_forward_length"))?,
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": file.get_u64_opt(&key("attention.key_length"))?.unwrap_or(256),
        "rms_norm_eps": short_f64(file.get_f32(&key("attention.layer_norm_rms_epsilon"))?),
        "max_position_embeddings": file.get_u64(&key("context_length"))?,
        "vocab_size": vocab_size(file, arch)?,
        "tie_word_embeddings": file.tensor_info("output.weight").is_none(),
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256,
        "layer_types": layer_types,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        "attention_bias": false,
        "final_logit_softcapping": null,
        "attn_logit_softcapping": null,
    });
    if let Some(w) = file.get_u64_opt(&key("attention.sliding_window"))? {
        config["sliding_window"] = json!(w);
    }
    if let Some(t) = file.get_str_opt(&key("rope.scaling.type"))? {
        if t != "none" {
            return Err(file.err(format!("rope scaling type `{t}` is not implemented for gemma3")));
        }
    }
    for (gguf, hf) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.unknown_token_id", "unk_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = file.get_u64_opt(gguf)? {
            config[hf] = json!(id);
        }
    }
    Ok(config)
}

/// The rotary scaling a GGUF file declares, as an HF `rope_scaling` object (`None`: plain RoPE).
///
/// `{arch}.rope.scaling.type` `none`/`linear` (with `rope.scaling.factor`) map directly. A `rope_freqs.weight`
/// tensor (what llama.cpp's converter writes for Llama 3.x: one divisor per rotary frequency) is matched against
/// the llama3 rule — factor = the largest divisor, low/high frequency factors 1 and 4, original context 8192, as
/// every Llama 3.1/3.2/3.3 checkpoint uses — and must reproduce every divisor to f32 precision. Anything else
/// (`yarn`, `longrope`, divisors no known rule gives) is refused by name: running it as plain RoPE would be a
/// silently wrong model.
fn rope_scaling(file: &GgufFile, key: &dyn Fn(&str) -> String, theta: f64, rope_dim: u64) -> Result<Option<Value>> {
    match file.get_str_opt(&key("rope.scaling.type"))? {
        None | Some("none") => {}
        Some("linear") => {
            let factor = file.get_f32(&key("rope.scaling.factor"))?;
            return Ok(Some(json!({"rope_type": "linear", "factor": short_f64(factor)})));
        }
        Some(other) => {
            return Err(file.err(format!(
                "rope scaling type `{other}` (`{}`) is not implemented (supported: none, linear, llama3 via \
                 rope_freqs)",
                key("rope.scaling.type")
            )))
        }
    }
    if file.tensor_info("rope_freqs.weight").is_none() {
        return Ok(None);
    }
    let (divisors, _) = file.dequantize("rope_freqs.weight")?;
    let half = usize::try_from(rope_dim / 2).unwrap_or(0);
    if divisors.len() != half || half == 0 {
        return Err(file.err(format!(
            "`rope_freqs.weight` has {} values, but the rotary dimension {rope_dim} needs {half}",
            divisors.len()
        )));
    }
    let factor = f64::from(divisors.iter().copied().fold(f32::MIN, f32::max));
    let (low, high, original) = (1.0, 4.0, 8192usize);
    let expected = llama3_divisors(theta, rope_dim as usize, factor, low, high, original);
    let worst = divisors.iter().zip(&expected).map(|(&d, &e)| ((f64::from(d) - e) / e).abs()).fold(0.0, f64::max);
    if !(factor >= 1.0 && worst < 1e-5) {
        return Err(file.err(format!(
            "`rope_freqs.weight` holds per-frequency RoPE divisors that the llama3 rule (factor {factor}, low 1, \
             high 4, original context 8192) does not reproduce (worst relative difference {worst:.2e}); arbitrary \
             per-frequency factors are not implemented"
        )));
    }
    Ok(Some(json!({
        "rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
        "original_max_position_embeddings": original,
    })))
}

/// The divisor the llama3 rule applies to each rotary frequency (`inv_freq / inv_freq_llama3`), as llama.cpp's
/// converter writes them into `rope_freqs.weight`.
pub(crate) fn llama3_divisors(theta: f64, dim: usize, factor: f64, low: f64, high: f64, original: usize) -> Vec<f64> {
    let original = original as f64;
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    (0..dim / 2)
        .map(|i| {
            let inv_freq = 1.0 / theta.powf((2 * i) as f64 / dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// The `f64` with the shortest decimal form that rounds to `x` as an `f32` (`1e-5`, not
/// `9.999999747378752e-6`), so the config reads like the one the model was converted from.
fn short_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}
