//! Times the parts of one probe batch against a plain forward, interleaved (robust to a busy machine).
//!
//! `cargo run --release -p lora-probe --example probe_profile -- [MODEL] [ROUNDS] [PROMPT]`
//! (default: models/SmolLM2-135M-Instruct.Q4_1.gguf, 3 rounds, 60 prompt tokens; batch 8, k = 4, so each row is
//! `PROMPT + k - 1` tokens: 63 by default; 70 is the E2E chat prompts' mean length, ≈ 73, with the answer).
//!
//! The probe's extra work is the LM head at every point for the `8 · k` answer positions; a plain forward's LM head
//! covers every position instead. With the same arithmetic rate for both, the ratio is
//! `(blocks + 31 · 8k · head) / (blocks + 8 (PROMPT + k − 1) · head)`: ≈ 1.2 at 60 prompt tokens on SmolLM2, less
//! for longer prompts (the lens part stays the same while the forward grows).
use std::time::Instant;

use lora_model::tch::Tensor;
use lora_model::{ForwardOptions, LayerMask, Llama, Logits, Placement};
use lora_probe::{LogitLens, Probe, ProbeConfig, TokenizedSample};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).cloned().unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let rounds: usize = args.get(2).map_or(Ok(3), |s| s.parse())?;
    let model = Llama::load(&path, Placement::default())?;
    let vocab = model.config().vocab_size as u64;
    let prompt: usize = args.get(3).map_or(Ok(60), |s| s.parse())?;
    let (batch, k) = (8usize, 4usize);
    let mut x: u64 = 0x1234_5678;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        3 + (x % (vocab - 3)) as i64
    };
    let samples: Vec<TokenizedSample> = (0..batch)
        .map(|_| TokenizedSample {
            prompt_ids: (0..prompt).map(|_| next()).collect(),
            answer_ids: (0..k).map(|_| next()).collect(),
        })
        .collect();
    let ids: Vec<i64> =
        samples.iter().flat_map(|s| s.prompt_ids.iter().chain(&s.answer_ids[..k - 1]).copied()).collect();
    let input = Tensor::from_slice(&ids).view([batch as i64, (prompt + k - 1) as i64]);
    let mask = LayerMask::all();
    let probe = Probe::new(ProbeConfig { k, batch_size: batch, ..Default::default() });
    let _g = lora_model::tch::no_grad_guard();
    let rows: Vec<i64> = (0..batch as i64).flat_map(|r| std::iter::repeat_n(r, k)).collect();
    let cols: Vec<i64> = (0..batch).flat_map(|_| (0..k as i64).map(|j| prompt as i64 - 1 + j)).collect();
    let tgts: Vec<i64> = samples.iter().flat_map(|s| s.answer_ids.clone()).collect();
    let mut ratios = Vec::new();
    for round in 0..=rounds {
        let t = Instant::now();
        let out = model.forward(&input, None, &ForwardOptions::new(&mask))?;
        drop(out);
        let plain = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let opts = ForwardOptions { mask: &mask, hidden_states: true, logits: Logits::Skip, train: false };
        let out = model.forward(&input, None, &opts)?;
        let hidden = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _stats = LogitLens::new(&model).project(&out.hidden_states, &rows, &cols, &tgts)?;
        let lens = t.elapsed().as_secs_f64();
        drop(out);
        let t = Instant::now();
        let _r = probe.run_tokenized(&model, &samples, std::slice::from_ref(&mask))?;
        let full = t.elapsed().as_secs_f64();
        if round > 0 {
            ratios.push(full / plain);
        }
        println!(
            "round {round}: plain {plain:.3}s  hidden-states forward {hidden:.3}s  lens {lens:.3}s  probe {full:.3}s  ratio {:.3}",
            full / plain
        );
    }
    ratios.sort_by(f64::total_cmp);
    if let Some(m) = ratios.get(ratios.len() / 2) {
        println!("median probe / plain forward: {m:.3}");
    }
    Ok(())
}
