//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, loaded onto a [`Llama`], pruned to
//! the kept blocks, and saved back in PEFT's format.
//!
//! Matching follows PEFT 0.21 (`check_target_module_exists`, `get_pattern_key`): a list of `target_modules` matches
//! a module whose name equals an entry or ends with `.entry`; a string is a regex that must match the whole
//! module name; `all-linear` means every projection of the decoder blocks (not the LM head). `layers_to_transform`
//! applies only with a list of targets, as in PEFT. Variants we do not implement are refused before any compute.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{ModelError, Result};
use crate::lora::LoraWeights;
use crate::mask::{LayerMask, Module};
use crate::model::Llama;
use crate::weights::{save_safetensors, write_atomic, SafetensorsWeights, WeightSource};

/// `target_modules` / `exclude_modules`: a list (suffix match) or a regex (full match).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModuleSelector {
    /// Names; a module matches if its name equals one or ends with `.name`.
    List(Vec<String>),
    /// A regular expression over the whole module name (or `all-linear`).
    Regex(String),
}

/// An int or a list of ints (`layers_to_transform`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerList {
    /// One block.
    One(usize),
    /// Several blocks.
    Many(Vec<usize>),
}

/// A string or a list of strings (`layers_pattern`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StringList {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}

/// The fields of PEFT's `LoraConfig` that decide what an adapter computes. Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// `LORA` (other PEFT methods are refused).
    #[serde(default)]
    pub peft_type: Option<String>,
    /// Default rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Default alpha.
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// rsLoRA scaling `alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Modules to wrap.
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    /// Modules never to wrap.
    #[serde(default)]
    pub exclude_modules: Option<ModuleSelector>,
    /// Restrict to these blocks (list targets only, as in PEFT).
    #[serde(default)]
    pub layers_to_transform: Option<LayerList>,
    /// Name of the layer list in module paths (`layers`).
    #[serde(default)]
    pub layers_pattern: Option<StringList>,
    /// Per-module ranks, in file order (PEFT's `get_pattern_key` takes the first key that matches).
    #[serde(default, deserialize_with = "ordered_map", serialize_with = "ordered_map_ser")]
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alphas, in file order.
    #[serde(default, deserialize_with = "ordered_map", serialize_with = "ordered_map_ser")]
    pub alpha_pattern: Vec<(String, f64)>,
    /// Dropout on the LoRA branch while training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Transposed (Conv1D-style) weights: PEFT turns this off for `nn.Linear`, so it changes nothing here.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Must be `none`.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// DoRA: refused.
    #[serde(default)]
    pub use_dora: bool,
    /// Fully trained extra modules: refused.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Layer replication: refused.
    #[serde(default)]
    pub layer_replication: Option<serde_json::Value>,
    /// Parameter targeting (MoE experts): refused.
    #[serde(default)]
    pub target_parameters: Option<Vec<String>>,
    /// Trainable token indices: refused.
    #[serde(default)]
    pub trainable_token_indices: Option<serde_json::Value>,
    /// The base model's name or path.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Other PEFT switches that change what the adapter computes; any that is set is refused.
    #[serde(flatten, default)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// PEFT config keys that, when set, make the adapter compute something other than plain LoRA.
const REFUSED_WHEN_SET: &[&str] = &[
    "lora_bias",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
    "arrow_config",
    "monteclora_config",
    "velora_config",
    "kasa_config",
];

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            peft_type: Some("LORA".into()),
            r: 8,
            lora_alpha: 16.0,
            use_rslora: false,
            target_modules: Some(ModuleSelector::List(Module::ALL.iter().map(|m| m.hf_name().to_string()).collect())),
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            lora_dropout: 0.0,
            fan_in_fan_out: false,
            bias: "none".into(),
            use_dora: false,
            modules_to_save: None,
            layer_replication: None,
            target_parameters: None,
            trainable_token_indices: None,
            base_model_name_or_path: None,
            other: BTreeMap::new(),
        }
    }
}

fn full_regex(pattern: &str, origin: &Path, field: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| ModelError::Adapter {
        path: origin.to_path_buf(),
        message: format!("`{field}` regex `{pattern}` is not supported: {e}"),
    })
}

