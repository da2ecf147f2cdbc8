//! The whole method in one call: load model + adapter → probe a validation set → detect and search the boundary
//! → evaluate base, full and pruned LoRA on a test set → export the pruned adapter and a report.
//!
//! Each step is also a public function, so a user can run any of them alone.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use lora_metrics::Metric;
use lora_model::{load_adapter, prune_adapter, AdapterInfo, LayerMask, Llama, Placement, PromptFormat, Tokenizer};
use lora_probe::{Probe, ProbeConfig, ProbeResult};
use lora_search::{detect, Curve, Detected, Detection, SearchReport};

use crate::error::{Error, Result};
use crate::loading::load_model;
use crate::plot::{BoundaryPlot, BoundaryPoint};
use crate::progress;
use crate::scoring::{score_masks, search_boundary, EvalSettings, SearchSetup};
use crate::settings::BoundaryRange;
use crate::tasks::{Sample, Task};
use lora_search::Strategy;

fn default_k() -> usize {
    4
}
fn default_max_new_tokens() -> usize {
    48
}
fn default_batch() -> usize {
    8
}
fn default_strategy() -> Strategy {
    Strategy::ProxyFirst
}

/// Configuration of a pipeline run (the TOML file of `lora-boundary run`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// HF model directory or `.gguf` file.
    pub model: PathBuf,
    /// PEFT adapter directory (the full-LoRA fine-tune).
    pub adapter: PathBuf,
    /// `e2e`, `hotpotqa`, `gsm8k`, `scitldr` or `jsonl`.
    pub task: Task,
    /// Validation data file (probe + search).
    pub validation: PathBuf,
    /// Test data file (evaluation).
    pub test: PathBuf,
    /// Validation samples used (first N).
    pub validation_samples: usize,
    /// Test samples used (first N).
    pub test_samples: usize,
    /// Skip this many samples at the start of the validation file (to keep it disjoint from the test part when
    /// both come from one file).
    #[serde(default)]
    pub validation_offset: usize,
    /// Skip this many samples at the start of the test file.
    #[serde(default)]
    pub test_offset: usize,
    /// Use the chat template.
    #[serde(default)]
    pub chat: bool,
    /// System message the chat template renders before every prompt (needs `chat = true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Text appended to every prompt (train, probe, search, evaluation), before any chat template: a base model
    /// with raw prompts wants a separator such as `"\n"` between the task's input and the answer it learns to
    /// write. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_suffix: Option<String>,
    /// Answer tokens probed.
    #[serde(default = "default_k")]
    pub k: usize,
    /// Metric for search and evaluation (default: the task's).
    #[serde(default, with = "crate::settings::as_string::option")]
    pub metric: Option<Metric>,
    /// Search strategy.
    #[serde(default = "default_strategy", with = "crate::settings::as_string")]
    pub strategy: Strategy,
    /// Candidate boundaries `LO-HI` for the search (default: every block).
    #[serde(default, with = "crate::settings::as_string::option")]
    pub range: Option<BoundaryRange>,
    /// Score candidates by the teacher-forced log-probability proxy instead of generation.
    #[serde(default)]
    pub proxy_only: bool,
    /// New tokens per generated answer.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Batch size for probe, generation and scoring.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Seed for bootstraps and search.
    #[serde(default)]
    pub seed: u64,
    /// Output directory for the report, plots and the pruned adapter.
    pub out: PathBuf,
    /// Shuffle every data file with this seed before taking offsets and counts (a fixed random split; every role
    /// reading the same file sees the same order, so disjoint ranges stay disjoint). Default: file order.
    #[serde(default)]
    pub shuffle_seed: Option<u64>,
    /// Test-set boundaries for the score-vs-boundary sweep (the paper's Fig. 4); empty = no sweep.
    #[serde(default)]
    pub sweep: Vec<usize>,
    /// Also probe with LoRA dropped from the bottom half and from the top half of the blocks (the paper's Fig. 2).
    #[serde(default = "default_true")]
    pub ablation: bool,
    /// Measure batch-1 decode speed (base, full, pruned, merged) over this many new tokens; 0 = skip.
    #[serde(default)]
    pub speed_tokens: usize,
    /// Train the adapter first when `adapter` holds none yet (the paper's "full LoRA first").
    #[serde(default)]
    pub train: Option<TrainSection>,
}

fn default_true() -> bool {
    true
}

