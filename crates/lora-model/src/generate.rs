//! Batched generation with a KV cache: continuous batching ([`generate_stream`]: a finished row's place goes to
//! the next waiting prompt), left-padded prefills, greedy or seeded sampling (temperature, top-p), EOS and stop
//! strings.
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::mask::LayerMask;
use crate::model::{ForwardOptions, KvCache, Llama, Logits};
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
    /// Tokens at the start of every prompt that were prefilled once for all of them (0: the prompts share fewer
    /// than [`MIN_SHARED_PREFIX`], or there is one prompt).
    pub shared_prefix_tokens: usize,
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
/// All prompts start together: they are prefilled as one left-padded batch, then decoded together; a row that
/// finishes leaves the batch (see [`generate_stream`], which this is with `batch_size = prompts.len()`). The
/// result for each prompt equals generating it alone (greedy). `tokenizer` is needed for stop strings and for the
/// returned text.
pub fn generate(
    model: &Llama,
    tokenizer: Option<&Tokenizer>,
    prompts: &[Vec<i64>],
    config: &GenerationConfig,
    mask: &LayerMask,
) -> Result<(Vec<Generation>, GenerationTiming)> {
    generate_stream(model, tokenizer, prompts, config, mask, prompts.len().max(1), |_, _| {})
}