/// The compiled matching rules of a [`LoraConfig`].
struct Matcher {
    targets: Option<Either>,
    excludes: Option<Either>,
    layers: Option<BTreeSet<usize>>,
    layer_regexes: Vec<Regex>,
    rank_keys: Vec<(Regex, usize)>,
    alpha_keys: Vec<(Regex, f64)>,
}

enum Either {
    List(Vec<String>),
    Regex(Regex),
}

/// Whether module path `key` is named by `list` as PEFT matches a target list: the whole path, or its last dotted
/// components.
pub(crate) fn list_match(list: &[String], key: &str) -> bool {
    list.iter().any(|t| key == t || key.ends_with(&format!(".{t}")))
}

impl LoraConfig {
    /// Reads `adapter_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        serde_json::from_str(&text).map_err(|source| ModelError::Json { path: path.to_path_buf(), source })
    }

    /// Refuses variants we do not implement, naming the field.
    pub fn check_supported(&self, origin: &Path) -> Result<()> {
        let refuse = |message: String| Err(ModelError::Adapter { path: origin.to_path_buf(), message });
        if let Some(t) = &self.peft_type {
            if !t.eq_ignore_ascii_case("lora") {
                return refuse(format!("peft_type `{t}` is not LoRA"));
            }
        }
        if self.use_dora {
            return refuse("DoRA adapters (`use_dora: true`) are not supported".into());
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse("`modules_to_save` (fully trained extra modules) is not supported".into());
        }
        if self.bias != "none" {
            return refuse(format!("`bias: {}` is not supported (only `none`)", self.bias));
        }
        if self.layer_replication.as_ref().is_some_and(|v| !v.is_null()) {
            return refuse("`layer_replication` is not supported".into());
        }
        if self.target_parameters.as_ref().is_some_and(|v| !v.is_empty()) {
            return refuse("`target_parameters` is not supported".into());
        }
        if self.trainable_token_indices.as_ref().is_some_and(|v| !v.is_null()) {
            return refuse("`trainable_token_indices` is not supported".into());
        }
        if self.r == 0 {
            return refuse("`r` must be positive".into());
        }
        if let Some((key, _)) = self.rank_pattern.iter().find(|(_, r)| *r == 0) {
            return refuse(format!("`rank_pattern` gives `{key}` rank 0; ranks must be positive"));
        }
        for key in REFUSED_WHEN_SET {
            let set = match self.other.get(*key) {
                None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
                Some(serde_json::Value::Object(o)) => !o.is_empty(),
                Some(serde_json::Value::Array(a)) => !a.is_empty(),
                Some(_) => true,
            };
            if set {
                return refuse(format!("`{key}` is set: this LoRA variant is not supported"));
            }
        }
        Ok(())
    }

    fn matcher(&self, origin: &Path) -> Result<Matcher> {
        let sel = |s: &Option<ModuleSelector>, field: &str| -> Result<Option<Either>> {
            Ok(match s {
                None => None,
                Some(ModuleSelector::List(l)) => Some(Either::List(l.clone())),
                Some(ModuleSelector::Regex(r)) if r.eq_ignore_ascii_case("all-linear") && field == "target_modules" => {
                    Some(Either::List(Module::ALL.iter().map(|m| m.hf_name().to_string()).collect()))
                }
                Some(ModuleSelector::Regex(r)) => Some(Either::Regex(full_regex(r, origin, field)?)),
            })
        };
        let layers = match &self.layers_to_transform {
            None => None,
            Some(LayerList::One(l)) => Some(BTreeSet::from([*l])),
            Some(LayerList::Many(v)) if v.is_empty() => None,
            Some(LayerList::Many(v)) => Some(v.iter().copied().collect()),
        };
        let patterns: Vec<String> = match &self.layers_pattern {
            None => vec![],
            Some(StringList::One(s)) if s.is_empty() => vec![],
            Some(StringList::One(s)) => vec![s.clone()],
            Some(StringList::Many(v)) => v.clone(),
        };
        let layer_regexes = if patterns.is_empty() {
            vec![Regex::new(r"^.*?\.[^.]*\.(?P<idx>\d+)\.").map_err(|e| ModelError::InvalidArgument(e.to_string()))?]
        } else {
            patterns
                .iter()
                .map(|p| {
                    Regex::new(&format!(r"^(?:|.*?\.){p}\.(?P<idx>\d+)\.")).map_err(|e| ModelError::Adapter {
                        path: origin.to_path_buf(),
                        message: format!("`layers_pattern` `{p}`: {e}"),
                    })
                })
                .collect::<Result<_>>()?
        };
        let key_regex = |k: &str, field: &str| {
            Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).map_err(|e| ModelError::Adapter {
                path: origin.to_path_buf(),
                message: format!("`{field}` key `{k}`: {e}"),
            })
        };
        let rank_keys =
            self.rank_pattern.iter().map(|(k, v)| Ok((key_regex(k, "rank_pattern")?, *v))).collect::<Result<_>>()?;
        let alpha_keys =
            self.alpha_pattern.iter().map(|(k, v)| Ok((key_regex(k, "alpha_pattern")?, *v))).collect::<Result<_>>()?;
        Ok(Matcher {
            targets: sel(&self.target_modules, "target_modules")?,
            excludes: sel(&self.exclude_modules, "exclude_modules")?,
            layers,
            layer_regexes,
            rank_keys,
            alpha_keys,
        })
    }
}

