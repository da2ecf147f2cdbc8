//! The Gemma 3 270M decoder (Q4_K_M GGUF, dequantized to f32) against transformers on the same file
//! (`tests/fixtures/gemma3/reference.json`, made by `scripts/fixtures/gemma3/make_gemma3_fixtures.py`): the config
//! transformers derives, the last position's top-20 logits, the logit lens at every block, and 16 greedy tokens on
//! four prompts, batched with left padding and one by one.
//!
//! The GGUF is fetched by `bash scripts/fetch-gemma3.sh` (Gemma Terms of Use, never committed); every test skips
//! with a printed reason when `models/gemma-3-270m-q4_k_m.gguf` is absent (`LORA_GEMMA3_GGUF` overrides the path).
#[path = "../../../tests/support/mod.rs"]
mod common;

use std::path::PathBuf;

use lora_model::config::{Architecture, LayerType, ModelConfig};
use lora_model::tch::{Kind, Tensor};
use lora_model::{generate, kernels, ForwardOptions, GenerationConfig, LayerMask, Llama, Placement};
use serde_json::Value;

/// Tolerance on logits: f32 on both sides from the same dequantized weights, so only the summation order differs
/// (measured: at most 1.5e-5 on the top-20 logits, 2.9e-5 on lens probabilities, 2.6e-4 on lens entropies).
const LOGIT_TOL: f64 = 1e-3;

fn gguf_path() -> Option<PathBuf> {
    common::gemma3_gguf()
}

/// One test loads the model once (f32, CPU; about 1 GiB) and runs every check on it.
#[test]
fn gemma3_270m_matches_transformers() {
    let Some(path) = gguf_path() else { return };
    let model = Llama::load(&path, Placement::default()).expect("load the Gemma 3 GGUF");
    config_equals_transformers_config(&model);
    logits_and_logit_lens_match_transformers(&model);
    greedy_tokens_match_transformers(&model);
}