/// The `[train]` table of a pipeline config: the full-LoRA fine-tune that produces `adapter`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Training data file (format of the pipeline's task).
    pub data: PathBuf,
    /// Skip this many samples at the start of the file.
    #[serde(default)]
    pub offset: usize,
    /// Use this many samples (0 = all after `offset`).
    #[serde(default)]
    pub samples: usize,
    /// LoRA rank.
    pub r: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// Peak learning rate.
    pub lr: f64,
    /// Passes over the data.
    #[serde(default = "default_one")]
    pub epochs: usize,
    /// Micro-batch size.
    #[serde(default = "default_train_batch")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "default_one")]
    pub grad_accum: usize,
    /// Maximum tokens per sample.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// Seed of initialisation and data order.
    #[serde(default)]
    pub seed: u64,
    /// Save the adapter in bf16.
    #[serde(default = "default_true")]
    pub bf16: bool,
}

fn default_one() -> usize {
    1
}
fn default_train_batch() -> usize {
    4
}
fn default_max_len() -> usize {
    256
}

/// Decode speed of one setting (batch 1, greedy).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpeedResult {
    /// `base`, `full`, `pruned (0-b)` or `merged`.
    pub label: String,
    /// Decode tokens per second (median of 3).
    pub decode_tokens_per_s: f64,
    /// Relative to base, e.g. `-0.04` = 4 % slower.
    pub vs_base: f64,
}

/// One evaluated mask.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalResult {
    /// Label (`base`, `full`, `manual`, `search`, …).
    pub label: String,
    /// The mask.
    pub mask: String,
    /// Corpus scores of the task's metrics.
    pub scores: Vec<(String, f64)>,
    /// Paired-bootstrap 95% CI of the per-item primary-metric difference to full LoRA.
    pub ci_vs_full: Option<[f64; 2]>,
    /// Fraction of LoRA parameters kept.
    pub lora_params_kept: f64,
    /// Mean per-item score of the primary metric (what the CI is about).
    pub item_mean: f64,
    /// `b` when the mask is `keep_through(b)`.
    pub boundary: Option<usize>,
}

/// What the run's fine-tune did (when it trained the adapter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRun {
    /// Optimiser steps.
    pub steps: usize,
    /// Samples trained on.
    pub samples: usize,
    /// Samples dropped (no answer token left after truncation).
    pub dropped_samples: usize,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Wall time of the fine-tune, seconds.
    pub wall_s: f64,
    /// LoRA rank.
    pub r: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// Peak learning rate.
    pub lr: f64,
    /// Epochs.
    pub epochs: usize,
    /// Micro-batch size.
    pub batch_size: usize,
    /// Gradient accumulation steps.
    pub grad_accum: usize,
    /// Maximum tokens per sample.
    pub max_len: usize,
    /// Seed.
    pub seed: u64,
}

/// What a pipeline run found.
#[derive(Debug, Serialize, Deserialize)]
pub struct PipelineReport {
    /// The configuration that produced it.
    pub config: PipelineConfig,
    /// Decoder blocks.
    pub num_layers: usize,
    /// Probe result (full LoRA, base and the half-drop ablations).
    pub probe: lora_probe::ProbeResult,
    /// Curve-based detections on the full-LoRA curve.
    pub detections: Vec<Detected>,
    /// The manual boundary (steepest rise when clear, else threshold).
    pub manual_boundary: Option<usize>,
    /// The search report.
    pub search: SearchReport,
    /// Test-set results.
    pub evaluation: Vec<EvalResult>,
    /// The test-set score-vs-boundary sweep (empty without `sweep`).
    pub sweep: Vec<EvalResult>,
    /// Decode speeds (empty without `speed_tokens`).
    pub speed: Vec<SpeedResult>,
    /// Training summary when the run trained the adapter.
    pub trained: Option<TrainingRun>,
    /// The exported pruned adapter.
    pub pruned_adapter: PathBuf,
    /// Wall time per step, seconds.
    pub timings: Vec<(String, f64)>,
}

/// Probes `samples` under each mask with the config's `k`, prompt format, batch size and seed (the paper's Fig. 1 inputs).
pub fn probe_curves(
    model: &Llama,
    tokenizer: &Tokenizer,
    samples: &[Sample],
    masks: &[LayerMask],
    cfg: &PipelineConfig,
) -> Result<ProbeResult> {
    let probe_samples: Vec<lora_probe::Sample> = samples.to_vec();
    let probe_cfg = ProbeConfig {
        k: cfg.k,
        prompt_format: cfg.prompt_format()?,
        batch_size: cfg.batch_size,
        seed: cfg.seed,
        ..Default::default()
    };
    Probe::new(probe_cfg).run(model, tokenizer, &probe_samples, masks).map_err(Error::from)
}