impl Matcher {
    /// PEFT's `check_target_module_exists` for module name `key`.
    fn targets(&self, key: &str) -> bool {
        match &self.excludes {
            Some(Either::Regex(r)) if r.is_match(key) => return false,
            Some(Either::List(l)) if list_match(l, key) => return false,
            _ => {}
        }
        match &self.targets {
            None => false,
            Some(Either::Regex(r)) => r.is_match(key),
            Some(Either::List(l)) => {
                let found = list_match(l, key);
                match (&self.layers, found) {
                    (Some(layers), true) => {
                        let idx = self
                            .layer_regexes
                            .iter()
                            .find_map(|r| r.captures(key))
                            .and_then(|c| c.name("idx"))
                            .and_then(|m| m.as_str().parse::<usize>().ok());
                        idx.is_some_and(|i| layers.contains(&i))
                    }
                    _ => found,
                }
            }
        }
    }

    fn rank_alpha(&self, key: &str, cfg: &LoraConfig) -> (usize, f64) {
        let r = self.rank_keys.iter().find(|(re, _)| re.is_match(key)).map_or(cfg.r, |p| p.1);
        let a = self.alpha_keys.iter().find(|(re, _)| re.is_match(key)).map_or(cfg.lora_alpha, |p| p.1);
        (r, a)
    }
}

/// The modules `cfg` wraps on a model with `num_layers` blocks, as (block, module, rank, alpha), by PEFT's rules
/// (target/exclude matching, `layers_to_transform`, `rank_pattern`, `alpha_pattern`). Used to attach fresh LoRA.
pub(crate) fn targeted_modules(
    cfg: &LoraConfig,
    num_layers: usize,
    origin: &Path,
) -> Result<Vec<(usize, Module, usize, f64)>> {
    let matcher = cfg.matcher(origin)?;
    let mut out = Vec::new();
    for l in 0..num_layers {
        for m in Module::ALL {
            let path = m.hf_path(l);
            if matcher.targets(&path) {
                let (r, alpha) = matcher.rank_alpha(&path, cfg);
                out.push((l, m, r, alpha));
            }
        }
    }
    Ok(out)
}

/// The PEFT scaling of a module with rank `r` and alpha `alpha`.
pub fn lora_scaling(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// What [`load_adapter`] attached.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdapterInfo {
    /// The adapter directory.
    pub path: PathBuf,
    /// The parsed config.
    pub config: LoraConfig,
    /// Wrapped modules, as (block, module, rank, scaling).
    pub modules: Vec<(usize, Module, usize, f64)>,
    /// LoRA parameters per block (A and B elements).
    pub params_per_layer: Vec<u64>,
    /// LoRA parameters (A and B elements) of each entry of `modules`, in the same order.
    pub params_per_module: Vec<u64>,
}

impl AdapterInfo {
    /// The info of the wrapped `modules` (block, module, rank, scaling) with their LoRA parameters (A and B
    /// elements) in the same order, in a model of `num_layers` blocks: the per-block counts are their sums.
    pub(crate) fn new(
        path: PathBuf,
        config: LoraConfig,
        num_layers: usize,
        modules: Vec<(usize, Module, usize, f64)>,
        params_per_module: Vec<u64>,
    ) -> Self {
        let mut params_per_layer = vec![0u64; num_layers];
        for (m, &n) in modules.iter().zip(&params_per_module) {
            if let Some(slot) = params_per_layer.get_mut(m.0) {
                *slot += n;
            }
        }
        AdapterInfo { path, config, modules, params_per_layer, params_per_module }
    }

