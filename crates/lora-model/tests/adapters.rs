//! PEFT adapters against PEFT itself (fixtures from `scripts/fixtures/model/make_adapter_fixtures.py`): full,
//! base, keep-through, dropped ranges and merged logits; unmerge; prune; refusals.
#[path = "../../../tests/support/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::Path;

use lora_model::adapter::{merge, unmerge};
use lora_model::tch::{Kind, Tensor};
use lora_model::{load_adapter, prune_adapter, ForwardOptions, LayerMask, Llama, Module, Placement};

use common::fixtures;

fn load(base: &str, adapter: Option<&Path>) -> Llama {
    let mut m = Llama::load(fixtures().join("models").join(base), Placement::default()).unwrap();
    if let Some(a) = adapter {
        load_adapter(&mut m, a).unwrap();
    }
    m
}

fn reference(adapter: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixtures().join("adapters").join(adapter).join("reference.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn logits(m: &Llama, r: &HashMap<String, Tensor>, mask: &LayerMask) -> Tensor {
    m.forward(&r["input_ids"], Some(&r["attention_mask"]), &ForwardOptions::new(mask)).unwrap().logits.unwrap()
}

fn diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let m = mask.to_kind(Kind::Float).unsqueeze(-1);
    ((a - b) * m).abs().max().double_value(&[])
}

/// Every logits key of the fixture, with the mask that reproduces it.
fn masks(r: &HashMap<String, Tensor>, layers: usize) -> Vec<(String, LayerMask)> {
    let mut out = vec![("logits_full".to_string(), LayerMask::all()), ("logits_base".to_string(), LayerMask::none())];
    for key in r.keys() {
        if let Some(b) = key.strip_prefix("logits_keep_through_") {
            out.push((key.clone(), LayerMask::keep_through(b.parse().unwrap())));
        } else if let Some(range) = key.strip_prefix("logits_drop_") {
            let (lo, hi) = range.split_once('_').unwrap();
            let (lo, hi): (usize, usize) = (lo.parse().unwrap(), hi.parse().unwrap());
            out.push((key.clone(), LayerMask::from_layers((0..layers).filter(|l| *l < lo || *l > hi))));
        }
    }
    out
}

fn check_adapter(base: &str, adapter: &str) {
    let dir = fixtures().join("adapters").join(adapter);
    let mut m = load(base, Some(&dir));
    let r = reference(adapter);
    let am = &r["attention_mask"];
    let cases = masks(&r, m.num_layers());
    assert!(cases.len() >= 4, "{adapter}: fixture has too few masks");
    for (key, mask) in &cases {
        let d = diff(&logits(&m, &r, mask), &r[key], am);
        assert!(d < 1e-4, "{adapter}: {key} (mask {mask}) differs from PEFT by {d}");
    }
    // Merged: LoRA folded into the weights equals PEFT's merge_and_unload.
    let w0 = m.projection(0, Module::Q).unwrap().weight.copy();
    merge(&mut m, &LayerMask::all()).unwrap();
    let d = diff(&logits(&m, &r, &LayerMask::all()), &r["logits_merged"], am);
    assert!(d < 1e-4, "{adapter}: merged logits differ from PEFT by {d}");
    unmerge(&mut m).unwrap();
    let restored = (&m.projection(0, Module::Q).unwrap().weight - &w0).abs().max().double_value(&[]);
    assert!(restored < 1e-5, "{adapter}: unmerge left a difference of {restored}");
    let d = diff(&logits(&m, &r, &LayerMask::all()), &r["logits_full"], am);
    assert!(d < 1e-4, "{adapter}: after unmerge, full logits differ by {d}");
}

#[test]
fn basic_adapter_matches_peft() {
    check_adapter("tiny-llama", "tiny-llama-basic");
}

#[test]
fn rslora_rank_and_alpha_patterns_match_peft() {
    check_adapter("tiny-llama", "tiny-llama-rslora-patterns");
}

#[test]
fn layers_to_transform_and_regex_targets_match_peft() {
    check_adapter("tiny-llama", "tiny-llama-layers");
    check_adapter("tiny-llama", "tiny-llama-regex");
}

/// LoRA on Gemma 3's seven projections with rank and alpha patterns and `layers_to_transform`.
#[test]
fn gemma3_adapter_with_patterns_matches_peft() {
    check_adapter("tiny-gemma3", "tiny-gemma3-patterns");
}

