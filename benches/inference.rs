//! Pruned vs full vs merged vs base LoRA inference on SmolLM2-135M-Instruct (the embedded default model):
//! prefill and decode throughput, f32 and bf16, batch 1 and 8.
//!
//! The adapter is r = 16 on all seven projections of every block (the anchor the issue measured with PEFT);
//! "pruned" keeps it on blocks 0..=14 of 30, unmerged. Run with `cargo bench --bench inference`; criterion prints
//! the time per iteration, and the throughput in tokens per second.
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lora_boundary::model::tch::{Kind, Tensor};
use lora_boundary::model::{adapter, init_lora, KvCache};
use lora_boundary::{ForwardOptions, LayerMask, Llama, Logits, LoraConfig, Placement, DEFAULT_MODEL};

const PROMPT: i64 = 64;
const DECODE: i64 = 16;

fn load(kind: Kind, variant: &str) -> Llama {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL);
    let mut m = Llama::load(&path, Placement { device: lora_boundary::model::tch::Device::Cpu, kind })
        .expect("run `bash scripts/setup.sh` first");
    if variant != "base" {
        let cfg = LoraConfig { r: 16, lora_alpha: 32.0, ..Default::default() };
        init_lora(&mut m, &cfg, 0).expect("init LoRA");
        if variant == "merged" {
            adapter::merge(&mut m, &LayerMask::all()).expect("merge");
        }
    }
    m
}

fn mask_of(variant: &str) -> LayerMask {
    match variant {
        "pruned-0-14" => LayerMask::keep_through(14),
        _ => LayerMask::all(),
    }
}

fn prefill(m: &Llama, mask: &LayerMask, batch: i64) -> KvCache {
    let ids = Tensor::arange(batch * PROMPT, (Kind::Int64, m.device())).remainder(1000).view([batch, PROMPT]);
    let mut cache = m.new_cache(batch, PROMPT + DECODE + 1).expect("cache");
    let opts = ForwardOptions { logits: Logits::Last, ..ForwardOptions::new(mask) };
    m.forward_cached(&ids, None, &mut cache, &opts).expect("prefill");
    cache
}

fn bench(c: &mut Criterion) {
    let _guard = lora_boundary::model::tch::no_grad_guard();
    for (kind, dtype) in [(Kind::Float, "f32"), (Kind::BFloat16, "bf16")] {
        for variant in ["base", "full", "pruned-0-14", "merged"] {
            let m = load(kind, variant);
            let mask = mask_of(variant);
            for batch in [1i64, 8] {
                let mut g = c.benchmark_group(format!("decode/{dtype}/b{batch}"));
                g.sample_size(10).measurement_time(Duration::from_secs(6)).warm_up_time(Duration::from_secs(1));
                g.throughput(Throughput::Elements((batch * DECODE) as u64));
                g.bench_function(BenchmarkId::from_parameter(variant), |b| {
                    b.iter_batched(
                        || prefill(&m, &mask, batch),
                        |mut cache| {
                            let _threads = lora_boundary::model::kernels::decode_scope();
                            let opts = ForwardOptions { logits: Logits::Last, ..ForwardOptions::new(&mask) };
                            let mut next = Tensor::zeros([batch, 1], (Kind::Int64, m.device()));
                            for _ in 0..DECODE {
                                let out = m.forward_cached(&next, None, &mut cache, &opts).expect("decode");
                                next = out.logits.expect("logits").argmax(-1, true);
                            }
                        },
                        criterion::BatchSize::PerIteration,
                    )
                });
                g.finish();
                let mut g = c.benchmark_group(format!("prefill/{dtype}/b{batch}"));
                g.sample_size(10).measurement_time(Duration::from_secs(6)).warm_up_time(Duration::from_secs(1));
                g.throughput(Throughput::Elements((batch * PROMPT) as u64));
                g.bench_function(BenchmarkId::from_parameter(variant), |b| b.iter(|| prefill(&m, &mask, batch)));
                g.finish();
            }
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
