//! Model-backed scorers for boundary search: generation + a task metric, and the cheap teacher-forced proxy
//! (mean log-probability of the ground-truth answer tokens).
use std::collections::HashMap;

use lora_metrics::Metric;
use lora_model::{generate_stream, GenerationConfig, LayerMask, Llama, PromptFormat, Tokenizer};
use lora_probe::scoring::AnswerSweep;
use lora_search::{BoundarySearch, Scorer, SearchError, SearchReport, Strategy};

use crate::error::{Error, Result};
use crate::tasks::Sample;

/// Generates answers for `samples` under `mask`: one continuously batched call over all of them
/// ([`lora_model::generate_stream`]: at most `batch_size` rows at a time, a finished row's place going to the next
/// sample), answers in sample order. The progress bar advances as each sample finishes.
pub fn generate_answers(
    model: &Llama,
    tokenizer: &Tokenizer,
    samples: &[&Sample],
    mask: &LayerMask,
    max_new_tokens: usize,
    format: &PromptFormat,
    batch_size: usize,
) -> Result<Vec<String>> {
    let cfg =
        GenerationConfig { max_new_tokens, eos_token_ids: tokenizer.eos_token_ids().to_vec(), ..Default::default() };
    let mut ids = Vec::with_capacity(samples.len());
    for (j, s) in samples.iter().enumerate() {
        let p = tokenizer.encode_prompt(&s.prompt, format)?;
        let what = format!("sample {j} (0-based, after --offset)");
        lora_model::generate::check_context(model, &what, p.len(), max_new_tokens)?;
        ids.push(p);
    }
    let (gens, _) = generate_stream(model, Some(tokenizer), &ids, &cfg, mask, batch_size.max(1), |_, _| {
        crate::progress::advance(1)
    })?;
    Ok(gens.into_iter().map(|g| g.text.trim().to_string()).collect())
}

/// Per-item metric scores of predictions against the samples' references.
pub fn item_scores(metric: Metric, predictions: &[String], samples: &[&Sample]) -> Result<Vec<f64>> {
    let refs: Vec<Vec<String>> = samples.iter().map(|s| s.references.clone()).collect();
    lora_metrics::item_scores(metric, predictions, &refs).map_err(Error::from)
}

/// Generation settings shared by evaluation runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalSettings {
    /// New tokens per answer.
    pub max_new_tokens: usize,
    /// How prompts are rendered (raw, or the chat template with an optional system message).
    pub prompt_format: PromptFormat,
    /// Generation batch size.
    pub batch_size: usize,
    /// Seed of the paired bootstrap.
    pub seed: u64,
}

/// One mask's evaluation: predictions, corpus scores, per-item scores of the first metric, and the paired-bootstrap
/// 95% CI of the per-item difference to the first mask.
#[derive(Debug, Clone)]
pub struct MaskScores {
    /// Generated answers.
    pub predictions: Vec<String>,
    /// Corpus score of each metric, by name.
    pub corpus: Vec<(String, f64)>,
    /// Per-item scores of the first metric.
    pub items: Vec<f64>,
    /// CI of `items − items of the first mask`; `None` for the first mask.
    pub ci_vs_first: Option<[f64; 2]>,
}

impl MaskScores {
    /// Mean per-item score of the first metric (what the CI is about).
    pub fn item_mean(&self) -> f64 {
        self.items.iter().sum::<f64>() / self.items.len().max(1) as f64
    }
}

/// How many generations [`score_masks`] runs for `masks`: one per distinct mask.
pub fn distinct_masks<'a>(masks: impl IntoIterator<Item = &'a LayerMask>) -> usize {
    let mut seen: Vec<&LayerMask> = Vec::new();
    for m in masks {
        if !seen.contains(&m) {
            seen.push(m);
        }
    }
    seen.len()
}

