//! One LoRA training step on SmolLM2-135M-Instruct (the embedded default model), f32 and bf16: issue #19 item 5's
//! workload under criterion.
//!
//! A fresh LoRA of rank 16 (alpha 32) on all seven projections of every block, a batch of 4 rows × 128 random
//! tokens (every position but the first a label), then `Trainer::accumulate` (forward, loss, backward) and
//! `Trainer::apply_step` (gradient-norm clipping at 1.0, AdamW at lr 2e-4): the step `examples/train_step.rs` times
//! and `scripts/bench/train_step.sh` compares with PEFT + torch. Run with `cargo bench --bench train`; criterion
//! prints the time per step and the throughput in label tokens per second.
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lora_boundary::model::tch::Kind;
use lora_boundary::model::train::{Batch, EncodedSample, Padding};
use lora_boundary::model::{TrainConfig, Trainer};
use lora_boundary::{Llama, LoraConfig, Placement, DEFAULT_MODEL};

const ROWS: usize = 4;
const TOKENS: usize = 128;

/// `ROWS` rows of `TOKENS` pseudo-random token ids (ids 0–2 are left out: SmolLM2's special tokens).
fn samples(vocab: u64) -> Vec<EncodedSample> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..ROWS)
        .map(|_| {
            let ids: Vec<i64> = (0..TOKENS)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    3 + ((x >> 33) % (vocab - 3)) as i64
                })
                .collect();
            EncodedSample::new(&ids[..1], &ids[1..], TOKENS)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL);
    let mut g = c.benchmark_group("train_step/smollm2_r16_4x128");
    g.sample_size(10).measurement_time(Duration::from_secs(45)).warm_up_time(Duration::from_secs(3));
    for (kind, dtype) in [(Kind::Float, "f32"), (Kind::BFloat16, "bf16")] {
        let mut model =
            Llama::load(&path, Placement { kind, ..Placement::default() }).expect("run `bash scripts/setup.sh` first");
        let lora = LoraConfig { r: 16, lora_alpha: 32.0, ..LoraConfig::default() };
        let cfg = TrainConfig { learning_rate: 2e-4, max_grad_norm: 1.0, max_len: TOKENS, ..TrainConfig::default() };
        let mut trainer = Trainer::new(&mut model, lora, cfg).expect("trainer");
        let rows = samples(model.config().vocab_size as u64);
        let refs: Vec<&EncodedSample> = rows.iter().collect();
        let batch = Batch::collate(&refs, 0, Padding::Right).expect("collate");
        let n = batch.label_tokens().expect("label tokens") as f64;
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::from_parameter(dtype), |b| {
            b.iter(|| {
                let loss = trainer.accumulate(&model, &batch, n).expect("forward and backward") / n;
                trainer.apply_step(&mut model, 2e-4).expect("optimizer step");
                loss
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
