//! Automated boundary search on validation samples: the cheap teacher-forced proxy ranks every boundary, the
//! task metric (BLEU on E2E) decides among the best few (`proxy-first`).
//!
//! `cargo run --release --example boundary_search [-- ADAPTER_DIR]`.
use std::path::Path;

use lora_boundary::scoring::{GenerationScorer, ProxyScorer};
use lora_boundary::search::{BoundarySearch, Strategy};
use lora_boundary::tasks::Task;
use lora_boundary::{load_adapter, load_model, Placement, PromptFormat, DEFAULT_MODEL};

fn main() -> anyhow::Result<()> {
    std::env::set_current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))?;
    let adapter = std::env::args().nth(1).unwrap_or_else(|| "adapters/smollm2-e2e-r8".into());
    let (mut model, tokenizer) = load_model(DEFAULT_MODEL, Placement::default())?;
    let info = load_adapter(&mut model, &adapter)?;
    let val: Vec<_> = Task::E2e.load(Path::new("data/e2e_nlg/testset_w_refs.csv"))?.into_iter().take(16).collect();
    let mut proxy = ProxyScorer::new(&model, &tokenizer, &val, PromptFormat::chat(), 8);
    let mut real = GenerationScorer {
        model: &model,
        tokenizer: &tokenizer,
        samples: &val,
        metric: Task::E2e.primary_metric(),
        max_new_tokens: 40,
        prompt_format: PromptFormat::chat(),
        batch_size: 8,
    };
    let search = BoundarySearch::new(model.num_layers())
        .strategy(Strategy::ProxyFirst)
        .param_counts(info.params_per_layer.iter().map(|&p| p as f64).collect());
    let report = search.run_with_proxy(&mut proxy, &mut real, val.len())?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