/// Generates under each mask (once per distinct mask) and scores with `metrics` (the first one per item too).
pub fn score_masks(
    model: &Llama,
    tokenizer: &Tokenizer,
    samples: &[Sample],
    masks: &[LayerMask],
    metrics: &[Metric],
    settings: EvalSettings,
) -> Result<Vec<MaskScores>> {
    let primary = *metrics.first().ok_or_else(|| Error::Usage("no metric to score with".into()))?;
    let refs: Vec<&Sample> = samples.iter().collect();
    let references: Vec<Vec<String>> = samples.iter().map(|s| s.references.clone()).collect();
    let mut out: Vec<MaskScores> = Vec::with_capacity(masks.len());
    for (i, mask) in masks.iter().enumerate() {
        let predictions = match masks[..i].iter().position(|m| m == mask) {
            Some(j) => out[j].predictions.clone(), // ok: j < i = out.len()
            None => generate_answers(
                model,
                tokenizer,
                &refs,
                mask,
                settings.max_new_tokens,
                &settings.prompt_format,
                settings.batch_size,
            )?,
        };
        let corpus = metrics
            .iter()
            .map(|m| {
                lora_metrics::corpus_score(*m, &predictions, &references)
                    .map(|s| (m.name().to_string(), s))
                    .map_err(Error::from)
            })
            .collect::<Result<_>>()?;
        let items = item_scores(primary, &predictions, &refs)?;
        let ci_vs_first = match out.first() {
            Some(first) => Some(
                lora_metrics::paired_bootstrap(&items, &first.items, 1000, settings.seed)
                    .map(|b| [b.ci_low, b.ci_high])
                    .map_err(Error::from)?,
            ),
            None => None,
        };
        out.push(MaskScores { predictions, corpus, items, ci_vs_first });
    }
    Ok(out)
}

pub use lora_probe::scoring::answer_logprobs;

/// [`lora_probe::scoring::answer_logprobs_sweep`], advancing the progress bar per batch.
pub fn answer_logprobs_sweep(
    model: &Llama,
    tokenizer: &Tokenizer,
    samples: &[&Sample],
    boundaries: &[usize],
    format: &PromptFormat,
    batch_size: usize,
) -> Result<Vec<Vec<f64>>> {
    Ok(lora_probe::scoring::answer_logprobs_sweep(model, tokenizer, samples, boundaries, format, batch_size, |n| {
        crate::progress::advance(n as u64)
    })?)
}

/// Scores keep-through(b) by generating and applying a task metric per sample.
pub struct GenerationScorer<'a> {
    /// The model with its adapter attached.
    pub model: &'a Llama,
    /// Its tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// Validation samples.
    pub samples: &'a [Sample],
    /// The metric.
    pub metric: Metric,
    /// New-token budget.
    pub max_new_tokens: usize,
    /// How prompts are rendered.
    pub prompt_format: PromptFormat,
    /// Generation batch size.
    pub batch_size: usize,
}

fn pick<'s>(
    samples: &'s [Sample],
    idx: &[usize],
    boundary: usize,
) -> std::result::Result<Vec<&'s Sample>, SearchError> {
    idx.iter()
        .map(|&i| {
            samples.get(i).ok_or_else(|| SearchError::Scorer {
                boundary,
                message: format!("sample {i} out of range ({} samples)", samples.len()),
            })
        })
        .collect()
}

impl Scorer for GenerationScorer<'_> {
    fn score(&mut self, boundary: usize, samples: &[usize]) -> std::result::Result<Vec<f64>, SearchError> {
        let chosen = pick(self.samples, samples, boundary)?;
        let wrap = |e: Error| SearchError::Scorer { boundary, message: e.to_string() };
        let preds = generate_answers(
            self.model,
            self.tokenizer,
            &chosen,
            &LayerMask::keep_through(boundary),
            self.max_new_tokens,
            &self.prompt_format,
            self.batch_size,
        )
        .map_err(wrap)?;
        item_scores(self.metric, &preds, &chosen).map_err(wrap)
    }
}

