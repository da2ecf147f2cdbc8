//! The whole method in one call: load model + adapter → probe a validation set → detect and search the boundary
//! → evaluate base, full and pruned LoRA on a test set → export the pruned adapter and a report.
//!
//! Each step is also a public function, so a user can run any of them alone.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use lora_metrics::Metric;
use lora_model::{load_adapter, prune_adapter, AdapterInfo, LayerMask, Llama, Placement, Tokenizer};
use lora_probe::{Probe, ProbeConfig, ProbeResult};
use lora_search::{detect, BoundarySearch, Curve, Detected, Detection, SearchReport, Strategy};

use crate::error::{Error, Result};
use crate::loading::load_model;
use crate::scoring::{score_masks, EvalSettings, GenerationScorer, ProxyScorer};
use crate::tasks::{Sample, Task};

fn default_k() -> usize {
    4
}
fn default_max_new_tokens() -> usize {
    48
}
fn default_batch() -> usize {
    8
}
fn default_strategy() -> String {
    "halving".into()
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
    pub task: String,
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
    /// Answer tokens probed.
    #[serde(default = "default_k")]
    pub k: usize,
    /// Metric for search and evaluation (default: the task's).
    #[serde(default)]
    pub metric: Option<String>,
    /// Search strategy.
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// Candidate boundaries `LO-HI` for the search (default: every block).
    #[serde(default)]
    pub range: Option<String>,
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
}

/// One evaluated mask.
#[derive(Debug, Clone, Serialize)]
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
}

/// What a pipeline run found.
#[derive(Debug, Serialize)]
pub struct PipelineReport {
    /// The configuration that produced it.
    pub config: PipelineConfig,
    /// Decoder blocks.
    pub num_layers: usize,
    /// Probe result (full LoRA and base).
    pub probe: serde_json::Value,
    /// Curve-based detections on the full-LoRA curve.
    pub detections: Vec<Detected>,
    /// The manual boundary (steepest rise when clear, else threshold).
    pub manual_boundary: Option<usize>,
    /// The search report.
    pub search: SearchReport,
    /// Test-set results.
    pub evaluation: Vec<EvalResult>,
    /// The exported pruned adapter.
    pub pruned_adapter: PathBuf,
    /// Wall time per step, seconds.
    pub timings: Vec<(String, f64)>,
}

/// Probes `samples` under each mask with the config's `k`, chat, batch size and seed (the paper's Fig. 1 inputs).
pub fn probe_curves(
    model: &Llama,
    tokenizer: &Tokenizer,
    samples: &[Sample],
    masks: &[LayerMask],
    cfg: &PipelineConfig,
) -> Result<ProbeResult> {
    let probe_samples: Vec<lora_probe::Sample> =
        samples.iter().map(|s| lora_probe::Sample { prompt: s.prompt.clone(), answer: s.answer.clone() }).collect();
    let probe_cfg =
        ProbeConfig { k: cfg.k, chat: cfg.chat, batch_size: cfg.batch_size, seed: cfg.seed, ..Default::default() };
    Probe::new(probe_cfg).run(model, tokenizer, &probe_samples, masks).map_err(|e| Error::Usage(format!("probe: {e}")))
}

/// The curve rules applied to one probe curve (`gt_prob` with its CI).
pub fn detect_boundaries(curve: &lora_probe::MaskCurve) -> Result<Vec<Detected>> {
    let c = Curve::with_ci(curve.gt_prob.clone(), curve.gt_prob_ci_low.clone(), curve.gt_prob_ci_high.clone())
        .map_err(|e| Error::Usage(e.to_string()))?;
    [Detection::SteepestRise { half_window: 1 }, Detection::Threshold { tau: 0.5 }, Detection::Knee]
        .into_iter()
        .map(|d| detect(&c, d).map_err(|e| Error::Usage(e.to_string())))
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
    let settings =
        EvalSettings { max_new_tokens: cfg.max_new_tokens, chat: cfg.chat, batch_size: cfg.batch_size, seed: cfg.seed };
    let plain: Vec<LayerMask> = masks.iter().map(|(_, m)| m.clone()).collect();
    let scored = score_masks(model, tokenizer, samples, &plain, metrics, settings)?;
    Ok(masks
        .iter()
        .zip(scored)
        .map(|((label, mask), s)| EvalResult {
            label: label.clone(),
            mask: mask.to_string(),
            scores: s.corpus,
            ci_vs_full: s.ci_vs_first,
            lora_params_kept: info.kept_fraction(mask),
        })
        .collect())
}

fn load_split(task: Task, path: &Path, offset: usize, n: usize) -> Result<Vec<Sample>> {
    let all = task.load(path)?;
    let part: Vec<Sample> = all.into_iter().skip(offset).take(n).collect();
    if part.is_empty() {
        return Err(Error::Usage(format!("{}: no samples after skipping {offset}", path.display())));
    }
    Ok(part)
}