    /// Blocks that carry LoRA.
    pub fn layers(&self) -> BTreeSet<usize> {
        self.modules.iter().map(|m| m.0).collect()
    }

    /// Fraction of the adapter's parameters that a mask keeps.
    pub fn kept_fraction(&self, mask: &LayerMask) -> f64 {
        let counted = || self.modules.iter().zip(&self.params_per_module);
        let total: u64 = counted().map(|(_, &n)| n).sum();
        let kept: u64 = counted().filter(|(m, _)| mask.is_active(m.0, m.1)).map(|(_, &n)| n).sum();
        if total == 0 {
            0.0
        } else {
            kept as f64 / total as f64
        }
    }
}

/// Deserializes a JSON object into (key, value) pairs in document order.
fn ordered_map<'de, D, T>(d: D) -> std::result::Result<Vec<(String, T)>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
        type Value = Vec<(String, T)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map")
        }
        fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> std::result::Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some((k, v)) = m.next_entry::<String, T>()? {
                out.push((k, v));
            }
            Ok(out)
        }
    }
    d.deserialize_any(V(std::marker::PhantomData))
}

fn ordered_map_ser<S: serde::Serializer, T: Serialize>(
    v: &[(String, T)],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(v.len()))?;
    for (k, x) in v {
        m.serialize_entry(k, x)?;
    }
    m.end()
}

const PREFIX: &str = "base_model.model.";

/// Splits a PEFT tensor name into (module path, `A`/`B`).
fn split_key(name: &str) -> Option<(&str, char)> {
    let rest = name.strip_prefix(PREFIX).unwrap_or(name);
    if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        Some((m, 'A'))
    } else {
        rest.strip_suffix(".lora_B.weight").map(|m| (m, 'B'))
    }
}

