//! The README's main job, end to end on 2 CPU cores in a few minutes: SmolLM2-135M-Instruct (the embedded
//! default) with a small E2E NLG LoRA adapter the project trained and commits → probe curve on validation
//! samples → manual and searched boundary → full vs pruned vs base scores on test samples → pruned adapter.
//!
//! Run with `bash scripts/quickstart.sh` (set-up first) or `cargo run --release --example quickstart`.
//! Results land in `runs/quickstart-<timestamp>/` (report.md, report.json, probe.svg, pruned-adapter/).
use std::path::Path;

use lora_boundary::pipeline::{markdown, run_pipeline, PipelineConfig};
use lora_boundary::Placement;

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(root)?;
    let text = std::fs::read_to_string("configs/quickstart-e2e.toml")?;
    let mut cfg: PipelineConfig = toml::from_str(&text)?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    cfg.out = cfg.out.with_file_name(format!("quickstart-{stamp}"));
    let t0 = std::time::Instant::now();
    lora_boundary::progress::enable(true);
    let report = run_pipeline(&cfg, Placement::default(), |line| {
        lora_boundary::progress::println(&format!("[{:>6.1}s] {line}", t0.elapsed().as_secs_f64()))
    })?;
    println!("\n{}", markdown(&report));
    println!("report, plot and pruned adapter in {} ({:.0}s in all)", cfg.out.display(), t0.elapsed().as_secs_f64());
    Ok(())
}
