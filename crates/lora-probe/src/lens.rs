//! [`LogitLens`]: the final norm and LM head applied to chosen positions of every hidden state.
use lora_model::tch::{Kind, Tensor};
use lora_model::Llama;

use crate::error::Result;

/// Most logits (rows × vocabulary) materialised at once; larger projections are split by points.
const MAX_LOGIT_ELEMENTS: i64 = 64 * 1024 * 1024;

/// Per-point statistics of the lens, each `[points, n]` row-major (`points = L + 1`, `n` gathered positions).
#[derive(Debug, Clone, PartialEq)]
pub struct LensStats {
    /// Number of points (hidden states) projected.
    pub points: usize,
    /// Number of gathered positions per point.
    pub positions: usize,
    /// Probability of the target token.
    pub gt_prob: Vec<f32>,
    /// Largest probability.
    pub max_prob: Vec<f32>,
    /// 1-based rank of the target: 1 + number of vocabulary entries with a strictly larger logit.
    pub gt_rank: Vec<f32>,
    /// Entropy of the distribution in nats.
    pub entropy: Vec<f32>,
}

impl LensStats {
    /// Flat index of point `point`, gathered position `n`.
    pub fn index(&self, point: usize, n: usize) -> usize {
        point * self.positions + n
    }
}

/// The logit lens of one model: `softmax(lm_head(final_norm(h)))` for any hidden state `h`.
///
/// Only the gathered positions are projected, never the full `sequence × vocabulary` of each layer.
#[derive(Debug, Clone, Copy)]
pub struct LogitLens<'a> {
    model: &'a Llama,
}

impl<'a> LogitLens<'a> {
    /// The lens of `model`.
    pub fn new(model: &'a Llama) -> Self {
        LogitLens { model }
    }

    /// Projects the positions `(rows[n], cols[n])` of every state in `hidden` (each `[B, T, H]`, as returned by
    /// [`Llama::forward`] with `hidden_states`; every state is pre-final-norm, so each is normed exactly once) and
    /// scores them against `targets[n]`.
    pub fn project(&self, hidden: &[Tensor], rows: &[i64], cols: &[i64], targets: &[i64]) -> Result<LensStats> {
        if rows.len() != cols.len() || rows.len() != targets.len() {
            return Err(crate::ProbeError::InvalidArgument(format!(
                "lens: {} rows, {} columns and {} targets differ",
                rows.len(),
                cols.len(),
                targets.len()
            )));
        }
        let n = rows.len() as i64;
        let points = hidden.len();
        let mut stats = LensStats {
            points,
            positions: rows.len(),
            gt_prob: Vec::with_capacity(points * rows.len()),
            max_prob: Vec::with_capacity(points * rows.len()),
            gt_rank: Vec::with_capacity(points * rows.len()),
            entropy: Vec::with_capacity(points * rows.len()),
        };
        if n == 0 || points == 0 {
            return Ok(stats);
        }
        let _guard = lora_model::tch::no_grad_guard();
        // Hidden states live on their block's device; the head on the output device.
        let dev = self.model.device_map().output();
        let rows_host = Tensor::from_slice(rows);
        let cols_host = Tensor::from_slice(cols);
        let vocab = self.model.config().vocab_size as i64;
        let per_chunk = (MAX_LOGIT_ELEMENTS / (n * vocab.max(1))).max(1) as usize;
        let tgt = Tensor::from_slice(targets).f_to_device(dev)?;
        for chunk in hidden.chunks(per_chunk) {
            let gathered = chunk
                .iter()
                .map(|h| {
                    let (r, c) = (rows_host.f_to_device(h.device())?, cols_host.f_to_device(h.device())?);
                    h.f_index(&[Some(&r), Some(&c)])?.f_to_device(dev)
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let c = chunk.len() as i64;
            let x = Tensor::f_cat(&gathered, 0)?; // [c * n, H]
            let repeated: Vec<i64> = (0..c).flat_map(|_| targets.iter().copied()).collect();
            if let Some(rows) = self.model.lens_stats(&x, &repeated)? {
                for r in rows {
                    stats.gt_prob.push(r.target_prob);
                    stats.max_prob.push(r.max_prob);
                    stats.gt_rank.push(r.rank);
                    stats.entropy.push(r.entropy);
                }
                continue;
            }
            let logits = self.model.lm_head(&self.model.final_norm(&x)?)?.f_to_kind(Kind::Float)?;
            let t = tgt.f_repeat([c])?.f_unsqueeze(1)?; // [c * n, 1]
            let (gt_prob, max_prob, rank, entropy) = scores(&logits, &t)?;
            stats.gt_prob.extend(to_vec(&gt_prob)?);
            stats.max_prob.extend(to_vec(&max_prob)?);
            stats.gt_rank.extend(to_vec(&rank)?);
            stats.entropy.extend(to_vec(&entropy)?);
        }
        Ok(stats)
    }
}

/// Probed-token probability, max probability, 1-based rank and entropy of each row of f32 `logits` `[M, V]`
/// against `targets` `[M, 1]`, in few passes over the `M × V` logits: one softmax, one max, one dot product and one
/// comparison (the statistics are memory-bound, so passes are what costs).
fn scores(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let (m, v) = (logits.size()[0], logits.size()[1]);
    let (max_logit, argmax) = logits.f_max_dim(1, true)?; // [M, 1]
    let probs = logits.f_softmax(-1, Kind::Float)?;
    let max_prob = probs.f_gather(1, &argmax, false)?;
    let gt_prob = probs.f_gather(1, targets, false)?.f_squeeze_dim(1)?;
    let gt_logit = logits.f_gather(1, targets, false)?;
    let rank =
        logits.f_gt_tensor(&gt_logit)?.f_sum_dim_intlist(Some(&[1i64][..]), false, Kind::Float)?.f_add_scalar(1.0)?;
    // H = logsumexp - E_p[logit], with logsumexp = max_logit - log(max_prob) (max_prob >= 1/V: no underflow).
    let lse = max_logit.f_sub(&max_prob.f_log()?)?.f_squeeze_dim(1)?;
    let mean_logit = probs.f_view([m, 1, v])?.f_bmm(&logits.f_view([m, v, 1])?)?.f_view([m])?;
    let mut entropy = lse.f_sub(&mean_logit)?;
    // A -inf logit makes 0 * -inf = NaN in the dot product: recompute those rows as -sum p log p with 0 log 0 = 0.
    if bool::try_from(entropy.f_isnan()?.f_any()?)? {
        let logp = logits.f_log_softmax(-1, Kind::Float)?;
        let plogp = probs.f_mul(&logp)?.f_nan_to_num(0.0, None, None)?;
        entropy = plogp.f_sum_dim_intlist(Some(&[1i64][..]), false, Kind::Float)?.f_neg()?;
    }
    Ok((gt_prob, max_prob.f_squeeze_dim(1)?, rank, entropy))
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    let t = t.f_to_kind(Kind::Float)?.f_to_device(lora_model::tch::Device::Cpu)?.f_contiguous()?;
    Ok(Vec::<f32>::try_from(&t.f_flatten(0, -1)?)?)
}
