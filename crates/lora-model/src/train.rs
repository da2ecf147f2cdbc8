//! LoRA fine-tuning (the paper's "full LoRA first"): fresh PEFT-initialised LoRA on every targeted projection,
//! trained on `{"prompt", "answer"}` data with the loss on answer tokens only, AdamW, warmup + decay, gradient
//! accumulation and clipping, PEFT-format checkpoints and exact resume.
//!
//! - Initialisation as PEFT's `reset_lora_parameters`: `lora_A` Kaiming-uniform with `a = √5` (bound
//!   `1/√in_features`), `lora_B` zero, from a seeded in-crate generator (libtorch's global generator is not used).
//! - Loss: HF's `ForCausalLMLoss` (shifted cross-entropy, `ignore_index = -100`). With gradient accumulation the
//!   summed loss of every micro-batch is divided by the label tokens of the *whole* optimizer step, as HF Trainer
//!   (≥ 4.46) does with `num_items_in_batch`, so accumulation equals one big batch.
//! - Optimizer: [`AdamW`] (torch semantics), [`lr_factor`] (HF schedules), [`clip_grad_norm`] (torch rule).
//! - Precision follows the model's [`crate::Placement`]: with an f32 model the LoRA tensors in the model are the
//!   trained parameters; with a bf16/f16 model (e.g. on CUDA) the model holds low-precision working copies while
//!   f32 master weights, gradients and optimizer state live here (mixed precision with f32 masters).
//! - Randomness: data order per epoch and LoRA dropout are derived from `seed`, the epoch and the step, so a run
//!   resumed from a checkpoint continues exactly as the uninterrupted run. With `lora_dropout > 0` each micro-batch
//!   reseeds libtorch's global generator (`tch::manual_seed`).
mod data;
mod optim;
mod setup;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

pub use data::{
    causal_lm_loss, causal_lm_loss_sum, encode_sample, read_jsonl, Batch, EncodedSample, Padding, TrainSample,
    IGNORE_INDEX,
};
pub use optim::{clip_grad_norm, lr_factor, AdamW, Schedule, MAX_STEPS};
pub use setup::{fine_tune, training_kind, FineTune};

use crate::adapter::{list_match, lora_scaling, targeted_modules, AdapterInfo, LoraConfig, ModuleSelector};
use crate::error::{ModelError, Result};
use crate::lora::LoraWeights;
use crate::mask::{LayerMask, Module};
use crate::model::{ForwardOptions, Llama, Logits};
use crate::tokenizer::{PromptFormat, Tokenizer};
use crate::weights::{save_safetensors, tmp_path, write_atomic, SafetensorsWeights, WeightSource};
use optim::Rng;

/// Prefix of PEFT's tensor names in `adapter_model.safetensors`.
const PEFT_PREFIX: &str = "base_model.model.";

/// Attaches fresh LoRA to every module `cfg` targets (replacing any adapter already attached) and returns what
/// was attached. `lora_A ~ U(−1/√in, 1/√in)` (PEFT's Kaiming-uniform with `a = √5`), `lora_B = 0`, drawn from a
/// generator seeded with `seed`; tensors are in the model's kind and device and do not require grad (a
/// [`Trainer`] switches that on).
pub fn init_lora(model: &mut Llama, cfg: &LoraConfig, seed: u64) -> Result<AdapterInfo> {
    let (info, _) = attach_fresh(model, cfg, seed)?;
    Ok(info)
}

