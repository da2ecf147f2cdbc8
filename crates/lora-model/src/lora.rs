//! [`LoraLinear`]: a projection with an optional low-rank update, `y = W x + b + (B (A dropout(x))) · scaling`.
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::kernels::{self, LoraPart};

/// The low-rank update of one projection.
#[derive(Debug)]
pub struct LoraWeights {
    /// `lora_A`, shape `[r, in]`.
    pub a: Tensor,
    /// `lora_B`, shape `[out, r]`.
    pub b: Tensor,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scaling: f64,
    /// Dropout on the LoRA input branch while training.
    pub dropout: f64,
    /// Whether `B A · scaling` has been added into the base weight.
    pub merged: bool,
}

impl LoraWeights {
    /// The rank `r`.
    pub fn rank(&self) -> i64 {
        self.a.size().first().copied().unwrap_or(0)
    }

    /// `B A · scaling` in f32.
    pub fn delta(&self) -> Result<Tensor> {
        let b = self.b.f_to_kind(Kind::Float)?;
        let a = self.a.f_to_kind(Kind::Float)?;
        Ok(b.f_matmul(&a)?.f_mul_scalar(self.scaling)?)
    }
}

/// A linear projection (`[out, in]` weight, optional bias) with an optional LoRA update beside it.
///
/// The update is applied only when the caller's [`crate::LayerMask`] says so, which is what makes masks free to
/// switch: nothing is copied or recomputed when the mask changes.
#[derive(Debug)]
pub struct LoraLinear {
    /// Base weight `[out, in]`.
    pub weight: Tensor,
    /// Optional bias `[out]`.
    pub bias: Option<Tensor>,
    /// Optional LoRA update.
    pub lora: Option<LoraWeights>,
}

impl LoraLinear {
    /// A plain projection without LoRA.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        LoraLinear { weight, bias, lora: None }
    }

    /// `W x + b`, plus the LoRA update when `lora_on` (and not merged). `train` enables LoRA dropout.
    pub fn forward(&self, x: &Tensor, lora_on: bool, train: bool) -> Result<Tensor> {
        if !train {
            let part = match &self.lora {
                Some(l) if lora_on && !l.merged => Some(LoraPart { a: &l.a, b: &l.b, scaling: l.scaling }),
                _ => None,
            };
            if let Some(y) = kernels::small_linear(x, &self.weight, self.bias.as_ref(), part)? {
                return Ok(y);
            }
        }
        let y = x.f_linear(&self.weight, self.bias.as_ref())?;
        match &self.lora {
            Some(l) if lora_on && !l.merged => {
                let xa = if train && l.dropout > 0.0 {
                    x.f_dropout(l.dropout, true)?.f_linear::<Tensor>(&l.a, None)?
                } else {
                    x.f_linear::<Tensor>(&l.a, None)?
                };
                let d = xa.f_linear::<Tensor>(&l.b, None)?;
                if train {
                    Ok(y.f_add(&d.f_mul_scalar(l.scaling)?)?)
                } else {
                    // y ← y + scaling · d, in place: one fused kernel, no extra allocation.
                    let mut y = y;
                    let _ = y.f_add_(&d.f_mul_scalar(l.scaling)?)?;
                    Ok(y)
                }
            }
            _ => Ok(y),
        }
    }

    /// Adds the LoRA update into the base weight. A no-op without LoRA or when already merged.
    pub fn merge(&mut self) -> Result<()> {
        if let Some(l) = &mut self.lora {
            if !l.merged {
                let delta = l.delta()?.f_to_kind(self.weight.kind())?;
                let _ = tch::no_grad(|| self.weight.f_add_(&delta))?;
                l.merged = true;
            }
        }
        Ok(())
    }

    /// Subtracts a merged LoRA update from the base weight again.
    pub fn unmerge(&mut self) -> Result<()> {
        if let Some(l) = &mut self.lora {
            if l.merged {
                let delta = l.delta()?.f_to_kind(self.weight.kind())?;
                let _ = tch::no_grad(|| self.weight.f_sub_(&delta))?;
                l.merged = false;
            }
        }
        Ok(())
    }

    /// Attaches a LoRA update, checking its shapes against the base weight.
    pub fn attach(&mut self, lora: LoraWeights, what: &str) -> Result<()> {
        let w = self.weight.size();
        let (a, b) = (lora.a.size(), lora.b.size());
        let ok = a.len() == 2 && b.len() == 2 && a[1] == w[1] && b[0] == w[0] && a[0] == b[1];
        if !ok {
            return Err(ModelError::InvalidArgument(format!(
                "{what}: LoRA shapes A {a:?}, B {b:?} do not fit the base weight {w:?}"
            )));
        }
        self.lora = Some(lora);
        Ok(())
    }
}