/// The curve rules applied to one probe curve (`gt_prob` with its CI).
pub fn detect_boundaries(curve: &lora_probe::MaskCurve) -> Result<Vec<Detected>> {
    let c = Curve::with_ci(curve.gt_prob.clone(), curve.gt_prob_ci_low.clone(), curve.gt_prob_ci_high.clone())
        .map_err(Error::from)?;
    [Detection::SteepestRise { half_window: 1 }, Detection::Threshold { tau: 0.5 }, Detection::Knee]
        .into_iter()
        .map(|d| detect(&c, d).map_err(Error::from))
        .collect()
}

/// Evaluates masks on test samples; the first mask (full LoRA in the pipeline) is the reference of the CIs.
pub fn evaluate(
    model: &Llama,
    tokenizer: &Tokenizer,
    info: &AdapterInfo,
    samples: &[Sample],
    masks: &[(String, LayerMask)],
    metrics: &[Metric],
    cfg: &PipelineConfig,
) -> Result<Vec<EvalResult>> {
    let settings = EvalSettings {
        max_new_tokens: cfg.max_new_tokens,
        prompt_format: cfg.prompt_format()?,
        batch_size: cfg.batch_size,
        seed: cfg.seed,
    };
    let plain: Vec<LayerMask> = masks.iter().map(|(_, m)| m.clone()).collect();
    let scored = score_masks(model, tokenizer, samples, &plain, metrics, settings)?;
    Ok(masks
        .iter()
        .zip(scored)
        .map(|((label, mask), s)| EvalResult {
            label: label.clone(),
            mask: mask.to_string(),
            item_mean: s.item_mean(),
            scores: s.corpus,
            ci_vs_full: s.ci_vs_first,
            lora_params_kept: info.kept_fraction(mask),
            boundary: if *mask == LayerMask::all() {
                Some(model.num_layers().saturating_sub(1))
            } else {
                (0..model.num_layers()).find(|&b| *mask == LayerMask::keep_through(b))
            },
        })
        .collect())
}

/// A file's samples, in a seeded random order when `shuffle_seed` is set (the same order for every role that reads
/// the file, so disjoint offset ranges stay disjoint).
/// `suffix` is appended to every prompt (the config's `prompt_suffix`).
fn load_ordered(task: Task, path: &Path, shuffle_seed: Option<u64>, suffix: Option<&str>) -> Result<Vec<Sample>> {
    let mut all = task.load(path)?;
    if let Some(suffix) = suffix {
        all.iter_mut().for_each(|s| s.prompt.push_str(suffix));
    }
    match shuffle_seed {
        Some(seed) => Ok(crate::tasks::split(&all, &[all.len()], seed)?.into_iter().next().unwrap_or_default()),
        None => Ok(all),
    }
}

fn load_split(cfg: &PipelineConfig, path: &Path, offset: usize, n: usize) -> Result<Vec<Sample>> {
    let all = load_ordered(cfg.task, path, cfg.shuffle_seed, cfg.prompt_suffix.as_deref())?;
    let part: Vec<Sample> = all.into_iter().skip(offset).take(n).collect();
    if part.is_empty() {
        return Err(Error::Usage(format!("{}: no samples after skipping {offset}", path.display())));
    }
    Ok(part)
}

impl PipelineConfig {
    /// How prompts are rendered: the `chat` and `system` keys as one [`PromptFormat`]; `system` without
    /// `chat = true` is a usage error.
    pub fn prompt_format(&self) -> Result<PromptFormat> {
        PromptFormat::from_flags(self.chat, self.system.clone()).map_err(|_| {
            Error::Usage(
                "config key `system` needs `chat = true` (the system message goes through the chat template)".into(),
            )
        })
    }

    /// Checks the settings before any work: counts and budgets at least 1, rates finite and positive, `system`
    /// only with `chat`.
    pub fn validate(&self) -> Result<()> {
        self.prompt_format()?;
        let at_least_one = |key: &str, v: usize| {
            if v == 0 {
                Err(Error::Usage(format!("config key `{key}` must be at least 1 (got 0)")))
            } else {
                Ok(())
            }
        };
        at_least_one("k", self.k)?;
        at_least_one("batch_size", self.batch_size)?;
        at_least_one("max_new_tokens", self.max_new_tokens)?;
        at_least_one("validation_samples", self.validation_samples)?;
        at_least_one("test_samples", self.test_samples)?;
        if self.speed_tokens == 1 {
            return Err(Error::Usage(
                "config key `speed_tokens` must be 0 (no speed run) or at least 2 (the first new token comes from the \
                 prefill, so one token leaves no decode step to time)"
                    .into(),
            ));
        }
        if let Some(t) = &self.train {
            at_least_one("train.r", t.r)?;
            at_least_one("train.epochs", t.epochs)?;
            at_least_one("train.batch_size", t.batch_size)?;
            at_least_one("train.grad_accum", t.grad_accum)?;
            at_least_one("train.max_len", t.max_len)?;
            for (key, v) in [("train.alpha", t.alpha), ("train.lr", t.lr)] {
                if !(v.is_finite() && v > 0.0) {
                    return Err(Error::Usage(format!("config key `{key}` must be a finite number above 0 (got {v})")));
                }
            }
        }
        Ok(())
    }
}

