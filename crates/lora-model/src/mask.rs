//! [`LayerMask`]: which decoder blocks (and which projections) have their LoRA switched on.
//!
//! The paper's operation is `keep_through(b)`: LoRA on blocks `0..=b`, off above. Masks are plain values passed to
//! each forward call, so switching between them costs nothing: no reload, no weight copy.
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// A projection that LoRA can wrap, by its HF module name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Module {
    /// `self_attn.q_proj`
    Q,
    /// `self_attn.k_proj`
    K,
    /// `self_attn.v_proj`
    V,
    /// `self_attn.o_proj`
    O,
    /// `mlp.gate_proj`
    Gate,
    /// `mlp.up_proj`
    Up,
    /// `mlp.down_proj`
    Down,
}

impl Module {
    /// The seven decoder-block projections in HF order.
    pub const ALL: [Module; 7] = [Module::Q, Module::K, Module::V, Module::O, Module::Gate, Module::Up, Module::Down];

    /// HF leaf name, e.g. `q_proj`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    /// HF parent path inside a block: `self_attn` or `mlp`.
    pub fn hf_parent(self) -> &'static str {
        match self {
            Module::Q | Module::K | Module::V | Module::O => "self_attn",
            _ => "mlp",
        }
    }

    /// The module's path inside block `layer`, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn hf_path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.hf_parent(), self.hf_name())
    }

    /// Parses `q_proj` or `q`.
    pub fn from_name(name: &str) -> Option<Module> {
        let n = name.strip_suffix("_proj").unwrap_or(name);
        Some(match n {
            "q" => Module::Q,
            "k" => Module::K,
            "v" => Module::V,
            "o" => Module::O,
            "gate" => Module::Gate,
            "up" => Module::Up,
            "down" => Module::Down,
            _ => return None,
        })
    }
}

/// Block indices a mask may name: far above any real model's depth, and a bound on what parsing a mask can
/// allocate (`0-18446744073709551615` is refused, not expanded).
pub const MAX_BLOCKS: usize = 1 << 16;

/// Which blocks are on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layers {
    All,
    Set(BTreeSet<usize>),
}

/// Which decoder blocks' LoRA is active, and optionally which projections.
///
/// String form (see [`FromStr`]): `all`, `none`, `keep-through:B`, or ranges such as `0-14` or `0-9,20-29`,
/// optionally followed by `@` and a module list (`attn`, `mlp`, or names like `q,v`): `0-14@attn`.
///
/// ```
/// use lora_model::{LayerMask, Module};
/// let m: LayerMask = "0-9,20-29".parse()?;
/// assert!(m.is_active(9, Module::Q) && !m.is_active(10, Module::Q) && m.is_active(29, Module::Down));
/// assert_eq!(LayerMask::keep_through(14), "0-14".parse()?);
/// let attn: LayerMask = "all@attn".parse()?;
/// assert!(attn.is_active(3, Module::V) && !attn.is_active(3, Module::Up));
/// # Ok::<(), lora_model::ModelError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMask {
    layers: Layers,
    modules: Option<BTreeSet<Module>>,
}

impl Default for LayerMask {
    fn default() -> Self {
        LayerMask::all()
    }
}

impl LayerMask {
    /// LoRA everywhere (the fine-tuned model as trained).
    pub fn all() -> Self {
        LayerMask { layers: Layers::All, modules: None }
    }

    /// No LoRA at all (the base model).
    pub fn none() -> Self {
        LayerMask { layers: Layers::Set(BTreeSet::new()), modules: None }
    }

    /// LoRA on blocks `0..=boundary`, off above: the paper's pruning.
    ///
    /// `boundary` is capped at [`MAX_BLOCKS`] (so the mask stays small); [`LayerMask::validate`] refuses a mask
    /// that names blocks past the model either way.
    pub fn keep_through(boundary: usize) -> Self {
        LayerMask::from_layers(0..=boundary.min(MAX_BLOCKS))
    }

    /// The highest block the mask names explicitly (`None` for `all`, and for `none`).
    pub fn max_block(&self) -> Option<usize> {
        match &self.layers {
            Layers::All => None,
            Layers::Set(s) => s.last().copied(),
        }
    }

    /// Whether the mask restricts LoRA to some projections (`@attn`, `@q_proj,v_proj`).
    pub fn has_module_filter(&self) -> bool {
        self.modules.is_some()
    }

    /// LoRA on exactly the given blocks.
    pub fn from_layers(layers: impl IntoIterator<Item = usize>) -> Self {
        LayerMask { layers: Layers::Set(layers.into_iter().collect()), modules: None }
    }

    /// Restricts the mask to some projections (e.g. attention only).
    pub fn with_modules(mut self, modules: impl IntoIterator<Item = Module>) -> Self {
        self.modules = Some(modules.into_iter().collect());
        self
    }

    /// Whether LoRA of `module` in block `layer` is on.
    pub fn is_active(&self, layer: usize, module: Module) -> bool {
        let layer_on = match &self.layers {
            Layers::All => true,
            Layers::Set(s) => s.contains(&layer),
        };
        layer_on && self.modules.as_ref().is_none_or(|m| m.contains(&module))
    }

    /// Whether any projection of block `layer` is on.
    pub fn layer_active(&self, layer: usize) -> bool {
        match &self.layers {
            Layers::All => self.modules.as_ref().is_none_or(|m| !m.is_empty()),
            Layers::Set(s) => s.contains(&layer) && self.modules.as_ref().is_none_or(|m| !m.is_empty()),
        }
    }

