//! Batched generation with a KV cache: left padding, greedy or seeded sampling (temperature, top-p), EOS and stop
//! strings.
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::mask::LayerMask;
use crate::model::{ForwardOptions, Llama, Logits};
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Sampling {
    /// Arg-max.
    Greedy,
    /// Softmax sampling with temperature and nucleus (top-p), reproducible from `seed`.
    Sample {
        /// Divides the logits; must be > 0.
        temperature: f64,
        /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0 = all).
        top_p: f64,
        /// Seed of the sampler (each row gets its own stream).
        seed: u64,
    },
}

/// Generation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Upper bound on new tokens per prompt.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Generation stops at any of these ids (kept in `token_ids`, left out of the text).
    pub eos_token_ids: Vec<i64>,
    /// Generation stops when the decoded text contains any of these; the text is cut before it.
    pub stop_strings: Vec<String>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 64,
            sampling: Sampling::Greedy,
            eos_token_ids: Vec::new(),
            stop_strings: Vec::new(),
        }
    }
}

/// One prompt's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// New token ids, including the EOS that ended generation (as transformers' `generate` returns them).
    pub token_ids: Vec<i64>,
    /// Decoded text of the new tokens (empty without a tokenizer), cut at a stop string.
    pub text: String,
}

/// Timings of a generate call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationTiming {
    /// Prompt tokens (excluding padding) processed per second in the prefill.
    pub prefill_tokens_per_s: f64,
    /// New tokens produced per second after the prefill (all rows together).
    pub decode_tokens_per_s: f64,
    /// Prefill seconds.
    pub prefill_s: f64,
    /// Decode seconds.
    pub decode_s: f64,
}

/// Bytes of memory the machine can still give this process, where the OS says (Linux `MemAvailable`).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// An upper estimate of the memory one [`generate`] call allocates beyond the loaded weights, in bytes: the KV
/// cache (`2 · blocks · rows · kv heads · head_dim · (prompt + new tokens)` values of the weights' kind) plus the
/// prefill's largest transients (one block's activations, its attention mask and scores taken as materialised
/// `rows · heads · T · T` f32 matrices, and the last position's logits).
pub fn generation_memory_bytes(model: &Llama, rows: usize, prompt_len: usize, max_new_tokens: usize) -> u128 {
    let c = model.config();
    let (b, t) = (rows as u128, prompt_len as u128);
    let cap = t + max_new_tokens as u128;
    let elt = model.kind().elt_size_in_bytes() as u128;
    let kv = 2 * c.num_layers as u128 * b * c.num_kv_heads as u128 * c.head_dim as u128 * cap * elt;
    let width = (c.hidden_size + c.num_heads * c.head_dim + 2 * c.num_kv_heads * c.head_dim) as u128
        + 3 * c.intermediate_size as u128;
    let activations = 4 * b * t * width * 2;
    let attention = 4 * b * (c.num_heads as u128 + 1) * t * t;
    let logits = 4 * b * c.vocab_size as u128;
    kv + activations + attention + logits
}

/// Refuses, before any compute, a prompt that with `max_new_tokens` would run past the model's context
/// (`max_position_embeddings`). `what` names the prompt in the error (e.g. `prompts.jsonl line 3`).
pub fn check_context(model: &Llama, what: &str, prompt_tokens: usize, max_new_tokens: usize) -> Result<()> {
    let ctx = model.config().max_position_embeddings;
    let total = prompt_tokens.saturating_add(max_new_tokens);
    if total > ctx {
        return Err(ModelError::Limit(format!(
            "{what}: {prompt_tokens} prompt tokens + {max_new_tokens} new tokens = {total}, past the model's context \
             of {ctx} tokens (max_position_embeddings)"
        )));
    }
    Ok(())
}

