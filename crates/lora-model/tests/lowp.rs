//! bf16 and f16 against transformers (`scripts/fixtures/model/make_lowp_fixtures.py`).
//!
//! Tolerance, from the data: both implementations round every matmul's inputs and outputs to the format, in
//! different places (our decode kernels accumulate in f32 and round once; libtorch rounds each op), so neither is
//! "the" low-precision answer. What we require: our low-precision logits and hidden states are no further from
//! transformers' low-precision ones than transformers' are from its own f32 result, times 2 (plus a floor of two
//! units in the last place of the format at the tensor's scale). Greedy choices on SmolLM2 in bf16, teacher-forced
//! on transformers' own greedy tokens, must agree on every step where transformers' top-1/top-2 logit margin is at
//! least [`NEAR_TIE`] (at SmolLM2's logit scale, ≈ 20, one bf16 ulp is 0.125: a smaller margin is a coin toss
//! between two bf16 implementations' roundings).
#[path = "../../../tests/support/mod.rs"]
mod common;

use std::collections::HashMap;

use lora_model::tch::{Kind, Tensor};
use lora_model::{ForwardOptions, LayerMask, Llama, Placement};

fn read(path: std::path::PathBuf) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

/// Max |a − b| where `mask` is 1, with both in f32.
fn masked_max(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let m = mask.to_kind(Kind::Float).unsqueeze(-1);
    ((a.to_kind(Kind::Float) - b.to_kind(Kind::Float)) * m).abs().max().double_value(&[])
}

fn check_tiny(name: &str, tag: &str, kind: Kind, ulp: f64) {
    let dir = common::fixtures().join("models").join(name);
    let f32_ref = read(dir.join("reference.safetensors"));
    let low_ref = read(dir.join(format!("reference_{tag}.safetensors")));
    let m = Llama::load(&dir, Placement { kind, ..Placement::default() }).unwrap();
    let am = &f32_ref["attention_mask"];
    let none = LayerMask::none();
    let opts = ForwardOptions { hidden_states: true, ..ForwardOptions::new(&none) };
    let out = m.forward(&f32_ref["input_ids"], Some(am), &opts).unwrap();
    let mut pairs = vec![("logits".to_string(), out.logits.unwrap())];
    let last = out.hidden_states.len() - 1;
    for (i, h) in out.hidden_states.into_iter().enumerate() {
        // transformers' last hidden state is after the final norm; ours is the last block's output.
        let h = if i == last { m.final_norm(&h).unwrap() } else { h };
        pairs.push((format!("hidden_states.{i}"), h));
    }
    assert!(pairs.len() > 4, "{name}: too few hidden states");
    for (key, ours) in pairs {
        let theirs = &low_ref[&key];
        let scale = (theirs * am.to_kind(Kind::Float).unsqueeze(-1)).abs().max().double_value(&[]);
        let hf_gap = masked_max(theirs, &f32_ref[&key], am);
        let ours_gap = masked_max(&ours, theirs, am);
        let tol = 2.0 * hf_gap + 2.0 * ulp * scale.max(1.0);
        assert!(
            ours_gap <= tol,
            "{name} {tag} {key}: ours vs transformers {ours_gap:.4} > tolerance {tol:.4} (transformers' own \
             {tag}-vs-f32 gap {hf_gap:.4}, scale {scale:.2})"
        );
    }
}

#[test]
fn tiny_llama_bf16_matches_transformers() {
    check_tiny("tiny-llama", "bf16", Kind::BFloat16, 2f64.powi(-8));
}

#[test]
fn tiny_llama_f16_matches_transformers() {
    check_tiny("tiny-llama", "f16", Kind::Half, 2f64.powi(-11));
}

#[test]
fn tiny_qwen2_bf16_matches_transformers() {
    check_tiny("tiny-qwen2", "bf16", Kind::BFloat16, 2f64.powi(-8));
}

#[test]
fn tiny_qwen2_f16_matches_transformers() {
    check_tiny("tiny-qwen2", "f16", Kind::Half, 2f64.powi(-11));
}

#[test]
fn smollm2_bf16_greedy_choices_agree_with_transformers_on_every_decisive_step() {
    let Some(gguf) = common::smollm2_gguf() else { return };
    let text = std::fs::read_to_string(common::fixtures().join("smollm2/greedy_bf16.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let m = Llama::load(&gguf, Placement { kind: Kind::BFloat16, ..Placement::default() }).unwrap();
    let none = LayerMask::none();
    let (mut decisive, mut near_ties) = (0, 0);
    for row in v["rows"].as_array().unwrap() {
        let ids = |k: &str| -> Vec<i64> { row[k].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect() };
        let (prompt, want) = (ids("prompt_ids"), ids("greedy_ids"));
        let margins: Vec<f64> = row["top2_margin"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        // Teacher-forced on transformers' own tokens: every step sees the context transformers saw, so one
        // near-tie cannot make the rest of the sequence diverge.
        let input: Vec<i64> = prompt.iter().chain(&want[..want.len() - 1]).copied().collect();
        let x = Tensor::from_slice(&input).view([1, -1]);
        let logits = m.forward(&x, None, &ForwardOptions::new(&none)).unwrap().logits.unwrap();
        let choice = logits.get(0).narrow(0, prompt.len() as i64 - 1, want.len() as i64).argmax(-1, false);
        let ours = Vec::<i64>::try_from(choice).unwrap();
        for (i, (&o, &w)) in ours.iter().zip(&want).enumerate() {
            if margins[i] < NEAR_TIE {
                near_ties += 1;
                continue;
            }
            decisive += 1;
            assert_eq!(o, w, "step {i}: transformers' margin {} but we chose {o}, it chose {w}", margins[i]);
        }
    }
    assert!(decisive >= 48, "only {decisive} decisive steps ({near_ties} near-ties skipped)");
    eprintln!("bf16 greedy: {decisive} decisive steps agree, {near_ties} near-ties (margin < {NEAR_TIE}) skipped");
}

/// A top-1/top-2 margin below this (eight bf16 ulps at SmolLM2's logit scale, ≈ 20) is within the rounding
/// differences of two bf16 implementations.
const NEAR_TIE: f64 = 1.0;