    /// The active blocks among `0..num_layers`.
    pub fn active_layers(&self, num_layers: usize) -> Vec<usize> {
        (0..num_layers).filter(|&l| self.layer_active(l)).collect()
    }

    /// Errors if the mask names a block at or beyond `num_layers`.
    pub fn validate(&self, num_layers: usize) -> Result<()> {
        if let Layers::Set(s) = &self.layers {
            if let Some(&bad) = s.iter().find(|&&l| l >= num_layers) {
                return Err(ModelError::InvalidArgument(format!(
                    "layer mask `{self}` names block {bad}, but the model has {num_layers} blocks (0..={})",
                    num_layers.saturating_sub(1)
                )));
            }
        }
        Ok(())
    }
}

fn fmt_ranges(set: &BTreeSet<usize>) -> String {
    let mut parts = Vec::new();
    let mut iter = set.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while end.checked_add(1).is_some_and(|next| iter.peek() == Some(&next)) {
            end += 1;
            iter.next();
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
    }
    parts.join(",")
}

impl fmt::Display for LayerMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.layers {
            Layers::All => write!(f, "all")?,
            Layers::Set(s) if s.is_empty() => write!(f, "none")?,
            Layers::Set(s) => write!(f, "{}", fmt_ranges(s))?,
        }
        if let Some(m) = &self.modules {
            let names: Vec<&str> = m.iter().map(|m| m.hf_name()).collect();
            write!(f, "@{}", names.join(","))?;
        }
        Ok(())
    }
}

impl FromStr for LayerMask {
    type Err = ModelError;

    fn from_str(spec: &str) -> Result<Self> {
        let bad = |why: String| ModelError::InvalidArgument(format!("layer mask `{spec}`: {why}"));
        let (layer_part, module_part) = match spec.split_once('@') {
            Some((l, m)) => (l.trim(), Some(m.trim())),
            None => (spec.trim(), None),
        };
        let mut mask = match layer_part {
            "all" | "full" => LayerMask::all(),
            "none" | "base" => LayerMask::none(),
            _ => {
                if let Some(b) = layer_part.strip_prefix("keep-through:") {
                    let b = b.trim().parse::<usize>().map_err(|_| bad(format!("`{b}` is not a block index")))?;
                    if b >= MAX_BLOCKS {
                        return Err(bad(format!("block {b} is past the largest supported index {}", MAX_BLOCKS - 1)));
                    }
                    LayerMask::keep_through(b)
                } else {
                    let mut set = BTreeSet::new();
                    for part in layer_part.split(',').map(str::trim) {
                        let parse = |s: &str| {
                            let b =
                                s.trim().parse::<usize>().map_err(|_| bad(format!("`{s}` is not a block index")))?;
                            if b >= MAX_BLOCKS {
                                return Err(bad(format!(
                                    "block {b} is past the largest supported index {}",
                                    MAX_BLOCKS - 1
                                )));
                            }
                            Ok(b)
                        };
                        match part.split_once('-') {
                            Some((lo, hi)) => {
                                let (lo, hi) = (parse(lo)?, parse(hi)?);
                                if lo > hi {
                                    return Err(bad(format!("range {lo}-{hi} is empty")));
                                }
                                set.extend(lo..=hi);
                            }
                            None => {
                                set.insert(parse(part)?);
                            }
                        }
                    }
                    LayerMask::from_layers(set)
                }
            }
        };
        if let Some(mods) = module_part {
            let mut set = BTreeSet::new();
            for name in mods.split(',').map(str::trim) {
                match name {
                    "attn" => set.extend([Module::Q, Module::K, Module::V, Module::O]),
                    "mlp" => set.extend([Module::Gate, Module::Up, Module::Down]),
                    _ => {
                        set.insert(Module::from_name(name).ok_or_else(|| bad(format!("unknown module `{name}`")))?);
                    }
                }
            }
            mask = mask.with_modules(set);
        }
        Ok(mask)
    }
}

impl Serialize for LayerMask {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for LayerMask {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        for spec in ["all", "none", "0-14", "0-9,20-29", "3", "0-2,5@q_proj,v_proj", "all@gate_proj,up_proj,down_proj"]
        {
            let m: LayerMask = spec.parse().unwrap();
            assert_eq!(m.to_string().parse::<LayerMask>().unwrap(), m, "{spec}");
        }
        assert_eq!("keep-through:3".parse::<LayerMask>().unwrap().to_string(), "0-3");
        assert_eq!("all@mlp".parse::<LayerMask>().unwrap().to_string(), "all@gate_proj,up_proj,down_proj");
    }

    #[test]
    fn bad_specs_are_errors() {
        for spec in ["5-2", "x", "0-", "1@foo", "keep-through:a", "0-18446744073709551615", "keep-through:65536"] {
            assert!(spec.parse::<LayerMask>().is_err(), "{spec}");
        }
        assert!(LayerMask::keep_through(30).validate(30).is_err());
        assert!(LayerMask::keep_through(29).validate(30).is_ok());
    }

    #[test]
    fn activity() {
        let m = LayerMask::keep_through(1);
        assert_eq!(m.active_layers(4), vec![0, 1]);
        assert!(!LayerMask::none().layer_active(0));
        assert_eq!(LayerMask::all().active_layers(3), vec![0, 1, 2]);
    }
}