/// Loads a PEFT LoRA adapter directory onto `model` (replacing any adapter already attached).
///
/// Everything is checked before anything is attached: unsupported variants, pickled weights, tensors that fit no
/// module, modules the config targets but the file lacks, shapes and ranks, and an adapter that matches nothing.
pub fn load_adapter(model: &mut Llama, dir: impl AsRef<Path>) -> Result<AdapterInfo> {
    let _guard = tch::no_grad_guard();
    let dir = dir.as_ref();
    let cfg_path = dir.join("adapter_config.json");
    let adapter_err = |message: String| ModelError::Adapter { path: dir.to_path_buf(), message };
    if !cfg_path.exists() {
        return Err(adapter_err("no adapter_config.json".into()));
    }
    let cfg = LoraConfig::from_file(&cfg_path)?;
    cfg.check_supported(&cfg_path)?;
    let st_path = dir.join("adapter_model.safetensors");
    if !st_path.exists() {
        if dir.join("adapter_model.bin").exists() {
            return Err(adapter_err(
                "adapter_model.bin is a pickle and is never loaded (unpickling runs code); save with safetensors"
                    .into(),
            ));
        }
        return Err(adapter_err("no adapter_model.safetensors".into()));
    }
    let weights = SafetensorsWeights::open_file(&st_path)?;
    let matcher = cfg.matcher(&cfg_path)?;

    // Group the file's tensors by module path.
    let mut found: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for name in weights.names() {
        let (module, which) = split_key(&name).ok_or_else(|| {
            adapter_err(format!(
                "tensor `{name}` is not a LoRA A/B weight (embedding LoRA, DoRA magnitudes and extra modules are not supported)"
            ))
        })?;
        let e = found.entry(module.to_string()).or_default();
        if which == 'A' {
            e.0 = true;
        } else {
            e.1 = true;
        }
    }
    let n_layers = model.num_layers();
    let mut known: BTreeMap<String, (usize, Module)> = BTreeMap::new();
    for l in 0..n_layers {
        for m in Module::ALL {
            known.insert(m.hf_path(l), (l, m));
        }
    }
    for (module, (a, b)) in &found {
        if !known.contains_key(module) {
            return Err(adapter_err(format!(
                "tensor for module `{module}`, which the base model does not have (it has {n_layers} blocks)"
            )));
        }
        if !(*a && *b) {
            return Err(adapter_err(format!("module `{module}` lacks its lora_{}", if *a { 'B' } else { 'A' })));
        }
    }
    let mut plan = Vec::new();
    for (path, &(l, m)) in &known {
        let targeted = matcher.targets(path);
        let present = found.contains_key(path);
        if targeted != present {
            return Err(adapter_err(if targeted {
                format!("the config targets `{path}` but adapter_model.safetensors has no weights for it")
            } else {
                format!("adapter_model.safetensors has weights for `{path}`, which the config does not target")
            }));
        }
        if !targeted {
            continue;
        }
        let (r, alpha) = matcher.rank_alpha(path, &cfg);
        let (out, inp) =
            model.config().projection_shape(m.hf_name()).ok_or_else(|| adapter_err(format!("unknown module {m:?}")))?;
        let key = |s: &str| {
            let bare = format!("{path}.lora_{s}.weight");
            if weights.contains(&bare) {
                bare
            } else {
                format!("{PREFIX}{bare}")
            }
        };
        let (ka, kb) = (key("A"), key("B"));
        let a = weights.load(&ka, Some(&[r as i64, inp as i64]))?;
        crate::weights::check_finite(&a, &ka, &st_path)?;
        let b = weights.load(&kb, Some(&[out as i64, r as i64]))?;
        crate::weights::check_finite(&b, &kb, &st_path)?;
        plan.push((l, m, r, lora_scaling(alpha, r, cfg.use_rslora), a, b));
    }
    if plan.is_empty() {
        return Err(adapter_err(
            "the adapter matches no module of the base model (refusing to serve the base model silently)".into(),
        ));
    }
    let kind = model.kind();
    let mut modules = Vec::with_capacity(plan.len());
    let mut params_per_module = Vec::with_capacity(plan.len());
    // Detach any previous adapter first so a partial failure cannot mix two adapters.
    for l in 0..n_layers {
        for m in Module::ALL {
            if let Some(p) = model.projection_mut(l, m) {
                p.unmerge()?;
                p.lora = None;
            }
        }
    }
    for (l, m, r, scaling, a, b) in plan {
        params_per_module.push((a.numel() + b.numel()) as u64);
        let device = model.device_map().block(l);
        let lw = LoraWeights {
            a: a.f_to_device(device)?.f_to_kind(kind)?,
            b: b.f_to_device(device)?.f_to_kind(kind)?,
            scaling,
            dropout: cfg.lora_dropout,
            merged: false,
        };
        let proj =
            model.projection_mut(l, m).ok_or_else(|| adapter_err(format!("block {l} has no {}", m.hf_name())))?;
        proj.attach(lw, &m.hf_path(l))?;
        modules.push((l, m, r, scaling));
    }
    Ok(AdapterInfo::new(dir.to_path_buf(), cfg, n_layers, modules, params_per_module))
}

/// A module's LoRA tensors from an adapter file: (name, tensor) of A and of B.
type LoraPair = ((String, Tensor), (String, Tensor));

/// The LoRA modules of an adapter file, by (block, projection).
type AdapterTensors = BTreeMap<(usize, Module), LoraPair>;

/// The module paths (`model.layers.N.self_attn.q_proj`) of an adapter file's tensors, each with its A and B,
/// checked: every name is a LoRA A/B weight of a decoder-block projection, both halves are present, ranks agree,
/// and every value is finite.
fn adapter_tensors(
    weights: &SafetensorsWeights,
    file: &Path,
    err: &dyn Fn(String) -> ModelError,
) -> Result<AdapterTensors> {
    type Halves = [Option<(String, Tensor)>; 2];
    let mut halves: BTreeMap<(usize, Module), Halves> = BTreeMap::new();
    for name in weights.names() {
        let (module, which) = split_key(&name).ok_or_else(|| {
            err(format!("tensor `{name}` is not a LoRA A/B weight (embedding LoRA, DoRA magnitudes and extra modules are not supported)"))
        })?;
        let key = parse_module_path(module).ok_or_else(|| {
            err(format!("tensor `{name}` is not on a decoder-block projection (model.layers.N.self_attn|mlp.*_proj)"))
        })?;
        if key.0 >= crate::mask::MAX_BLOCKS {
            return Err(err(format!(
                "tensor `{name}` is on block {}, past the largest supported index {}",
                key.0,
                crate::mask::MAX_BLOCKS - 1
            )));
        }
        let t = weights.load(&name, None)?;
        crate::weights::check_finite(&t, &name, file)?;
        if t.dim() != 2 {
            return Err(err(format!("tensor `{name}` has shape {:?}; LoRA weights are 2-D", t.size())));
        }
        let slot = &mut halves.entry(key).or_default()[usize::from(which == 'B')];
        *slot = Some((name, t));
    }
    let mut out = BTreeMap::new();
    for ((l, m), [a, b]) in halves {
        let path = m.hf_path(l);
        let (Some((an, a)), Some((bn, b))) = (a, b) else {
            return Err(err(format!("module `{path}` lacks one of lora_A / lora_B")));
        };
        if a.size()[0] != b.size()[1] {
            return Err(err(format!(
                "module `{path}`: lora_A has rank {} but lora_B has rank {}",
                a.size()[0],
                b.size()[1]
            )));
        }
        out.insert((l, m), ((an, a), (bn, b)));
    }
    Ok(out)
}

