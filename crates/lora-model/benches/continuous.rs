//! Static vs continuous batched generation: the same prompts of different lengths, greedy, at most 8 rows at a time,
//! generated as fixed chunks of 8 through [`generate`] (each chunk runs until its longest row is done) and in one
//! [`generate_stream`] call (a finished row's place goes to the next prompt at once).
//!
//! Two models: the tiny Llama fixture with its LoRA adapter (always there; EOS ids chosen so that rows finish at
//! different steps) and, when `scripts/setup.sh` has fetched it, SmolLM2-135M-Instruct (GGUF, f32) with the committed
//! E2E adapter on 24 E2E chat prompts (40 new tokens, the tokenizer's EOS), under full LoRA. Run with
//! `cargo bench -p lora-model --bench continuous`; criterion prints the time per job.
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lora_model::{
    generate, generate_stream, gguf_tokenizer_for, load_adapter, GenerationConfig, LayerMask, Llama, Placement,
    PromptFormat,
};

const BATCH: usize = 8;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Chunks of `BATCH` prompts, each generated as one static batch.
fn static_chunks(m: &Llama, tk: Option<&lora_model::Tokenizer>, prompts: &[Vec<i64>], cfg: &GenerationConfig) {
    for chunk in prompts.chunks(BATCH) {
        generate(m, tk, chunk, cfg, &LayerMask::all()).expect("generate");
    }
}

fn continuous(m: &Llama, tk: Option<&lora_model::Tokenizer>, prompts: &[Vec<i64>], cfg: &GenerationConfig) {
    generate_stream(m, tk, prompts, cfg, &LayerMask::all(), BATCH, |_, _| {}).expect("generate_stream");
}

/// 24 prompts of 2 to 48 tokens on the tiny model, with EOS ids it reaches at different steps.
fn tiny() -> (Llama, Vec<Vec<i64>>, GenerationConfig) {
    let fixtures = root().join("tests/fixtures");
    let mut m = Llama::load(fixtures.join("models/tiny-llama"), Placement::default()).expect("tiny-llama fixture");
    load_adapter(&mut m, fixtures.join("adapters/tiny-llama-basic")).expect("adapter fixture");
    let prompts: Vec<Vec<i64>> =
        (0..24).map(|i| (0..2 + (i * 7) % 47).map(|j| 3 + ((i * 31 + j * 17) % 250) as i64).collect()).collect();
    let free = GenerationConfig { max_new_tokens: 40, ..Default::default() };
    let (outs, _) = generate(&m, None, &prompts, &free, &LayerMask::all()).expect("generate");
    let mut eos: Vec<i64> = outs.iter().step_by(5).filter_map(|g| g.token_ids.get(6).copied()).collect();
    eos.dedup();
    (m, prompts, GenerationConfig { eos_token_ids: eos, ..free })
}

/// SmolLM2 with the E2E adapter on the first 24 E2E test MRs as chat prompts, or `None` without the GGUF.
fn smollm2() -> Option<(Llama, lora_model::Tokenizer, Vec<Vec<i64>>, GenerationConfig)> {
    let gguf = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        eprintln!("skipped SmolLM2: {} not found (run scripts/setup.sh)", gguf.display());
        return None;
    }
    let mut m = Llama::load(&gguf, Placement::default()).expect("SmolLM2");
    load_adapter(&mut m, root().join("adapters/smollm2-e2e-r8")).expect("E2E adapter");
    let tk = gguf_tokenizer_for(&gguf).expect("tokenizer");
    let csv = std::fs::read_to_string(root().join("data/e2e_nlg/testset_w_refs.csv")).expect("E2E test set");
    let mut mrs: Vec<String> = Vec::new();
    for line in csv.lines().skip(1) {
        // `"mr","ref"` rows: the MR is the first quoted field (MRs hold no quotes).
        let Some(mr) = line.strip_prefix('"').and_then(|l| l.split('"').next()) else { continue };
        if !mrs.iter().any(|x| x == mr) {
            mrs.push(mr.to_string());
        }
        if mrs.len() == 24 {
            break;
        }
    }
    let prompts = mrs
        .iter()
        .map(|mr| {
            let p = format!("Describe this restaurant in one or two sentences from its attributes.\n{mr}");
            tk.encode_prompt(&p, &PromptFormat::chat()).expect("prompt")
        })
        .collect();
    let cfg = GenerationConfig { max_new_tokens: 40, eos_token_ids: tk.eos_token_ids().to_vec(), ..Default::default() };
    Some((m, tk, prompts, cfg))
}

fn bench(c: &mut Criterion) {
    let _guard = lora_model::tch::no_grad_guard();
    let (m, prompts, cfg) = tiny();
    let mut g = c.benchmark_group("generate/tiny-llama/24x40");
    g.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    g.bench_function(BenchmarkId::from_parameter("static-8"), |b| b.iter(|| static_chunks(&m, None, &prompts, &cfg)));
    g.bench_function(BenchmarkId::from_parameter("continuous-8"), |b| b.iter(|| continuous(&m, None, &prompts, &cfg)));
    g.finish();
    if let Some((m, tk, prompts, cfg)) = smollm2() {
        let mut g = c.benchmark_group("generate/smollm2-e2e/24x40");
        g.sample_size(10).measurement_time(Duration::from_secs(60)).warm_up_time(Duration::from_secs(1));
        g.bench_function(BenchmarkId::from_parameter("static-8"), |b| {
            b.iter(|| static_chunks(&m, Some(&tk), &prompts, &cfg))
        });
        g.bench_function(BenchmarkId::from_parameter("continuous-8"), |b| {
            b.iter(|| continuous(&m, Some(&tk), &prompts, &cfg))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