/// Scores keep-through(b) by the teacher-forced mean log-probability of the answer (cheap: no generation).
///
/// [`Scorer::prepare`] computes the boundaries it is given at once with [`answer_logprobs_sweep`] (one full-LoRA
/// pass, then the blocks above each boundary) and remembers the results; without it, the first request for a
/// sample computes every candidate boundary at once, so ranking all `L` candidates costs about `L / 2 + 1`
/// forward passes per sample rather than `L`, and a later request for a sample seen before computes that boundary
/// alone.
pub struct ProxyScorer<'a> {
    model: &'a Llama,
    tokenizer: &'a Tokenizer,
    samples: &'a [Sample],
    prompt_format: PromptFormat,
    batch_size: usize,
    candidates: Vec<usize>,
    cache: HashMap<(usize, usize), f64>,
    /// The sweep of the samples last asked for (their indices), with its full-LoRA pass kept.
    sweep: Option<(Vec<usize>, AnswerSweep<'a>)>,
}

impl<'a> ProxyScorer<'a> {
    /// A proxy over `samples` with prompts rendered in `prompt_format`, sweeping all boundaries `0..L` on first use
    /// of a sample.
    pub fn new(
        model: &'a Llama,
        tokenizer: &'a Tokenizer,
        samples: &'a [Sample],
        prompt_format: PromptFormat,
        batch_size: usize,
    ) -> Self {
        let candidates = (0..model.num_layers()).collect();
        ProxyScorer {
            model,
            tokenizer,
            samples,
            prompt_format,
            batch_size,
            candidates,
            cache: HashMap::new(),
            sweep: None,
        }
    }

    /// Sweep only `lo..=hi` (the search range); other boundaries are computed on request.
    pub fn with_range(mut self, lo: usize, hi: usize) -> Self {
        self.candidates = (lo..=hi.min(self.model.num_layers().saturating_sub(1))).collect();
        self
    }
}

impl ProxyScorer<'_> {
    /// Sweeps `boundaries` for `samples` (one full-LoRA pass for all of them, or the one kept from the previous
    /// call on the same samples: [`lora_probe::scoring::AnswerSweep`]) and remembers the results. `keep`: keep this
    /// call's full-LoRA pass for the next (a prepared round, which a search may follow with another).
    fn sweep(&mut self, boundaries: &[usize], samples: &[usize], keep: bool) -> std::result::Result<(), SearchError> {
        let first = boundaries.first().copied().unwrap_or(0);
        let wrap = |e: lora_probe::ProbeError| SearchError::Scorer { boundary: first, message: e.to_string() };
        if self.sweep.as_ref().is_none_or(|(of, _)| of != samples) {
            let chosen = pick(self.samples, samples, first)?;
            let sweep = AnswerSweep::new(self.model, self.tokenizer, &chosen, &self.prompt_format, self.batch_size)
                .map_err(wrap)?;
            // The previous samples' states go first.
            self.sweep = None;
            self.sweep = Some((samples.to_vec(), sweep));
        }
        let Some((_, sweep)) = self.sweep.as_mut() else {
            return Err(SearchError::Scorer { boundary: first, message: "no sweep".into() });
        };
        sweep.set_keep_states(keep);
        let scores = sweep.scores(boundaries, |n| crate::progress::advance(n as u64)).map_err(wrap)?;
        for (b, row) in boundaries.iter().zip(scores) {
            for (&i, v) in samples.iter().zip(row) {
                self.cache.insert((*b, i), v);
            }
        }
        Ok(())
    }
}

