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
            if p.is_empty() {
                // The first answer token is predicted from the position before it: there must be one.
                return Err(ProbeError::InvalidArgument(format!(
                    "sample with answer {:?} has a prompt of no tokens (its first answer token has nothing to be \
                     predicted from)",
                    s.answer
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

/// The position that predicts the first of `answer` tokens in a row of `max_len` that ends with them.
fn answer_start(max_len: usize, answer: usize) -> Result<i64> {
    max_len.checked_sub(answer + 1).and_then(|s| i64::try_from(s).ok()).ok_or_else(|| {
        ProbeError::InvalidArgument(format!("a row of {max_len} tokens has no room before its {answer} answer tokens"))
    })
}

/// Mean answer-token log-probability of each row of `batch`, read from the last hidden state `last` (pre-norm),
/// whose rows end with their answers at column `max_len` (the batch's, or its shared layout's).
fn row_logprobs(model: &Llama, batch: &ForcedBatch, max_len: usize, last: &Tensor, out: &mut Vec<f64>) -> Result<()> {
    let err = lora_model::ModelError::from;
    // On CPU: every row's predicting positions through the head at once, scored in two passes per row of logits.
    let mut states = Vec::with_capacity(batch.answers.len());
    for (r, a) in batch.answers.iter().enumerate() {
        let start = answer_start(max_len, a.len())?;
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
        let start = answer_start(max_len, a.len())?;
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
/// `L / 8 + 1` instead of `L / 2`. `on_batch` hears the number of samples after each batch (progress). To ask for
/// more boundaries of the same samples later without a second full-LoRA pass, use [`AnswerSweep`].
pub fn answer_logprobs_sweep(
    model: &Llama,
    tokenizer: &Tokenizer,
    samples: &[&Sample],
    boundaries: &[usize],
    format: &PromptFormat,
    batch_size: usize,
    on_batch: impl FnMut(usize),
) -> Result<Vec<Vec<f64>>> {
    AnswerSweep::new(model, tokenizer, samples, format, batch_size)?.scores(boundaries, on_batch)
}

/// Bytes of full-LoRA hidden states an [`AnswerSweep`] keeps between calls at most (past it, a batch's states are
/// dropped and computed again when asked for).
pub const SWEEP_KEEP_BYTES: usize = 1 << 30;

/// [`answer_logprobs_sweep`] over one set of samples, asked for boundaries several times (a search that scores some
/// boundaries, then others around what it saw): the samples are tokenized and batched once, and with
/// [`AnswerSweep::keep_states`] each batch's full-LoRA pass (every block's output) is kept for the next call, up to
/// [`SWEEP_KEEP_BYTES`], so a later call runs only the blocks above its boundaries.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use lora_probe::scoring::AnswerSweep;
/// use lora_probe::Sample;
/// let model = lora_model::Llama::load("models/SmolLM2-135M-Instruct.Q4_1.gguf", Default::default())?;
/// let tokenizer = lora_model::gguf_tokenizer_for(std::path::Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf"))?;
/// let samples = [Sample::new("2 + 2 =", " 4")];
/// let refs: Vec<&Sample> = samples.iter().collect();
/// let format = lora_model::PromptFormat::Raw;
/// let mut sweep = AnswerSweep::new(&model, &tokenizer, &refs, &format, 8)?.keep_states(true);
/// let first = sweep.scores(&[29, 26, 23], |_| {})?; // one full-LoRA pass, then the blocks above each
/// let more = sweep.scores(&[24, 25], |_| {})?; // the blocks above 24 and 25 only
/// assert_eq!((first.len(), more[0].len()), (3, 1));
/// # Ok(())
/// # }
/// ```
pub struct AnswerSweep<'m> {
    model: &'m Llama,
    /// Input index of each sample in the batches' order (by text length).
    order: Vec<usize>,
    batches: Vec<SweepBatch>,
    keep: bool,
    kept_bytes: usize,
}

/// One batch of an [`AnswerSweep`] and, when kept, its full-LoRA pass.
struct SweepBatch {
    batch: ForcedBatch,
    full: Option<FullPass>,
}

/// Every block's output under full LoRA for one batch: the shared prefix's (one row; empty without one) and the
/// rows' (after the prefix when there is one).
struct FullPass {
    prefix: Vec<Tensor>,
    rows: Vec<Tensor>,
}

impl FullPass {
    fn bytes(&self) -> usize {
        self.prefix.iter().chain(&self.rows).map(|t| t.numel() * t.kind().elt_size_in_bytes()).sum()
    }
}

impl<'m> AnswerSweep<'m> {
    /// Tokenizes and batches `samples` (`batch_size` a batch, in order of text length); no forward pass yet.
    pub fn new(
        model: &'m Llama,
        tokenizer: &Tokenizer,
        samples: &[&Sample],
        format: &PromptFormat,
        batch_size: usize,
    ) -> Result<Self> {
        // Batches of similar lengths pad less: the samples go through in order of text length, and the results
        // come back in input order.
        let mut order: Vec<usize> = (0..samples.len()).collect();
        order.sort_by_key(|&i| samples.get(i).map_or(0, |s| s.prompt.len() + s.answer.len()));
        let sorted: Vec<&Sample> = order.iter().filter_map(|&i| samples.get(i).copied()).collect();
        let batches = forced_batches(model, tokenizer, &sorted, format, batch_size)?
            .into_iter()
            .map(|batch| SweepBatch { batch, full: None })
            .collect();
        Ok(AnswerSweep { model, order, batches, keep: false, kept_bytes: 0 })
    }

    /// Whether each batch's full-LoRA pass is kept for later calls (within [`SWEEP_KEEP_BYTES`]; default no).
    pub fn keep_states(mut self, keep: bool) -> Self {
        self.set_keep_states(keep);
        self
    }

    /// [`AnswerSweep::keep_states`] on a sweep in use: from the next call on, its full-LoRA passes are kept (or,
    /// with `false`, used once more if kept and then dropped).
    pub fn set_keep_states(&mut self, keep: bool) {
        self.keep = keep;
    }

    /// [`answer_logprobs_sweep`]'s result for `boundaries`: `result[i][j]` is boundary `boundaries[i]`, sample `j`
    /// (input order). `on_batch` hears the number of samples after each batch.
    pub fn scores(&mut self, boundaries: &[usize], mut on_batch: impl FnMut(usize)) -> Result<Vec<Vec<f64>>> {
        let _guard = lora_model::tch::no_grad_guard();
        let model = self.model;
        let l = model.num_layers();
        if let Some(&b) = boundaries.iter().find(|&&b| b >= l) {
            return Err(ProbeError::InvalidArgument(format!("boundary {b} is past the last block ({l} blocks)")));
        }
        let mut out = vec![Vec::with_capacity(self.order.len()); boundaries.len()];
        for sb in &mut self.batches {
            let clock = std::time::Instant::now();
            let full = match sb.full.take() {
                Some(full) => {
                    self.kept_bytes -= full.bytes();
                    full
                }
                None => full_pass(model, &sb.batch)?,
            };
            let full_s = clock.elapsed().as_secs_f64();
            let (tails_s, heads_s) = tails(model, &sb.batch, &full, boundaries, &mut out)?;
            tracing::debug!(
                rows = sb.batch.answers.len(),
                prefix = sb.batch.shared.as_ref().map_or(0, |s| s.prefix_len),
                answer_tokens = sb.batch.answers.iter().map(Vec::len).sum::<usize>(),
                boundaries = boundaries.len(),
                full_s,
                tails_s,
                heads_s,
                "answer_logprobs_sweep batch"
            );
            let bytes = full.bytes();
            if self.keep && self.kept_bytes + bytes <= SWEEP_KEEP_BYTES {
                self.kept_bytes += bytes;
                sb.full = Some(full);
            }
            on_batch(sb.batch.answers.len());
        }
        for row in &mut out {
            let mut inputs = vec![0.0; row.len()];
            for (&i, &v) in self.order.iter().zip(row.iter()) {
                if let Some(slot) = inputs.get_mut(i) {
                    *slot = v;
                }
            }
            *row = inputs;
        }
        Ok(out)
    }
}

/// The full-LoRA pass of one batch with every block's output: with a shared prefix, the prefix once (one row,
/// cached) and the rows' remaining tokens after it; else the padded batch.
fn full_pass(model: &Llama, batch: &ForcedBatch) -> Result<FullPass> {
    let all = LayerMask::all();
    let states = ForwardOptions { logits: Logits::Skip, hidden_states: true, ..ForwardOptions::new(&all) };
    match &batch.shared {
        Some(shared) => {
            let rows = batch.answers.len() as i64;
            let (p, cols) = (shared.prefix_len, shared.prefix_len + shared.len as i64);
            let mut prefix_cache = model.new_cache(1, p)?;
            let prefix = model.forward_cached(&shared.prefix, None, &mut prefix_cache, &states)?;
            let mut cache = lora_model::KvCache::from_prefix(&prefix_cache, rows, cols)?;
            let full = model.forward_cached(&shared.input, Some(&shared.attention), &mut cache, &states)?;
            Ok(FullPass { prefix: prefix.hidden_states, rows: full.hidden_states })
        }
        None => {
            let full = model.forward(&batch.input, Some(&batch.attention), &states)?;
            Ok(FullPass { prefix: Vec::new(), rows: full.hidden_states })
        }
    }
}

/// Each boundary `b` of `boundaries` for one batch, from its full-LoRA pass: blocks `b+1..L` without LoRA (with a
/// shared prefix, the prefix's keys and values above `b` once, then the rows after it), then the answer's
/// log-probabilities, appended to `out[i]`. Returns the seconds spent in the blocks and in the LM head.
fn tails(
    model: &Llama,
    batch: &ForcedBatch,
    full: &FullPass,
    boundaries: &[usize],
    out: &mut [Vec<f64>],
) -> Result<(f64, f64)> {
    let l = model.num_layers();
    let none = LayerMask::none();
    let rows = batch.answers.len() as i64;
    // The columns of the rows' states: after the shared prefix when there is one.
    let width = batch.shared.as_ref().map_or(batch.max_len, |s| s.len);
    let skip = ForwardOptions { logits: Logits::Skip, hidden_states: false, ..ForwardOptions::new(&none) };
    let opts = ForwardOptions { hidden_states: true, ..skip };
    let (mut tails_s, mut heads_s) = (0.0, 0.0);
    let missing = || ProbeError::InvalidArgument("model returned too few hidden states".into());
    for (&b, dst) in boundaries.iter().zip(out.iter_mut()) {
        let from = full.rows.get(b + 1).ok_or_else(missing)?;
        let clock = std::time::Instant::now();
        let last = match &batch.shared {
            _ if b + 1 == l => from.shallow_clone(),
            Some(shared) => {
                // The prefix's keys and values above b without LoRA, then the rows after it.
                let (p, cols) = (shared.prefix_len, shared.prefix_len + shared.len as i64);
                let mut tail_prefix = model.new_cache(1, p)?;
                let h = full.prefix.get(b + 1).ok_or_else(missing)?;
                model.forward_from_cached(h, b + 1, None, &mut tail_prefix, &skip)?;
                let mut tail_cache = lora_model::KvCache::from_prefix(&tail_prefix, rows, cols)?;
                let tail = model.forward_from_cached(from, b + 1, Some(&shared.attention), &mut tail_cache, &opts)?;
                tail.hidden_states.last().map(Tensor::shallow_clone).ok_or_else(missing)?
            }
            None => {
                let tail = model.forward_from(from, b + 1, Some(&batch.attention), &opts)?;
                tail.hidden_states.last().map(Tensor::shallow_clone).ok_or_else(missing)?
            }
        };
        let head = std::time::Instant::now();
        tails_s += (head - clock).as_secs_f64();
        row_logprobs(model, batch, width, &last, dst)?;
        heads_s += head.elapsed().as_secs_f64();
    }
    Ok((tails_s, heads_s))
}
