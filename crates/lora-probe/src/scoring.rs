//! Teacher-forced answer scoring and the one left-padded prompt+answer batching that the probe and the search's
//! log-probability proxy share.
use lora_common::Sample;
use lora_model::tch::{Kind, Tensor};
use lora_model::{ForwardOptions, LayerMask, Llama, Logits, PromptFormat, Tokenizer};

use crate::error::{ProbeError, Result};

/// Left-pads rows of token ids to one `[B, T]` batch: the ids (pad id `pad`) and the attention mask (0 on pads),
/// placed on `device`. Returns them with `T`.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use lora_probe::scoring::left_padded;
/// let (ids, att, t) = left_padded(&[vec![5, 6, 7], vec![8]], 0, lora_model::tch::Device::Cpu)?;
/// assert_eq!(t, 3);
/// assert_eq!(Vec::<i64>::try_from(ids.view([-1]))?, [5, 6, 7, 0, 0, 8]);
/// assert_eq!(Vec::<i64>::try_from(att.view([-1]))?, [1, 1, 1, 0, 0, 1]);
/// # Ok(())
/// # }
/// ```
pub fn left_padded(rows: &[Vec<i64>], pad: i64, device: lora_model::tch::Device) -> Result<(Tensor, Tensor, usize)> {
    let t = rows.iter().map(Vec::len).max().unwrap_or(0);
    let (mut ids, mut att) = (Vec::with_capacity(rows.len() * t), Vec::with_capacity(rows.len() * t));
    for r in rows {
        let n_pad = t - r.len();
        ids.extend(std::iter::repeat_n(pad, n_pad).chain(r.iter().copied()));
        att.extend(std::iter::repeat_n(0i64, n_pad).chain(std::iter::repeat_n(1i64, r.len())));
    }
    let shape = [rows.len() as i64, t as i64];
    let ids = Tensor::from_slice(&ids).f_view(shape)?.f_to_device(device)?;
    let att = Tensor::from_slice(&att).f_view(shape)?.f_to_device(device)?;
    Ok((ids, att, t))
}

/// One batch of teacher-forced rows: `[B, T]` ids and attention mask (left padding), and each row's answer ids.
pub(crate) struct ForcedBatch {
    input: Tensor,
    attention: Tensor,
    answers: Vec<Vec<i64>>,
    max_len: usize,
    /// The same rows as a prefix all their prompts share and the left-padded rest, when they share at least
    /// [`lora_model::MIN_SHARED_PREFIX`] tokens.
    shared: Option<SharedForced>,
}

/// A batch's shared prompt prefix (`[1, P]`) and each row's remaining tokens, left-padded (`[B, S]`).
struct SharedForced {
    prefix: Tensor,
    prefix_len: i64,
    input: Tensor,
    attention: Tensor,
    len: usize,
}

pub(crate) fn forced_batches(
    model: &Llama,
    tokenizer: &Tokenizer,
    samples: &[&Sample],
    format: &PromptFormat,
    batch_size: usize,
) -> Result<Vec<ForcedBatch>> {
    let mut out = Vec::new();
    for chunk in samples.chunks(batch_size.max(1)) {
        let mut rows = Vec::with_capacity(chunk.len());
        for s in chunk {
            let p = tokenizer.encode_prompt(&s.prompt, format)?;
            let a = tokenizer.encode(&s.answer, false)?;
            if a.is_empty() {
                return Err(ProbeError::InvalidArgument(format!(
                    "sample with prompt {:?} has an empty answer",
                    s.prompt
                )));
            }
            lora_model::generate::check_context(model, "a validation sample (prompt + answer)", p.len() + a.len(), 0)?;
            rows.push((p, a));
        }
        let pad = tokenizer.pad_token_id().unwrap_or(0);
        let joined: Vec<Vec<i64>> = rows.iter().map(|(p, a)| p.iter().chain(a).copied().collect()).collect();
        let (input, attention, max_len) = left_padded(&joined, pad, model.device())?;
        let prompts: Vec<&[i64]> = rows.iter().map(|(p, _)| p.as_slice()).collect();
        let p = lora_model::shared_prefix_len(prompts.iter().copied());
        let shared = match (p >= lora_model::MIN_SHARED_PREFIX, joined.first()) {
            (true, Some(first)) => {
                let rest: Vec<Vec<i64>> = joined.iter().map(|r| r.get(p..).unwrap_or(&[]).to_vec()).collect();
                let (input, attention, len) = left_padded(&rest, pad, model.device())?;
                let ids = first.get(..p).unwrap_or(&[]);
                let prefix = Tensor::from_slice(ids).f_view([1, p as i64])?.f_to_device(model.device())?;
                Some(SharedForced { prefix, prefix_len: p as i64, input, attention, len })
            }
            _ => None,
        };
        out.push(ForcedBatch {
            input,
            attention,
            answers: rows.into_iter().map(|(_, a)| a).collect(),
            max_len,
            shared,
        });
    }
    Ok(out)
}

