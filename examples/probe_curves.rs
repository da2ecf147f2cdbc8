//! The paper's Fig. 1 and Fig. 2 on the embedded model: answer-token probability per layer for full LoRA, the base
//! model, and LoRA dropped in the bottom or top half of the blocks; writes `runs/probe_curves.svg` and `.csv`.
//!
//! `cargo run --release --example probe_curves [-- ADAPTER_DIR]` (default: the committed E2E adapter).
use std::path::Path;

use lora_boundary::probe::{Probe, ProbeConfig, Sample};
use lora_boundary::tasks::Task;
use lora_boundary::{load_adapter, load_model, LayerMask, Placement, PromptFormat, DEFAULT_MODEL};

fn main() -> anyhow::Result<()> {
    std::env::set_current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))?;
    let adapter = std::env::args().nth(1).unwrap_or_else(|| "adapters/smollm2-e2e-r8".into());
    let (mut model, tokenizer) = load_model(DEFAULT_MODEL, Placement::default())?;
    load_adapter(&mut model, &adapter)?;
    let l = model.num_layers();
    let samples: Vec<Sample> =
        Task::E2e.load(Path::new("data/e2e_nlg/testset_w_refs.csv"))?.into_iter().take(16).collect();
    let masks = [
        LayerMask::all(),
        LayerMask::none(),
        LayerMask::from_layers(l / 2..l), // LoRA dropped in the bottom half
        LayerMask::from_layers(0..l / 2), // LoRA dropped in the top half
    ];
    let result = Probe::new(ProbeConfig { prompt_format: PromptFormat::chat(), ..Default::default() })
        .run(&model, &tokenizer, &samples, &masks)?;
    std::fs::create_dir_all("runs")?;
    result.plot_svg("runs/probe_curves.svg")?;
    result.write_csv("runs/probe_curves.csv")?;
    for c in &result.curves {
        let pts: Vec<String> = c.gt_prob.iter().map(|p| format!("{p:.2}")).collect();
        println!("{:>8}: {}", c.mask, pts.join(" "));
    }
    println!("wrote runs/probe_curves.svg and runs/probe_curves.csv");
    Ok(())
}