/// Runs the whole pipeline and writes `report.json`, `report.md`, the figures of [`write_plots`] and `pruned-adapter/` into
/// `cfg.out`. `log` receives one line per step.
pub fn run_pipeline(cfg: &PipelineConfig, place: Placement, mut log: impl FnMut(&str)) -> Result<PipelineReport> {
    cfg.validate()?;
    let task = cfg.task;
    let metrics: Vec<Metric> = match cfg.metric {
        Some(m) => vec![m],
        None => {
            let mut v = vec![task.primary_metric()];
            v.extend(task.metrics().into_iter().filter(|m| *m != task.primary_metric()));
            v
        }
    };
    if cfg.out.exists() {
        let empty_dir = std::fs::read_dir(&cfg.out).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !empty_dir {
            return Err(Error::Usage(format!(
                "{}: exists and is not an empty directory (a previous run?); choose a new `out`",
                cfg.out.display()
            )));
        }
    }
    // The out directory is created only when the first artifact is ready (below): a run that fails early leaves
    // nothing behind.
    let mut timings = Vec::new();
    let t = std::time::Instant::now();
    let trained = match &cfg.train {
        Some(tr) if !cfg.adapter.join("adapter_config.json").exists() => {
            log(&format!("training the adapter into {} ...", cfg.adapter.display()));
            let summary = train_adapter(cfg, tr, task, place)?;
            log(&format!("trained {} steps (final loss {})", summary.steps, summary.final_loss));
            timings.push(("train".to_string(), t.elapsed().as_secs_f64()));
            Some(summary)
        }
        Some(_) => {
            log(&format!("{} exists: reusing it (delete it to retrain)", cfg.adapter.display()));
            None
        }
        None => None,
    };
    let t = std::time::Instant::now();
    let (mut model, tokenizer) = load_model(&cfg.model, place)?;
    let info = load_adapter(&mut model, &cfg.adapter)?;
    let l = model.num_layers();
    let val = load_split(cfg, &cfg.validation, cfg.validation_offset, cfg.validation_samples)?;
    let test = load_split(cfg, &cfg.test, cfg.test_offset, cfg.test_samples)?;
    timings.push(("load".to_string(), t.elapsed().as_secs_f64()));
    log(&format!("loaded {} ({l} blocks) + adapter ({} LoRA modules)", cfg.model.display(), info.modules.len()));

    let t = std::time::Instant::now();
    let mut probe_masks = vec![LayerMask::all(), LayerMask::none()];
    if cfg.ablation && l >= 2 {
        // The paper's Fig. 2: LoRA dropped from the bottom half (kept on the top half) and from the top half.
        probe_masks.push(LayerMask::from_layers(l / 2..l));
        probe_masks.push(LayerMask::keep_through(l / 2 - 1));
    }
    let _bar = progress::begin(&format!("probe ({} masks)", probe_masks.len()), None, "");
    let probe = probe_curves(&model, &tokenizer, &val, &probe_masks, cfg)?;
    drop(_bar);
    let full_curve = probe.curve("all").ok_or_else(|| Error::Usage("probe returned no `all` curve".into()))?;
    let detections = detect_boundaries(full_curve)?;
    let manual_boundary = detections.iter().find_map(|d| d.boundary);

    timings.push(("probe".to_string(), t.elapsed().as_secs_f64()));
    log(&format!(
        "probe on {} samples: manual boundary {}",
        val.len(),
        manual_boundary.map_or("none (no clear rise)".to_string(), |b| b.to_string())
    ));

    let t = std::time::Instant::now();
    let _bar = progress::begin("search", None, "samples scored");
    let setup = SearchSetup {
        strategy: cfg.strategy,
        proxy_stride: None,
        seed: cfg.seed,
        range: cfg.range,
        params_per_layer: Some(&info.params_per_layer),
        metric: (!cfg.proxy_only).then_some(metrics[0]),
        max_new_tokens: cfg.max_new_tokens,
        prompt_format: cfg.prompt_format()?,
        batch_size: cfg.batch_size,
    };
    let report = search_boundary(&model, &tokenizer, &val, &setup)?;
    drop(_bar);
    timings.push(("search".to_string(), t.elapsed().as_secs_f64()));
    log(&format!(
        "search ({}): boundary {} after {:.2} full validation evaluations",
        report.strategy, report.boundary, report.full_evaluations
    ));

    let t = std::time::Instant::now();
    // keep_through(L − 1) is full LoRA: use the same mask so it is generated once.
    let keep = |b: usize| if b + 1 >= l { LayerMask::all() } else { LayerMask::keep_through(b) };
    let mut masks = vec![("full".to_string(), LayerMask::all()), ("base".to_string(), LayerMask::none())];
    if let Some(b) = manual_boundary {
        masks.push((format!("manual (0-{b})"), keep(b)));
    }
    masks.push((format!("search (0-{})", report.boundary), keep(report.boundary)));
    let n_main = masks.len();
    for &b in &cfg.sweep {
        if b >= l {
            return Err(Error::Usage(format!("sweep boundary {b} is past the last block ({l} blocks)")));
        }
        masks.push((format!("sweep 0-{b}"), keep(b)));
    }
    let distinct = crate::scoring::distinct_masks(masks.iter().map(|(_, m)| m));
    let _bar = progress::begin("evaluate", Some((distinct * test.len()) as u64), "answers");
    let mut evaluation = evaluate(&model, &tokenizer, &info, &test, &masks, &metrics, cfg)?;
    drop(_bar);
    let sweep = evaluation.split_off(n_main);
    timings.push(("evaluate".to_string(), t.elapsed().as_secs_f64()));
    log(&format!("evaluated {distinct} distinct masks on {} test samples", test.len()));

    let speed = if cfg.speed_tokens > 0 {
        let t = std::time::Instant::now();
        let _bar = progress::begin("decode speed", None, "tokens");
        let first = test.first().ok_or_else(|| Error::Usage("no test sample for the speed run".into()))?;
        let prompt = tokenizer.encode_prompt(&first.prompt, &cfg.prompt_format()?)?;
        let v = decode_speeds(&mut model, &prompt, cfg.speed_tokens, report.boundary)?;
        timings.push(("speed".to_string(), t.elapsed().as_secs_f64()));
        log(&format!("decode speed measured over {} tokens", cfg.speed_tokens));
        v
    } else {
        Vec::new()
    };

    // Every artifact is written into a partial directory beside `out`, renamed into place when all are there:
    // `out` appears whole or not at all (an empty `out` made by the user is replaced).
    if cfg.out.is_dir() {
        std::fs::remove_dir(&cfg.out).map_err(|source| Error::Io { path: cfg.out.clone(), source })?;
    }
    let partial = lora_model::atomic::PartialDir::create(&cfg.out)?;
    let dir = partial.path().to_path_buf();
    let pruned = cfg.out.join("pruned-adapter");
    prune_adapter(&cfg.adapter, &LayerMask::keep_through(report.boundary), &dir.join("pruned-adapter"))?;
    let out = PipelineReport {
        config: cfg.clone(),
        num_layers: l,
        probe,
        detections,
        manual_boundary,
        search: report,
        evaluation,
        sweep,
        speed,
        trained,
        pruned_adapter: pruned,
        timings,
    };
    write_plots(&out, &dir)?;
    write_text(&dir.join("report.json"), &serde_json::to_string_pretty(&out)?)?;
    write_text(&dir.join("report.md"), &markdown_in(&out, &dir))?;
    partial.commit()?;
    Ok(out)
}