/// `model.layers.N.self_attn.q_proj` → (N, Q).
fn parse_module_path(path: &str) -> Option<(usize, Module)> {
    let rest = path.strip_prefix("model.layers.")?;
    let (n, rest) = rest.split_once('.')?;
    let (parent, leaf) = rest.split_once('.')?;
    let m = Module::from_name(leaf).filter(|m| m.hf_name() == leaf && m.hf_parent() == parent)?;
    Some((n.parse().ok()?, m))
}

/// Checks that an adapter's config and its tensors describe the same modules with the same ranks, as every
/// loader requires: the config targets each module that has weights (with the rank `rank_pattern` gives it),
/// and every module the config targets in a block that exists has weights. Blocks are checked up to the highest
/// block that has weights, and every block `layers_to_transform` names.
fn check_config_matches_tensors(
    cfg: &LoraConfig,
    cfg_path: &Path,
    present: &AdapterTensors,
    err: &dyn Fn(String) -> ModelError,
) -> Result<()> {
    let matcher = cfg.matcher(cfg_path)?;
    let mut blocks: BTreeSet<usize> = present.keys().map(|k| k.0).collect();
    if let Some(max) = blocks.last().copied() {
        blocks.extend(0..=max);
    }
    match &cfg.layers_to_transform {
        Some(LayerList::One(l)) => {
            blocks.insert(*l);
        }
        Some(LayerList::Many(v)) => blocks.extend(v.iter().copied()),
        None => {}
    }
    for &l in &blocks {
        for m in Module::ALL {
            let path = m.hf_path(l);
            match (matcher.targets(&path), present.get(&(l, m))) {
                (true, None) => {
                    return Err(err(format!(
                        "the config targets `{path}` but adapter_model.safetensors has no weights for it"
                    )))
                }
                (false, Some(_)) => {
                    return Err(err(format!(
                        "adapter_model.safetensors has weights for `{path}`, which the config does not target"
                    )))
                }
                (true, Some(((_, a), _))) => {
                    let (r, _) = matcher.rank_alpha(&path, cfg);
                    if a.size()[0] != r as i64 {
                        return Err(err(format!(
                            "`{path}` has rank {} in the file but {r} by the config (r / rank_pattern)",
                            a.size()[0]
                        )));
                    }
                }
                (false, None) => {}
            }
        }
    }
    Ok(())
}

