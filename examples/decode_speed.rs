//! Batch-1 decode speed of SmolLM2-135M-Instruct (the embedded default) for base, full LoRA (unmerged), LoRA
//! pruned to blocks 0..=14 (unmerged) and merged LoRA, next to this machine's memory-bandwidth cap, in one
//! interleaved run. It prints a Markdown table.
//!
//! ```text
//! cargo run --release --example decode_speed -- [--tokens 64] [--rounds 3] [--dtype f32|bf16|both] [--r 16]
//!     [--compare-libtorch] [--bandwidth-only] [--only base|full|pruned|merged]
//! ```
//! The LoRA adapter is random, rank `r` on all seven projections of every block (what the speed goals were
//! stated for). The cap is the measured read bandwidth (sum over a 512 MiB tensor on huge pages, as the weights
//! are, with libtorch's threads) divided by the bytes of weights one decode step streams (every projection, the LM
//! head, LoRA A/B where active).
//! "vs base" is the median over the rounds of each round's speed against the base's in the same round (the variants
//! take turns within a round, so the host's drift during the run cancels out of it).
//! `--compare-libtorch` adds rows with the fused decode kernels switched off (libtorch's BLAS for every product);
//! `--bandwidth-only` prints the measured read bandwidth and stops; `--only` times one variant (for a profiler:
//! nothing else runs between its decodes).
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lora_boundary::model::tch::{self, Device, Kind, Tensor};
use lora_boundary::model::{adapter, init_lora, kernels};
use lora_boundary::{ForwardOptions, LayerMask, Llama, Logits, LoraConfig, Placement, DEFAULT_MODEL};

const USAGE: &str = "usage: decode_speed [--tokens 64] [--rounds 3] [--dtype f32|bf16|both] [--r 16] \
                     [--compare-libtorch] [--bandwidth-only] [--only base|full|pruned|merged]";

/// The variants' names for `--only`, in the order `main` times them (base, full LoRA, LoRA 0-14, merged).
const ONLY: [&str; 4] = ["base", "full", "pruned", "merged"];