/// Trains the adapter the config names from its `[train]` table.
fn train_adapter(cfg: &PipelineConfig, t: &TrainSection, task: Task, place: Placement) -> Result<TrainingRun> {
    let all = load_ordered(task, &t.data, cfg.shuffle_seed, cfg.prompt_suffix.as_deref())?;
    let take = if t.samples == 0 { usize::MAX } else { t.samples };
    let samples: Vec<Sample> = all.into_iter().skip(t.offset).take(take).collect();
    if samples.is_empty() {
        return Err(Error::Usage(format!("{}: no training samples after skipping {}", t.data.display(), t.offset)));
    }
    let ft = lora_model::train::FineTune {
        r: t.r,
        alpha: t.alpha,
        dropout: 0.0,
        targets: lora_model::adapter::ModuleSelector::parse_targets("all-linear"),
        train: lora_model::TrainConfig {
            learning_rate: t.lr,
            epochs: t.epochs,
            batch_size: t.batch_size,
            grad_accum: t.grad_accum,
            max_len: t.max_len,
            seed: t.seed,
            chat: cfg.chat,
            system: cfg.system.clone(),
            save_bf16: t.bf16,
            ..Default::default()
        },
    };
    let started = std::time::Instant::now();
    let mut bar: Option<progress::Step> = None;
    let summary = lora_model::train::fine_tune(&cfg.model, place, &samples, &ft, &cfg.adapter, |p| {
        if bar.is_none() {
            bar = Some(progress::begin("train", Some(p.total_steps as u64), "steps"));
        }
        progress::advance(1);
    })?;
    drop(bar);
    Ok(TrainingRun {
        steps: summary.steps,
        samples: summary.samples,
        dropped_samples: summary.dropped_samples,
        final_loss: summary.final_loss,
        wall_s: started.elapsed().as_secs_f64(),
        r: t.r,
        alpha: t.alpha,
        lr: t.lr,
        epochs: t.epochs,
        batch_size: t.batch_size,
        grad_accum: t.grad_accum,
        max_len: t.max_len,
        seed: t.seed,
    })
}

