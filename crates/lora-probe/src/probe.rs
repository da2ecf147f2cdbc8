//! [`Probe`]: batched forward passes under each mask, the logit lens on the first `k` answer positions.
use std::fmt;
use std::str::FromStr;

use lora_model::{generate, ForwardOptions, GenerationConfig, LayerMask, Llama, Logits, PromptFormat, Tokenizer};
use ndarray::Array3;
use serde::{Deserialize, Serialize};

use crate::data::{memory_origin, tokenize_samples, Sample, TokenizedSample};
use crate::error::{ProbeError, Result};
use crate::lens::LogitLens;
use crate::result::{MaskCurve, PerSample, ProbeResult};

/// Which answer tokens are probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeMode {
    /// Teacher-forced: the reference answer tokens follow the prompt.
    #[default]
    Teacher,
    /// Free-running: the model's own greedy tokens (under the same mask) follow the prompt.
    Free,
}

impl fmt::Display for ProbeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProbeMode::Teacher => "teacher",
            ProbeMode::Free => "free",
        })
    }
}

impl FromStr for ProbeMode {
    type Err = ProbeError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "teacher" | "teacher-forced" => Ok(ProbeMode::Teacher),
            "free" | "free-running" => Ok(ProbeMode::Free),
            other => Err(ProbeError::InvalidArgument(format!("probe mode `{other}`: expected `teacher` or `free`"))),
        }
    }
}

/// Probe settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeConfig {
    /// How many answer positions are probed (the first `k`).
    pub k: usize,
    /// Teacher-forced or free-running.
    pub mode: ProbeMode,
    /// Samples per forward pass.
    pub batch_size: usize,
    /// How prompts are rendered (text samples only): raw, or the chat template with an optional system message.
    pub prompt_format: PromptFormat,
    /// Bootstrap resamples for the 95% confidence intervals (0 = no intervals: low = high = mean).
    pub bootstrap_resamples: usize,
    /// Seed of the bootstrap.
    pub seed: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            k: 4,
            mode: ProbeMode::Teacher,
            batch_size: 8,
            prompt_format: PromptFormat::Raw,
            bootstrap_resamples: 1000,
            seed: 0,
        }
    }
}

/// The per-layer logit-lens probe.
///
/// For every point `i = 0..=L` (the state after `i` blocks, `0` = embeddings) and each of the first `k` answer
/// positions it applies the final norm and the LM head (the last point is the model's real output distribution),
/// and records the ground-truth probability, the max probability, the ground-truth rank and the entropy. One
/// batched forward pass per mask per batch; no autograd.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    config: ProbeConfig,
}

impl Probe {
    /// A probe with the given settings.
    pub fn new(config: ProbeConfig) -> Self {
        Probe { config }
    }

    /// The settings.
    pub fn config(&self) -> &ProbeConfig {
        &self.config
    }

    /// Tokenizes text samples (see [`tokenize_samples`]) and probes them under each mask.
    pub fn run(
        &self,
        model: &Llama,
        tokenizer: &Tokenizer,
        samples: &[Sample],
        masks: &[LayerMask],
    ) -> Result<ProbeResult> {
        let require_answer = self.config.mode == ProbeMode::Teacher;
        let tokenized = tokenize_samples(tokenizer, samples, &self.config.prompt_format, require_answer, None)?;
        self.run_tokenized(model, &tokenized, masks)
    }

    /// Probes pre-tokenized samples under each mask (no tokenizer needed).
    ///
    /// Each mask's curve is labelled with the mask's display form; see [`Probe::run_labelled`] to choose labels.
    pub fn run_tokenized(
        &self,
        model: &Llama,
        samples: &[TokenizedSample],
        masks: &[LayerMask],
    ) -> Result<ProbeResult> {
        let labelled: Vec<(String, LayerMask)> = masks.iter().map(|m| (m.to_string(), m.clone())).collect();
        self.run_labelled(model, samples, &labelled)
    }

