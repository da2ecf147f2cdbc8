//! Real-size checkpoints: make one (random weights, real shapes, written shard by shard) and report what loading
//! it costs: load time, peak RSS against the weights' bytes, time to the first generated token, decode speed.
//!
//! ```text
//! cargo run --release --example real_size -- make --shape llama-3.2-1b --dtype bf16 --out models/llama-3.2-1b-shaped
//! cargo run --release --example real_size -- report --model models/llama-3.2-1b-shaped [--dtype auto|f32|bf16] [--tokens 4]
//! ```
//! Shapes: `llama-3.2-1b` (hidden 2048, 16 blocks, 32/8 heads, FFN 8192, vocab 128256, tied, llama3 rope) and
//! `llama-3.1-8b` (hidden 4096, 32 blocks, 32/8 heads, FFN 14336, vocab 128256, untied, llama3 rope). The
//! checkpoints are never committed (`models/` is git-ignored). `report` prints one JSON line; peak RSS is the
//! process's `VmHWM` (what `/usr/bin/time -f %M` reports): anonymous memory plus every file page it has mapped and
//! touched, so mapped checkpoint pages that stay resident count.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lora_boundary::model::tch::{Kind, Tensor};
use lora_boundary::{generate, GenerationConfig, LayerMask, Placement, PromptFormat};

struct Shape {
    hidden: i64,
    layers: i64,
    heads: i64,
    kv_heads: i64,
    ffn: i64,
    vocab: i64,
    tied: bool,
}

fn shape(name: &str) -> Result<Shape> {
    Ok(match name {
        "llama-3.2-1b" => {
            Shape { hidden: 2048, layers: 16, heads: 32, kv_heads: 8, ffn: 8192, vocab: 128256, tied: true }
        }
        "llama-3.1-8b" => {
            Shape { hidden: 4096, layers: 32, heads: 32, kv_heads: 8, ffn: 14336, vocab: 128256, tied: false }
        }
        other => bail!("unknown shape `{other}` (llama-3.2-1b, llama-3.1-8b)"),
    })
}

fn arg(args: &[String], flag: &str) -> Option<String> {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned()
}

/// Every tensor of the checkpoint, in file order, with its shape.
fn tensors(s: &Shape) -> Vec<(String, Vec<i64>)> {
    let hd = s.hidden / s.heads;
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![s.vocab, s.hidden])];
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        v.push((format!("{p}.input_layernorm.weight"), vec![s.hidden]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![s.hidden]));
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![s.heads * hd, s.hidden]));
        v.push((format!("{p}.self_attn.k_proj.weight"), vec![s.kv_heads * hd, s.hidden]));
        v.push((format!("{p}.self_attn.v_proj.weight"), vec![s.kv_heads * hd, s.hidden]));
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![s.hidden, s.heads * hd]));
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![s.ffn, s.hidden]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![s.ffn, s.hidden]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![s.hidden, s.ffn]));
    }
    v.push(("model.norm.weight".to_string(), vec![s.hidden]));
    if !s.tied {
        v.push(("lm_head.weight".to_string(), vec![s.vocab, s.hidden]));
    }
    v
}