fn reference() -> Value {
    let p = common::fixtures().join("gemma3/reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn i64s(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// The GGUF's config resolves to what transformers' config.json (the fixture) resolves to.
fn config_equals_transformers_config(model: &Llama) {
    let ours = model.config().clone();
    let theirs = ModelConfig::from_file(common::fixtures().join("gemma3/config.json")).unwrap();
    assert_eq!(ours.architecture, Architecture::Gemma3);
    assert!((ours.rms_norm_eps - theirs.rms_norm_eps).abs() < 1e-12);
    let eps = theirs.rms_norm_eps;
    assert_eq!(ModelConfig { rms_norm_eps: eps, ..ours.clone() }, theirs);
    let g = ours.gemma3.as_ref().unwrap();
    assert_eq!(g.sliding_window, 512);
    assert_eq!((ours.rope_theta, g.local_rope_theta, g.query_pre_attn_scalar), (1e6, 1e4, 256.0));
    let full: Vec<usize> = (0..18).filter(|&i| ours.layer_type(i) == LayerType::FullAttention).collect();
    assert_eq!(full, vec![5, 11, 17]);
    assert!(ours.tie_word_embeddings && g.final_logit_softcapping.is_none());
}

/// Top-20 logits at the last prompt position, and the logit lens (final norm + LM head on every hidden state:
/// probabilities of five target tokens, the top probability, the targets' ranks, the entropy).
fn logits_and_logit_lens_match_transformers(model: &Llama) {
    let r = reference();
    let all = LayerMask::all();
    let opts = ForwardOptions { hidden_states: true, ..ForwardOptions::new(&all) };
    let (mut worst_logit, mut worst_prob, mut worst_entropy) = (0f64, 0f64, 0f64);
    for case in r["prompts"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let ids = i64s(&case["prompt_ids"]);
        let t = ids.len() as i64;
        let out = model.forward(&Tensor::from_slice(&ids).view([1, t]), None, &opts).unwrap();
        let last = out.logits.unwrap().select(0, 0).select(0, t - 1);
        // Top-20: the same ids in the same order, the same values.
        let (vals, idx) = last.topk(20, -1, true, true);
        let got_ids = Vec::<i64>::try_from(&idx).unwrap();
        let got_vals = Vec::<f64>::try_from(&vals.to_kind(Kind::Double)).unwrap();
        let want_vals = f64s(&case["top_logits"]);
        for (k, (g, w)) in got_vals.iter().zip(&want_vals).enumerate() {
            worst_logit = worst_logit.max((g - w).abs());
            assert!((g - w).abs() < LOGIT_TOL, "{prompt:?}: top-{k} logit {g} vs {w}");
        }
        let want_ids = i64s(&case["top_ids"]);
        for (k, (g, w)) in got_ids.iter().zip(&want_ids).enumerate() {
            // Neighbours closer than the tolerance may swap places.
            let close = (want_vals[k] - want_vals[k.saturating_sub(1)]).abs() < LOGIT_TOL
                || want_vals.get(k + 1).is_some_and(|n| (want_vals[k] - n).abs() < LOGIT_TOL);
            assert!(g == w || close, "{prompt:?}: top-{k} id {g} vs {w}");
        }
        // The lens: point i < L is lm_head(final_norm(h_i)); point L is the model's own logits.
        let hs = &out.hidden_states;
        let l = model.num_layers();
        assert_eq!(hs.len(), l + 1);
        let targets = i64s(&case["lens_targets"]);
        let lens = &case["lens"];
        for i in 0..=l {
            let lg = if i < l {
                let h = hs[i].select(0, 0).select(0, t - 1);
                model.lm_head(&model.final_norm(&h).unwrap()).unwrap()
            } else {
                last.shallow_clone()
            };
            let logp = lg.to_kind(Kind::Double).log_softmax(-1, Kind::Double);
            let p = logp.exp();
            let entropy = -(&p * &logp).sum(Kind::Double).double_value(&[]);
            let want_entropy = lens["entropy"][i].as_f64().unwrap();
            worst_entropy = worst_entropy.max((entropy - want_entropy).abs());
            assert!((entropy - want_entropy).abs() < 1e-3, "{prompt:?} point {i}: entropy {entropy} vs {want_entropy}");
            let max_p = p.max().double_value(&[]);
            let want_max = lens["max_prob"][i].as_f64().unwrap();
            worst_prob = worst_prob.max((max_p - want_max).abs());
            assert!((max_p - want_max).abs() < 1e-4, "{prompt:?} point {i}: max prob {max_p} vs {want_max}");
            let logits = Vec::<f32>::try_from(&lg).unwrap();
            for (j, &tgt) in targets.iter().enumerate() {
                let pj = p.double_value(&[tgt]);
                let want = lens["gt_prob"][i][j].as_f64().unwrap();
                worst_prob = worst_prob.max((pj - want).abs());
                assert!(
                    (pj - want).abs() < 1e-4 + 1e-2 * want,
                    "{prompt:?} point {i} target {tgt}: prob {pj} vs {want}"
                );
                // Rank: 1 + entries strictly above the target; near-ties (within the tolerance) may count
                // either way.
                let x = logits[tgt as usize];
                let above = logits.iter().filter(|&&v| v > x).count() as i64 + 1;
                let band = logits.iter().filter(|&&v| (f64::from(v) - f64::from(x)).abs() < LOGIT_TOL).count() as i64;
                let want_rank = lens["gt_rank"][i][j].as_i64().unwrap();
                assert!(
                    (above - want_rank).abs() <= band,
                    "{prompt:?} point {i} target {tgt}: rank {above} vs {want_rank} (±{band} near-ties)"
                );
            }
        }
    }
    eprintln!(
        "worst |Δ| over 4 prompts: top-20 logits {worst_logit:.2e}, lens probabilities {worst_prob:.2e}, \
         lens entropy {worst_entropy:.2e}"
    );
}

/// 16 greedy tokens on the four prompts: batched (left padding) and one prompt at a time, decoded by the fused CPU
/// step.
fn greedy_tokens_match_transformers(model: &Llama) {
    let r = reference();
    let cases = r["prompts"].as_array().unwrap();
    let prompts: Vec<Vec<i64>> = cases.iter().map(|c| i64s(&c["prompt_ids"])).collect();
    let expected: Vec<Vec<i64>> = cases.iter().map(|c| i64s(&c["greedy_ids"])).collect();
    let cfg = GenerationConfig { max_new_tokens: 16, eos_token_ids: vec![], ..Default::default() };
    let before = kernels::fused_decode_steps();
    let (batched, _) = generate(model, None, &prompts, &cfg, &LayerMask::all()).unwrap();
    if kernels::enabled() {
        // The decode steps ran in the fused CPU step (models/decode.rs), Gemma's block included.
        assert!(kernels::fused_decode_steps() > before, "Gemma 3 decode steps did not run fused");
    }
    for ((row, want), c) in batched.iter().zip(&expected).zip(cases) {
        assert_eq!(&row.token_ids, want, "batched: {:?}", c["prompt"]);
    }
    for ((p, want), c) in prompts.iter().zip(&expected).zip(cases) {
        let (single, _) = generate(model, None, std::slice::from_ref(p), &cfg, &LayerMask::all()).unwrap();
        assert_eq!(&single[0].token_ids, want, "one by one: {:?}", c["prompt"]);
    }
}