impl Scorer for ProxyScorer<'_> {
    fn score(&mut self, boundary: usize, samples: &[usize]) -> std::result::Result<Vec<f64>, SearchError> {
        let missing: Vec<usize> =
            samples.iter().copied().filter(|&i| !self.cache.contains_key(&(boundary, i))).collect();
        if !missing.is_empty() {
            // A sample seen before (a prepared sweep) gets this boundary alone; a new one every candidate.
            let fresh = |i: &usize| !self.cache.keys().any(|(_, s)| s == i);
            let sweep = if missing.iter().all(fresh) {
                let mut all = self.candidates.clone();
                if !all.contains(&boundary) {
                    all.push(boundary);
                }
                all
            } else {
                vec![boundary]
            };
            self.sweep(&sweep, &missing, false)?;
        }
        samples
            .iter()
            .map(|&i| {
                self.cache
                    .get(&(boundary, i))
                    .copied()
                    .ok_or_else(|| SearchError::Scorer { boundary, message: format!("no proxy score for sample {i}") })
            })
            .collect()
    }

    /// One sweep over every requested boundary not yet known for some of `samples`.
    fn prepare(&mut self, boundaries: &[usize], samples: &[usize]) -> std::result::Result<(), SearchError> {
        let open: Vec<usize> = boundaries
            .iter()
            .copied()
            .filter(|&b| samples.iter().any(|&i| !self.cache.contains_key(&(b, i))))
            .collect();
        if open.is_empty() {
            return Ok(());
        }
        self.sweep(&open, samples, true)
    }
}

/// How the validation-set boundary search runs (shared by the CLI's `search` and `lora-boundary run`).
pub(crate) struct SearchSetup<'a> {
    /// The search strategy.
    pub strategy: Strategy,
    /// [`Strategy::ProxyFirst`]'s proxy stride ([`BoundarySearch::proxy_stride`]; `None`: its default).
    pub proxy_stride: Option<usize>,
    pub seed: u64,
    /// Candidate boundaries (default: all blocks).
    pub range: Option<crate::settings::BoundaryRange>,
    /// LoRA parameters per block, for the "LoRA kept" figures and the cost model.
    pub params_per_layer: Option<&'a [u64]>,
    /// The metric that decides, or `None` to rank by the teacher-forced proxy alone.
    pub metric: Option<Metric>,
    pub max_new_tokens: usize,
    pub prompt_format: PromptFormat,
    pub batch_size: usize,
}

/// Searches the boundary on `samples`. With the proxy alone, `proxy-first` becomes exhaustive search over the
/// proxy (one shared sweep); with a metric, the tie tolerance ε (meant for 0–1 scores) is scaled to the metric's
/// range (BLEU and chrF score 0–100).
pub(crate) fn search_boundary(
    model: &Llama,
    tokenizer: &Tokenizer,
    samples: &[Sample],
    setup: &SearchSetup<'_>,
) -> Result<SearchReport> {
    let mut strategy = setup.strategy;
    if setup.metric.is_none() && strategy == Strategy::ProxyFirst {
        strategy = Strategy::Exhaustive;
    }
    let mut search = BoundarySearch::new(model.num_layers()).strategy(strategy).seed(setup.seed);
    if let Some(s) = setup.proxy_stride {
        search = search.proxy_stride(s);
    }
    let mut proxy = ProxyScorer::new(model, tokenizer, samples, setup.prompt_format.clone(), setup.batch_size);
    if let Some(r) = setup.range {
        let (lo, hi) = (r.lo, r.hi);
        search = search.range(lo, hi);
        proxy = proxy.with_range(lo, hi);
    }
    if let Some(p) = setup.params_per_layer {
        search = search.param_counts(p.iter().map(|&p| p as f64).collect());
    }
    let Some(metric) = setup.metric else {
        return search.run(&mut proxy, samples.len()).map_err(Error::from);
    };
    let search = search.epsilon(lora_search::DEFAULT_EPSILON * metric.max_score());
    let mut real = GenerationScorer {
        model,
        tokenizer,
        samples,
        metric,
        max_new_tokens: setup.max_new_tokens,
        prompt_format: setup.prompt_format.clone(),
        batch_size: setup.batch_size,
    };
    if strategy == Strategy::ProxyFirst {
        search.run_with_proxy(&mut proxy, &mut real, samples.len())
    } else {
        search.run(&mut real, samples.len())
    }
    .map_err(Error::from)
}