/// [`init_lora`], also returning the f32 initial values `(block, module, A, B)`.
#[allow(clippy::type_complexity)]
fn attach_fresh(
    model: &mut Llama,
    cfg: &LoraConfig,
    seed: u64,
) -> Result<(AdapterInfo, Vec<(usize, Module, Tensor, Tensor)>)> {
    let _guard = tch::no_grad_guard();
    let origin = Path::new("LoRA config");
    cfg.check_supported(origin)?;
    if cfg.target_modules.is_none() {
        return Err(ModelError::Adapter {
            path: origin.to_path_buf(),
            message: "`target_modules` is required to attach fresh LoRA".into(),
        });
    }
    let n_layers = model.num_layers();
    // A listed target that names no projection (a typo such as `v_prj`) would silently train less than asked.
    if let Some(ModuleSelector::List(list)) = &cfg.target_modules {
        let paths: Vec<String> = (0..n_layers).flat_map(|l| Module::ALL.map(|m| m.hf_path(l))).collect();
        if let Some(t) = list.iter().find(|t| !paths.iter().any(|p| list_match(std::slice::from_ref(*t), p))) {
            return Err(ModelError::Adapter {
                path: origin.to_path_buf(),
                message: format!(
                    "target `{t}` names no projection of this model (targets are module names such as q_proj, \
                     v_proj, down_proj, or `all-linear`)"
                ),
            });
        }
    }
    let targets = targeted_modules(cfg, n_layers, origin)?;
    if targets.is_empty() {
        return Err(ModelError::Adapter {
            path: origin.to_path_buf(),
            message: "the config targets no module of this model".into(),
        });
    }
    for l in 0..n_layers {
        for m in Module::ALL {
            if let Some(p) = model.projection_mut(l, m) {
                p.unmerge()?;
                p.lora = None;
            }
        }
    }
    let kind = model.kind();
    let mut rng = Rng::new(seed);
    let mut modules = Vec::with_capacity(targets.len());
    let mut params_per_module = Vec::with_capacity(targets.len());
    let mut values = Vec::with_capacity(targets.len());
    for (l, m, r, alpha) in targets {
        if r == 0 {
            return Err(ModelError::Adapter {
                path: origin.to_path_buf(),
                message: format!("rank 0 for `{}`", m.hf_path(l)),
            });
        }
        let (out, inp) = model
            .config()
            .projection_shape(m.hf_name())
            .ok_or_else(|| ModelError::InvalidArgument(format!("unknown module {m:?}")))?;
        let device = model.device_map().block(l);
        let bound = 1.0 / (inp as f64).sqrt();
        let a_vals: Vec<f32> = (0..r * inp).map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32).collect();
        let a = Tensor::f_from_slice(&a_vals)?.f_view([r as i64, inp as i64])?.f_to_device(device)?;
        let b = Tensor::f_zeros([out as i64, r as i64], (Kind::Float, device))?;
        let scaling = lora_scaling(alpha, r, cfg.use_rslora);
        let lw = LoraWeights {
            a: a.f_to_kind(kind)?.f_contiguous()?,
            b: b.f_to_kind(kind)?.f_contiguous()?,
            scaling,
            dropout: cfg.lora_dropout,
            merged: false,
        };
        let proj = model
            .projection_mut(l, m)
            .ok_or_else(|| ModelError::InvalidArgument(format!("block {l} has no {}", m.hf_name())))?;
        proj.attach(lw, &m.hf_path(l))?;
        params_per_module.push((r * inp + out * r) as u64);
        modules.push((l, m, r, scaling));
        values.push((l, m, a, b));
    }
    let info = AdapterInfo::new(PathBuf::new(), cfg.clone(), n_layers, modules, params_per_module);
    Ok((info, values))
}

/// Training hyper-parameters. Every field has a default (shown), so a JSON file may set only some.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Peak learning rate. Default `2e-4`.
    pub learning_rate: f64,
    /// Passes over the data. Default 1.
    pub epochs: usize,
    /// Samples per micro-batch. Default 4.
    pub batch_size: usize,
    /// Micro-batches per optimizer step. Default 1.
    pub grad_accum: usize,
    /// Warmup as a fraction of all optimizer steps, rounded up (HF `warmup_ratio`). Default 0.03.
    pub warmup_ratio: f64,
    /// Warmup steps; overrides `warmup_ratio` when set. Default none.
    pub warmup_steps: Option<usize>,
    /// Decay after warmup. Default linear.
    pub schedule: Schedule,
    /// AdamW decoupled weight decay. Default 0.
    pub weight_decay: f64,
    /// AdamW β₁. Default 0.9.
    pub adam_beta1: f64,
    /// AdamW β₂. Default 0.999.
    pub adam_beta2: f64,
    /// AdamW ε. Default 1e-8.
    pub adam_eps: f64,
    /// Global gradient-norm clipping; `0` disables it. Default 1.0.
    pub max_grad_norm: f64,
    /// Seed of LoRA initialisation, data order and dropout. Default 0.
    pub seed: u64,
    /// Maximum tokens per sample (right truncation, see [`EncodedSample::new`]); 0 = no limit. Default 512.
    pub max_len: usize,
    /// Render prompts with the model's chat template. Default true.
    pub chat: bool,
    /// System message rendered before each prompt (needs `chat`; see [`TrainConfig::prompt_format`]). Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Padding side. Default right.
    pub padding: Padding,
    /// Reshuffle the samples every epoch (seeded). Default true.
    pub shuffle: bool,
    /// Write `checkpoint-{step}/` every this many optimizer steps; none = only the final adapter. Default none.
    pub save_every: Option<usize>,
    /// Record a `log_history` entry in `trainer_state.json` every this many steps (the progress callback sees
    /// every step). Default 10.
    pub log_every: usize,
    /// Save the final `adapter_model.safetensors` in bf16 (checkpoints are always f32). Default false.
    pub save_bf16: bool,
    /// Continue from this checkpoint directory (one of the `checkpoint-{step}/` this trainer wrote). Default none.
    pub resume_from: Option<PathBuf>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            learning_rate: 2e-4,
            epochs: 1,
            batch_size: 4,
            grad_accum: 1,
            warmup_ratio: 0.03,
            warmup_steps: None,
            schedule: Schedule::Linear,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 0,
            max_len: 512,
            chat: true,
            system: None,
            padding: Padding::Right,
            shuffle: true,
            save_every: None,
            log_every: 10,
            save_bf16: false,
            resume_from: None,
        }
    }
}