/// Mean answer-token log-probability of each row of `batch`, read from the last hidden state `last` (pre-norm),
/// whose rows end with their answers at column `max_len` (the batch's, or its shared layout's).
fn row_logprobs(model: &Llama, batch: &ForcedBatch, max_len: usize, last: &Tensor, out: &mut Vec<f64>) -> Result<()> {
    let err = lora_model::ModelError::from;
    // On CPU: every row's predicting positions through the head at once, scored in two passes per row of logits.
    let mut states = Vec::with_capacity(batch.answers.len());
    for (r, a) in batch.answers.iter().enumerate() {
        let start = (max_len - a.len() - 1) as i64;
        states.push(last.f_select(0, r as i64).and_then(|h| h.f_narrow(0, start, a.len() as i64)).map_err(err)?);
    }
    let targets: Vec<i64> = batch.answers.iter().flatten().copied().collect();
    if let Some(stats) = model.lens_stats(&Tensor::f_cat(&states, 0).map_err(err)?, &targets)? {
        let mut at = 0;
        for a in &batch.answers {
            let rows = stats.get(at..at + a.len()).unwrap_or(&[]);
            out.push(rows.iter().map(|s| f64::from(s.target_logprob)).sum::<f64>() / a.len() as f64);
            at += a.len();
        }
        return Ok(());
    }
    for (r, a) in batch.answers.iter().enumerate() {
        // Answer token j sits at position max_len - |a| + j and is predicted from the position before it.
        let start = (max_len - a.len() - 1) as i64;
        let h = last.f_select(0, r as i64).and_then(|h| h.f_narrow(0, start, a.len() as i64)).map_err(err)?;
        let logits = model.lm_head(&model.final_norm(&h)?)?;
        let logp = logits.f_log_softmax(-1, Kind::Float).map_err(err)?;
        let target = Tensor::from_slice(a).unsqueeze(1).to_device(logp.device());
        let gt = logp.f_gather(1, &target, false).map_err(err)?;
        out.push(gt.f_mean(Kind::Double).map_err(err)?.double_value(&[]));
    }
    Ok(())
}

/// Mean log-probability of each sample's answer tokens (teacher-forced) under `mask`.
pub fn answer_logprobs(
    model: &Llama,
    tokenizer: &Tokenizer,
    samples: &[&Sample],
    mask: &LayerMask,
    format: &PromptFormat,
    batch_size: usize,
) -> Result<Vec<f64>> {
    let _guard = lora_model::tch::no_grad_guard();
    let mut out = Vec::with_capacity(samples.len());
    for batch in forced_batches(model, tokenizer, samples, format, batch_size)? {
        let opts = ForwardOptions { logits: Logits::Skip, hidden_states: true, ..ForwardOptions::new(mask) };
        let fwd = model.forward(&batch.input, Some(&batch.attention), &opts)?;
        let last = fwd
            .hidden_states
            .last()
            .ok_or_else(|| ProbeError::InvalidArgument("model returned no hidden states".into()))?;
        row_logprobs(model, &batch, batch.max_len, last, &mut out)?;
    }
    Ok(out)
}