fn make(args: &[String]) -> Result<()> {
    let name = arg(args, "--shape").unwrap_or_else(|| "llama-3.2-1b".into());
    let s = shape(&name)?;
    let kind = match arg(args, "--dtype").as_deref().unwrap_or("bf16") {
        "bf16" => Kind::BFloat16,
        "f32" => Kind::Float,
        d => bail!("unknown dtype `{d}` (bf16, f32)"),
    };
    let out = PathBuf::from(arg(args, "--out").context("--out DIR is required")?);
    if out.exists() {
        bail!("{} exists", out.display());
    }
    std::fs::create_dir_all(&out)?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s.hidden,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
        "head_dim": s.hidden / s.heads, "intermediate_size": s.ffn, "vocab_size": s.vocab, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072, "tie_word_embeddings": s.tied, "hidden_act": "silu",
        "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": if kind == Kind::BFloat16 { "bfloat16" } else { "float32" },
    });
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    // A byte-level tokenizer (ids 0..256 of the vocabulary): enough to run `generate` and `probe` on the shapes.
    let mut vocab = serde_json::Map::new();
    let mut extra = 0u32;
    for b in 0u32..256 {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        vocab.insert(char::from_u32(c).context("char")?.to_string(), serde_json::json!(b));
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    std::fs::write(out.join("tokenizer.json"), tok.to_string())?;
    std::fs::write(out.join("tokenizer_config.json"), r#"{"tokenizer_class": "PreTrainedTokenizerFast"}"#)?;

    // Shards of about 2 GB, each generated and written before the next is made.
    let all = tensors(&s);
    let elt = kind.elt_size_in_bytes() as i64;
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut bytes = 0i64;
    for (i, (_, dims)) in all.iter().enumerate() {
        let n: i64 = dims.iter().product::<i64>() * elt;
        if bytes > 0 && bytes + n > 2_000_000_000 {
            shards.push(Vec::new());
            bytes = 0;
        }
        bytes += n;
        shards.last_mut().context("shard")?.push(i);
    }
    let total = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0i64;
    lora_boundary::model::tch::manual_seed(0);
    for (k, idx) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{total:05}.safetensors", k + 1);
        let named: Vec<(String, Tensor)> = idx
            .iter()
            .map(|&i| {
                let (name, dims) = &all[i];
                let t = if dims.len() == 1 {
                    Tensor::ones(dims.as_slice(), (Kind::Float, lora_boundary::model::tch::Device::Cpu))
                } else {
                    Tensor::randn(dims.as_slice(), (Kind::Float, lora_boundary::model::tch::Device::Cpu)) * 0.02
                };
                (name.clone(), t.to_kind(kind))
            })
            .collect();
        for (name, t) in &named {
            weight_map.insert(name.clone(), serde_json::json!(file));
            total_size += t.numel() as i64 * elt;
        }
        Tensor::write_safetensors(&named, out.join(&file))?;
        eprintln!("wrote {file}");
    }
    let index = serde_json::json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
    std::fs::write(out.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    println!("{} ({name}, {:.2} GB of weights in {total} shards)", out.display(), total_size as f64 / 1e9);
    Ok(())
}

/// Bytes of every tensor in the checkpoint's safetensors files.
fn weight_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0u64;
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            total += std::fs::metadata(&p)?.len();
        }
    }
    Ok(total)
}

/// The process's peak resident set (`VmHWM`), bytes.
fn peak_rss() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM")?;
    let kb: u64 = line.split_whitespace().nth(1).context("VmHWM value")?.parse()?;
    Ok(kb * 1024)
}

fn report(args: &[String]) -> Result<()> {
    let model = PathBuf::from(arg(args, "--model").context("--model DIR is required")?);
    let dtype = arg(args, "--dtype").unwrap_or_else(|| "auto".into());
    let tokens: usize = arg(args, "--tokens").map_or(Ok(4), |t| t.parse())?;
    let kind = lora_boundary::resolve_kind(&dtype, &model)?;
    // What the process holds before any weight: libtorch's and the binary's mapped code, the allocator.
    let _warm = Tensor::zeros([1], (Kind::Float, lora_boundary::model::tch::Device::Cpu));
    let rss_before = peak_rss()?;
    let t0 = Instant::now();
    let (m, tokenizer) = lora_boundary::load_model(&model, Placement { kind, ..Placement::default() })?;
    let load_s = t0.elapsed().as_secs_f64();
    let rss_after_load = peak_rss()?;
    let prompt = tokenizer.encode_prompt("The capital of France is", &PromptFormat::raw())?;
    let cfg = GenerationConfig { max_new_tokens: tokens, ..Default::default() };
    let t1 = Instant::now();
    let (gens, timing) = generate(&m, Some(&tokenizer), std::slice::from_ref(&prompt), &cfg, &LayerMask::all())?;
    let first_token = gens.first().and_then(|g| g.token_ids.first().copied());
    let first_token_s = load_s + timing.prefill_s;
    let wall_generate_s = t1.elapsed().as_secs_f64();
    let file_bytes = weight_bytes(&model)?;
    let loaded_bytes: u64 =
        m.named_weights().iter().map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum();
    let peak = peak_rss()?;
    let out = serde_json::json!({
        "model": model, "dtype": format!("{kind:?}"), "file_bytes": file_bytes, "weight_bytes": loaded_bytes,
        "load_s": load_s, "rss_before_load": rss_before, "peak_rss_after_load": rss_after_load, "peak_rss": peak,
        "peak_rss_over_weight_bytes": peak as f64 / loaded_bytes as f64,
        "peak_rss_less_baseline_over_weight_bytes": (peak - rss_before) as f64 / loaded_bytes as f64,
        "first_token_s": first_token_s, "generate_s": wall_generate_s,
        "decode_tokens_per_s": timing.decode_tokens_per_s, "prompt_ids": prompt, "first_token": first_token,
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{out}")?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("make") => make(&args[1..]),
        Some("report") => report(&args[1..]),
        _ => bail!("usage: real_size make --shape S --dtype bf16 --out DIR | real_size report --model DIR"),
    }
}
