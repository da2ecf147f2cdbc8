//! Real-size checkpoints: make one (random weights, real shapes, written shard by shard) and report what loading
//! it costs: load time, peak RSS against the weights' bytes, time to the first generated token, decode speed.
//!
//! ```text
//! cargo run --release --example real_size -- make --shape llama-3.2-1b --dtype bf16 --out models/llama-3.2-1b-shaped
//! cargo run --release --example real_size -- report --model models/llama-3.2-1b-shaped [--dtype auto|f32|bf16] [--tokens 4]
//! cargo run --release --example real_size -- adapter --shape llama-3.1-8b --r 16 --out models/llama-3.1-8b-r16
//! cargo run --release --example real_size -- bench --model DIR --adapter DIR [--device cuda:0] [--dtype bf16]
//!     [--keep-through 15] [--tokens 64] [--rounds 2]
//! ```
//! Shapes: `llama-3.2-1b` (hidden 2048, 16 blocks, 32/8 heads, FFN 8192, vocab 128256, tied, llama3 rope),
//! `llama-3.1-8b` (hidden 4096, 32 blocks, 32/8 heads, FFN 14336, vocab 128256, untied, llama3 rope) and `tiny`
//! (hidden 64, 4 blocks, 4/2 heads, FFN 128, vocab 512: for dry runs of the scripts). The checkpoints are never
//! committed (`models/` is git-ignored). `make --device cuda:0` draws the weights on the GPU (the host only writes
//! them). `report` prints one JSON line; peak RSS is the process's `VmHWM` (what `/usr/bin/time -f %M` reports):
//! anonymous memory plus every file page it has mapped and touched, so mapped checkpoint pages that stay resident
//! count.
//!
//! `adapter` writes a random PEFT LoRA adapter for a shape: rank `r` (alpha 2r) on all seven projections of every
//! block, A ~ N(0, 1/in), B ~ N(0, 0.01²), so the LoRA changes the output. `bench` loads a checkpoint with such an
//! adapter and prints one Markdown row per variant (base, full LoRA, LoRA pruned to blocks `0..=B` by the mask,
//! merged): batch-1 greedy decode speed after a 16-token prompt, each step's token read back to the host as
//! `generate` does, the median over `rounds` interleaved rounds after a warm-up (`scripts/gpu-check.sh` puts
//! `scripts/gpu/peft_decode.py`'s rows for PEFT + transformers beside them).
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lora_boundary::model::tch::{self, Device, Kind, Tensor};
use lora_boundary::model::train::peft_tensor_name;
use lora_boundary::{generate, load_adapter, GenerationConfig, LayerMask, Module, Placement, PromptFormat};

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
        "tiny" => Shape { hidden: 64, layers: 4, heads: 4, kv_heads: 2, ffn: 128, vocab: 512, tied: false },
        other => bail!("unknown shape `{other}` (llama-3.2-1b, llama-3.1-8b, tiny)"),
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
    let device = lora_boundary::parse_device(&arg(args, "--device").unwrap_or_else(|| "cpu".into()))?;
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
                    Tensor::ones(dims.as_slice(), (Kind::Float, device))
                } else {
                    Tensor::randn(dims.as_slice(), (Kind::Float, device)) * 0.02
                };
                (name.clone(), t.to_kind(kind).to_device(Device::Cpu))
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

/// `[out, in]` of `module`'s weight in every block of shape `s`.
fn projection_dims(s: &Shape, module: Module) -> (i64, i64) {
    let hd = s.hidden / s.heads;
    match module {
        Module::Q => (s.heads * hd, s.hidden),
        Module::K | Module::V => (s.kv_heads * hd, s.hidden),
        Module::O => (s.hidden, s.heads * hd),
        Module::Gate | Module::Up => (s.ffn, s.hidden),
        Module::Down => (s.hidden, s.ffn),
    }
}

fn make_adapter(args: &[String]) -> Result<()> {
    let name = arg(args, "--shape").context("--shape S is required")?;
    let s = shape(&name)?;
    let r: i64 = arg(args, "--r").map_or(Ok(16), |v| v.parse())?;
    if r < 1 {
        bail!("--r must be at least 1");
    }
    let kind = match arg(args, "--dtype").as_deref().unwrap_or("bf16") {
        "bf16" => Kind::BFloat16,
        "f32" => Kind::Float,
        d => bail!("unknown dtype `{d}` (bf16, f32)"),
    };
    let out = PathBuf::from(arg(args, "--out").context("--out DIR is required")?);
    if out.exists() {
        bail!("{} exists", out.display());
    }
    tch::manual_seed(1);
    let cpu = (Kind::Float, Device::Cpu);
    let mut named = Vec::new();
    for l in 0..s.layers as usize {
        for m in Module::ALL {
            let (o, i) = projection_dims(&s, m);
            let a = Tensor::randn([r, i], cpu) / (i as f64).sqrt();
            let b = Tensor::randn([o, r], cpu) * 0.01;
            named.push((peft_tensor_name(l, m, true), a.to_kind(kind)));
            named.push((peft_tensor_name(l, m, false), b.to_kind(kind)));
        }
    }
    let config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": format!("{name}-shaped"),
        "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": false,
        "use_rslora": false, "use_dora": false, "init_lora_weights": true, "inference_mode": true,
        "layers_to_transform": null, "modules_to_save": null,
        "target_modules": Module::ALL.iter().map(|m| m.hf_name()).collect::<Vec<_>>(),
    });
    let part = out.with_extension("part");
    if part.exists() {
        std::fs::remove_dir_all(&part)?;
    }
    std::fs::create_dir_all(&part)?;
    std::fs::write(part.join("adapter_config.json"), serde_json::to_string_pretty(&config)?)?;
    Tensor::write_safetensors(&named, part.join("adapter_model.safetensors"))?;
    std::fs::rename(&part, &out)?;
    println!("{} (r = {r} on all seven projections of {} blocks, {} tensors)", out.display(), s.layers, named.len());
    Ok(())
}

