//! The `probe` subcommand's work, for the facade's binary: parsed options in, serialisable result out.
use std::path::{Path, PathBuf};

use lora_model::{gguf_tokenizer_for, load_adapter, LayerMask, Llama, Placement, Tokenizer};

use crate::data::{read_jsonl, tokenize_samples};
use crate::error::{ProbeError, Result};
use crate::probe::{Probe, ProbeConfig, ProbeMode};
use crate::result::ProbeResult;

/// Options of `lora-boundary probe`.
///
/// `lora-boundary probe --model M [--adapter A] --data FILE.jsonl [--chat] [--k 4] [--mask SPEC]...
/// [--mode teacher|free] [--plot out.svg] [--diff A,B]... --format json`
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeOptions {
    /// HF model directory or `.gguf` file.
    pub model: PathBuf,
    /// PEFT adapter directory.
    pub adapter: Option<PathBuf>,
    /// Tokenizer directory (default: the model directory, or the `.gguf` file's embedded tokenizer).
    pub tokenizer: Option<PathBuf>,
    /// `{"prompt", "answer"}` JSONL file.
    pub data: PathBuf,
    /// Mask specifications ([`LayerMask`] syntax); empty = `all` and `none` with an adapter, `none` without.
    pub masks: Vec<String>,
    /// Pairs `(a, b)` of mask specifications whose difference curves `a − b` are added to the result.
    pub differences: Vec<(String, String)>,
    /// Probe settings (`k`, mode, batch size, chat, bootstrap).
    pub config: ProbeConfig,
    /// Where to write the SVG plot, if anywhere.
    pub plot: Option<PathBuf>,
    /// Where the model is placed.
    pub placement: Placement,
}

impl ProbeOptions {
    /// Options with defaults for everything but the model and the data.
    pub fn new(model: impl Into<PathBuf>, data: impl Into<PathBuf>) -> Self {
        ProbeOptions {
            model: model.into(),
            adapter: None,
            tokenizer: None,
            data: data.into(),
            masks: Vec::new(),
            differences: Vec::new(),
            config: ProbeConfig::default(),
            plot: None,
            placement: Placement::default(),
        }
    }
}

/// The tokenizer of `model` (an HF directory or a `.gguf` file), or the one in `dir` when given.
pub fn load_tokenizer(model: &Path, dir: Option<&Path>) -> Result<Tokenizer> {
    match dir {
        Some(d) => Ok(Tokenizer::from_dir(d)?),
        None if model.is_dir() => Ok(Tokenizer::from_dir(model)?),
        None => Ok(gguf_tokenizer_for(model)?),
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

/// Runs `lora-boundary probe`: loads the model (and adapter and tokenizer), reads and tokenizes the data, probes
/// every mask, adds the requested difference curves and writes the plot. The caller prints
/// [`ProbeResult::to_json`] (or [`ProbeResult::to_csv`]).
pub fn run_probe_command(opts: &ProbeOptions) -> Result<ProbeResult> {
    let specs: Vec<String> = if !opts.masks.is_empty() {
        opts.masks.clone()
    } else if opts.adapter.is_some() {
        vec!["all".into(), "none".into()]
    } else {
        vec!["none".into()]
    };
    let masks = parse_masks(&specs)?;
    let samples = read_jsonl(&opts.data)?;
    let tokenizer = load_tokenizer(&opts.model, opts.tokenizer.as_deref())?;
    let require_answer = opts.config.mode == ProbeMode::Teacher;
    let tokenized = tokenize_samples(&tokenizer, &samples, opts.config.chat, require_answer, Some(&opts.data))?;
    let mut model = Llama::load(&opts.model, opts.placement)?;
    if let Some(a) = &opts.adapter {
        load_adapter(&mut model, a)?;
    }
    let mut result = Probe::new(opts.config.clone()).run_labelled(&model, &tokenized, &masks).map_err(|e| match e {
        // Rows of in-memory samples are the data file's non-blank rows in order.
        ProbeError::Row { row, message, .. } => ProbeError::Row {
            file: opts.data.clone(),
            row,
            message: format!("{message} (row = n-th sample, blank lines not counted)"),
        },
        other => other,
    })?;
    for (a, b) in &opts.differences {
        result.add_difference(a, b)?;
    }
    if let Some(p) = &opts.plot {
        result.plot_svg(p)?;
    }
    Ok(result)
}