/// Generates continuations of `prompts` (token ids) under LoRA mask `mask` with **continuous batching**: at
/// most `batch_size` rows are decoded together, and when a row finishes (an EOS id, a stop string, or
/// `max_new_tokens`) the next waiting prompt takes its place in the KV cache. Results come back in input order;
/// `on_done(index, &generation)` is called as each prompt finishes (in the order they finish), e.g. for
/// progress.
///
/// How it runs:
/// - When two or more prompts share their first [`MIN_SHARED_PREFIX`] tokens or more (a chat template's system
///   prompt, a task instruction), that prefix is prefilled once; every later prefill starts from a copy of its keys
///   and values and computes only the prompts' remaining tokens ([`GenerationTiming::shared_prefix_tokens`] says
///   how many were shared).
/// - Prompts wait in input order. When a row is free and no prompt is prefilled ahead, the next waiting prompts (up
///   to `batch_size` of them) are prefilled together as one left-padded batch into a cache of their own and their
///   first tokens are chosen; they then take free rows one by one, each row's keys and values copied without the
///   padding into a free row of the shared cache ([`KvCache::install_row_parts`]). So prefills run as whole
///   batches rather than one or two prompts at a time, and at most one batch waits ahead. The shared cache is
///   *ragged*: each row holds its own number of positions, its next token is written at its own next column, and
///   it attends only to its own columns, so a new row never sees the keys of the row it replaces.
/// - Then one decode step runs for every live row together (the fused CPU step for up to
///   [`crate::kernels::MAX_ROWS`] rows, libtorch otherwise).
/// - Rows that finish free their place; once no prompt waits, finished rows are dropped from the cache
///   ([`KvCache::retain_rows`]) so the last steps compute only the rows still running.
///
/// Each row computes exactly what it would alone (per-row positions, per-row attention over its own keys), so
/// greedy outputs equal one-by-one generation; a sampled row's stream is seeded by its input index
/// (`seed`, `index`), whatever row of the cache it lands in, so sampling is reproducible per prompt and equal
/// for every `batch_size`. `batch_size` must be at least 1.
pub fn generate_stream<F>(
    model: &Llama,
    tokenizer: Option<&Tokenizer>,
    prompts: &[Vec<i64>],
    config: &GenerationConfig,
    mask: &LayerMask,
    batch_size: usize,
    mut on_done: F,
) -> Result<(Vec<Generation>, GenerationTiming)>
where
    F: FnMut(usize, &Generation),
{
    let _guard = tch::no_grad_guard();
    if prompts.is_empty() {
        return Ok((Vec::new(), GenerationTiming::default()));
    }
    if batch_size == 0 {
        return Err(ModelError::InvalidArgument("batch size must be at least 1".into()));
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
    let n = prompts.len();
    let rows = batch_size.min(n);
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    for (i, p) in prompts.iter().enumerate() {
        check_context(model, &format!("prompt {i} of the batch"), p.len(), config.max_new_tokens)?;
    }
    // A batch being decoded and, when more prompts wait than fit, the next one prefilled ahead.
    check_generation_memory(model, rows + rows.min(n - rows), max_len, config.max_new_tokens)?;
    let mut run = Run {
        model,
        tokenizer,
        prompts,
        config,
        opts: ForwardOptions { mask, hidden_states: false, logits: Logits::Last, train: false },
        pad: model.config().pad_token_id.or_else(|| config.eos_token_ids.first().copied()).unwrap_or(0),
        results: vec![None; n],
        prefix: None,
        prefill_s: 0.0,
        decode_s: 0.0,
        decoded: 0,
        steps: 0,
        prefills: 0,
        prefill_positions: 0,
    };
    let mut finish = |run: &mut Run<'_>, row: Row| -> Result<()> {
        let index = row.index;
        let g = run.finish(row)?;
        on_done(index, &g);
        if let Some(slot) = run.results.get_mut(index) {
            *slot = Some(g);
        }
        Ok(())
    };
    if config.max_new_tokens == 0 {
        for index in 0..n {
            finish(&mut run, Row::new(index, &config.sampling))?;
        }
    } else {
        run.share_prefix()?;
        let capacity = (max_len + config.max_new_tokens) as i64;
        let mut cache = model.new_cache(rows as i64, capacity)?;
        // `slots[r]`: the prompt in row `r` of the cache (`None`: free).
        let mut slots: Vec<Option<Row>> = (0..rows).map(|_| None).collect();
        let mut waiting: std::collections::VecDeque<usize> = (0..n).collect();
        // Prompts prefilled ahead of a free row, in input order.
        let mut ready: std::collections::VecDeque<Ready> = std::collections::VecDeque::new();
        let mut scope: Option<crate::kernels::DecodeScope> = None;
        let use_kernels_scope = model.device_map().all_cpu();
        loop {
            // Free rows take the prompts prefilled ahead; when none is left, the next waiting prompts (up to a
            // whole batch) are prefilled together first. Rows done at their first token never take a place.
            while let Some(slot) = slots.iter().position(Option::is_none) {
                let Some(Ready { row, cache: from, k, parts }) = ready.pop_front() else {
                    let take = rows.min(waiting.len());
                    if take == 0 {
                        break;
                    }
                    let group: Vec<usize> = waiting.drain(..take).collect();
                    scope = None; // prefill runs on libtorch's own threads
                    let Prefilled { rows: entered, cache: group_cache, width, prefix } = run.prefill(&group)?;
                    let group_cache = std::rc::Rc::new(group_cache);
                    for (k, (row, done)) in entered.into_iter().enumerate() {
                        if done {
                            finish(&mut run, row)?;
                            continue;
                        }
                        let len = prompts.get(row.index).map_or(0, Vec::len) as i64;
                        let parts = if prefix > 0 {
                            vec![(0, prefix), (width - (len - prefix), len - prefix)]
                        } else {
                            vec![(width - len, len)]
                        };
                        ready.push_back(Ready { row, cache: std::rc::Rc::clone(&group_cache), k, parts });
                    }
                    continue;
                };
                cache.install_row_parts(slot, &from, k, &parts)?;
                if let Some(s) = slots.get_mut(slot) {
                    *s = Some(row);
                }
            }
            if slots.iter().all(Option::is_none) {
                break;
            }
            // Nothing waits: finished rows leave the cache.
            if slots.iter().any(Option::is_none) {
                let keep: Vec<usize> = slots.iter().enumerate().filter(|(_, s)| s.is_some()).map(|(r, _)| r).collect();
                cache.retain_rows(&keep)?;
                slots.retain(Option::is_some);
            }
            let live = slots.len();
            if use_kernels_scope && live as i64 <= crate::kernels::MAX_ROWS {
                if scope.is_none() {
                    scope = Some(crate::kernels::decode_scope());
                }
            } else {
                scope = None;
            }
            let t = Instant::now();
            let feed: Vec<i64> =
                slots.iter().map(|s| s.as_ref().and_then(|r| r.tokens.last().copied()).unwrap_or(run.pad)).collect();
            let input = Tensor::from_slice(&feed).f_view([live as i64, 1])?;
            let logits = model
                .forward_cached(&input, None, &mut cache, &run.opts)?
                .logits
                .ok_or_else(|| ModelError::InvalidArgument("a decode step returned no logits".into()))?;
            let mut live_rows: Vec<&mut Row> = slots.iter_mut().flatten().collect();
            let next = run.choose(&logits, &mut live_rows)?;
            let mut done = vec![false; live];
            for ((row, &tok), d) in live_rows.into_iter().zip(&next).zip(done.iter_mut()) {
                *d = run.push(row, tok)?;
                if !config.eos_token_ids.contains(&tok) {
                    run.decoded += 1;
                }
            }
            run.decode_s += t.elapsed().as_secs_f64();
            run.steps += 1;
            for (slot, d) in slots.iter_mut().zip(done) {
                if d {
                    if let Some(row) = slot.take() {
                        finish(&mut run, row)?;
                    }
                }
            }
        }
        drop(scope);
    }
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let timing = GenerationTiming {
        prefill_tokens_per_s: prompt_tokens as f64 / run.prefill_s.max(1e-9),
        decode_tokens_per_s: run.decoded as f64 / run.decode_s.max(1e-9),
        prefill_s: run.prefill_s,
        decode_s: run.decode_s,
        shared_prefix_tokens: run.prefix.as_ref().map_or(0, |p| p.len),
    };
    tracing::debug!(
        prompts = n,
        prompt_tokens,
        prefills = run.prefills,
        prefill_positions = run.prefill_positions,
        prefill_s = run.prefill_s,
        decode_steps = run.steps,
        decoded = run.decoded,
        decode_s = run.decode_s,
        "generate_stream"
    );
    let mut results = Vec::with_capacity(n);
    for (i, r) in run.results.into_iter().enumerate() {
        // ok: every prompt is finished before the loop above ends; a missing one is a bug reported as an error.
        results.push(r.ok_or_else(|| ModelError::InvalidArgument(format!("prompt {i} was never finished")))?);
    }
    Ok((results, timing))
}

