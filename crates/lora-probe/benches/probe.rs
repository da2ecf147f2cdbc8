//! Probe cost vs one plain forward of the same batch.
//!
//! `probe_k4`: one batched forward with every hidden state, the logit lens on the first 4 answer positions of all
//! `L + 1` points, statistics and aggregation (1000 bootstrap resamples). `plain_forward`: the ordinary forward
//! pass of the same input ids (all logits). Models: the tiny-llama fixture (+ its adapter) and, when present,
//! `models/SmolLM2-135M-Instruct.Q4_1.gguf`; batch 8 × 64 tokens (60 prompt + 4 answer).
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use lora_model::tch::Tensor;
use lora_model::{load_adapter, ForwardOptions, LayerMask, Llama, Logits, Placement};
use lora_probe::{Probe, ProbeConfig, TokenizedSample};

const BATCH: usize = 8;
const PROMPT: usize = 60;
const K: usize = 4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Deterministic pseudo-random token ids in `3..vocab`.
fn samples(vocab: i64) -> Vec<TokenizedSample> {
    let mut x: u64 = 0x1234_5678;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        3 + (x % (vocab as u64 - 3)) as i64
    };
    (0..BATCH)
        .map(|_| TokenizedSample {
            prompt_ids: (0..PROMPT).map(|_| next()).collect(),
            answer_ids: (0..K).map(|_| next()).collect(),
        })
        .collect()
}

fn bench_model(c: &mut Criterion, name: &str, model: &Llama) {
    let s = samples(model.config().vocab_size as i64);
    // The plain forward sees exactly what the probe feeds: prompt + all but the last probed answer token.
    let ids: Vec<i64> = s.iter().flat_map(|x| x.prompt_ids.iter().chain(&x.answer_ids[..K - 1]).copied()).collect();
    let input = Tensor::from_slice(&ids).view([BATCH as i64, (PROMPT + K - 1) as i64]);
    let mask = LayerMask::all();
    let probe = Probe::new(ProbeConfig { k: K, batch_size: BATCH, ..Default::default() });
    let mut g = c.benchmark_group(name);
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    g.bench_function("plain_forward", |b| {
        b.iter(|| {
            let _guard = lora_model::tch::no_grad_guard();
            let out = model.forward(&input, None, &ForwardOptions::new(&mask)).expect("forward");
            std::hint::black_box(out.logits);
        })
    });
    g.bench_function("hidden_states_forward", |b| {
        b.iter(|| {
            let _guard = lora_model::tch::no_grad_guard();
            let opts = ForwardOptions { mask: &mask, hidden_states: true, logits: Logits::Skip, train: false };
            std::hint::black_box(model.forward(&input, None, &opts).expect("forward").hidden_states);
        })
    });
    g.bench_function("probe_k4", |b| {
        b.iter(|| std::hint::black_box(probe.run_tokenized(model, &s, std::slice::from_ref(&mask)).expect("probe")))
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let r = root();
    match Llama::load(r.join("tests/fixtures/models/tiny-llama"), Placement::default()) {
        Ok(mut m) => {
            if let Err(e) = load_adapter(&mut m, r.join("tests/fixtures/adapters/tiny-llama-basic")) {
                eprintln!("tiny-llama adapter: {e}");
            }
            bench_model(c, "tiny-llama", &m);
        }
        Err(e) => eprintln!("skipping tiny-llama: {e}"),
    }
    let smol = r.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if smol.exists() {
        match Llama::load(&smol, Placement::default()) {
            Ok(m) => bench_model(c, "smollm2-135m", &m),
            Err(e) => eprintln!("skipping SmolLM2: {e}"),
        }
    } else {
        eprintln!("skipping SmolLM2: {} not found", smol.display());
    }
}

criterion_group!(probe_benches, benches);
criterion_main!(probe_benches);