/// Writes a PEFT adapter directory that holds only the LoRA of blocks kept by `mask`.
///
/// The input is checked first as a loader would check it (config and tensors agree, ranks, finite values), and
/// `mask` may not name blocks past the adapter's last LoRA block. The written config selects exactly the kept
/// modules in a form PEFT accepts: a list of `target_modules` keeps its list and gets `layers_to_transform`;
/// `"all-linear"` becomes the list of projection names it covered plus `layers_to_transform`; any other regex
/// becomes the explicit list of kept module paths (PEFT refuses `layers_to_transform` with a string target). The
/// directory appears whole or not at all.
pub fn prune_adapter(src_dir: &Path, mask: &LayerMask, out_dir: &Path) -> Result<Vec<usize>> {
    let err = |message: String| ModelError::Adapter { path: src_dir.to_path_buf(), message };
    if mask.has_module_filter() {
        return Err(err("pruning by module is not expressible in PEFT's config; use a block mask".into()));
    }
    if out_dir.exists() {
        return Err(ModelError::InvalidArgument(format!(
            "{}: output directory exists; choose a new path",
            out_dir.display()
        )));
    }
    let cfg_path = src_dir.join("adapter_config.json");
    if !cfg_path.exists() {
        return Err(err("no adapter_config.json".into()));
    }
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let mut cfg_json: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ModelError::Json { path: cfg_path.clone(), source })?;
    let cfg: LoraConfig = serde_json::from_value(cfg_json.clone())
        .map_err(|source| ModelError::Json { path: cfg_path.clone(), source })?;
    cfg.check_supported(&cfg_path)?;
    let st_path = src_dir.join("adapter_model.safetensors");
    if !st_path.exists() {
        return Err(err("no adapter_model.safetensors".into()));
    }
    let weights = SafetensorsWeights::open_file(&st_path)?;
    let present = adapter_tensors(&weights, &st_path, &err)?;
    check_config_matches_tensors(&cfg, &cfg_path, &present, &err)?;
    let last = present.keys().map(|k| k.0).max().ok_or_else(|| err("the adapter has no LoRA weights".into()))?;
    if let Some(b) = mask.max_block().filter(|&b| b > last) {
        return Err(ModelError::InvalidArgument(format!(
            "mask `{mask}` names block {b}, but this adapter's LoRA ends at block {last}"
        )));
    }
    let kept_modules: Vec<(usize, Module)> = present.keys().copied().filter(|&(l, _)| mask.layer_active(l)).collect();
    if kept_modules.is_empty() {
        return Err(err(format!("mask `{mask}` keeps no LoRA block of this adapter")));
    }
    let kept: Vec<usize> = kept_modules.iter().map(|k| k.0).collect::<BTreeSet<_>>().into_iter().collect();

    // The pruned config, in a form PEFT accepts for this kind of `target_modules`.
    let obj = cfg_json.as_object_mut().ok_or_else(|| err("adapter_config.json is not a JSON object".into()))?;
    match &cfg.target_modules {
        Some(ModuleSelector::Regex(r)) if !r.eq_ignore_ascii_case("all-linear") => {
            let paths: Vec<String> = kept_modules.iter().map(|&(l, m)| m.hf_path(l)).collect();
            obj.insert("target_modules".into(), serde_json::json!(paths));
            obj.insert("layers_to_transform".into(), serde_json::Value::Null);
            obj.insert("layers_pattern".into(), serde_json::Value::Null);
        }
        Some(ModuleSelector::Regex(_)) => {
            let names: BTreeSet<Module> = kept_modules.iter().map(|k| k.1).collect();
            let names: Vec<&str> = names.iter().map(|m| m.hf_name()).collect();
            obj.insert("target_modules".into(), serde_json::json!(names));
            obj.insert("layers_to_transform".into(), serde_json::json!(kept));
        }
        _ => {
            obj.insert("layers_to_transform".into(), serde_json::json!(kept));
        }
    }
    // rank/alpha pattern keys that match no kept module are dropped (PEFT warns about each); a key that matches no
    // kept module never decides any kept module's rank or alpha, so this changes nothing that is computed.
    let kept_paths: Vec<String> = kept_modules.iter().map(|&(l, m)| m.hf_path(l)).collect();
    for field in ["rank_pattern", "alpha_pattern"] {
        if let Some(serde_json::Value::Object(map)) = obj.get_mut(field) {
            let mut keep = serde_json::Map::new();
            for (k, v) in std::mem::take(map) {
                let re = Regex::new(&format!(r"^(?:.*\.)?(?:{k})$"))
                    .map_err(|e| err(format!("`{field}` key `{k}`: {e}")))?;
                if kept_paths.iter().any(|p| re.is_match(p)) {
                    keep.insert(k, v);
                }
            }
            *map = keep;
        }
    }
    // Self-check: the written config must select exactly the kept modules, or we write nothing.
    let pruned_cfg: LoraConfig = serde_json::from_value(cfg_json.clone())
        .map_err(|source| ModelError::Json { path: out_dir.join("adapter_config.json"), source })?;
    let kept_present: BTreeMap<_, _> = present.into_iter().filter(|(k, _)| mask.layer_active(k.0)).collect();
    check_config_matches_tensors(&pruned_cfg, &out_dir.join("adapter_config.json"), &kept_present, &|m| {
        ModelError::Adapter {
            path: out_dir.to_path_buf(),
            message: format!("pruned config would not reproduce the mask: {m}"),
        }
    })?;
    let tensors: Vec<(String, Tensor)> = kept_present.into_values().flat_map(|(a, b)| [a, b]).collect();

    let partial = crate::atomic::PartialDir::create(out_dir)?;
    let body = serde_json::to_string_pretty(&cfg_json)
        .map_err(|source| ModelError::Json { path: out_dir.join("adapter_config.json"), source })?;
    write_atomic(&partial.path().join("adapter_config.json"), body.as_bytes())?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_safetensors(&partial.path().join("adapter_model.safetensors"), &tensors, Some(meta))?;
    partial.commit()?;
    Ok(kept)
}

