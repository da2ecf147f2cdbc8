//! Writes a real-run fixture for `lora-search`: the per-sample teacher-forced proxy and task metric of every
//! boundary (keep-through `b`, `b = 0..L-1`) on a validation set, so that the search strategies can be replayed
//! against exhaustive search in tests without a model (`crates/lora-search/tests/real_runs.rs`).
//!
//! `cargo run --release --example search_fixture -- TASK ADAPTER DATA N MAX_NEW_TOKENS OUT.json`, e.g.
//! `… hotpotqa adapters/smollm2-hotpotqa-r8 data/hotpotqa/hotpot_dev_v1_simplified.json 32 16
//! tests/fixtures/search/hotpotqa-32.json` (the first `N` items of `DATA`, chat template, greedy, batch 8).
use std::path::Path;

use anyhow::Context;
use lora_boundary::scoring::{GenerationScorer, ProxyScorer};
use lora_boundary::search::Scorer;
use lora_boundary::tasks::Task;
use lora_boundary::{load_adapter, load_model, Placement, PromptFormat, DEFAULT_MODEL};

fn main() -> anyhow::Result<()> {
    std::env::set_current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [task, adapter, data, n, max_new, out] = args.as_slice() else {
        anyhow::bail!("usage: search_fixture TASK ADAPTER DATA N MAX_NEW_TOKENS OUT.json");
    };
    let task: Task = task.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let n: usize = n.parse().context("N")?;
    let max_new_tokens: usize = max_new.parse().context("MAX_NEW_TOKENS")?;
    let (mut model, tokenizer) = load_model(DEFAULT_MODEL, Placement::default())?;
    load_adapter(&mut model, adapter)?;
    let samples: Vec<_> = task.load(Path::new(data))?.into_iter().take(n).collect();
    let idx: Vec<usize> = (0..samples.len()).collect();
    let l = model.num_layers();
    let mut proxy = ProxyScorer::new(&model, &tokenizer, &samples, PromptFormat::chat(), 8);
    let proxy: Vec<Vec<f64>> = (0..l).map(|b| proxy.score(b, &idx)).collect::<Result<_, _>>()?;
    let metric = task.primary_metric();
    let mut real = GenerationScorer {
        model: &model,
        tokenizer: &tokenizer,
        samples: &samples,
        metric,
        max_new_tokens,
        prompt_format: PromptFormat::chat(),
        batch_size: 8,
    };
    let scores: Vec<Vec<f64>> = (0..l).map(|b| real.score(b, &idx)).collect::<Result<_, _>>()?;
    let json = serde_json::json!({
        "task": format!("{task:?}"),
        "adapter": adapter,
        "data": data,
        "samples": samples.len(),
        "max_new_tokens": max_new_tokens,
        "metric": metric.name(),
        "num_layers": l,
        "proxy": proxy,
        "metric_scores": scores,
    });
    let tmp = format!("{out}.tmp");
    std::fs::write(&tmp, serde_json::to_string(&json)?)?;
    std::fs::rename(&tmp, out)?;
    println!("wrote {out}");
    Ok(())
}