/// Refuses a batch whose [`generation_memory_bytes`] estimate exceeds what the machine has available (CPU).
pub fn check_generation_memory(model: &Llama, rows: usize, prompt_len: usize, max_new_tokens: usize) -> Result<()> {
    if !model.device_map().all_cpu() {
        return Ok(());
    }
    let need = generation_memory_bytes(model, rows, prompt_len, max_new_tokens);
    if let Some(free) = available_memory() {
        if need > free as u128 {
            let gib = |x: u128| x as f64 / (1u64 << 30) as f64;
            return Err(ModelError::Limit(format!(
                "a batch of {rows} prompts of up to {prompt_len} tokens with {max_new_tokens} new tokens needs about \
                 {:.1} GiB (KV cache and prefill activations) but {:.1} GiB are available; use a smaller batch or \
                 shorter prompts",
                gib(need),
                gib(free as u128)
            )));
        }
    }
    Ok(())
}

/// Samples from `logits` (one row) with temperature and top-p.
fn sample_row(logits: &[f32], temperature: f64, top_p: f64, rng: &mut Rng) -> i64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i, (((l - max) as f64) / temperature).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (n, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= top_p {
            cut = n + 1;
            break;
        }
    }
    probs.truncate(cut.max(1));
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.next_f64() * mass;
    for &(i, p) in &probs {
        if u < p {
            return i as i64;
        }
        u -= p;
    }
    probs.last().map_or(0, |p| p.0 as i64)
}