    /// Probes pre-tokenized samples under each `(label, mask)`.
    pub fn run_labelled(
        &self,
        model: &Llama,
        samples: &[TokenizedSample],
        masks: &[(String, LayerMask)],
    ) -> Result<ProbeResult> {
        let cfg = &self.config;
        if cfg.k == 0 {
            return Err(ProbeError::InvalidArgument("k must be at least 1".into()));
        }
        if cfg.batch_size == 0 {
            return Err(ProbeError::InvalidArgument("batch_size must be at least 1".into()));
        }
        if masks.is_empty() {
            return Err(ProbeError::InvalidArgument("no masks to probe".into()));
        }
        let longest = samples.iter().map(|s| s.prompt_ids.len() + s.answer_ids.len()).max().unwrap_or(0);
        lora_model::generate::check_generation_memory(model, cfg.batch_size.min(samples.len()), longest, 0)?;
        for (spec, m) in masks {
            m.validate(model.num_layers())
                .map_err(|e| ProbeError::Mask { spec: spec.clone(), message: e.to_string() })?;
        }
        if samples.is_empty() {
            return Err(ProbeError::InvalidArgument("no samples to probe".into()));
        }
        let vocab = model.config().vocab_size as i64;
        for (i, s) in samples.iter().enumerate() {
            let row_err = |message: String| ProbeError::Row { file: memory_origin(), row: i + 1, message };
            if s.prompt_ids.is_empty() {
                return Err(row_err("the prompt has no tokens".into()));
            }
            if cfg.mode == ProbeMode::Teacher && s.answer_ids.is_empty() {
                return Err(row_err("the answer is empty (teacher-forced probing needs one)".into()));
            }
            if let Some(bad) = s.prompt_ids.iter().chain(&s.answer_ids).find(|&&t| t < 0 || t >= vocab) {
                return Err(row_err(format!("token id {bad} outside the vocabulary (0..{vocab})")));
            }
            let ctx = model.config().max_position_embeddings;
            let (np, na) = (s.prompt_ids.len(), s.answer_ids.len());
            if np + na > ctx {
                return Err(row_err(format!(
                    "{np} prompt + {na} answer tokens = {}, past the model's context of {ctx} tokens",
                    np + na
                )));
            }
        }
        // The per-sample arrays hold `k` positions per point: no sample can have more than the context, and
        // a `k` past it would only size those arrays (samples × (L + 1) × k, four of them) past any use.
        let ctx = model.config().max_position_embeddings;
        if cfg.k > ctx {
            return Err(ProbeError::InvalidArgument(format!(
                "k = {} answer positions is past the model's context of {ctx} tokens",
                cfg.k
            )));
        }
        let num_layers = model.num_layers();
        // Four f32 arrays of samples × (L + 1) × k per mask, kept for every mask until the result is built.
        let per_mask = 16u128 * samples.len() as u128 * (num_layers as u128 + 1) * cfg.k as u128;
        let need = per_mask * masks.len() as u128;
        if let Some(free) = lora_model::generate::available_memory() {
            if need > u128::from(free) / 2 {
                return Err(ProbeError::InvalidArgument(format!(
                    "probing {} samples × {} points × k = {} positions under {} masks needs {:.1} GiB of per-position \
                     statistics; {:.1} GiB are available (lower --k or the number of samples)",
                    samples.len(),
                    num_layers + 1,
                    cfg.k,
                    masks.len(),
                    need as f64 / f64::from(1u32 << 30),
                    free as f64 / f64::from(1u32 << 30)
                )));
            }
        }
        for (label, mask) in masks {
            mask.validate(num_layers).map_err(|e| ProbeError::Mask { spec: label.clone(), message: e.to_string() })?;
        }
        let _guard = lora_model::tch::no_grad_guard();
        let lens = LogitLens::new(model);
        let mut curves = Vec::with_capacity(masks.len());
        for (label, mask) in masks {
            let per_sample = self.probe_mask(model, &lens, samples, mask)?;
            curves.push(MaskCurve::from_per_sample(label.clone(), per_sample, cfg.bootstrap_resamples, cfg.seed));
        }
        Ok(ProbeResult {
            num_layers,
            k: cfg.k,
            mode: cfg.mode,
            num_samples: samples.len(),
            bootstrap_resamples: cfg.bootstrap_resamples,
            seed: cfg.seed,
            curves,
            differences: Vec::new(),
        })
    }

