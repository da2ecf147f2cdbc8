//! Full LoRA vs LoRA kept on blocks 0..=B only vs the base model, on E2E test samples: task scores with paired
//! bootstrap CIs, and decode speed of each, on the same loaded model (masks switch for free).
//!
//! `cargo run --release --example pruned_vs_full [-- BOUNDARY [ADAPTER_DIR]]` (default boundary 14).
use std::path::Path;
use std::time::Instant;

use lora_boundary::scoring::{generate_answers, item_scores};
use lora_boundary::tasks::Task;
use lora_boundary::{load_adapter, load_model, LayerMask, Placement, DEFAULT_MODEL};

fn main() -> anyhow::Result<()> {
    std::env::set_current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))?;
    let mut args = std::env::args().skip(1);
    let b: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(14);
    let adapter = args.next().unwrap_or_else(|| "adapters/smollm2-e2e-r8".into());
    let (mut model, tokenizer) = load_model(DEFAULT_MODEL, Placement::default())?;
    let info = load_adapter(&mut model, &adapter)?;
    let test: Vec<_> =
        Task::E2e.load(Path::new("data/e2e_nlg/testset_w_refs.csv"))?.into_iter().skip(16).take(24).collect();
    let refs: Vec<_> = test.iter().collect();
    let metric = Task::E2e.primary_metric();
    let mut full_items = Vec::new();
    println!("{:<10} {:>8} {:>24} {:>10} {:>9}", "mask", metric.name(), "95% CI vs full", "LoRA kept", "seconds");
    for mask in [LayerMask::all(), LayerMask::keep_through(b), LayerMask::none()] {
        let t = Instant::now();
        let preds = generate_answers(&model, &tokenizer, &refs, &mask, 40, true, 8)?;
        let secs = t.elapsed().as_secs_f64();
        let items = item_scores(metric, &preds, &refs)?;
        let refs_text: Vec<Vec<String>> = test.iter().map(|s| s.references.clone()).collect();
        let score = lora_boundary::metrics::corpus_score(metric, &preds, &refs_text)?;
        let ci = if full_items.is_empty() {
            full_items = items;
            "-".to_string()
        } else {
            let r = lora_boundary::metrics::paired_bootstrap(&items, &full_items, 1000, 0)?;
            format!("[{:+.3}, {:+.3}]", r.ci_low, r.ci_high)
        };
        println!(
            "{:<10} {:>8.2} {:>24} {:>9.0}% {:>9.1}",
            mask.to_string(),
            score,
            ci,
            info.kept_fraction(&mask) * 100.0,
            secs
        );
    }
    Ok(())
}
