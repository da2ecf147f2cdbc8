//! The decoder against HF transformers on tiny random models (fixtures from
//! `scripts/fixtures/model/make_model_fixtures.py`): logits, every hidden state, greedy tokens.
#[path = "../../../tests/support/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use lora_model::tch::{Kind, Tensor};
use lora_model::{generate, ForwardOptions, GenerationConfig, LayerMask, Llama, Placement};

fn fixtures() -> PathBuf {
    common::fixtures().join("models")
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixtures().join(name).join("reference.safetensors")).unwrap().into_iter().collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Compares positions where `mask` is 1; returns the max abs difference.
fn masked_diff(ours: &Tensor, theirs: &Tensor, mask: &Tensor) -> f64 {
    let m = mask.to_kind(Kind::Float).unsqueeze(-1);
    max_abs_diff(&(ours * &m), &(theirs * &m))
}

fn check_forward(name: &str) {
    let model = Llama::load(fixtures().join(name), Placement::default()).unwrap();
    let r = reference(name);
    let ids = &r["input_ids"];
    let mask = &r["attention_mask"];
    let all = LayerMask::all();
    let opts = ForwardOptions { hidden_states: true, ..ForwardOptions::new(&all) };
    let out = model.forward(ids, Some(mask), &opts).unwrap();
    let logits = out.logits.unwrap();
    let d = masked_diff(&logits, &r["logits"], mask);
    assert!(d < 1e-4, "{name}: logits differ by {d}");
    let l = model.num_layers();
    assert_eq!(out.hidden_states.len(), l + 1);
    for i in 0..l {
        let d = masked_diff(&out.hidden_states[i], &r[&format!("hidden_states.{i}")], mask);
        assert!(d < 1e-4, "{name}: hidden state {i} differs by {d}");
        let d = masked_diff(&out.hidden_states[i + 1], &r[&format!("block_output.{i}")], mask);
        assert!(d < 1e-4, "{name}: block {i} output differs by {d}");
    }
    // HF's last hidden state is the final-normed one.
    let normed = model.final_norm(&out.hidden_states[l]).unwrap();
    let d = masked_diff(&normed, &r[&format!("hidden_states.{l}")], mask);
    assert!(d < 1e-4, "{name}: final normed state differs by {d}");
}

fn check_greedy(name: &str) {
    let model = Llama::load(fixtures().join(name), Placement::default()).unwrap();
    let r = reference(name);
    let ids = Vec::<Vec<i64>>::try_from(&r["gen_input_ids"]).unwrap();
    let mask = Vec::<Vec<i64>>::try_from(&r["gen_attention_mask"]).unwrap();
    let expected = Vec::<Vec<i64>>::try_from(&r["gen_tokens"]).unwrap();
    let prompts: Vec<Vec<i64>> = ids
        .iter()
        .zip(&mask)
        .map(|(row, m)| row.iter().zip(m).filter(|(_, &m)| m == 1).map(|(&t, _)| t).collect())
        .collect();
    let cfg = GenerationConfig { max_new_tokens: expected[0].len(), ..Default::default() };
    let (batched, _) = generate(&model, None, &prompts, &cfg, &LayerMask::all()).unwrap();
    for (row, exp) in batched.iter().zip(&expected) {
        assert_eq!(&row.token_ids, exp, "{name}: batched greedy tokens");
    }
    for (p, exp) in prompts.iter().zip(&expected) {
        let (single, _) = generate(&model, None, std::slice::from_ref(p), &cfg, &LayerMask::all()).unwrap();
        assert_eq!(&single[0].token_ids, exp, "{name}: one-by-one greedy tokens");
    }
}

#[test]
fn tiny_llama_matches_transformers() {
    check_forward("tiny-llama");
    check_greedy("tiny-llama");
}

#[test]
fn sharded_checkpoint_loads_the_same_weights() {
    check_forward("tiny-llama-sharded");
}

#[test]
fn tiny_qwen2_with_bias_matches_transformers() {
    check_forward("tiny-qwen2");
    check_greedy("tiny-qwen2");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    check_forward("tiny-llama3-rope");
    check_greedy("tiny-llama3-rope");
}

