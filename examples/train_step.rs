//! One LoRA training step, timed: what issue #19 item 5 compares with PEFT + torch
//! (`scripts/bench/peft_train_step.py`; `scripts/bench/train_step.sh` runs both).
//!
//! ```text
//! cargo run --release --example train_step -- [--dtype f32|bf16] [--steps 5] [--model PATH]
//! ```
//! SmolLM2-135M-Instruct (the embedded default GGUF) in f32 or bf16, a fresh LoRA of rank 16 (alpha 32) on all
//! seven projections of every block, a batch of 4 rows × 128 random tokens (every position but the first a
//! label), then `Trainer::accumulate` (forward, loss, backward) and `Trainer::apply_step` (gradient-norm clipping at
//! 1.0, AdamW at lr 2e-4). One warm-up step, then `steps` timed ones; prints one JSON line with the median.
use std::time::Instant;

use anyhow::{bail, Result};
use lora_boundary::model::tch::Kind;
use lora_boundary::model::train::{Batch, EncodedSample, Padding};
use lora_boundary::model::{TrainConfig, Trainer};
use lora_boundary::{Llama, LoraConfig, Placement, DEFAULT_MODEL};

fn main() -> Result<()> {
    let (mut kind, mut steps, mut path) = (Kind::Float, 5usize, DEFAULT_MODEL.to_string());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"));
        match a.as_str() {
            "--dtype" => {
                kind = match value()?.as_str() {
                    "f32" => Kind::Float,
                    "bf16" => Kind::BFloat16,
                    other => bail!("--dtype f32|bf16, got {other}"),
                }
            }
            "--steps" => steps = value()?.parse()?,
            "--model" => path = value()?,
            other => bail!("unknown flag {other}"),
        }
    }
    let mut model = Llama::load(&path, Placement { kind, ..Placement::default() })?;
    let lora = LoraConfig { r: 16, lora_alpha: 32.0, ..LoraConfig::default() };
    let cfg = TrainConfig { learning_rate: 2e-4, max_grad_norm: 1.0, max_len: 128, ..TrainConfig::default() };
    let mut trainer = Trainer::new(&mut model, lora, cfg)?;
    let vocab = model.config().vocab_size as u64;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let samples: Vec<EncodedSample> = (0..4)
        .map(|_| {
            let ids: Vec<i64> = (0..128)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    3 + ((x >> 33) % (vocab - 3)) as i64
                })
                .collect();
            EncodedSample::new(&ids[..1], &ids[1..], 128)
        })
        .collect();
    let rows: Vec<&EncodedSample> = samples.iter().collect();
    let batch = Batch::collate(&rows, 0, Padding::Right)?;
    let n = batch.label_tokens()? as f64;
    let mut times = Vec::new();
    let mut loss = 0.0;
    for step in 0..=steps {
        let t = Instant::now();
        loss = trainer.accumulate(&model, &batch, n)? / n;
        trainer.apply_step(&mut model, 2e-4)?;
        if step > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let dtype = if kind == Kind::Float { "f32" } else { "bf16" };
    println!(
        "{{\"dtype\":\"{dtype}\",\"threads\":{},\"median_s\":{median:.4},\"steps_s\":{times:?},\"loss\":{loss:.4}}}",
        lora_boundary::model::tch::get_num_threads()
    );
    Ok(())
}
