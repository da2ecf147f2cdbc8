//! Blocks placed over several devices: a model split over two CPU "devices" (the cross-device code paths — per
//! block weights, KV cache and step context, the head with the last block, a tied head's copy) gives the same
//! logits, hidden states and greedy tokens as on one device, and still matches PEFT (fixtures from
//! `scripts/fixtures/model/make_adapter_fixtures.py`); a plan made from capacities loads as planned; a model too
//! large for the memory available is refused before anything is allocated.
#[path = "../../../tests/support/mod.rs"]
mod common;

use std::collections::HashMap;

use lora_model::device_map::{DeviceMap, Footprint};
use lora_model::tch::{Device, Kind, Tensor};
use lora_model::{
    generate, load_adapter, ForwardOptions, GenerationConfig, LayerMask, Llama, ModelConfig, ModelError, Placement,
};

use common::fixtures;

fn reference(adapter: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixtures().join("adapters").join(adapter).join("reference.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn load(base: &str, adapter: &str, map: Option<DeviceMap>) -> Llama {
    let path = fixtures().join("models").join(base);
    let mut m = match map {
        Some(map) => Llama::load_mapped(&path, Kind::Float, map).unwrap(),
        None => Llama::load(&path, Placement::default()).unwrap(),
    };
    load_adapter(&mut m, fixtures().join("adapters").join(adapter)).unwrap();
    m
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Split `base` (+ `adapter`) over two CPU slots at `first` blocks and compare with one device, and with PEFT.
fn check_split(base: &str, adapter: &str, first: usize) {
    let one = load(base, adapter, None);
    let layers = one.num_layers();
    let map = DeviceMap::split(&[Device::Cpu, Device::Cpu], &[first, layers - first]).unwrap();
    let split = load(base, adapter, Some(map));
    assert_eq!(split.device_map().segments(), vec![(0..first, 0), (first..layers, 1)]);
    assert!(!split.device_map().is_single());

    let r = reference(adapter);
    let (ids, am) = (&r["input_ids"], &r["attention_mask"]);
    let keep = LayerMask::keep_through(first - 1);
    for (name, mask) in [("full", LayerMask::all()), ("keep", keep), ("none", LayerMask::none())] {
        let opts = ForwardOptions { hidden_states: true, ..ForwardOptions::new(&mask) };
        let a = one.forward(ids, Some(am), &opts).unwrap();
        let b = split.forward(ids, Some(am), &opts).unwrap();
        let (la, lb) = (a.logits.unwrap(), b.logits.unwrap());
        assert_eq!(max_diff(&la, &lb), 0.0, "{base} {name}: logits differ between one device and the split");
        assert_eq!(a.hidden_states.len(), layers + 1);
        for (l, (x, y)) in a.hidden_states.iter().zip(&b.hidden_states).enumerate() {
            assert_eq!(max_diff(x, y), 0.0, "{base} {name}: hidden state {l} differs");
        }
        if name == "full" {
            let m = am.to_kind(Kind::Float).unsqueeze(-1);
            let d = ((&lb - &r["logits_full"]) * m).abs().max().double_value(&[]);
            assert!(d < 1e-4, "{base}: split full-LoRA logits differ from PEFT by {d}");
        }
        // Resuming from the state after `first` blocks crosses the device boundary at once.
        let from = split.forward_from(&b.hidden_states[first], first, Some(am), &ForwardOptions::new(&mask)).unwrap();
        assert_eq!(max_diff(&from.logits.unwrap(), &lb), 0.0, "{base} {name}: forward_from differs");
    }

    // Cached, batched greedy generation (left padding, KV cache per block device).
    let prompts = vec![vec![5, 9, 13, 2, 7], vec![11, 3, 8]];
    let cfg = GenerationConfig { max_new_tokens: 6, eos_token_ids: vec![], ..Default::default() };
    let all = LayerMask::all();
    let tokens = |m: &Llama| -> Vec<Vec<i64>> {
        generate(m, None, &prompts, &cfg, &all).unwrap().0.into_iter().map(|g| g.token_ids).collect()
    };
    let (a, b) = (tokens(&one), tokens(&split));
    assert_eq!(a, b, "{base}: greedy tokens differ between one device and the split");
    assert!(a.iter().all(|t| t.len() == 6));
}

#[test]
fn untied_llama_split_equals_one_device_and_peft() {
    check_split("tiny-llama", "tiny-llama-basic", 1);
    check_split("tiny-llama", "tiny-llama-basic", 3);
}

#[test]
fn tied_qwen2_split_equals_one_device_and_peft() {
    // Tied head: the last block's device gets its own copy of the embedding.
    check_split("tiny-qwen2", "tiny-qwen2-basic", 2);
}

#[test]
fn a_plan_from_capacities_loads_as_planned() {
    let path = fixtures().join("models").join("tiny-llama");
    let config = ModelConfig::from_file(path.join("config.json")).unwrap();
    let fp = Footprint::of(&config, Kind::Float);
    // Room for the embedding and two blocks (with their planned KV cache) on the first slot.
    let first = fp.embed + 2 * (fp.blocks[0] + fp.kv_per_block);
    let map = DeviceMap::plan(&fp, &[(Device::Cpu, first), (Device::Cpu, u64::MAX)]).unwrap();
    assert_eq!(map.segments(), vec![(0..2, 0), (2..4, 1)]);
    let split = Llama::load_mapped(&path, Kind::Float, map).unwrap();
    let one = Llama::load(&path, Placement::default()).unwrap();
    let ids = Tensor::from_slice(&[3i64, 17, 4, 29, 8]).view([1, 5]);
    let all = LayerMask::all();
    let (a, b) = (
        one.forward(&ids, None, &ForwardOptions::new(&all)).unwrap().logits.unwrap(),
        split.forward(&ids, None, &ForwardOptions::new(&all)).unwrap().logits.unwrap(),
    );
    assert_eq!(max_diff(&a, &b), 0.0);
    // A map for the wrong number of blocks is refused.
    let wrong = DeviceMap::split(&[Device::Cpu, Device::Cpu], &[1, 1]).unwrap();
    let err = Llama::load_mapped(&path, Kind::Float, wrong).unwrap_err();
    assert!(err.to_string().contains("places 2 blocks but the model has 4"), "{err}");
}

#[test]
fn a_model_too_large_for_memory_is_refused_before_loading() {
    // A config of a ~10 TB model with no weight files: the plan refuses it before any file is opened (a missing
    // safetensors file would be a different error).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type":"llama","vocab_size":256000,"hidden_size":65536,"intermediate_size":262144,
            "num_hidden_layers":200,"num_attention_heads":512,"num_key_value_heads":64}"#,
    )
    .unwrap();
    let err = Llama::load(dir.path(), Placement { kind: Kind::BFloat16, ..Placement::default() }).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Limit(_)), "{msg}");
    assert!(msg.contains("does not fit") && msg.contains("GiB") && msg.contains("free: cpu"), "{msg}");
}