struct Args {
    tokens: i64,
    rounds: usize,
    dtypes: Vec<Kind>,
    r: usize,
    compare: bool,
    /// Print the measured read bandwidth and stop.
    bandwidth_only: bool,
    /// Time only this variant (index into [`ONLY`] and the variants).
    only: Option<usize>,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        tokens: 64,
        rounds: 3,
        dtypes: vec![Kind::Float, Kind::BFloat16],
        r: 16,
        compare: false,
        bandwidth_only: false,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--tokens" => a.tokens = value()?.parse()?,
            "--rounds" => a.rounds = value()?.parse()?,
            "--r" => a.r = value()?.parse()?,
            "--dtype" => {
                a.dtypes = match value()?.as_str() {
                    "f32" => vec![Kind::Float],
                    "bf16" => vec![Kind::BFloat16],
                    "both" => vec![Kind::Float, Kind::BFloat16],
                    other => bail!("--dtype f32|bf16|both, got {other}"),
                }
            }
            "--compare-libtorch" => a.compare = true,
            "--bandwidth-only" => a.bandwidth_only = true,
            "--only" => {
                let v = value()?;
                a.only = Some(match ONLY.iter().position(|&k| k == v) {
                    Some(i) => i,
                    None => bail!("--only {}, got {v}", ONLY.join("|")),
                })
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    Ok(a)
}

/// Decode tokens per second: a 16-token prompt, then `tokens` greedy single-token steps.
fn decode(m: &Llama, mask: &LayerMask, tokens: i64) -> Result<f64> {
    let _g = tch::no_grad_guard();
    let prompt = Tensor::arange(16, (Kind::Int64, Device::Cpu)).f_add_scalar(100)?.f_view([1, 16])?;
    let mut cache = m.new_cache(1, 16 + tokens + 1)?;
    let opts = ForwardOptions { logits: Logits::Last, ..ForwardOptions::new(mask) };
    let mut next = m.forward_cached(&prompt, None, &mut cache, &opts)?.logits.context("logits")?.f_argmax(-1, true)?;
    let t = Instant::now();
    let _threads = kernels::decode_scope();
    for _ in 0..tokens {
        let out = m.forward_cached(&next, None, &mut cache, &opts)?;
        next = out.logits.context("logits")?.f_argmax(-1, true)?;
    }
    Ok(tokens as f64 / t.elapsed().as_secs_f64())
}

/// Read bandwidth in bytes/s: the median of 5 sums over a 512 MiB f32 tensor on huge pages.
fn bandwidth() -> Result<f64> {
    // On huge pages, as the model's weights are (`weights::empty_on_huge_pages`): the cap of the same memory.
    let mut big = lora_boundary::model::weights::empty_on_huge_pages(&[128 << 20], Kind::Float)?;
    let _ = big.f_fill_(1.0)?;
    let mut v: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let _ = big.sum(Kind::Float).double_value(&[]);
            (big.numel() * 4) as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    Ok(v[2])
}

/// Bytes of weights one decode step reads under `mask` (LoRA A/B of active blocks unless merged).
fn bytes_per_token(m: &Llama, mask: &LayerMask, merged: bool) -> f64 {
    let elem = if m.kind() == Kind::Float { 4.0 } else { 2.0 };
    let mut n = (m.config().vocab_size * m.config().hidden_size) as f64; // LM head (tied or not)
    for (l, module, p) in m.projections() {
        n += p.weight.numel() as f64;
        if let (Some(lora), false, true) = (&p.lora, merged, mask.is_active(l, module)) {
            n += (lora.a.numel() + lora.b.numel()) as f64;
        }
    }
    n * elem
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = parse()?;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL);
    let bw = bandwidth()?;
    if args.bandwidth_only {
        println!("read bandwidth {:.1} GB/s", bw / 1e9);
        return Ok(());
    }
    println!(
        "read bandwidth {:.1} GB/s, libtorch threads {}, fused kernels available: {} (SIMD path {}; \
         LORA_BOUNDARY_SIMD forces another)\n",
        bw / 1e9,
        tch::get_num_threads(),
        kernels::enabled(),
        kernels::simd_path()
    );
    println!("| dtype | products | variant | decode tok/s | vs base | cap tok/s | % of cap |");
    println!("|---|---|---|---|---|---|---|");
    for &kind in &args.dtypes {
        let mut m = Llama::load(&path, Placement { device: Device::Cpu, kind })
            .with_context(|| format!("loading {} (run `bash scripts/setup.sh` first)", path.display()))?;
        let cfg = LoraConfig { r: args.r, lora_alpha: 2.0 * args.r as f64, ..Default::default() };
        init_lora(&mut m, &cfg, 0)?;
        let variants: [(&str, LayerMask); 4] = [
            ("base", LayerMask::none()),
            ("full LoRA", LayerMask::all()),
            ("LoRA 0-14", LayerMask::keep_through(14)),
            ("merged", LayerMask::none()),
        ];
        let paths: &[bool] = if args.compare { &[true, false] } else { &[true] };
        for &fused in paths {
            kernels::set_enabled(fused);
            let mut speeds = vec![Vec::new(); variants.len()];
            decode(&m, &LayerMask::all(), 4)?; // warm-up
            for _ in 0..args.rounds {
                for (i, (name, mask)) in variants.iter().enumerate() {
                    if args.only.is_some_and(|o| o != i) {
                        continue;
                    }
                    let merged = *name == "merged";
                    if merged {
                        adapter::merge(&mut m, &LayerMask::all())?;
                    }
                    speeds[i].push(decode(&m, mask, args.tokens)?);
                    if merged {
                        adapter::unmerge(&mut m)?;
                    }
                }
            }
            let base = speeds[0].clone();
            for ((name, mask), s) in variants.iter().zip(speeds) {
                if s.is_empty() {
                    continue;
                }
                // Each round's speed against the base's in the same round (the rounds interleave the variants, so
                // a drift of the host's speed during the run cancels), then the median of those ratios.
                let paired: Vec<f64> = s.iter().zip(&base).map(|(v, b)| v / b - 1.0).collect();
                let s = median(s);
                let cap = bw / bytes_per_token(&m, mask, *name == "merged" || *name == "base");
                // Without a base row (`--only`) there is nothing to compare with.
                let vs_base =
                    if paired.is_empty() { "—".to_string() } else { format!("{:+.1} %", median(paired) * 100.0) };
                println!(
                    "| {} | {} | {name} | {s:.1} | {vs_base} | {cap:.1} | {:.0} % |",
                    if kind == Kind::Float { "f32" } else { "bf16" },
                    if fused { "fused kernels" } else { "libtorch" },
                    100.0 * s / cap
                );
            }
        }
    }
    kernels::set_enabled(true);
    Ok(())
}