/// Batch-1 greedy decode after a fixed 16-token prompt: (decode tokens/s, prefill s, the first tokens).
fn decode_once(m: &lora_boundary::Llama, mask: &LayerMask, tokens: usize) -> Result<(f64, f64, Vec<i64>)> {
    let prompt: Vec<i64> = (100..116).collect();
    let cfg = GenerationConfig { max_new_tokens: tokens, ..Default::default() };
    let (out, timing) = generate(m, None, &[prompt], &cfg, mask)?;
    let first = out.first().map(|g| g.token_ids.iter().take(4).copied().collect()).unwrap_or_default();
    Ok((timing.decode_tokens_per_s, timing.prefill_s, first))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn bench(args: &[String]) -> Result<()> {
    let model = PathBuf::from(arg(args, "--model").context("--model DIR is required")?);
    let adapter = PathBuf::from(arg(args, "--adapter").context("--adapter DIR is required")?);
    let device_name = arg(args, "--device").unwrap_or_else(|| "cpu".into());
    let device = lora_boundary::parse_device(&device_name)?;
    let kind = lora_boundary::resolve_kind(&arg(args, "--dtype").unwrap_or_else(|| "bf16".into()), &model)?;
    let keep: usize = arg(args, "--keep-through").map_or(Ok(15), |v| v.parse())?;
    let tokens: usize = arg(args, "--tokens").map_or(Ok(64), |v| v.parse())?;
    let rounds: usize = arg(args, "--rounds").map_or(Ok(2), |v| v.parse())?;
    if tokens < 2 || rounds < 1 {
        bail!("--tokens must be at least 2 and --rounds at least 1");
    }
    let t0 = Instant::now();
    let (mut m, _) = lora_boundary::load_model(&model, Placement { device, kind })?;
    load_adapter(&mut m, &adapter)?;
    let load_s = t0.elapsed().as_secs_f64();
    let variants: [(String, LayerMask); 4] = [
        ("base".into(), LayerMask::none()),
        ("full LoRA".into(), LayerMask::all()),
        (format!("LoRA 0-{keep}"), LayerMask::keep_through(keep)),
        ("merged".into(), LayerMask::none()),
    ];
    decode_once(&m, &LayerMask::all(), 4)?; // warm-up: kernels, allocator, cuBLAS handles
    let mut speeds = vec![Vec::new(); variants.len()];
    let mut prefill = vec![Vec::new(); variants.len()];
    let mut first = vec![Vec::new(); variants.len()];
    for _ in 0..rounds {
        for (i, (name, mask)) in variants.iter().enumerate() {
            let merged = name == "merged";
            if merged {
                lora_boundary::model::adapter::merge(&mut m, &LayerMask::all())?;
            }
            let (tps, pre, toks) = decode_once(&m, mask, tokens)?;
            if merged {
                lora_boundary::model::adapter::unmerge(&mut m)?;
            }
            speeds[i].push(tps);
            prefill[i].push(pre);
            first[i] = toks;
        }
    }
    let base = median(speeds[0].clone());
    let dtype = lora_boundary::model::dtype_support::dtype_name(kind);
    let mut stdout = std::io::stdout().lock();
    for (i, (name, _)) in variants.iter().enumerate() {
        let s = median(speeds[i].clone());
        writeln!(
            stdout,
            "| lora-boundary | {name} | {dtype} | {device_name} | {load_s:.1} | {:.3} | {s:.1} | {:+.1} % | {:?} |",
            median(prefill[i].clone()),
            (s / base - 1.0) * 100.0,
            first[i]
        )?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("make") => make(&args[1..]),
        Some("report") => report(&args[1..]),
        Some("adapter") => make_adapter(&args[1..]),
        Some("bench") => bench(&args[1..]),
        _ => bail!(
            "usage: real_size make --shape S --dtype bf16 [--device D] --out DIR | real_size report --model DIR | \
             real_size adapter --shape S --r 16 --out DIR | real_size bench --model DIR --adapter DIR [--device D]"
        ),
    }
}