/// Generates continuations of `prompts` (token ids) in one batch under LoRA mask `mask`.
///
/// Prompts of different lengths are left-padded; the result for each prompt equals generating it alone (greedy).
/// `tokenizer` is needed for stop strings and for the returned text.
pub fn generate(
    model: &Llama,
    tokenizer: Option<&Tokenizer>,
    prompts: &[Vec<i64>],
    config: &GenerationConfig,
    mask: &LayerMask,
) -> Result<(Vec<Generation>, GenerationTiming)> {
    let _guard = tch::no_grad_guard();
    if prompts.is_empty() {
        return Ok((Vec::new(), GenerationTiming::default()));
    }
    if let Some((i, _)) = prompts.iter().enumerate().find(|(_, p)| p.is_empty()) {
        return Err(ModelError::InvalidArgument(format!("prompt {i} has no tokens")));
    }
    if let Sampling::Sample { temperature, top_p, .. } = config.sampling {
        let valid = temperature.is_finite() && temperature > 0.0 && top_p > 0.0 && top_p <= 1.0;
        if !valid {
            return Err(ModelError::InvalidArgument(format!(
                "sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})"
            )));
        }
    }
    if !config.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(ModelError::InvalidArgument("stop strings need a tokenizer".into()));
    }
    let vocab = model.config().vocab_size as i64;
    if let Some(bad) = prompts.iter().flatten().find(|&&t| t < 0 || t >= vocab) {
        return Err(ModelError::InvalidArgument(format!("token id {bad} outside the vocabulary (0..{vocab})")));
    }
    let b = prompts.len();
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    for (i, p) in prompts.iter().enumerate() {
        check_context(model, &format!("prompt {i} of the batch"), p.len(), config.max_new_tokens)?;
    }
    check_generation_memory(model, b, max_len, config.max_new_tokens)?;
    let pad = model.config().pad_token_id.or_else(|| config.eos_token_ids.first().copied()).unwrap_or(0);
    let mut ids = Vec::with_capacity(b * max_len);
    let mut att = Vec::with_capacity(b * max_len);
    for p in prompts {
        let n_pad = max_len - p.len();
        ids.extend(std::iter::repeat_n(pad, n_pad).chain(p.iter().copied()));
        att.extend(std::iter::repeat_n(0i64, n_pad).chain(std::iter::repeat_n(1i64, p.len())));
    }
    let (bi, ti) = (b as i64, max_len as i64);
    let input = Tensor::from_slice(&ids).f_view([bi, ti])?;
    let attention = Tensor::from_slice(&att).f_view([bi, ti])?;
    let capacity = ti + config.max_new_tokens as i64;
    let mut cache = model.new_cache(bi, capacity.max(1))?;
    let opts = ForwardOptions { mask, hidden_states: false, logits: Logits::Last, train: false };
    let mut rngs: Vec<Rng> = match config.sampling {
        Sampling::Sample { seed, .. } => (0..b as u64).map(|i| Rng::derived(seed, i)).collect(),
        Sampling::Greedy => Vec::new(),
    };
    let mut out: Vec<Vec<i64>> = vec![Vec::new(); b];
    let mut texts: Vec<Option<String>> = vec![None; b];
    let mut done = vec![config.max_new_tokens == 0; b];

    let t0 = Instant::now();
    let mut logits = if config.max_new_tokens == 0 {
        None
    } else {
        model.forward_cached(&input, Some(&attention), &mut cache, &opts)?.logits
    };
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut produced = 0usize;
    let _threads = model.device_map().all_cpu().then(crate::kernels::decode_scope);
    for step in 0..config.max_new_tokens {
        let Some(l) = logits.take() else { break };
        // A NaN or +inf logit (overflow in f16, a broken weight) would make the choice garbage silently.
        let non_finite = || {
            ModelError::Limit(format!(
                "step {step}: the model produced non-finite logits (NaN or inf); try --dtype f32 or bf16"
            ))
        };
        let next: Vec<i64> = match config.sampling {
            Sampling::Greedy => {
                // arg-max picks a NaN or +inf if there is one, so checking the chosen logits (one per row, not the
                // whole vocabulary) catches every case, off the decode step's hot path.
                let idx = l.f_argmax(-1, true)?;
                if !l.f_gather(-1, &idx, false)?.f_sum(Kind::Double)?.f_double_value(&[])?.is_finite() {
                    return Err(non_finite());
                }
                Vec::<i64>::try_from(idx.f_view([-1])?.f_to_device(tch::Device::Cpu)?)?
            }
            Sampling::Sample { temperature, top_p, .. } => {
                let host = l.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?;
                let flat = Vec::<f32>::try_from(host.f_view([-1])?)?;
                if flat.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
                    return Err(non_finite());
                }
                flat.chunks(vocab as usize)
                    .zip(rngs.iter_mut())
                    .map(|(row, rng)| sample_row(row, temperature, top_p, rng))
                    .collect()
            }
        };
        for (r, &tok) in next.iter().enumerate() {
            if done[r] {
                continue;
            }
            out[r].push(tok);
            if config.eos_token_ids.contains(&tok) {
                done[r] = true;
                continue;
            }
            produced += 1;
            if let (Some(tk), false) = (tokenizer, config.stop_strings.is_empty()) {
                let text = tk.decode(&out[r], true)?;
                if let Some(pos) = config.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min() {
                    texts[r] = Some(text[..pos].to_string());
                    done[r] = true;
                }
            }
        }
        if done.iter().all(|&d| d) || step + 1 == config.max_new_tokens {
            break;
        }
        let feed: Vec<i64> = next.iter().zip(&done).map(|(&t, &d)| if d { pad } else { t }).collect();
        let step_input = Tensor::from_slice(&feed).f_view([bi, 1])?;
        logits = model.forward_cached(&step_input, None, &mut cache, &opts)?.logits;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let timing = GenerationTiming {
        prefill_tokens_per_s: prompt_tokens as f64 / prefill_s.max(1e-9),
        decode_tokens_per_s: produced.saturating_sub(b) as f64 / decode_s.max(1e-9),
        prefill_s,
        decode_s,
    };
    let mut results = Vec::with_capacity(b);
    for (tokens, text) in out.into_iter().zip(texts) {
        let text = match (text, tokenizer) {
            (Some(t), _) => t,
            (None, Some(tk)) => tk.decode(&tokens, true)?,
            (None, None) => String::new(),
        };
        results.push(Generation { token_ids: tokens, text });
    }
    Ok((results, timing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_the_head() {
        let mut rng = Rng::new(7);
        // One token holds almost all mass: top_p = 0.5 must always pick it.
        let logits = [0.0f32, 10.0, 0.0, 0.0];
        for _ in 0..100 {
            assert_eq!(sample_row(&logits, 1.0, 0.5, &mut rng), 1);
        }
        // Uniform logits with top_p = 1 eventually pick every token.
        let mut seen = [false; 4];
        for _ in 0..200 {
            seen[sample_row(&[1.0; 4], 1.0, 1.0, &mut rng) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn rng_is_reproducible() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        for _ in 0..10 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }
}