impl TrainConfig {
    /// How prompts are rendered: `chat` and `system` as one [`PromptFormat`] (a system message without `chat` is
    /// an [`ModelError::InvalidArgument`]).
    pub fn prompt_format(&self) -> Result<PromptFormat> {
        PromptFormat::from_flags(self.chat, self.system.clone())
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidArgument(m));
        self.prompt_format()?;
        if self.batch_size == 0 || self.grad_accum == 0 || self.epochs == 0 {
            return bad("batch_size, grad_accum and epochs must be positive".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return bad(format!("learning_rate {} is not a non-negative number", self.learning_rate));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad(format!("warmup_ratio {} is outside [0, 1]", self.warmup_ratio));
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) || self.adam_eps < 0.0 {
            return bad("AdamW betas must lie in [0, 1) and eps must be non-negative".into());
        }
        if self.save_every == Some(0) {
            return bad("save_every must be positive".into());
        }
        Ok(())
    }
}

/// What the progress callback receives after every optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainProgress {
    /// Optimizer steps done (1-based).
    pub step: usize,
    /// All optimizer steps of the run.
    pub total_steps: usize,
    /// Fractional epoch reached.
    pub epoch: f64,
    /// Mean loss over the label tokens of this step.
    pub loss: f64,
    /// Learning rate used for this step.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Real tokens (prompt + answer) processed since this run (or resume) started, per second.
    pub tokens_per_sec: f64,
    /// Real tokens processed in this step.
    pub tokens: i64,
}

/// One entry of `trainer_state.json`'s `log_history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Optimizer step.
    pub step: usize,
    /// Fractional epoch.
    pub epoch: f64,
    /// Loss of that step.
    pub loss: f64,
    /// Learning rate of that step.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// `trainer_state.json`: where a run stands, enough (with `optimizer.safetensors` and the adapter) to resume it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: usize,
    /// Optimizer steps of the whole run.
    pub total_steps: usize,
    /// Fractional epoch reached.
    pub epoch: f64,
    /// AdamW's step count.
    pub adam_step: i64,
    /// Training samples (after dropping those without label tokens).
    pub num_samples: usize,
    /// FNV-1a hash of the tokenized samples, so a resume on other data is refused.
    pub data_fingerprint: String,
    /// The hyper-parameters of the run.
    pub train_config: TrainConfig,
    /// Logged steps.
    pub log_history: Vec<LogEntry>,
}

/// What [`train`] returns.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainSummary {
    /// The trained adapter (its `path` is the output directory).
    pub adapter: AdapterInfo,
    /// Optimizer steps of the run.
    pub steps: usize,
    /// Loss of the last step (NaN when resuming a finished run).
    pub final_loss: f64,
    /// Samples used.
    pub samples: usize,
    /// Samples dropped because truncation left them no answer token.
    pub dropped_samples: usize,
}

/// One trained tensor: where it lives in the model and its f32 master copy.
#[derive(Debug)]
struct Param {
    name: String,
    layer: usize,
    module: Module,
    is_a: bool,
    /// f32 master weights; with an f32 model this is the model's own tensor (shared storage).
    master: Tensor,
    /// Accumulated f32 gradient of the current optimizer step.
    grad: Tensor,
}

/// The PEFT tensor name of `lora_{A,B}` of `module` in block `layer`.
pub fn peft_tensor_name(layer: usize, module: Module, is_a: bool) -> String {
    format!("{PEFT_PREFIX}{}.lora_{}.weight", module.hf_path(layer), if is_a { 'A' } else { 'B' })
}