    fn probe_mask(
        &self,
        model: &Llama,
        lens: &LogitLens<'_>,
        samples: &[TokenizedSample],
        mask: &LayerMask,
    ) -> Result<PerSample> {
        let k = self.config.k;
        let points = model.num_layers() + 1;
        let shape = (samples.len(), points, k);
        let mut out = PerSample {
            positions: vec![0; samples.len()],
            answer_ids: vec![Vec::new(); samples.len()],
            gt_prob: Array3::zeros(shape),
            max_prob: Array3::zeros(shape),
            gt_rank: Array3::zeros(shape),
            entropy: Array3::zeros(shape),
        };
        for (b, batch) in samples.chunks(self.config.batch_size).enumerate() {
            let first = b * self.config.batch_size;
            let targets: Vec<Vec<i64>> = match self.config.mode {
                ProbeMode::Teacher => batch.iter().map(|s| s.answer_ids.iter().take(k).copied().collect()).collect(),
                ProbeMode::Free => {
                    let prompts: Vec<Vec<i64>> = batch.iter().map(|s| s.prompt_ids.clone()).collect();
                    let gen = GenerationConfig { max_new_tokens: k, ..Default::default() };
                    let (generated, _) = generate(model, None, &prompts, &gen, mask)?;
                    generated.into_iter().map(|g| g.token_ids).collect()
                }
            };
            if let Some((i, _)) = targets.iter().enumerate().find(|(_, t)| t.is_empty()) {
                return Err(ProbeError::Row {
                    file: memory_origin(),
                    row: first + i + 1,
                    message: "no answer tokens to probe".into(),
                });
            }
            // Input: prompt + all but the last probed answer token (the last one is only ever a target).
            let inputs: Vec<Vec<i64>> = batch
                .iter()
                .zip(&targets)
                .map(|(s, t)| {
                    let mut ids = s.prompt_ids.clone();
                    ids.extend_from_slice(&t[..t.len() - 1]);
                    ids
                })
                .collect();
            let (input_ids, attention, t_max) = crate::scoring::left_padded(&inputs, 0, model.device())?;
            let (mut rows, mut cols, mut tgts) = (Vec::new(), Vec::new(), Vec::new());
            for (r, (input, (s, t))) in inputs.iter().zip(batch.iter().zip(&targets)).enumerate() {
                let pad = t_max - input.len();
                for (j, &tok) in t.iter().enumerate() {
                    rows.push(r as i64);
                    cols.push((pad + s.prompt_ids.len() - 1 + j) as i64);
                    tgts.push(tok);
                }
            }
            let fwd = model.forward(
                &input_ids,
                Some(&attention),
                &ForwardOptions { mask, hidden_states: true, logits: Logits::Skip, train: false },
            )?;
            let stats = lens.project(&fwd.hidden_states, &rows, &cols, &tgts)?;
            let mut n = 0;
            for (r, t) in targets.iter().enumerate() {
                let s = first + r;
                out.positions[s] = t.len();
                out.answer_ids[s] = t.clone();
                for j in 0..t.len() {
                    for p in 0..points {
                        let idx = stats.index(p, n + j);
                        out.gt_prob[[s, p, j]] = stats.gt_prob[idx];
                        out.max_prob[[s, p, j]] = stats.max_prob[idx];
                        out.gt_rank[[s, p, j]] = stats.gt_rank[idx];
                        out.entropy[[s, p, j]] = stats.entropy[idx];
                    }
                }
                n += t.len();
            }
        }
        Ok(out)
    }
}

/// Parses mask specifications, keeping each spec as its curve's label.
pub fn parse_masks(specs: &[String]) -> Result<Vec<(String, LayerMask)>> {
    specs
        .iter()
        .map(|s| {
            let m: LayerMask = s
                .parse()
                .map_err(|e: lora_model::ModelError| ProbeError::Mask { spec: s.clone(), message: e.to_string() })?;
            Ok((s.clone(), m))
        })
        .collect()
}
