//! AdamW with torch's semantics, HF's learning-rate schedules, global-norm clipping and a small seeded RNG.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};

/// Learning-rate schedule after warmup (warmup is always linear from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear decay to 0 (HF `get_linear_schedule_with_warmup`).
    #[default]
    Linear,
    /// Half-cosine decay to 0 (HF `get_cosine_schedule_with_warmup`, `num_cycles = 0.5`).
    Cosine,
    /// Constant after warmup (HF `get_constant_schedule_with_warmup`).
    Constant,
}

/// The factor HF's `LambdaLR` applies to the base learning rate for optimizer step `step` (0-based: the first
/// update uses `step = 0`, so with warmup it has learning rate 0, as in HF).
pub fn lr_factor(schedule: Schedule, step: usize, warmup: usize, total: usize) -> f64 {
    let (s, w, t) = (step as f64, warmup as f64, total as f64);
    if step < warmup {
        return s / w.max(1.0);
    }
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
        Schedule::Cosine => {
            let progress = (s - w) / (t - w).max(1.0);
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}

/// `torch.nn.utils.clip_grad_norm_` over all `grads` (2-norm): returns the total norm *before* clipping and, when
/// `max_norm > 0`, scales every gradient by `min(1, max_norm / (norm + 1e-6))` in place.
///
/// A non-finite norm is an error (torch would silently poison the weights with NaN).
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let mut sq = 0f64;
    for g in grads {
        let n = g.f_to_kind(Kind::Float)?.f_norm()?.f_double_value(&[])?;
        sq += n * n;
    }
    let total = sq.sqrt();
    if !total.is_finite() {
        return Err(ModelError::InvalidArgument(format!(
            "gradient norm is {total}; training diverged (try a lower learning rate)"
        )));
    }
    if max_norm > 0.0 {
        let coef = (max_norm / (total + 1e-6)).min(1.0);
        if coef < 1.0 {
            for g in grads {
                let mut g = g.shallow_clone();
                let _ = g.f_mul_scalar_(coef)?;
            }
        }
    }
    Ok(total)
}

/// Most updates an [`AdamW`] takes (its bias corrections raise the betas to the step's power as an `i32`).
pub const MAX_STEPS: i64 = i32::MAX as i64;

/// AdamW exactly as `torch.optim.AdamW` (single-tensor path, `amsgrad=False`): decoupled weight decay
/// `p ← p·(1 − lr·wd)`, then `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
/// `p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`. State is kept in f32.
#[derive(Debug)]
pub struct AdamW {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    step: i64,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
}

impl AdamW {
    /// Zero state shaped like `params`.
    pub fn new(params: &[Tensor], beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Result<Self> {
        let zeros = |p: &Tensor| -> Result<Tensor> { Ok(Tensor::f_zeros(p.size(), (Kind::Float, p.device()))?) };
        Ok(AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            step: 0,
            exp_avg: params.iter().map(zeros).collect::<Result<_>>()?,
            exp_avg_sq: params.iter().map(zeros).collect::<Result<_>>()?,
        })
    }

    /// Updates done so far (torch's `state["step"]`).
    pub fn steps(&self) -> i64 {
        self.step
    }

    /// First moments (`exp_avg`), one per parameter.
    pub fn exp_avg(&self) -> &[Tensor] {
        &self.exp_avg
    }

    /// Second moments (`exp_avg_sq`), one per parameter.
    pub fn exp_avg_sq(&self) -> &[Tensor] {
        &self.exp_avg_sq
    }

    /// Restores the state (e.g. from a checkpoint); shapes must match, and `step` lie in `0..=`[`MAX_STEPS`].
    pub fn restore(&mut self, step: i64, exp_avg: &[Tensor], exp_avg_sq: &[Tensor]) -> Result<()> {
        if !(0..=MAX_STEPS).contains(&step) {
            return Err(ModelError::InvalidArgument(format!(
                "optimizer step {step} is outside 0..={MAX_STEPS} (a corrupt checkpoint?)"
            )));
        }
        if exp_avg.len() != self.exp_avg.len() || exp_avg_sq.len() != self.exp_avg_sq.len() {
            return Err(ModelError::InvalidArgument(format!(
                "optimizer state holds {} tensors, expected {}",
                exp_avg.len(),
                self.exp_avg.len()
            )));
        }
        let _guard = tch::no_grad_guard();
        for (dst, src) in self.exp_avg.iter_mut().zip(exp_avg).chain(self.exp_avg_sq.iter_mut().zip(exp_avg_sq)) {
            if dst.size() != src.size() {
                return Err(ModelError::InvalidArgument(format!(
                    "optimizer state shape {:?} differs from parameter shape {:?}",
                    src.size(),
                    dst.size()
                )));
            }
            dst.f_copy_(src)?;
        }
        self.step = step;
        Ok(())
    }