/// Runs the whole pipeline and writes `report.json`, `report.md`, `probe.svg` and `pruned-adapter/` into
/// `cfg.out`. `log` receives one line per step.
pub fn run_pipeline(cfg: &PipelineConfig, place: Placement, mut log: impl FnMut(&str)) -> Result<PipelineReport> {
    let task: Task = cfg.task.parse()?;
    let metrics: Vec<Metric> = match &cfg.metric {
        Some(m) => vec![Metric::from_name(m).map_err(|e| Error::Usage(e.to_string()))?],
        None => {
            let mut v = vec![task.primary_metric()];
            v.extend(task.metrics().into_iter().filter(|m| *m != task.primary_metric()));
            v
        }
    };
    if cfg.out.join("report.json").exists() || cfg.out.join("pruned-adapter").exists() {
        return Err(Error::Usage(format!("{}: holds a previous run; choose a new --out", cfg.out.display())));
    }
    std::fs::create_dir_all(&cfg.out).map_err(|source| Error::Io { path: cfg.out.clone(), source })?;
    let mut timings = Vec::new();
    let t = std::time::Instant::now();
    let (mut model, tokenizer) = load_model(&cfg.model, place)?;
    let info = load_adapter(&mut model, &cfg.adapter)?;
    let l = model.num_layers();
    let val = load_split(task, &cfg.validation, cfg.validation_offset, cfg.validation_samples)?;
    let test = load_split(task, &cfg.test, cfg.test_offset, cfg.test_samples)?;
    timings.push(("load".to_string(), t.elapsed().as_secs_f64()));
    log(&format!("loaded {} ({l} blocks) + adapter ({} LoRA modules)", cfg.model.display(), info.modules.len()));

    let t = std::time::Instant::now();
    let probe = probe_curves(&model, &tokenizer, &val, &[LayerMask::all(), LayerMask::none()], cfg)?;
    let full_curve = probe.curve("all").ok_or_else(|| Error::Usage("probe returned no `all` curve".into()))?;
    let detections = detect_boundaries(full_curve)?;
    let manual_boundary = detections.iter().find_map(|d| d.boundary);
    probe.plot_svg(cfg.out.join("probe.svg")).map_err(|e| Error::Usage(format!("plot: {e}")))?;
    timings.push(("probe".to_string(), t.elapsed().as_secs_f64()));
    log(&format!(
        "probe on {} samples: manual boundary {}",
        val.len(),
        manual_boundary.map_or("none (no clear rise)".to_string(), |b| b.to_string())
    ));

    let t = std::time::Instant::now();
    let strategy: Strategy = cfg.strategy.parse().map_err(|e: lora_search::SearchError| Error::Usage(e.to_string()))?;
    let mut search = BoundarySearch::new(l)
        .strategy(strategy)
        .seed(cfg.seed)
        .param_counts(info.params_per_layer.iter().map(|&p| p as f64).collect());
    let mut proxy = ProxyScorer::new(&model, &tokenizer, &val, cfg.chat, cfg.batch_size);
    if let Some(r) = &cfg.range {
        let (lo, hi) = lora_search::parse_range(r).map_err(|e| Error::Usage(format!("range: {e}")))?;
        search = search.range(lo, hi);
        proxy = proxy.with_range(lo, hi);
    }
    let report = if cfg.proxy_only {
        search.run(&mut proxy, val.len())
    } else {
        let mut real = GenerationScorer {
            model: &model,
            tokenizer: &tokenizer,
            samples: &val,
            metric: metrics[0],
            max_new_tokens: cfg.max_new_tokens,
            chat: cfg.chat,
            batch_size: cfg.batch_size,
        };
        if strategy == Strategy::ProxyFirst {
            search.run_with_proxy(&mut proxy, &mut real, val.len())
        } else {
            search.run(&mut real, val.len())
        }
    }
    .map_err(|e| Error::Usage(format!("search: {e}")))?;
    timings.push(("search".to_string(), t.elapsed().as_secs_f64()));
    log(&format!(
        "search ({}): boundary {} after {:.2} full validation evaluations",
        cfg.strategy, report.boundary, report.full_evaluations
    ));

    let t = std::time::Instant::now();
    let mut masks = vec![("full".to_string(), LayerMask::all()), ("base".to_string(), LayerMask::none())];
    if let Some(b) = manual_boundary {
        masks.push((format!("manual (0-{b})"), LayerMask::keep_through(b)));
    }
    masks.push((format!("search (0-{})", report.boundary), LayerMask::keep_through(report.boundary)));
    let evaluation = evaluate(&model, &tokenizer, &info, &test, &masks, &metrics, cfg)?;
    timings.push(("evaluate".to_string(), t.elapsed().as_secs_f64()));
    log(&format!("evaluated {} masks on {} test samples", masks.len(), test.len()));

    let pruned = cfg.out.join("pruned-adapter");
    prune_adapter(&cfg.adapter, &LayerMask::keep_through(report.boundary), &pruned)?;
    let out = PipelineReport {
        config: cfg.clone(),
        num_layers: l,
        probe: probe.to_json(false).map_err(|e| Error::Usage(e.to_string()))?,
        detections,
        manual_boundary,
        search: report,
        evaluation,
        pruned_adapter: pruned,
        timings,
    };
    write_text(&cfg.out.join("report.json"), &serde_json::to_string_pretty(&out)?)?;
    write_text(&cfg.out.join("report.md"), &markdown(&out))?;
    Ok(out)
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|source| Error::Io { path: tmp.clone(), source })?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// The report's Markdown summary: boundary, the full-vs-pruned table, the probe curve.
pub fn markdown(r: &PipelineReport) -> String {
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
    s.push_str("\n![probe curves](probe.svg)\n");
    s
}