#[test]
fn cuda_and_cpu_split_matches_cpu() {
    if !lora_model::tch::Cuda::is_available() {
        common::skip("no CUDA device (cuda_and_cpu_split_matches_cpu places blocks on cuda:0 + cpu)");
        return;
    }
    for (base, adapter) in [("tiny-llama", "tiny-llama-basic"), ("tiny-qwen2", "tiny-qwen2-basic")] {
        let one = load(base, adapter, None);
        let layers = one.num_layers();
        let map = DeviceMap::split(&[Device::Cuda(0), Device::Cpu], &[1, layers - 1]).unwrap();
        let split = load(base, adapter, Some(map));
        assert_eq!(split.device(), Device::Cuda(0));
        assert_eq!(split.device_map().output(), Device::Cpu);
        let r = reference(adapter);
        let (ids, am) = (&r["input_ids"], &r["attention_mask"]);
        let all = LayerMask::all();
        let opts = ForwardOptions { hidden_states: true, ..ForwardOptions::new(&all) };
        let a = one.forward(ids, Some(am), &opts).unwrap();
        let b = split.forward(ids, Some(am), &opts).unwrap();
        let m = am.to_kind(Kind::Float).unsqueeze(-1);
        let d = ((b.logits.unwrap() - a.logits.unwrap()) * &m).abs().max().double_value(&[]);
        assert!(d < 1e-4, "{base}: cuda:0+cpu logits differ from cpu by {d}");
        assert_eq!(b.hidden_states[1].device(), Device::Cuda(0));
        assert_eq!(b.hidden_states[layers].device(), Device::Cpu);
        let prompts = vec![vec![5, 9, 13, 2, 7], vec![11, 3, 8]];
        let cfg = GenerationConfig { max_new_tokens: 6, eos_token_ids: vec![], ..Default::default() };
        let tokens = |m: &Llama| -> Vec<Vec<i64>> {
            generate(m, None, &prompts, &cfg, &all).unwrap().0.into_iter().map(|g| g.token_ids).collect()
        };
        assert_eq!(tokens(&one), tokens(&split), "{base}: cuda:0+cpu greedy tokens differ from cpu");
    }
}