/// The LoRA parameters of a model with their optimizer: micro-batch backward passes, clipped AdamW steps,
/// PEFT-format saving and checkpoints.
#[derive(Debug)]
pub struct Trainer {
    cfg: TrainConfig,
    lora: LoraConfig,
    params: Vec<Param>,
    optim: AdamW,
    global_step: usize,
    low_precision: bool,
}

fn lora_of(model: &Llama, layer: usize, module: Module) -> Result<&LoraWeights> {
    model
        .projection(layer, module)
        .and_then(|p| p.lora.as_ref())
        .ok_or_else(|| ModelError::InvalidArgument(format!("`{}` has no LoRA attached", module.hf_path(layer))))
}

impl Trainer {
    /// Attaches fresh LoRA ([`init_lora`] with `cfg.seed`) and prepares to train it.
    pub fn new(model: &mut Llama, lora: LoraConfig, cfg: TrainConfig) -> Result<Self> {
        let (_, init) = attach_fresh(model, &lora, cfg.seed)?;
        let t = Self::from_attached(model, lora, cfg)?;
        if t.low_precision {
            // Masters start from the exact f32 draws, not from their rounded working copies.
            let _guard = tch::no_grad_guard();
            for (l, m, a, b) in init {
                for p in t.params.iter().filter(|p| p.layer == l && p.module == m) {
                    let mut dst = p.master.shallow_clone();
                    dst.f_copy_(if p.is_a { &a } else { &b })?;
                }
            }
        }
        Ok(t)
    }

    /// Trains the LoRA already attached to `model` (e.g. by [`crate::load_adapter`]); `lora` is the config saved
    /// with it.
    pub fn from_attached(model: &mut Llama, lora: LoraConfig, cfg: TrainConfig) -> Result<Self> {
        cfg.validate()?;
        let low_precision = model.kind() != Kind::Float;
        let mut params = Vec::new();
        for l in 0..model.num_layers() {
            for m in Module::ALL {
                let Some(proj) = model.projection_mut(l, m) else {
                    continue;
                };
                let Some(lw) = proj.lora.as_mut() else {
                    continue;
                };
                if lw.merged {
                    return Err(ModelError::InvalidArgument(format!(
                        "`{}`: LoRA is merged into the base weight; unmerge before training",
                        m.hf_path(l)
                    )));
                }
                for is_a in [true, false] {
                    let t = if is_a { &mut lw.a } else { &mut lw.b };
                    let master = if low_precision {
                        let _ = t.f_set_requires_grad(true)?;
                        t.f_detach()?.f_to_kind(Kind::Float)?
                    } else {
                        // The model's tensor itself is trained: a shallow clone shares storage and gradient.
                        t.f_set_requires_grad(true)?
                    };
                    let grad = master.f_zeros_like()?;
                    params.push(Param { name: peft_tensor_name(l, m, is_a), layer: l, module: m, is_a, master, grad });
                }
            }
        }
        if params.is_empty() {
            return Err(ModelError::InvalidArgument("the model has no LoRA to train".into()));
        }
        let masters: Vec<Tensor> = params.iter().map(|p| p.master.shallow_clone()).collect();
        let optim = AdamW::new(&masters, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, cfg.weight_decay)?;
        Ok(Trainer { cfg, lora, params, optim, global_step: 0, low_precision })
    }

