//! The README's main job: SmolLM2-135M-Instruct (the embedded default) answers a few chat prompts.
//!
//! Run with `bash scripts/quickstart.sh` (which does the set-up first) or `cargo run --release --example quickstart`.
use lora_boundary::{generate, load_model, GenerationConfig, LayerMask, Placement, DEFAULT_MODEL};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let t0 = std::time::Instant::now();
    let (model, tokenizer) = load_model(root.join(DEFAULT_MODEL), Placement::default())?;
    println!("loaded {} ({} blocks) in {:.2}s", DEFAULT_MODEL, model.num_layers(), t0.elapsed().as_secs_f64());
    let prompts = [
        "What is the capital of France?",
        "Give me one tip for writing clear code.",
        "What is 12 times 7?",
    ];
    let ids = prompts
        .iter()
        .map(|p| tokenizer.encode_prompt(p, true))
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = GenerationConfig {
        max_new_tokens: 48,
        eos_token_ids: tokenizer.eos_token_ids().to_vec(),
        ..Default::default()
    };
    let (out, timing) = generate(&model, Some(&tokenizer), &ids, &cfg, &LayerMask::all())?;
    for (p, g) in prompts.iter().zip(&out) {
        println!("\n> {p}\n{}", g.text.trim());
    }
    println!(
        "\nprefill {:.0} tok/s, decode {:.1} tok/s (batch {})",
        timing.prefill_tokens_per_s,
        timing.decode_tokens_per_s,
        prompts.len()
    );
    Ok(())
}