    /// One update of every parameter with its gradient, at learning rate `lr`.
    pub fn step(&mut self, params: &[Tensor], grads: &[Tensor], lr: f64) -> Result<()> {
        if params.len() != self.exp_avg.len() || grads.len() != params.len() {
            return Err(ModelError::InvalidArgument(format!(
                "AdamW was built for {} parameters, got {} parameters and {} gradients",
                self.exp_avg.len(),
                params.len(),
                grads.len()
            )));
        }
        let _guard = tch::no_grad_guard();
        if self.step >= MAX_STEPS {
            return Err(ModelError::InvalidArgument(format!(
                "AdamW has taken its largest number of steps ({MAX_STEPS})"
            )));
        }
        self.step += 1;
        // `step ≤ MAX_STEPS` fits an i32 (checked above and in `restore`).
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let step_size = lr / bc1;
        for ((p, g), (m, v)) in params.iter().zip(grads).zip(self.exp_avg.iter_mut().zip(self.exp_avg_sq.iter_mut())) {
            let mut p = p.shallow_clone();
            let g = g.f_to_kind(Kind::Float)?;
            if self.weight_decay != 0.0 {
                let _ = p.f_mul_scalar_(1.0 - lr * self.weight_decay)?;
            }
            let _ = m.f_lerp_(&g, 1.0 - self.beta1)?;
            let _ = v.f_mul_scalar_(self.beta2)?;
            let _ = v.f_add_(&g.f_mul(&g)?.f_mul_scalar(1.0 - self.beta2)?)?;
            let denom = v.f_sqrt()?.f_div_scalar(bc2_sqrt)?.f_add_scalar(self.eps)?;
            let update = m.f_div(&denom)?.f_mul_scalar(step_size)?;
            let _ = p.f_sub_(&update.f_to_kind(p.kind())?)?;
        }
        Ok(())
    }
}

pub(crate) use crate::rng::Rng;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_hf() {
        // warmup 2 of 10 steps.
        assert_eq!(lr_factor(Schedule::Linear, 0, 2, 10), 0.0);
        assert_eq!(lr_factor(Schedule::Linear, 1, 2, 10), 0.5);
        assert_eq!(lr_factor(Schedule::Linear, 2, 2, 10), 1.0);
        assert_eq!(lr_factor(Schedule::Linear, 6, 2, 10), 0.5);
        assert_eq!(lr_factor(Schedule::Linear, 10, 2, 10), 0.0);
        assert!((lr_factor(Schedule::Cosine, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!(
            (lr_factor(Schedule::Cosine, 4, 2, 10) - 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())).abs() < 1e-12
        );
        assert_eq!(lr_factor(Schedule::Constant, 9, 2, 10), 1.0);
        assert_eq!(lr_factor(Schedule::Linear, 0, 0, 10), 1.0);
    }

    #[test]
    fn permutation_is_a_permutation_and_seeded() {
        let p = Rng::derived(7, 1).permutation(50);
        let mut s = p.clone();
        s.sort_unstable();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_eq!(p, Rng::derived(7, 1).permutation(50));
        assert_ne!(p, Rng::derived(7, 2).permutation(50));
    }

    #[test]
    fn a_restored_step_outside_the_range_is_refused() {
        let p = [Tensor::from_slice(&[1.0f32, 2.0])];
        let mut opt = AdamW::new(&p, 0.9, 0.999, 1e-8, 0.0).unwrap();
        let zeros = [Tensor::zeros([2], (Kind::Float, tch::Device::Cpu))];
        for bad in [-1, MAX_STEPS + 1, i64::MAX] {
            let err = opt.restore(bad, &zeros, &zeros).unwrap_err().to_string();
            assert!(err.contains(&bad.to_string()), "{err}");
        }
        assert_eq!(opt.steps(), 0, "a refused restore changed the state");
        opt.restore(MAX_STEPS, &zeros, &zeros).unwrap();
        // No step past the largest: an error, not a wrapped exponent.
        let g = [Tensor::from_slice(&[0.5f32, 0.5])];
        assert!(opt.step(&p, &g, 1e-3).is_err());
        opt.restore(3, &zeros, &zeros).unwrap();
        opt.step(&p, &g, 1e-3).unwrap();
        assert_eq!(opt.steps(), 4);
    }

    #[test]
    fn clipping_matches_torch_rule() {
        let g = [Tensor::from_slice(&[3.0f32, 0.0]), Tensor::from_slice(&[0.0f32, 4.0])];
        let n = clip_grad_norm(&g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        let c = 1.0 / (5.0 + 1e-6);
        assert!((g[0].double_value(&[0]) - 3.0 * c).abs() < 1e-6);
        assert!((g[1].double_value(&[1]) - 4.0 * c).abs() < 1e-6);
    }
}