/// Merges the LoRA of modules active under `mask` into the base weights (in place).
pub fn merge(model: &mut Llama, mask: &LayerMask) -> Result<()> {
    for l in 0..model.num_layers() {
        for m in Module::ALL {
            if mask.is_active(l, m) {
                if let Some(p) = model.projection_mut(l, m) {
                    p.merge()?;
                }
            }
        }
    }
    Ok(())
}

/// Undoes [`merge`] for every merged module.
pub fn unmerge(model: &mut Llama) -> Result<()> {
    for l in 0..model.num_layers() {
        for m in Module::ALL {
            if let Some(p) = model.projection_mut(l, m) {
                p.unmerge()?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(json: &str) -> (LoraConfig, Matcher) {
        let cfg: LoraConfig = serde_json::from_str(json).unwrap();
        let m = cfg.matcher(Path::new("adapter_config.json")).unwrap();
        (cfg, m)
    }

    #[test]
    fn peft_matching_rules() {
        let (_, m) = matcher(r#"{"target_modules":["q_proj","v_proj"],"layers_to_transform":[0,2]}"#);
        assert!(m.targets("model.layers.0.self_attn.q_proj"));
        assert!(!m.targets("model.layers.1.self_attn.q_proj"));
        assert!(!m.targets("model.layers.2.self_attn.k_proj"));
        // Regex targets ignore layers_to_transform, as in PEFT.
        let (_, m) = matcher(r#"{"target_modules":".*\\.(q_proj|v_proj)","layers_to_transform":[0]}"#);
        assert!(m.targets("model.layers.3.self_attn.v_proj"));
        assert!(!m.targets("model.layers.3.self_attn.o_proj"));
        let (_, m) = matcher(r#"{"target_modules":"all-linear","exclude_modules":["down_proj"]}"#);
        assert!(m.targets("model.layers.3.mlp.up_proj"));
        assert!(!m.targets("model.layers.3.mlp.down_proj"));
    }

    #[test]
    fn rank_and_alpha_patterns() {
        let (cfg, m) = matcher(
            r#"{"r":4,"lora_alpha":16,"target_modules":"all-linear","rank_pattern":{"layers.1.self_attn.q_proj":2,"mlp.down_proj":6},"alpha_pattern":{"v_proj":4}}"#,
        );
        assert_eq!(m.rank_alpha("model.layers.1.self_attn.q_proj", &cfg), (2, 16.0));
        assert_eq!(m.rank_alpha("model.layers.11.self_attn.q_proj", &cfg), (4, 16.0));
        assert_eq!(m.rank_alpha("model.layers.0.mlp.down_proj", &cfg), (6, 16.0));
        assert_eq!(m.rank_alpha("model.layers.0.self_attn.v_proj", &cfg), (4, 4.0));
        assert_eq!(lora_scaling(16.0, 4, true), 8.0);
    }

    #[test]
    fn unsupported_variants_are_refused() {
        for json in [
            r#"{"use_dora":true}"#,
            r#"{"modules_to_save":["lm_head"]}"#,
            r#"{"bias":"all"}"#,
            r#"{"peft_type":"IA3"}"#,
            r#"{"r":8,"rank_pattern":{"q_proj":0}}"#,
        ] {
            let cfg: LoraConfig = serde_json::from_str(json).unwrap();
            assert!(cfg.check_supported(Path::new("x")).is_err(), "{json}");
        }
    }
}