/// One prompt being generated.
struct Row {
    /// Its index in the input.
    index: usize,
    /// New tokens so far (an ending EOS included).
    tokens: Vec<i64>,
    /// The text cut at a stop string, once one appeared.
    text: Option<String>,
    /// Its sampler: stream `index` of the seed.
    rng: Option<Rng>,
}

impl Row {
    fn new(index: usize, sampling: &Sampling) -> Self {
        let rng = match *sampling {
            Sampling::Sample { seed, .. } => Some(Rng::derived(seed, index as u64)),
            Sampling::Greedy => None,
        };
        Row { index, tokens: Vec::new(), text: None, rng }
    }
}

/// Prompts just prefilled together.
struct Prefilled {
    /// Per prompt, its row (first token chosen) and whether it is already done.
    rows: Vec<(Row, bool)>,
    /// Their cache: one row per prompt, `width` columns: the shared prefix (`prefix` columns, none without one),
    /// then each prompt's remaining tokens left-padded to the longest.
    cache: KvCache,
    /// Columns of `cache` in use.
    width: i64,
    /// Columns of the shared prefix at the start of every row (0: none).
    prefix: i64,
}

/// A prompt prefilled and waiting for a free row of the shared cache.
struct Ready {
    row: Row,
    /// The cache of the prefill it was part of, and its row there.
    cache: std::rc::Rc<KvCache>,
    k: usize,
    /// Its columns there: `(start, n)` ranges without padding.
    parts: Vec<(i64, i64)>,
}