/// Batch-1 greedy decode speed of base, full LoRA, LoRA pruned at `boundary` (unmerged) and merged full LoRA,
/// interleaved over three rounds (median). The model is left unmerged.
pub fn decode_speeds(model: &mut Llama, prompt: &[i64], tokens: usize, boundary: usize) -> Result<Vec<SpeedResult>> {
    if tokens < 2 {
        return Err(Error::Usage(format!(
            "a decode-speed run needs at least 2 new tokens (the first comes from the prefill), got {tokens}"
        )));
    }
    let cfg = lora_model::GenerationConfig { max_new_tokens: tokens, ..Default::default() };
    let settings: [(String, LayerMask, bool); 4] = [
        ("base".into(), LayerMask::none(), false),
        ("full".into(), LayerMask::all(), false),
        (format!("pruned (0-{boundary})"), LayerMask::keep_through(boundary), false),
        ("merged".into(), LayerMask::none(), true),
    ];
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); settings.len()];
    for _ in 0..3 {
        for ((_, mask, merged), out) in settings.iter().zip(runs.iter_mut()) {
            if *merged {
                lora_model::adapter::merge(model, &LayerMask::all())?;
            }
            let r = lora_model::generate(model, None, &[prompt.to_vec()], &cfg, mask);
            if *merged {
                lora_model::adapter::unmerge(model)?;
            }
            out.push(r?.1.decode_tokens_per_s);
            progress::advance(tokens as u64);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let speeds: Vec<f64> = runs.iter_mut().map(median).collect();
    Ok(settings
        .iter()
        .zip(&speeds)
        .map(|((label, _, _), &v)| SpeedResult {
            label: label.clone(),
            decode_tokens_per_s: v,
            vs_base: v / speeds[0] - 1.0,
        })
        .collect())
}

/// The curve rule behind the manual boundary, in words (`steepest rise`, `threshold τ = 0.5`, `knee`).
fn rule_name(method: &Detection) -> String {
    match method {
        Detection::SteepestRise { .. } => "steepest rise".into(),
        Detection::Threshold { tau } => format!("threshold τ = {tau}"),
        Detection::Knee => "knee".into(),
    }
}

/// The boundaries every plot marks, with their legend text: the searched one first, then the curve rule's (when
/// the curve had a clear rise); one mark naming both when they coincide.
pub fn boundary_marks(r: &PipelineReport) -> Vec<(String, usize)> {
    let b = r.search.boundary;
    let mut searched = format!("searched boundary b = {b} (LoRA on blocks 0–{b}; {})", r.search.strategy);
    let rule = r.manual_boundary.map(|m| {
        let name = r.detections.iter().find(|d| d.boundary == Some(m)).map(|d| rule_name(&d.method));
        (name.map_or_else(|| "curve rule".to_string(), |n| format!("curve rule ({n})")), m)
    });
    match rule {
        Some((name, m)) if m == b => {
            searched.push_str(&format!(" = {name}"));
            vec![(searched, b)]
        }
        Some((name, m)) => vec![(searched, b), (format!("{name} b = {m} (LoRA on blocks 0–{m})"), m)],
        None => vec![(searched, b)],
    }
}

/// Writes the report's figures into `dir`, each atomically: `probe.svg` (answer-token probability by layer),
/// `search.svg` (validation scores of the fully evaluated boundaries), `proxy.svg` (proxy-first's ranking) and
/// `sweep.svg` (test-set score vs boundary), as far as the report has the data. Returns the files written.
/// The pipeline and `lora-boundary plot` both draw through here.
pub fn write_plots(r: &PipelineReport, dir: &Path) -> Result<Vec<PathBuf>> {
    let metric = r.config.metric.unwrap_or_else(|| r.config.task.primary_metric());
    let name = metric.name();
    let l = r.num_layers;
    let marks = boundary_marks(r);
    let mut written = Vec::new();
    let probe = dir.join("probe.svg");
    r.probe.plot_svg_marked(&probe, &marks)?;
    written.push(probe);
    let ci_note = "bars: paired-bootstrap 95% CI vs full LoRA";
    let full_val = r.search.reference.score;
    let points: Vec<BoundaryPoint> = r
        .search
        .candidates
        .iter()
        .filter(|c| c.finalist)
        .map(|c| BoundaryPoint {
            boundary: c.boundary,
            value: c.score,
            band: Some([full_val + c.ci[0], full_val + c.ci[1]]),
        })
        .collect();
    if !points.is_empty() {
        let path = dir.join("search.svg");
        BoundaryPlot {
            title: format!(
                "Validation {name} of the searched boundaries ({}, {} samples)",
                r.config.strategy, r.search.n_samples
            ),
            y_label: format!("mean per-sample {name}"),
            series_label: format!("validation {name}, LoRA on blocks 0–b ({ci_note})"),
            num_layers: l,
            points,
            references: vec![(format!("full LoRA (all {l} blocks): {full_val:.3}"), full_val)],
            marks: marks.clone(),
        }
        .write(&path)?;
        written.push(path);
    }
    if !r.search.proxy_ranking.is_empty() {
        let path = dir.join("proxy.svg");
        BoundaryPlot {
            title: "Validation proxy (teacher-forced answer log-probability) by boundary".into(),
            y_label: "mean log P(answer)".into(),
            series_label: "proxy score, LoRA on blocks 0–b".into(),
            num_layers: l,
            points: r
                .search
                .proxy_ranking
                .iter()
                .map(|p| BoundaryPoint { boundary: p.boundary, value: p.score, band: None })
                .collect(),
            references: Vec::new(),
            marks: marks.clone(),
        }
        .write(&path)?;
        written.push(path);
    }
    if let Some(full) = r.evaluation.iter().find(|e| e.label == "full") {
        if !r.sweep.is_empty() {
            let mut refs = vec![(format!("full LoRA (all {l} blocks): {:.3}", full.item_mean), full.item_mean)];
            if let Some(base) = r.evaluation.iter().find(|e| e.label == "base") {
                refs.push((format!("base (no LoRA): {:.3}", base.item_mean), base.item_mean));
            }
            let points = r
                .sweep
                .iter()
                .filter_map(|e| {
                    let b = e.boundary?;
                    let band = e.ci_vs_full.map(|c| [full.item_mean + c[0], full.item_mean + c[1]]);
                    Some(BoundaryPoint { boundary: b, value: e.item_mean, band })
                })
                .collect();
            let path = dir.join("sweep.svg");
            BoundaryPlot {
                title: format!("Test {name} by boundary ({} test samples)", r.config.test_samples),
                y_label: format!("mean per-item {name}"),
                series_label: format!("test {name}, LoRA on blocks 0–b ({ci_note})"),
                num_layers: l,
                points,
                references: refs,
                marks,
            }
            .write(&path)?;
            written.push(path);
        }
    }
    Ok(written)
}

impl PipelineReport {
    /// Reads a saved `report.json` (or the `report.json` inside a run directory). A file that is not a report is
    /// [`Error::Report`] naming it.
    pub fn load(path: &Path) -> Result<PipelineReport> {
        let file = if path.is_dir() { path.join("report.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|source| Error::Io { path: file.clone(), source })?;
        serde_json::from_str(&text).map_err(|source| Error::Report { path: file, source })
    }

    /// The model's name for legends and tables: the file stem of the config's `model` path (the whole path when
    /// it has none).
    pub fn model_name(&self) -> String {
        let model = &self.config.model;
        model.file_stem().map_or_else(|| model.display().to_string(), |s| s.to_string_lossy().into_owned())
    }
}

pub(crate) fn write_text(path: &Path, text: &str) -> Result<()> {
    Ok(lora_model::atomic::write_file(path, text.as_bytes())?)
}

/// The report's Markdown summary: boundary, the full-vs-pruned table, the probe curve.
pub fn markdown(r: &PipelineReport) -> String {
    markdown_in(r, &r.config.out)
}

/// [`markdown`] for a report whose plots lie in `dir`.
fn markdown_in(r: &PipelineReport, dir: &Path) -> String {
    let mut s = String::new();
    s.push_str(&format!("# LoRA boundary report: {}\n\n", r.config.task));
    s.push_str(&format!(
        "- model `{}`, adapter `{}`, {} blocks\n- manual boundary (probe curve): {}\n- searched boundary ({}): **{}** ({:.2} full validation evaluations)\n\n",
        r.config.model.display(),
        r.config.adapter.display(),
        r.num_layers,
        r.manual_boundary.map_or("no clear rise".into(), |b| b.to_string()),
        r.config.strategy,
        r.search.boundary,
        r.search.full_evaluations
    ));
    let names: Vec<&str> =
        r.evaluation.first().map(|e| e.scores.iter().map(|s| s.0.as_str()).collect()).unwrap_or_default();
    s.push_str(&format!("| setting | mask | {} | 95% CI vs full | LoRA kept |\n", names.join(" | ")));
    s.push_str(&format!("|---|---|{}---|---|\n", "---|".repeat(names.len())));
    for e in &r.evaluation {
        let vals: Vec<String> = e.scores.iter().map(|(_, v)| format!("{v:.4}")).collect();
        let ci = e.ci_vs_full.map_or("—".to_string(), |c| format!("[{:+.4}, {:+.4}]", c[0], c[1]));
        s.push_str(&format!(
            "| {} | `{}` | {} | {} | {:.0}% |\n",
            e.label,
            e.mask,
            vals.join(" | "),
            ci,
            e.lora_params_kept * 100.0
        ));
    }
    if !r.sweep.is_empty() {
        s.push_str("\n## Score vs boundary on the test set (the paper's Fig. 4)\n\n");
        s.push_str(&format!("| boundary | {} | mean per item | 95% CI vs full | LoRA kept |\n", names.join(" | ")));
        s.push_str(&format!("|---|{}---|---|---|\n", "---|".repeat(names.len())));
        for e in &r.sweep {
            let vals: Vec<String> = e.scores.iter().map(|(_, v)| format!("{v:.4}")).collect();
            let ci = e.ci_vs_full.map_or("—".to_string(), |c| format!("[{:+.4}, {:+.4}]", c[0], c[1]));
            s.push_str(&format!(
                "| {} | {} | {:.4} | {} | {:.0}% |\n",
                e.boundary.map_or(e.mask.clone(), |b| b.to_string()),
                vals.join(" | "),
                e.item_mean,
                ci,
                e.lora_params_kept * 100.0
            ));
        }
        s.push_str("\n![score vs boundary](sweep.svg)\n");
    }
    if !r.speed.is_empty() {
        s.push_str("\n## Decode speed (batch 1, greedy)\n\n| setting | tokens/s | vs base |\n|---|---|---|\n");
        for v in &r.speed {
            s.push_str(&format!("| {} | {:.1} | {:+.1} % |\n", v.label, v.decode_tokens_per_s, v.vs_base * 100.0));
        }
    }
    s.push_str("\n## Probe curves (answer-token probability by layer)\n\n![probe curves](probe.svg)\n");
    if dir.join("search.svg").exists() {
        s.push_str("\n![validation score vs boundary](search.svg)\n");
    }
    if dir.join("proxy.svg").exists() {
        s.push_str("\n![validation proxy vs boundary](proxy.svg)\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed config (SmolLM2's and Gemma 3's paper runs, the quickstart) parses and validates.
    #[test]
    fn committed_configs_parse_and_validate() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut seen = 0;
        for dir in ["configs", "configs/paper", "configs/paper/gemma3"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "toml") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    let cfg: PipelineConfig =
                        toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    cfg.validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    seen += 1;
                }
            }
        }
        assert!(seen >= 7, "expected the four SmolLM2 and three Gemma 3 paper configs, found {seen}");
    }

    #[test]
    fn prompt_suffix_is_appended_to_every_prompt() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.jsonl");
        std::fs::write(&f, "{\"prompt\": \"Q1\", \"answer\": \"A1\"}\n{\"prompt\": \"Q2\", \"answer\": \"A2\"}\n")
            .unwrap();
        let plain = load_ordered(Task::Jsonl, &f, None, None).unwrap();
        let suffixed = load_ordered(Task::Jsonl, &f, Some(1), Some("\n")).unwrap();
        assert_eq!(plain.iter().map(|s| s.prompt.as_str()).collect::<Vec<_>>(), ["Q1", "Q2"]);
        let mut got: Vec<(&str, &str)> = suffixed.iter().map(|s| (s.prompt.as_str(), s.answer.as_str())).collect();
        got.sort();
        assert_eq!(got, [("Q1\n", "A1"), ("Q2\n", "A2")], "suffix on the prompt, answers untouched");
    }
}