/// A merged Gemma 3 written as an HF directory loads back as the same model: PEFT's `merge_and_unload` logits.
#[test]
fn merged_gemma3_exports_and_reloads() {
    let mut m = load("tiny-gemma3", Some(&fixtures().join("adapters/tiny-gemma3-patterns")));
    let r = reference("tiny-gemma3-patterns");
    merge(&mut m, &LayerMask::all()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    lora_model::export::save_hf_model(&m, None, &out, &Default::default()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "gemma3_text");
    // transformers types it `int` and refuses 24.0.
    assert_eq!(cfg["query_pre_attn_scalar"], serde_json::json!(24));
    assert_eq!(cfg["rope_parameters"]["sliding_attention"]["rope_theta"].as_f64(), Some(10000.0));
    let reloaded = Llama::load(&out, Placement::default()).unwrap();
    assert_eq!(reloaded.config(), m.config());
    let d = diff(&logits(&reloaded, &r, &LayerMask::none()), &r["logits_merged"], &r["attention_mask"]);
    assert!(d < 1e-4, "reloaded merged Gemma 3 differs from PEFT's merge by {d}");
}

#[test]
fn qwen2_adapter_matches_peft() {
    check_adapter("tiny-qwen2", "tiny-qwen2-basic");
}

#[test]
fn prune_writes_what_peft_loads() {
    let src = fixtures().join("adapters/tiny-llama-basic");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pruned");
    let kept = prune_adapter(&src, &LayerMask::keep_through(1), &out).unwrap();
    assert_eq!(kept, vec![0, 1]);
    // Same tensors as the adapter PEFT itself wrote for blocks 0-1.
    let expected: HashMap<String, Tensor> = Tensor::read_safetensors(
        fixtures().join("adapters/tiny-llama-basic-pruned-expected/adapter_model.safetensors"),
    )
    .unwrap()
    .into_iter()
    .collect();
    let ours: HashMap<String, Tensor> =
        Tensor::read_safetensors(out.join("adapter_model.safetensors")).unwrap().into_iter().collect();
    assert_eq!(ours.len(), expected.len());
    for (k, v) in &expected {
        assert!(ours[k].equal(v), "{k}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["layers_to_transform"], serde_json::json!([0, 1]));
    // Our own loader on the pruned adapter gives PEFT's keep-through-1 logits.
    let m = load("tiny-llama", Some(&out));
    let r = reference("tiny-llama-basic");
    let d = diff(&logits(&m, &r, &LayerMask::all()), &r["logits_keep_through_1"], &r["attention_mask"]);
    assert!(d < 1e-4, "pruned adapter differs from PEFT keep-through-1 by {d}");
    // Writing over an existing directory is refused, leaving it untouched.
    assert!(prune_adapter(&src, &LayerMask::keep_through(1), &out).is_err());
}

#[test]
fn kept_fraction_counts_each_modules_own_parameters() {
    // q/k/v/o and the MLP projections have different `in + out`: a module-filtered mask keeps the share of the
    // parameters those modules hold, counted from the adapter's own tensors.
    let dir = fixtures().join("adapters/tiny-llama-basic");
    let mut m = load("tiny-llama", None);
    let info = load_adapter(&mut m, &dir).unwrap();
    let tensors = Tensor::read_safetensors(dir.join("adapter_model.safetensors")).unwrap();
    let count = |keep: &dyn Fn(&str) -> bool| -> f64 {
        tensors.iter().filter(|(n, _)| keep(n)).map(|(_, t)| t.numel() as f64).sum()
    };
    let total = count(&|_| true);
    let attn = count(&|n| n.contains(".self_attn."));
    assert!(attn > 0.0 && attn < total);
    // Not the share of the ranks (4 of 7 equal-rank modules per block), which the fraction used to be.
    let modules = tensors.iter().filter(|(n, _)| n.contains("lora_A")).count() as f64;
    let attn_modules = tensors.iter().filter(|(n, _)| n.contains("lora_A") && n.contains(".self_attn.")).count() as f64;
    assert!((attn / total - attn_modules / modules).abs() > 0.01, "this fixture cannot tell the two apart");
    let mask = LayerMask::all().with_modules([Module::Q, Module::K, Module::V, Module::O]);
    let got = info.kept_fraction(&mask);
    assert!((got - attn / total).abs() < 1e-12, "kept {got}, the tensors say {}", attn / total);
    let blocks01 = count(&|n| n.contains(".layers.0.") || n.contains(".layers.1."));
    assert!((info.kept_fraction(&LayerMask::keep_through(1)) - blocks01 / total).abs() < 1e-12);
}

#[test]
fn a_tensor_on_an_absurd_block_is_refused_naming_it() {
    // The block index comes from the tensor's name in the file; a huge one must not make the pruner walk (or
    // allocate for) every block up to it. The loader refuses it as a block the model does not have.
    let src = fixtures().join("adapters/tiny-llama-basic");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("far");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("adapter_config.json"), dir.join("adapter_config.json")).unwrap();
    let mut tensors = Tensor::read_safetensors(src.join("adapter_model.safetensors")).unwrap();
    for (name, _) in tensors.iter_mut() {
        if name.contains(".layers.0.self_attn.q_proj.") {
            *name = name.replace(".layers.0.", ".layers.99999999999.");
        }
    }
    Tensor::write_safetensors(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    let out = tmp.path().join("pruned");
    let err = prune_adapter(&dir, &LayerMask::keep_through(1), &out).unwrap_err().to_string();
    assert!(err.contains("layers.99999999999") && err.contains("block 99999999999"), "{err}");
    assert!(!out.exists(), "a refused prune left {}", out.display());
    let mut m = load("tiny-llama", None);
    let err = load_adapter(&mut m, &dir).unwrap_err().to_string();
    assert!(err.contains("99999999999"), "{err}");
}

fn write_adapter(dir: &Path, config: serde_json::Value, from: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    std::fs::copy(
        fixtures().join("adapters").join(from).join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
}

fn base_config(from: &str) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("adapters").join(from).join("adapter_config.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn unsupported_or_mismatched_adapters_are_refused_before_compute() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = load("tiny-llama", None);
    let refuse = |m: &mut Llama, name: &str, patch: serde_json::Value, from: &str, expect: &str| {
        let dir = tmp.path().join(name);
        let mut cfg = base_config(from);
        for (k, v) in patch.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        write_adapter(&dir, cfg, from);
        let err = load_adapter(m, &dir).unwrap_err().to_string();
        assert!(err.contains(expect), "{name}: `{err}` should mention `{expect}`");
        // Nothing was attached.
        assert!(m.projection(0, Module::Q).unwrap().lora.is_none(), "{name}");
    };
    refuse(&mut m, "dora", serde_json::json!({"use_dora": true}), "tiny-llama-basic", "DoRA");
    refuse(&mut m, "save", serde_json::json!({"modules_to_save": ["lm_head"]}), "tiny-llama-basic", "modules_to_save");
    refuse(&mut m, "bias", serde_json::json!({"bias": "lora_only"}), "tiny-llama-basic", "bias");
    refuse(&mut m, "lora_bias", serde_json::json!({"lora_bias": true}), "tiny-llama-basic", "lora_bias");
    refuse(&mut m, "nomatch", serde_json::json!({"target_modules": ["c_attn"]}), "tiny-llama-basic", "does not target");
    refuse(&mut m, "rank", serde_json::json!({"r": 8}), "tiny-llama-basic", "shape");
    // An adapter made for another model (Qwen2, 3 blocks, different widths).
    refuse(&mut m, "qwen", serde_json::json!({}), "tiny-qwen2-basic", "model.layers.3");
    // Pickled weights are never loaded.
    let dir = tmp.path().join("pickle");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), base_config("tiny-llama-basic").to_string()).unwrap();
    std::fs::write(dir.join("adapter_model.bin"), b"not a pickle").unwrap();
    let err = load_adapter(&mut m, &dir).unwrap_err().to_string();
    assert!(err.contains("pickle"), "{err}");
}

#[test]
fn masks_switch_without_reloading() {
    let m = load("tiny-llama", Some(&fixtures().join("adapters/tiny-llama-basic")));
    let r = reference("tiny-llama-basic");
    let am = &r["attention_mask"];
    // Alternate masks on the same loaded model; each result stays exact.
    for _ in 0..2 {
        for (key, mask) in [("logits_keep_through_0", LayerMask::keep_through(0)), ("logits_full", LayerMask::all())] {
            assert!(diff(&logits(&m, &r, &mask), &r[key], am) < 1e-4, "{key}");
        }
    }
}

/// `forward_from` continues a full-LoRA pass above block `b` without LoRA and lands on PEFT's keep-through(b)
/// logits (the prefix sharing the proxy scorer relies on); bad starts and shapes are refused.
#[test]
fn forward_from_a_shared_prefix_equals_keep_through() {
    let m = load("tiny-llama", Some(&fixtures().join("adapters/tiny-llama-basic")));
    let r = reference("tiny-llama-basic");
    let am = &r["attention_mask"];
    let all = LayerMask::all();
    let opts = ForwardOptions { hidden_states: true, ..ForwardOptions::new(&all) };
    let full = m.forward(&r["input_ids"], Some(am), &opts).unwrap();
    let mut checked = 0;
    for (key, mask) in masks(&r, m.num_layers()) {
        let Some(b) = key.strip_prefix("logits_keep_through_") else { continue };
        let b: usize = b.parse().unwrap();
        let none = LayerMask::none();
        let out = m.forward_from(&full.hidden_states[b + 1], b + 1, Some(am), &ForwardOptions::new(&none)).unwrap();
        let d = diff(out.logits.as_ref().unwrap(), &r[&key], am);
        assert!(d < 1e-4, "{key} (mask {mask}): forward_from differs from PEFT by {d}");
        checked += 1;
    }
    assert!(checked >= 1, "fixture has no keep-through logits");
    // From the last state: only the head, equal to the full pass.
    let l = m.num_layers();
    let out = m.forward_from(&full.hidden_states[l], l, Some(am), &ForwardOptions::new(&LayerMask::none())).unwrap();
    assert!(diff(out.logits.as_ref().unwrap(), &r["logits_full"], am) < 1e-4);
    assert!(m.forward_from(&full.hidden_states[0], l + 1, None, &ForwardOptions::new(&LayerMask::none())).is_err());
    let wrong = Tensor::zeros([1, 3, 5], (Kind::Float, lora_model::tch::Device::Cpu));
    let err = m.forward_from(&wrong, 0, None, &ForwardOptions::new(&LayerMask::none())).unwrap_err().to_string();
    assert!(err.contains("hidden states"), "{err}");
}