/// The fewest tokens all prompts of a [`generate_stream`] call must share at their start for that prefix to be
/// prefilled once and reused (below this, the extra one-row forward costs about what it saves).
pub const MIN_SHARED_PREFIX: usize = 8;

/// The tokens every prompt starts with, leaving each at least one more (0 for fewer than two prompts): what
/// [`generate_stream`] (and the search's teacher-forced proxy) prefill once when it reaches [`MIN_SHARED_PREFIX`].
///
/// ```
/// let p: [&[i64]; 2] = [&[1, 2, 3, 4], &[1, 2, 3]];
/// assert_eq!(lora_model::shared_prefix_len(p), 2);
/// ```
pub fn shared_prefix_len<'a>(prompts: impl IntoIterator<Item = &'a [i64]>) -> usize {
    let mut it = prompts.into_iter();
    let Some(first) = it.next() else { return 0 };
    let mut len = first.len().saturating_sub(1);
    let mut count = 1;
    for p in it {
        count += 1;
        len = len.min(p.len().saturating_sub(1));
        len = first.iter().zip(p).take(len).take_while(|(a, b)| a == b).count();
    }
    if count < 2 {
        0
    } else {
        len
    }
}

/// A prefix all prompts share, prefilled once.
struct SharedPrefix {
    /// Its tokens (each prompt has at least one more).
    len: usize,
    /// Its keys and values, one row.
    cache: KvCache,
}

/// The state of one [`generate_stream`] call shared by its steps.
struct Run<'a> {
    model: &'a Llama,
    tokenizer: Option<&'a Tokenizer>,
    prompts: &'a [Vec<i64>],
    config: &'a GenerationConfig,
    opts: ForwardOptions<'a>,
    /// The id fed to left padding.
    pad: i64,
    results: Vec<Option<Generation>>,
    /// The prompts' shared prefix, once prefilled (see [`MIN_SHARED_PREFIX`]).
    prefix: Option<SharedPrefix>,
    prefill_s: f64,
    decode_s: f64,
    /// Tokens chosen by decode steps (EOS excluded).
    decoded: usize,
    /// Decode steps run.
    steps: usize,
    /// Prefill calls run.
    prefills: usize,
    /// Positions the prefills computed, padding included.
    prefill_positions: usize,
}

