//! Full LoRA vs LoRA kept on blocks 0..=B only vs the base model, on E2E test samples: task scores with paired
//! bootstrap CIs, and the generation time, on the same loaded model (masks switch for free).
//!
//! `cargo run --release --example pruned_vs_full [-- BOUNDARY [ADAPTER_DIR]]` (default boundary 14).
use std::path::Path;
use std::time::Instant;

use lora_boundary::scoring::{score_masks, EvalSettings};
use lora_boundary::tasks::Task;
use lora_boundary::{load_adapter, load_model, LayerMask, Placement, PromptFormat, DEFAULT_MODEL};

fn main() -> anyhow::Result<()> {
    std::env::set_current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))?;
    let mut args = std::env::args().skip(1);
    let b: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(14);
    let adapter = args.next().unwrap_or_else(|| "adapters/smollm2-e2e-r8".into());
    let (mut model, tokenizer) = load_model(DEFAULT_MODEL, Placement::default())?;
    let info = load_adapter(&mut model, &adapter)?;
    let test: Vec<_> =
        Task::E2e.load(Path::new("data/e2e_nlg/testset_w_refs.csv"))?.into_iter().skip(16).take(24).collect();
    let metric = Task::E2e.primary_metric();
    let masks = [LayerMask::all(), LayerMask::keep_through(b), LayerMask::none()];
    let settings = EvalSettings { max_new_tokens: 40, prompt_format: PromptFormat::chat(), batch_size: 8, seed: 0 };
    let t = Instant::now();
    let scored = score_masks(&model, &tokenizer, &test, &masks, &[metric], settings)?;
    println!("{:<10} {:>8} {:>24} {:>10}", "mask", metric.name(), "95% CI vs full", "LoRA kept");
    for (mask, s) in masks.iter().zip(&scored) {
        let ci = s.ci_vs_first.map_or("-".to_string(), |c| format!("[{:+.3}, {:+.3}]", c[0], c[1]));
        println!(
            "{:<10} {:>8.2} {:>24} {:>9.0}%",
            mask.to_string(),
            s.corpus[0].1,
            ci,
            info.kept_fraction(mask) * 100.0
        );
    }
    println!("{:.1}s for {} masks x {} samples", t.elapsed().as_secs_f64(), masks.len(), test.len());
    Ok(())
}