/// [`answer_logprobs`] under `keep_through(b)` for every `b` in `boundaries` at once: `result[i][j]` is boundary
/// `boundaries[i]`, sample `j`.
///
/// One full-LoRA pass keeps every block's output; boundary `b` then only runs blocks `b+1..L` without LoRA from
/// the state after block `b` ([`Llama::forward_from`]), since below that the two masks agree. Over all `L`
/// boundaries this costs about `L / 2 + 1` forward passes instead of `L`; over the top half of the blocks, about
/// `L / 8 + 1` instead of `L / 2`. `on_batch` hears the number of samples after each batch (progress).
pub fn answer_logprobs_sweep(
    model: &Llama,
    tokenizer: &Tokenizer,
    samples: &[&Sample],
    boundaries: &[usize],
    format: &PromptFormat,
    batch_size: usize,
    mut on_batch: impl FnMut(usize),
) -> Result<Vec<Vec<f64>>> {
    let _guard = lora_model::tch::no_grad_guard();
    let l = model.num_layers();
    if let Some(&b) = boundaries.iter().find(|&&b| b >= l) {
        return Err(ProbeError::InvalidArgument(format!("boundary {b} is past the last block ({l} blocks)")));
    }
    // Batches of similar lengths pad less: the samples go through in order of text length, and the results come
    // back in input order at the end.
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| samples.get(i).map_or(0, |s| s.prompt.len() + s.answer.len()));
    let sorted: Vec<&Sample> = order.iter().filter_map(|&i| samples.get(i).copied()).collect();
    let mut out = vec![Vec::with_capacity(samples.len()); boundaries.len()];
    let none = LayerMask::none();
    let all = LayerMask::all();
    for batch in forced_batches(model, tokenizer, &sorted, format, batch_size)? {
        if let Some(shared) = &batch.shared {
            sweep_shared(model, &batch, shared, boundaries, &mut out)?;
            on_batch(batch.answers.len());
            continue;
        }
        let opts = ForwardOptions { logits: Logits::Skip, hidden_states: true, ..ForwardOptions::new(&all) };
        let full = model.forward(&batch.input, Some(&batch.attention), &opts)?;
        for (&b, dst) in boundaries.iter().zip(out.iter_mut()) {
            let states = &full.hidden_states;
            let from = states
                .get(b + 1)
                .ok_or_else(|| ProbeError::InvalidArgument("model returned too few hidden states".into()))?;
            let last = if b + 1 == l {
                from.shallow_clone()
            } else {
                let opts = ForwardOptions { logits: Logits::Skip, hidden_states: true, ..ForwardOptions::new(&none) };
                let tail = model.forward_from(from, b + 1, Some(&batch.attention), &opts)?;
                tail.hidden_states
                    .last()
                    .map(Tensor::shallow_clone)
                    .ok_or_else(|| ProbeError::InvalidArgument("no state".into()))?
            };
            row_logprobs(model, &batch, batch.max_len, &last, dst)?;
        }
        on_batch(batch.answers.len());
    }
    for row in &mut out {
        let mut inputs = vec![0.0; row.len()];
        for (&i, &v) in order.iter().zip(row.iter()) {
            if let Some(slot) = inputs.get_mut(i) {
                *slot = v;
            }
        }
        *row = inputs;
    }
    Ok(out)
}

/// [`answer_logprobs_sweep`] for a batch whose prompts share a prefix: the prefix runs once (one row) and the rows'
/// remaining tokens after it, for the full-LoRA pass and again for each boundary's tail above it, so the shared
/// positions cost one row instead of one per sample. Equal to the padded batch up to summation order.
fn sweep_shared(
    model: &Llama,
    batch: &ForcedBatch,
    shared: &SharedForced,
    boundaries: &[usize],
    out: &mut [Vec<f64>],
) -> Result<()> {
    let l = model.num_layers();
    let (all, none) = (LayerMask::all(), LayerMask::none());
    let rows = batch.answers.len() as i64;
    let (p, cols) = (shared.prefix_len, shared.prefix_len + shared.len as i64);
    let states = ForwardOptions { logits: Logits::Skip, hidden_states: true, ..ForwardOptions::new(&all) };
    let clock = std::time::Instant::now();
    let mut prefix_cache = model.new_cache(1, p)?;
    let prefix = model.forward_cached(&shared.prefix, None, &mut prefix_cache, &states)?;
    let mut cache = lora_model::KvCache::from_prefix(&prefix_cache, rows, cols)?;
    let full = model.forward_cached(&shared.input, Some(&shared.attention), &mut cache, &states)?;
    let full_s = clock.elapsed().as_secs_f64();
    let (mut tails_s, mut heads_s) = (0.0, 0.0);
    let missing = || ProbeError::InvalidArgument("model returned too few hidden states".into());
    for (&b, dst) in boundaries.iter().zip(out.iter_mut()) {
        let from = full.hidden_states.get(b + 1).ok_or_else(missing)?;
        let clock = std::time::Instant::now();
        let last = if b + 1 == l {
            from.shallow_clone()
        } else {
            // The prefix's keys and values above b without LoRA, then the rows after it.
            let skip = ForwardOptions { logits: Logits::Skip, hidden_states: false, ..ForwardOptions::new(&none) };
            let mut tail_prefix = model.new_cache(1, p)?;
            let h = prefix.hidden_states.get(b + 1).ok_or_else(missing)?;
            model.forward_from_cached(h, b + 1, None, &mut tail_prefix, &skip)?;
            let mut tail_cache = lora_model::KvCache::from_prefix(&tail_prefix, rows, cols)?;
            let opts = ForwardOptions { hidden_states: true, ..skip };
            let tail = model.forward_from_cached(from, b + 1, Some(&shared.attention), &mut tail_cache, &opts)?;
            tail.hidden_states.last().map(Tensor::shallow_clone).ok_or_else(missing)?
        };
        let head = std::time::Instant::now();
        tails_s += (head - clock).as_secs_f64();
        row_logprobs(model, batch, shared.len, &last, dst)?;
        heads_s += head.elapsed().as_secs_f64();
    }
    tracing::debug!(
        rows,
        prefix = p,
        suffix = shared.len,
        answer_tokens = batch.answers.iter().map(Vec::len).sum::<usize>(),
        boundaries = boundaries.len(),
        full_s,
        tails_s,
        heads_s,
        "answer_logprobs_sweep batch"
    );
    Ok(())
}