impl Run<'_> {
    /// With two or more prompts whose common start is at least [`MIN_SHARED_PREFIX`] tokens (leaving every prompt
    /// one more), prefills that prefix once, so that each prefill afterwards computes only the prompts' remaining
    /// tokens (as vLLM's prefix caching does for a shared system prompt or instruction).
    fn share_prefix(&mut self) -> Result<()> {
        let Some(first) = self.prompts.first() else { return Ok(()) };
        let len = shared_prefix_len(self.prompts.iter().map(Vec::as_slice));
        if len < MIN_SHARED_PREFIX {
            return Ok(());
        }
        let t0 = Instant::now();
        let ids = first.get(..len).unwrap_or(first);
        let mut cache = self.model.new_cache(1, len as i64)?;
        let opts = ForwardOptions { logits: Logits::Skip, ..self.opts };
        self.model.forward_cached(&Tensor::from_slice(ids).f_view([1, len as i64])?, None, &mut cache, &opts)?;
        self.prefills += 1;
        self.prefill_positions += len;
        self.prefill_s += t0.elapsed().as_secs_f64();
        self.prefix = Some(SharedPrefix { len, cache });
        Ok(())
    }

    /// Prefills the prompts `group` as one left-padded batch into a cache of their own (after the shared prefix,
    /// when there is one) and chooses their first tokens.
    fn prefill(&mut self, group: &[usize]) -> Result<Prefilled> {
        let t0 = Instant::now();
        let skip = self.prefix.as_ref().map_or(0, |p| p.len);
        let tail = |i: usize| self.prompts.get(i).and_then(|p| p.get(skip..)).unwrap_or(&[]);
        let width = group.iter().map(|&i| tail(i).len()).max().unwrap_or(0);
        let (mut ids, mut att) = (Vec::with_capacity(group.len() * width), Vec::with_capacity(group.len() * width));
        for &i in group {
            let p = tail(i);
            let n_pad = width - p.len();
            ids.extend(std::iter::repeat_n(self.pad, n_pad).chain(p.iter().copied()));
            att.extend(std::iter::repeat_n(0i64, n_pad).chain(std::iter::repeat_n(1i64, p.len())));
        }
        let (b, w, prefix) = (group.len() as i64, width as i64, skip as i64);
        self.prefills += 1;
        self.prefill_positions += group.len() * width;
        let input = Tensor::from_slice(&ids).f_view([b, w])?;
        let attention = Tensor::from_slice(&att).f_view([b, w])?;
        let mut cache = match &self.prefix {
            Some(p) => KvCache::from_prefix(&p.cache, b, prefix + w)?,
            None => self.model.new_cache(b, w)?,
        };
        let logits = self
            .model
            .forward_cached(&input, Some(&attention), &mut cache, &self.opts)?
            .logits
            .ok_or_else(|| ModelError::InvalidArgument("a prefill returned no logits".into()))?;
        let mut rows: Vec<Row> = group.iter().map(|&i| Row::new(i, &self.config.sampling)).collect();
        let mut refs: Vec<&mut Row> = rows.iter_mut().collect();
        let first = self.choose(&logits, &mut refs)?;
        let mut out = Vec::with_capacity(rows.len());
        for (mut row, tok) in rows.into_iter().zip(first) {
            let done = self.push(&mut row, tok)?;
            out.push((row, done));
        }
        self.prefill_s += t0.elapsed().as_secs_f64();
        Ok(Prefilled { rows: out, cache, width: prefix + w, prefix })
    }

    /// The next token of each row from its logits (`[rows, vocab]`, one row per entry of `rows`).
    fn choose(&self, logits: &Tensor, rows: &mut [&mut Row]) -> Result<Vec<i64>> {
        // A NaN or +inf logit (overflow in f16, a broken weight) would make the choice garbage silently.
        let non_finite = || {
            ModelError::Limit("the model produced non-finite logits (NaN or inf); try --dtype f32 or bf16".to_string())
        };
        let vocab = self.model.config().vocab_size;
        match self.config.sampling {
            Sampling::Greedy => {
                // SAFETY: aliasing: `logits` is the step's own output, held only by the caller, which neither writes
                // it nor hands out a view of it while this shared slice lives. Threads: the slice is read on this
                // thread only and dropped before `choose` returns.
                let host =
                    if on_host(logits, rows.len(), vocab) { unsafe { crate::kernels::borrow(logits) } } else { None };
                if let Some(crate::kernels::Mat::F32(all)) = host {
                    return all
                        .chunks_exact(vocab)
                        .map(|row| greedy(row).map(|i| i as i64).ok_or_else(non_finite))
                        .collect();
                }
                // arg-max picks a NaN or +inf if there is one, so checking the chosen logits (one per row, not the
                // whole vocabulary) catches every case, off the decode step's hot path.
                let idx = logits.f_argmax(-1, true)?;
                if !logits.f_gather(-1, &idx, false)?.f_sum(Kind::Double)?.f_double_value(&[])?.is_finite() {
                    return Err(non_finite());
                }
                Ok(Vec::<i64>::try_from(idx.f_view([-1])?.f_to_device(tch::Device::Cpu)?)?)
            }
            Sampling::Sample { temperature, top_p, .. } => {
                let host = logits.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?;
                let flat = Vec::<f32>::try_from(host.f_view([-1])?)?;
                if flat.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
                    return Err(non_finite());
                }
                let mut out = Vec::with_capacity(rows.len());
                for (values, row) in flat.chunks(vocab).zip(rows.iter_mut()) {
                    // ok: `Row::new` gives every row a sampler when sampling; a missing one is reported, not faked.
                    let rng = row.rng.as_mut().ok_or_else(|| {
                        ModelError::InvalidArgument(format!("prompt {}: no sampler for a sampled row", row.index))
                    })?;
                    out.push(sample_row(values, temperature, top_p, rng));
                }
                Ok(out)
            }
        }
    }

    /// Appends `tok` to `row`; whether the row is finished (EOS, a stop string, or `max_new_tokens`).
    fn push(&self, row: &mut Row, tok: i64) -> Result<bool> {
        row.tokens.push(tok);
        if self.config.eos_token_ids.contains(&tok) {
            return Ok(true);
        }
        if let (Some(tk), false) = (self.tokenizer, self.config.stop_strings.is_empty()) {
            let text = tk.decode(&row.tokens, true)?;
            if let Some(pos) = self.config.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min() {
                row.text = Some(text[..pos].to_string());
                return Ok(true);
            }
        }
        Ok(row.tokens.len() >= self.config.max_new_tokens)
    }

    /// The finished row's [`Generation`].
    fn finish(&self, row: Row) -> Result<Generation> {
        let text = match (row.text, self.tokenizer) {
            (Some(t), _) => t,
            (None, Some(tk)) => tk.decode(&row.tokens, true)?,
            (None, None) => String::new(),
        };
        Ok(Generation { token_ids: row.tokens, text })
    }
}