/// Gemma 3 (tiny, random): sliding-window (4) and full layers with their own RoPE bases, q/k norms, `1 + w`
/// norms before and after attention and MLP, GELU-tanh, scaled embeddings, `query_pre_attn_scalar` 24 against
/// head_dim 16, final logit soft-capping; T = 12 and 7 + 10 generated tokens run past the window.
#[test]
fn tiny_gemma3_matches_transformers() {
    check_forward("tiny-gemma3");
    check_greedy("tiny-gemma3");
}

/// Token-by-token cached decoding past the sliding window equals the full forward, on a padded batch too.
#[test]
fn gemma3_cached_decoding_past_the_window_equals_full_forward() {
    let model = Llama::load(fixtures().join("tiny-gemma3"), Placement::default()).unwrap();
    let r = reference("tiny-gemma3");
    let (ids, mask) = (&r["input_ids"], &r["attention_mask"]);
    let all = LayerMask::all();
    let opts = ForwardOptions::new(&all);
    let full = model.forward(ids, Some(mask), &opts).unwrap().logits.unwrap();
    let t = ids.size()[1];
    let mut cache = model.new_cache(2, t).unwrap();
    let mut parts = vec![model.forward_cached(&ids.narrow(1, 0, 5), Some(&mask.narrow(1, 0, 5)), &mut cache, &opts)];
    for i in 5..t {
        parts.push(model.forward_cached(&ids.narrow(1, i, 1), None, &mut cache, &opts));
    }
    let parts: Vec<Tensor> = parts.into_iter().map(|p| p.unwrap().logits.unwrap()).collect();
    let stitched = Tensor::cat(&parts, 1);
    let d = masked_diff(&stitched, &full, mask);
    assert!(d < 1e-4, "cached vs full logits differ by {d}");
    let d = masked_diff(&full, &r["logits"], mask);
    assert!(d < 1e-4, "full logits differ from transformers by {d}");
}

#[test]
fn cached_decoding_equals_full_forward() {
    let model = Llama::load(fixtures().join("tiny-llama"), Placement::default()).unwrap();
    let ids = Tensor::from_slice(&[5i64, 17, 42, 7, 99, 3]).view([1, 6]);
    let all = LayerMask::all();
    let full = model.forward(&ids, None, &ForwardOptions::new(&all)).unwrap().logits.unwrap();
    let mut cache = model.new_cache(1, 8).unwrap();
    let opts = ForwardOptions::new(&all);
    let a = model.forward_cached(&ids.narrow(1, 0, 4), None, &mut cache, &opts).unwrap();
    let b = model.forward_cached(&ids.narrow(1, 4, 1), None, &mut cache, &opts).unwrap();
    let c = model.forward_cached(&ids.narrow(1, 5, 1), None, &mut cache, &opts).unwrap();
    let stitched = Tensor::cat(&[a.logits.unwrap(), b.logits.unwrap(), c.logits.unwrap()], 1);
    assert!(max_abs_diff(&stitched, &full) < 1e-4);
    assert_eq!(cache.len(), 6);
    // Overflowing the cache is an error, not a panic.
    let err = model.forward_cached(&ids.narrow(1, 0, 3), None, &mut cache, &opts).unwrap_err();
    assert!(err.to_string().contains("KV cache"), "{err}");
}

#[test]
fn bad_inputs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Missing weights.
    std::fs::copy(fixtures().join("tiny-llama/config.json"), dir.path().join("config.json")).unwrap();
    let err = Llama::load(dir.path(), Placement::default()).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    // A tensor with the wrong shape names the tensor and the file.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny-llama/config.json")).unwrap()).unwrap();
    let mut cfg = cfg;
    cfg["hidden_size"] = serde_json::json!(32);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(fixtures().join("tiny-llama/model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let err = Llama::load(dir.path(), Placement::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("model.embed_tokens.weight") && msg.contains("model.safetensors"), "{msg}");
    // Out-of-vocabulary ids.
    let model = Llama::load(fixtures().join("tiny-llama"), Placement::default()).unwrap();
    let err = generate(&model, None, &[vec![1, 100_000]], &GenerationConfig::default(), &LayerMask::all()).unwrap_err();
    assert!(err.to_string().contains("100000"), "{err}");
    // A mask naming a block the model lacks.
    let m = LayerMask::keep_through(10);
    let ids = Tensor::from_slice(&[1i64, 2]).view([1, 2]);
    assert!(model.forward(&ids, None, &ForwardOptions::new(&m)).is_err());
}