    /// Optimizer steps done.
    pub fn global_step(&self) -> usize {
        self.global_step
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The LoRA config.
    pub fn lora_config(&self) -> &LoraConfig {
        &self.lora
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.optim
    }

    /// `(PEFT name, f32 master weight)` of every trained tensor.
    pub fn parameters(&self) -> Vec<(&str, &Tensor)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.master)).collect()
    }

    /// `(PEFT name, accumulated f32 gradient)` of every trained tensor (zero after each optimizer step).
    pub fn gradients(&self) -> Vec<(&str, &Tensor)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.grad)).collect()
    }

    /// Forward + backward of one micro-batch in training mode: adds the gradient of `loss_sum / normaliser` to the
    /// accumulated gradients and returns the summed loss (divide by the label tokens for the mean). Use the batch's
    /// own [`Batch::label_tokens`] as `normaliser` for HF's plain mean, or the label tokens of every micro-batch
    /// of the optimizer step for accumulation.
    pub fn accumulate(&mut self, model: &Llama, batch: &Batch, normaliser: f64) -> Result<f64> {
        if normaliser <= 0.0 {
            return Err(ModelError::InvalidArgument("the loss normaliser must be positive".into()));
        }
        let mask = LayerMask::all();
        let opts = ForwardOptions { mask: &mask, hidden_states: false, logits: Logits::All, train: true };
        let dev = model.device();
        let ids = batch.input_ids.f_to_device(dev)?;
        let am = batch.attention_mask.f_to_device(dev)?;
        let out = model.forward(&ids, Some(&am), &opts)?;
        let logits = out.logits.ok_or_else(|| ModelError::InvalidArgument("forward returned no logits".into()))?;
        let sum = causal_lm_loss_sum(&logits, &batch.labels)?;
        sum.f_div_scalar(normaliser)?.f_backward()?;
        let _guard = tch::no_grad_guard();
        for p in &mut self.params {
            let w = lora_of(model, p.layer, p.module)?;
            let t = if p.is_a { &w.a } else { &w.b };
            let mut g = t.f_grad()?;
            if g.defined() {
                let _ = p.grad.f_add_(&g.f_to_kind(Kind::Float)?)?;
                let _ = g.f_zero_()?;
            }
        }
        Ok(sum.f_double_value(&[])?)
    }

    /// Clips the accumulated gradients (`max_grad_norm`), applies one AdamW update at learning rate `lr`, zeroes
    /// the gradients and refreshes low-precision working copies. Returns the gradient norm before clipping.
    pub fn apply_step(&mut self, model: &mut Llama, lr: f64) -> Result<f64> {
        let grads: Vec<Tensor> = self.params.iter().map(|p| p.grad.shallow_clone()).collect();
        let norm = clip_grad_norm(&grads, self.cfg.max_grad_norm)?;
        let masters: Vec<Tensor> = self.params.iter().map(|p| p.master.shallow_clone()).collect();
        self.optim.step(&masters, &grads, lr)?;
        {
            let _guard = tch::no_grad_guard();
            for p in &mut self.params {
                let _ = p.grad.f_zero_()?;
            }
        }
        self.sync_model(model)?;
        self.global_step += 1;
        Ok(norm)
    }

    /// Copies the f32 masters into the model's low-precision working copies (a no-op for f32 models).
    fn sync_model(&self, model: &mut Llama) -> Result<()> {
        if !self.low_precision {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        for p in &self.params {
            let lw = model
                .projection_mut(p.layer, p.module)
                .and_then(|x| x.lora.as_mut())
                .ok_or_else(|| ModelError::InvalidArgument(format!("`{}` lost its LoRA", p.name)))?;
            let t = if p.is_a { &mut lw.a } else { &mut lw.b };
            t.f_copy_(&p.master)?;
        }
        Ok(())
    }

    /// Stops gradient tracking on the model's LoRA tensors (call when training is over, so that inference does not
    /// build autograd graphs). [`train`] does this before returning.
    pub fn release(&self, model: &mut Llama) -> Result<()> {
        for p in &self.params {
            if let Some(lw) = model.projection_mut(p.layer, p.module).and_then(|x| x.lora.as_mut()) {
                let t = if p.is_a { &mut lw.a } else { &mut lw.b };
                let _ = t.f_set_requires_grad(false)?;
            }
        }
        Ok(())
    }

    /// The `adapter_config.json` PEFT writes for this adapter.
    pub fn adapter_config_json(&self) -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(&self.lora)
            .map_err(|source| ModelError::Json { path: PathBuf::from("adapter_config.json"), source })?;
        if let Some(o) = v.as_object_mut() {
            o.insert("peft_type".into(), "LORA".into());
            o.insert("task_type".into(), "CAUSAL_LM".into());
            o.insert("bias".into(), "none".into());
            o.insert("inference_mode".into(), true.into());
            o.insert("init_lora_weights".into(), true.into());
            if let Some(ModuleSelector::Regex(r)) = &self.lora.target_modules {
                o.insert("target_modules".into(), r.clone().into());
            }
        }
        Ok(v)
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (PEFT names) into `dir`, each file atomically;
    /// `bf16` stores the weights in bf16.
    pub fn save_adapter(&self, dir: &Path, bf16: bool) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let cfg_path = dir.join("adapter_config.json");
        let body = serde_json::to_string_pretty(&self.adapter_config_json()?)
            .map_err(|source| ModelError::Json { path: cfg_path.clone(), source })?;
        let kind = if bf16 { Kind::BFloat16 } else { Kind::Float };
        let tensors = self
            .params
            .iter()
            .map(|p| Ok((p.name.clone(), p.master.f_detach()?.f_to_kind(kind)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        save_safetensors(&dir.join("adapter_model.safetensors"), &tensors, Some(meta))?;
        write_atomic(&cfg_path, body.as_bytes())
    }

    /// Writes a resumable checkpoint directory (adapter in f32, `optimizer.safetensors`, `trainer_state.json`);
    /// it appears whole or not at all (an existing one is replaced).
    pub fn save_checkpoint(&self, dir: &Path, state: &TrainerState) -> Result<()> {
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
        crate::atomic::clean_stale(parent);
        let tmp = tmp_path(dir);
        let _ = std::fs::remove_dir_all(&tmp);
        let result = (|| {
            self.save_adapter(&tmp, false)?;
            let mut opt = Vec::with_capacity(2 * self.params.len());
            for (i, p) in self.params.iter().enumerate() {
                opt.push((format!("{}.exp_avg", p.name), self.optim.exp_avg()[i].shallow_clone()));
                opt.push((format!("{}.exp_avg_sq", p.name), self.optim.exp_avg_sq()[i].shallow_clone()));
            }
            save_safetensors(&tmp.join("optimizer.safetensors"), &opt, None)?;
            write_state(&tmp.join("trainer_state.json"), state)?;
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
            }
            std::fs::rename(&tmp, dir).map_err(|e| ModelError::io(dir, e))?;
            crate::atomic::sync_parent(dir);
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    /// Restores weights, optimizer state and step from a checkpoint written by [`Trainer::save_checkpoint`];
    /// returns its state.
    pub fn load_checkpoint(&mut self, model: &mut Llama, dir: &Path) -> Result<TrainerState> {
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| ModelError::io(&state_path, e))?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|source| ModelError::Json { path: state_path.clone(), source })?;
        // Checked before anything is restored (in f32 the masters are the model's own LoRA tensors).
        if !(0..=optim::MAX_STEPS).contains(&state.adam_step) || state.global_step as u64 > optim::MAX_STEPS as u64 {
            return Err(ModelError::Config {
                path: state_path,
                message: format!(
                    "adam_step {} / global_step {} lie outside 0..={} (a corrupt checkpoint?)",
                    state.adam_step,
                    state.global_step,
                    optim::MAX_STEPS
                ),
            });
        }
        let weights = SafetensorsWeights::open_file(dir.join("adapter_model.safetensors"))?;
        let opt = SafetensorsWeights::open_file(dir.join("optimizer.safetensors"))?;
        let (mut m, mut v) = (Vec::new(), Vec::new());
        let mut values = Vec::new();
        for p in &self.params {
            let shape = p.master.size();
            values.push(weights.load(&p.name, Some(&shape))?);
            m.push(opt.load(&format!("{}.exp_avg", p.name), Some(&shape))?);
            v.push(opt.load(&format!("{}.exp_avg_sq", p.name), Some(&shape))?);
        }
        if weights.names().len() != self.params.len() {
            return Err(ModelError::Adapter {
                path: dir.to_path_buf(),
                message: format!(
                    "checkpoint holds {} LoRA tensors, the trainer has {}",
                    weights.names().len(),
                    self.params.len()
                ),
            });
        }
        {
            let _guard = tch::no_grad_guard();
            for (p, val) in self.params.iter_mut().zip(&values) {
                p.master.f_copy_(val)?;
                let _ = p.grad.f_zero_()?;
            }
        }
        self.optim.restore(state.adam_step, &m, &v)?;
        self.global_step = state.global_step;
        self.sync_model(model)?;
        Ok(state)
    }
}

fn write_state(path: &Path, state: &TrainerState) -> Result<()> {
    let body =
        serde_json::to_string_pretty(state).map_err(|source| ModelError::Json { path: path.to_path_buf(), source })?;
    write_atomic(path, body.as_bytes())
}

fn fingerprint(samples: &[EncodedSample]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: i64| {
        for b in x.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for s in samples {
        eat(s.input_ids.len() as i64);
        s.input_ids.iter().for_each(|&x| eat(x));
        s.labels.iter().for_each(|&x| eat(x));
    }
    format!("{h:016x}")
}

/// Tokenizes `samples` ([`encode_sample`] with [`TrainConfig::prompt_format`] and `cfg.max_len`) and runs [`train_encoded`]; the pad
/// id is the tokenizer's pad token, else its first EOS, else 0 (pads never reach the loss).
pub fn train(
    model: &mut Llama,
    tokenizer: &Tokenizer,
    samples: &[TrainSample],
    lora: &LoraConfig,
    cfg: &TrainConfig,
    out_dir: &Path,
    progress: impl FnMut(&TrainProgress),
) -> Result<TrainSummary> {
    let format = cfg.prompt_format()?;
    let encoded =
        samples.iter().map(|s| encode_sample(tokenizer, s, &format, cfg.max_len)).collect::<Result<Vec<_>>>()?;
    let pad = tokenizer.pad_token_id().or_else(|| tokenizer.eos_token_ids().first().copied()).unwrap_or(0);
    train_encoded(model, &encoded, pad, lora, cfg, out_dir, progress)
}

/// Refuses, before any training, an output path the run would clobber or could not write: an existing file, a
/// directory that already holds an adapter, or any other non-empty directory (except one whose only contents
/// are this run's own checkpoints when resuming from one of them).
pub fn check_out_dir(out_dir: &Path, resume: Option<&Path>) -> Result<()> {
    let bad = |why: &str| Err(ModelError::InvalidArgument(format!("{}: {why}; choose a new path", out_dir.display())));
    if !out_dir.exists() {
        return Ok(());
    }
    if !out_dir.is_dir() {
        return bad("exists and is not a directory");
    }
    if out_dir.join("adapter_config.json").exists() {
        return bad("already holds an adapter (adapter_config.json); it would be overwritten");
    }
    let entries: Vec<String> = std::fs::read_dir(out_dir)
        .map_err(|e| ModelError::io(out_dir, e))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let own = |n: &String| {
        n.starts_with("checkpoint-") || n == "trainer_state.json" || n.starts_with(crate::atomic::PARTIAL_PREFIX)
    };
    let resuming_here = resume.is_some_and(|r| r.parent().is_some_and(|p| p == out_dir));
    if entries.is_empty() || (resuming_here && entries.iter().all(own)) {
        return Ok(());
    }
    bad(&format!("is a non-empty directory ({} entries)", entries.len()))
}

/// Trains fresh LoRA on tokenized samples and writes the final adapter (PEFT format, plus `trainer_state.json`)
/// into `out_dir`, and `out_dir/checkpoint-{step}/` every `save_every` steps.
///
/// Samples without label tokens are dropped (and counted). With `cfg.resume_from`, the LoRA config and state come
/// from that checkpoint (`lora` is ignored) and the run continues where it stopped; the data and the
/// order-determining settings must be the same.
pub fn train_encoded(
    model: &mut Llama,
    samples: &[EncodedSample],
    pad_id: i64,
    lora: &LoraConfig,
    cfg: &TrainConfig,
    out_dir: &Path,
    mut progress: impl FnMut(&TrainProgress),
) -> Result<TrainSummary> {
    cfg.validate()?;
    check_out_dir(out_dir, cfg.resume_from.as_deref())?;
    let kept: Vec<EncodedSample> = samples.iter().filter(|s| s.label_tokens() > 0).cloned().collect();
    let dropped = samples.len() - kept.len();
    if kept.is_empty() {
        return Err(ModelError::InvalidArgument(format!(
            "none of the {} samples has an answer token left after truncation to max_len {}",
            samples.len(),
            cfg.max_len
        )));
    }
    let n = kept.len();
    let batches = n.div_ceil(cfg.batch_size);
    let steps_per_epoch = batches.div_ceil(cfg.grad_accum);
    let total =
        steps_per_epoch.checked_mul(cfg.epochs).filter(|&t| t as u64 <= optim::MAX_STEPS as u64).ok_or_else(|| {
            ModelError::InvalidArgument(format!(
                "{} epochs of {steps_per_epoch} steps exceed the largest number of optimizer steps ({})",
                cfg.epochs,
                optim::MAX_STEPS
            ))
        })?;
    let warmup = cfg.warmup_steps.unwrap_or_else(|| (total as f64 * cfg.warmup_ratio).ceil() as usize);
    let fp = fingerprint(&kept);

    let (mut trainer, mut log_history) = match &cfg.resume_from {
        Some(ckpt) => {
            let lora = LoraConfig::from_file(&ckpt.join("adapter_config.json"))?;
            let mut t = Trainer::new(model, lora, cfg.clone())?;
            let state = t.load_checkpoint(model, ckpt)?;
            let (a, b) = (&state.train_config, cfg);
            let same = a.batch_size == b.batch_size
                && a.grad_accum == b.grad_accum
                && a.epochs == b.epochs
                && a.seed == b.seed
                && a.shuffle == b.shuffle;
            if !same || state.num_samples != n || state.data_fingerprint != fp || state.total_steps != total {
                return Err(ModelError::InvalidArgument(format!(
                    "{}: checkpoint was made with other data or batch/epoch/seed settings; cannot resume",
                    ckpt.display()
                )));
            }
            (t, state.log_history)
        }
        None => (Trainer::new(model, lora.clone(), cfg.clone())?, Vec::new()),
    };

    let mut order: Option<(usize, Vec<usize>)> = None;
    let start = Instant::now();
    let mut tokens_seen: i64 = 0;
    let mut final_loss = f64::NAN;
    let dropout = trainer.lora.lora_dropout > 0.0;
    for step in trainer.global_step()..total {
        let epoch = step / steps_per_epoch;
        if order.as_ref().is_none_or(|o| o.0 != epoch) {
            let perm =
                if cfg.shuffle { Rng::derived(cfg.seed, epoch as u64 + 1).permutation(n) } else { (0..n).collect() };
            order = Some((epoch, perm));
        }
        let perm = order.as_ref().map(|o| o.1.as_slice()).unwrap_or(&[]);
        let first = (step % steps_per_epoch) * cfg.grad_accum;
        let last = (first + cfg.grad_accum).min(batches);
        let micro = (first..last)
            .map(|b| {
                let idx = &perm[b * cfg.batch_size..((b + 1) * cfg.batch_size).min(n)];
                let rows: Vec<&EncodedSample> = idx.iter().map(|&i| &kept[i]).collect();
                Batch::collate(&rows, pad_id, cfg.padding)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut label_tokens = 0i64;
        let mut tokens = 0i64;
        for b in &micro {
            label_tokens += b.label_tokens()?;
            tokens += b.tokens()?;
        }
        let mut loss_sum = 0.0;
        for (i, b) in micro.iter().enumerate() {
            if dropout {
                let s = Rng::derived(cfg.seed ^ 0x5eed, (step * cfg.grad_accum + i) as u64).next_u64();
                tch::manual_seed((s >> 1) as i64);
            }
            loss_sum += trainer.accumulate(model, b, label_tokens.max(1) as f64)?;
        }
        let lr = cfg.learning_rate * lr_factor(cfg.schedule, step, warmup, total);
        let grad_norm = trainer.apply_step(model, lr)?;
        let loss = loss_sum / label_tokens.max(1) as f64;
        final_loss = loss;
        tokens_seen += tokens;
        let done = step + 1;
        let epoch_f = done as f64 / steps_per_epoch as f64;
        let secs = start.elapsed().as_secs_f64();
        progress(&TrainProgress {
            step: done,
            total_steps: total,
            epoch: epoch_f,
            loss,
            lr,
            grad_norm,
            tokens_per_sec: if secs > 0.0 { tokens_seen as f64 / secs } else { 0.0 },
            tokens,
        });
        if cfg.log_every > 0 && (done % cfg.log_every == 0 || done == total) {
            log_history.push(LogEntry { step: done, epoch: epoch_f, loss, lr, grad_norm });
        }
        if cfg.save_every.is_some_and(|k| done % k == 0) && done < total {
            let state = TrainerState {
                global_step: done,
                total_steps: total,
                epoch: epoch_f,
                adam_step: trainer.optimizer().steps(),
                num_samples: n,
                data_fingerprint: fp.clone(),
                train_config: cfg.clone(),
                log_history: log_history.clone(),
            };
            trainer.save_checkpoint(&out_dir.join(format!("checkpoint-{done}")), &state)?;
        }
    }
    trainer.release(model)?;
    trainer.save_adapter(out_dir, cfg.save_bf16)?;
    let state = TrainerState {
        global_step: trainer.global_step(),
        total_steps: total,
        epoch: cfg.epochs as f64,
        adam_step: trainer.optimizer().steps(),
        num_samples: n,
        data_fingerprint: fp,
        train_config: cfg.clone(),
        log_history,
    };
    write_state(&out_dir.join("trainer_state.json"), &state)?;
    let mut modules = Vec::new();
    let mut params_per_module = Vec::new();
    for (l, m, p) in model.projections() {
        if let Some(w) = &p.lora {
            modules.push((l, m, w.rank() as usize, w.scaling));
            params_per_module.push((w.a.numel() + w.b.numel()) as u64);
        }
    }
    Ok(TrainSummary {
        adapter: AdapterInfo::new(
            out_dir.to_path_buf(),
            trainer.lora.clone(),
            model.num_layers(),
            modules,
            params_per_module,
        ),
        steps: total,
        final_loss,
        samples: n,
        dropped_samples: dropped,
    })
}