/// Whether `logits` are a contiguous f32 CPU tensor `[rows, vocab]` (what decode steps and prefills hand back on
/// the CPU), for [`greedy`] to read in place.
fn on_host(logits: &Tensor, rows: usize, vocab: usize) -> bool {
    vocab > 0
        && logits.device() == tch::Device::Cpu
        && logits.kind() == Kind::Float
        && logits.size() == [rows as i64, vocab as i64]
        && logits.is_contiguous()
        && !logits.requires_grad()
}

/// The index of the largest logit, the first one on ties (as `torch.argmax`), or `None` when a logit is NaN or
/// the largest is infinite (+inf, or a row of −inf: garbage either way). Two passes over the row: the maximum (sixteen lanes, which the
/// compiler vectorises) with a NaN flag, then its first position.
fn greedy(row: &[f32]) -> Option<usize> {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut nan = false;
    let chunks = row.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            nan |= v.is_nan();
            *m = if v > *m { v } else { *m };
        }
    }
    let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in tail {
        nan |= v.is_nan();
        max = if v > max { v } else { max };
    }
    // An all −inf row has no choice either (the libtorch path refuses it too: its chosen logit is not finite).
    if nan || max.is_infinite() {
        return None;
    }
    row.iter().position(|&v| v == max)
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
    fn greedy_matches_torch_argmax() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(3);
        for n in [1i64, 15, 16, 17, 49_152, 100_003] {
            let t = Tensor::randn([4, n], (Kind::Float, tch::Device::Cpu));
            // Ties: the row's first maximum is copied further on.
            t.narrow(1, n - 1, 1).copy_(&t.amax([1], true));
            let want = Vec::<i64>::try_from(t.argmax(-1, false)).unwrap();
            let host = Vec::<f32>::try_from(t.view([-1])).unwrap();
            for (r, w) in want.iter().enumerate() {
                let row = &host[r * n as usize..(r + 1) * n as usize];
                assert_eq!(greedy(row), Some(*w as usize), "n = {n}, row {r}");
            }
        }
        assert_eq!(greedy(&[1.0, f32::NAN, 0.0]), None, "NaN");
        assert_eq!(greedy(&[1.0, f32::INFINITY]), None, "+inf");
        assert_eq!(greedy(&[f32::NEG_INFINITY, -1.0]), Some(1));
        assert_eq!(greedy(&[f32::NEG_INFINITY; 3]), None, "all −inf");
    }

    #[test]
    fn rng_is_reproducible() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        for _ in 0..10 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }
}
