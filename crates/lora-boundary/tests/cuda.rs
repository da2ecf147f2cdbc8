//! CUDA against the CPU and the references (#20), on the tiny fixtures of `tests/fixtures/`: f32 logits and hidden
//! states equal to the CPU's within 1e-4, bf16 generation, probe curves, LoRA masks, merge and one training step.
//!
//! Every test needs a CUDA device; where `tch::Cuda::is_available()` is false it prints `skipped: no CUDA device
//! (…)` straight to stderr (not through the test harness's capture, so the line shows in an ordinary
//! `cargo test` run too) and returns. The CUDA build is `scripts/gpu-build.sh`; `scripts/gpu-check.sh` runs these
//! tests on a GPU machine from the bundle it stages, finding the fixtures under `$LORA_BOUNDARY_HOME` (the
//! workspace this file was compiled in otherwise).
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use lora_boundary::model::adapter::{merge, unmerge};
use lora_boundary::model::dtype_support::{check_dtype, check_placement, device_name, dtype_name};
use lora_boundary::model::train::{Batch, TrainConfig, Trainer};
use lora_boundary::model::ModelError;
use lora_boundary::probe::{parse_masks, Probe, ProbeConfig, ProbeMode, ProbeResult, TokenizedSample};
use lora_boundary::tch::{self, Device, Kind, Tensor};
use lora_boundary::{
    generate, load_adapter, ForwardOptions, GenerationConfig, LayerMask, Llama, LoraConfig, Module, Placement,
};

/// The workspace: `$LORA_BOUNDARY_HOME` when set (a bundle run elsewhere), else where this test was compiled.
fn root() -> PathBuf {
    std::env::var_os("LORA_BOUNDARY_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

/// CUDA device 0, or `None` after printing why the test skips. With `LORA_BOUNDARY_CUDA_TESTS_ON_CPU=1` and no
/// device, the CPU stands in for it (said on stderr): that checks these tests' own logic, never CUDA.
fn cuda(test: &str) -> Option<Device> {
    if tch::Cuda::is_available() {
        return Some(Device::Cuda(0));
    }
    if std::env::var("LORA_BOUNDARY_CUDA_TESTS_ON_CPU").is_ok_and(|v| v == "1") {
        let _ = writeln!(
            std::io::stderr(),
            "{test}: no CUDA device; the CPU stands in (LORA_BOUNDARY_CUDA_TESTS_ON_CPU=1 checks the test, not CUDA)"
        );
        return Some(Device::Cpu);
    }
    let linked = std::fs::read_to_string("/proc/self/maps").is_ok_and(|m| m.contains("libtorch_cuda"));
    let why = if linked {
        "libtorch_cuda is loaded, but libtorch sees no device"
    } else {
        "this build does not link libtorch_cuda: build with scripts/gpu-build.sh"
    };
    // Straight to the process's stderr: the harness's capture would hide an eprintln! of a passing test.
    let _ = writeln!(std::io::stderr(), "{test}: skipped: no CUDA device ({why})");
    None
}

fn read(path: PathBuf) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_iter().collect()
}

fn host(t: &Tensor) -> Tensor {
    t.to_device(Device::Cpu).to_kind(Kind::Float)
}

/// Max |a − b| over positions where `mask` `[B, T]` is 1, both brought to the CPU in f32.
fn masked_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let m = host(mask).unsqueeze(-1);
    ((host(a) - host(b)) * m).abs().max().double_value(&[])
}

fn load(model: &str, device: Device, kind: Kind) -> Llama {
    let m = Llama::load(fixtures().join("models").join(model), Placement { device, kind }).unwrap();
    assert_eq!(m.device(), device, "{model}: placed on {device:?}");
    m
}

/// The fixture's greedy prompts (left padding removed) and transformers' f32 greedy tokens.
fn greedy_case(r: &HashMap<String, Tensor>) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let ids = Vec::<Vec<i64>>::try_from(&r["gen_input_ids"]).unwrap();
    let mask = Vec::<Vec<i64>>::try_from(&r["gen_attention_mask"]).unwrap();
    let prompts = ids
        .iter()
        .zip(&mask)
        .map(|(row, m)| row.iter().zip(m).filter(|(_, &m)| m == 1).map(|(&t, _)| t).collect())
        .collect();
    (prompts, Vec::<Vec<i64>>::try_from(&r["gen_tokens"]).unwrap())
}

#[test]
fn f32_logits_and_hidden_states_equal_the_cpu() {
    let Some(dev) = cuda("f32_logits_and_hidden_states_equal_the_cpu") else { return };
    for name in ["tiny-llama", "tiny-qwen2", "tiny-llama3-rope"] {
        let r = read(fixtures().join("models").join(name).join("reference.safetensors"));
        let (ids, am) = (&r["input_ids"], &r["attention_mask"]);
        let (cpu, gpu) = (load(name, Device::Cpu, Kind::Float), load(name, dev, Kind::Float));
        let all = LayerMask::all();
        let opts = ForwardOptions { hidden_states: true, ..ForwardOptions::new(&all) };
        let a = cpu.forward(ids, Some(am), &opts).unwrap();
        let b = gpu.forward(ids, Some(am), &opts).unwrap();
        let (la, lb) = (a.logits.unwrap(), b.logits.unwrap());
        assert_eq!(lb.device(), dev, "{name}: logits stay on the device");
        let d = masked_diff(&lb, &la, am);
        assert!(d < 1e-4, "{name}: CUDA logits differ from the CPU's by {d}");
        let d = masked_diff(&lb, &r["logits"], am);
        assert!(d < 1e-4, "{name}: CUDA logits differ from transformers' by {d}");
        assert_eq!(a.hidden_states.len(), b.hidden_states.len());
        for (i, (ha, hb)) in a.hidden_states.iter().zip(&b.hidden_states).enumerate() {
            let d = masked_diff(hb, ha, am);
            assert!(d < 1e-4, "{name}: hidden state {i} differs from the CPU's by {d}");
        }
        // Greedy generation in f32 gives transformers' tokens, batched (left-padded) as on the CPU.
        let (prompts, want) = greedy_case(&r);
        let cfg = GenerationConfig { max_new_tokens: want[0].len(), ..Default::default() };
        let (out, _) = generate(&gpu, None, &prompts, &cfg, &all).unwrap();
        for (row, w) in out.iter().zip(&want) {
            assert_eq!(&row.token_ids, w, "{name}: f32 greedy tokens on CUDA");
        }
    }
}

#[test]
fn bf16_forward_and_generation_on_cuda() {
    let Some(dev) = cuda("bf16_forward_and_generation_on_cuda") else { return };
    let ulp = 2f64.powi(-8);
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dir = fixtures().join("models").join(name);
        let f32_ref = read(dir.join("reference.safetensors"));
        let bf16_ref = read(dir.join("reference_bf16.safetensors"));
        let am = &f32_ref["attention_mask"];
        let gpu = load(name, dev, Kind::BFloat16);
        let cpu = load(name, Device::Cpu, Kind::Float);
        let none = LayerMask::none();
        // (1) The forward pass, by tests/lowp.rs's rule: no further from transformers' bf16 result than twice
        // transformers' own bf16-vs-f32 gap, plus two bf16 units at the tensor's scale.
        let out = gpu.forward(&f32_ref["input_ids"], Some(am), &ForwardOptions::new(&none)).unwrap();
        let ours = out.logits.unwrap();
        assert_eq!(gpu.kind(), Kind::BFloat16, "{name}: bf16 weights");
        let theirs = &bf16_ref["logits"];
        let scale = (host(theirs) * host(am).unsqueeze(-1)).abs().max().double_value(&[]);
        let hf_gap = masked_diff(theirs, &f32_ref["logits"], am);
        let ours_gap = masked_diff(&ours, theirs, am);
        let tol = 2.0 * hf_gap + 2.0 * ulp * scale.max(1.0);
        assert!(ours_gap <= tol, "{name}: CUDA bf16 logits vs transformers' bf16 {ours_gap:.4} > {tol:.4}");
        // (2) Greedy generation in bf16, batched: each chosen token, teacher-forced through the f32 model on the
        // CPU, is within bf16's error of the f32 best choice, and is that choice wherever the f32 margin between
        // the best two exceeds that error.
        let err = 4.0 * masked_diff(&ours, &f32_ref["logits"], am) + 4.0 * ulp * scale.max(1.0);
        let (prompts, want) = greedy_case(&f32_ref);
        let cfg = GenerationConfig { max_new_tokens: want[0].len(), ..Default::default() };
        let (gen, _) = generate(&gpu, None, &prompts, &cfg, &none).unwrap();
        let (mut decisive, mut steps) = (0, 0);
        for (prompt, g) in prompts.iter().zip(&gen) {
            assert_eq!(g.token_ids.len(), cfg.max_new_tokens, "{name}: no early stop without EOS ids");
            let seq: Vec<i64> = prompt.iter().chain(&g.token_ids).copied().collect();
            let x = Tensor::from_slice(&seq).view([1, -1]);
            let logits = cpu.forward(&x, None, &ForwardOptions::new(&none)).unwrap().logits.unwrap();
            for (i, &chosen) in g.token_ids.iter().enumerate() {
                let row = Vec::<f32>::try_from(logits.get(0).get((prompt.len() + i - 1) as i64)).unwrap();
                let mut sorted = row.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let best = sorted[0] as f64;
                let shortfall = best - row[chosen as usize] as f64;
                assert!(shortfall <= err, "{name}: step {i} chose {chosen}, {shortfall:.4} below the f32 best");
                if best - sorted[1] as f64 > err {
                    decisive += 1;
                    let argmax = row.iter().position(|&v| v as f64 == best).unwrap() as i64;
                    assert_eq!(chosen, argmax, "{name}: step {i} is decisive in f32 but bf16 chose otherwise");
                }
                steps += 1;
            }
        }
        assert!(decisive > 0, "{name}: no decisive step among {steps} (tolerance {err:.4})");
        eprintln!(
            "{name}: bf16 greedy on {}: {decisive} of {steps} steps decisive, each f32's choice",
            device_name(dev)
        );
    }
}

fn probe_samples(r: &serde_json::Value) -> Vec<TokenizedSample> {
    let ids =
        |v: &serde_json::Value| -> Vec<i64> { v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect() };
    r["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| TokenizedSample { prompt_ids: ids(&s["prompt_ids"]), answer_ids: ids(&s["answer_ids"]) })
        .collect()
}

fn with_adapter(base: &str, adapter: &Path, device: Device) -> Llama {
    let mut m = load(base, device, Kind::Float);
    load_adapter(&mut m, adapter).unwrap();
    m
}

fn run_probe(model: &Llama, r: &serde_json::Value, mode: ProbeMode) -> ProbeResult {
    let cfg = ProbeConfig {
        k: r["k"].as_u64().unwrap() as usize,
        mode,
        batch_size: 3,
        bootstrap_resamples: 100,
        seed: 7,
        ..Default::default()
    };
    let masks = parse_masks(&["all", "none", "0-1", "0,3"].map(String::from)).unwrap();
    Probe::new(cfg).run_labelled(model, &probe_samples(r), &masks).unwrap()
}

#[test]
fn probe_curves_on_cuda_equal_the_cpu_and_transformers_peft() {
    let Some(dev) = cuda("probe_curves_on_cuda_equal_the_cpu_and_transformers_peft") else { return };
    let text = std::fs::read_to_string(fixtures().join("probe/reference.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let adapter = fixtures().join("adapters/tiny-llama-basic");
    let (cpu, gpu) = (with_adapter("tiny-llama", &adapter, Device::Cpu), with_adapter("tiny-llama", &adapter, dev));
    for (mode, tag) in [(ProbeMode::Teacher, "teacher"), (ProbeMode::Free, "free")] {
        let (a, b) = (run_probe(&cpu, &r, mode), run_probe(&gpu, &r, mode));
        let mut checked = 0;
        for (ca, cb) in a.curves.iter().zip(&b.curves) {
            let (pa, pb) = (&ca.per_sample, &cb.per_sample);
            assert_eq!(pa.answer_ids, pb.answer_ids, "{tag} {}: probed tokens", ca.mask);
            for (metric, x, y) in [
                ("gt_prob", &pa.gt_prob, &pb.gt_prob),
                ("max_prob", &pa.max_prob, &pb.max_prob),
                ("gt_rank", &pa.gt_rank, &pb.gt_rank),
                ("entropy", &pa.entropy, &pb.entropy),
            ] {
                let d = (x - y).mapv(f32::abs).fold(0f32, |m, &v| m.max(v));
                assert!(d <= 1e-4, "{tag} {} {metric}: CUDA differs from the CPU by {d}", ca.mask);
                checked += x.len();
            }
        }
        // And against transformers + PEFT: the probed token's probability per sample, point and position.
        for c in r["curves"].as_array().unwrap().iter().filter(|c| c["mode"] == tag) {
            let curve = b.curve(c["mask"].as_str().unwrap()).unwrap();
            for (s, sample) in c["samples"].as_array().unwrap().iter().enumerate() {
                for (p, row) in sample["gt_prob"].as_array().unwrap().iter().enumerate() {
                    for (j, v) in row.as_array().unwrap().iter().enumerate() {
                        let (got, want) = (f64::from(curve.per_sample.gt_prob[[s, p, j]]), v.as_f64().unwrap());
                        assert!((got - want).abs() <= 1e-4, "{tag} {}: {s}/{p}/{j} {got} vs {want}", curve.mask);
                    }
                }
            }
        }
        assert!(checked > 500, "{tag}: only {checked} values compared");
    }
}

#[test]
fn lora_masks_and_merge_on_cuda_equal_peft() {
    let Some(dev) = cuda("lora_masks_and_merge_on_cuda_equal_peft") else { return };
    for (base, name) in
        [("tiny-llama", "tiny-llama-basic"), ("tiny-llama", "tiny-llama-layers"), ("tiny-qwen2", "tiny-qwen2-basic")]
    {
        let dir = fixtures().join("adapters").join(name);
        let r = read(dir.join("reference.safetensors"));
        let (ids, am) = (&r["input_ids"], &r["attention_mask"]);
        let mut m = with_adapter(base, &dir, dev);
        let cpu = with_adapter(base, &dir, Device::Cpu);
        let logits =
            |m: &Llama, mask: &LayerMask| m.forward(ids, Some(am), &ForwardOptions::new(mask)).unwrap().logits.unwrap();
        let layers = m.num_layers();
        let mut cases = vec![("logits_full".to_string(), LayerMask::all()), ("logits_base".into(), LayerMask::none())];
        for key in r.keys() {
            if let Some(b) = key.strip_prefix("logits_keep_through_") {
                cases.push((key.clone(), LayerMask::keep_through(b.parse().unwrap())));
            } else if let Some(range) = key.strip_prefix("logits_drop_") {
                let (lo, hi) = range.split_once('_').unwrap();
                let (lo, hi): (usize, usize) = (lo.parse().unwrap(), hi.parse().unwrap());
                cases.push((key.clone(), LayerMask::from_layers((0..layers).filter(|l| *l < lo || *l > hi))));
            }
        }
        assert!(cases.len() >= 4, "{name}: too few masks");
        for (key, mask) in &cases {
            let ours = logits(&m, mask);
            let d = masked_diff(&ours, &r[key], am);
            assert!(d < 1e-4, "{name}: {key} (mask {mask}) on CUDA differs from PEFT by {d}");
            let d = masked_diff(&ours, &logits(&cpu, mask), am);
            assert!(d < 1e-4, "{name}: {key} (mask {mask}) on CUDA differs from the CPU by {d}");
        }
        let w0 = host(&m.projection(0, Module::Q).unwrap().weight);
        merge(&mut m, &LayerMask::all()).unwrap();
        let d = masked_diff(&logits(&m, &LayerMask::all()), &r["logits_merged"], am);
        assert!(d < 1e-4, "{name}: merged logits on CUDA differ from PEFT's by {d}");
        unmerge(&mut m).unwrap();
        let back = (host(&m.projection(0, Module::Q).unwrap().weight) - w0).abs().max().double_value(&[]);
        assert!(back < 1e-5, "{name}: unmerge on CUDA left a difference of {back}");
    }
}

#[test]
fn one_training_step_on_cuda_matches_torch() {
    let Some(dev) = cuda("one_training_step_on_cuda_matches_torch") else { return };
    let dir = fixtures().join("adapters/train-step");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("adapter_config.json"), tmp.path().join("adapter_config.json")).unwrap();
    std::fs::copy(dir.join("init.safetensors"), tmp.path().join("adapter_model.safetensors")).unwrap();
    let mut model = with_adapter("tiny-llama", tmp.path(), dev);
    let lora = LoraConfig::from_file(&dir.join("adapter_config.json")).unwrap();
    let opt = &reference["optimizer"];
    let cfg = TrainConfig {
        learning_rate: opt["lr"].as_f64().unwrap(),
        weight_decay: opt["weight_decay"].as_f64().unwrap(),
        adam_beta1: opt["betas"][0].as_f64().unwrap(),
        adam_beta2: opt["betas"][1].as_f64().unwrap(),
        adam_eps: opt["eps"].as_f64().unwrap(),
        max_grad_norm: 0.0,
        ..TrainConfig::default()
    };
    let lr = cfg.learning_rate;
    let mut trainer = Trainer::from_attached(&mut model, lora, cfg).unwrap();
    let b = read(dir.join("batch.safetensors"));
    let batch = Batch {
        input_ids: b["input_ids"].to_kind(Kind::Int64),
        attention_mask: b["attention_mask"].to_kind(Kind::Int64),
        labels: b["labels"].to_kind(Kind::Int64),
    };
    let n = batch.label_tokens().unwrap() as f64;
    let loss = trainer.accumulate(&model, &batch, n).unwrap() / n;
    let want = reference["loss_step1"].as_f64().unwrap();
    assert!((loss - want).abs() < 1e-4, "loss on CUDA {loss}, torch {want}");
    let compare = |what: &str, ours: Vec<(&str, &Tensor)>, theirs: &HashMap<String, Tensor>| {
        assert_eq!(ours.len(), theirs.len(), "{what}: tensor count");
        for (name, t) in ours {
            assert_eq!(t.device(), dev, "{what}: {name} lives on the device");
            let d = (host(t) - host(&theirs[name])).abs().max().double_value(&[]);
            assert!(d < 1e-4, "{what}: {name} on CUDA differs from torch by {d}");
        }
    };
    compare("gradients", trainer.gradients(), &read(dir.join("grads1.safetensors")));
    trainer.apply_step(&mut model, lr).unwrap();
    compare("weights after one step", trainer.parameters(), &read(dir.join("after.safetensors")));
}

#[test]
fn dtypes_the_device_cannot_run_are_refused_by_name() {
    let Some(dev) = cuda("dtypes_the_device_cannot_run_are_refused_by_name") else { return };
    let model = fixtures().join("models/tiny-llama");
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        let place = Placement { device: dev, kind };
        match check_placement(place) {
            Ok(()) => {
                let m = Llama::load(&model, place).unwrap();
                let ids = Tensor::from_slice(&[1i64, 5, 9, 12]).view([1, 4]);
                let l = m.forward(&ids, None, &ForwardOptions::new(&LayerMask::none())).unwrap().logits.unwrap();
                assert!(host(&l).isfinite().all().int64_value(&[]) == 1, "{}: finite logits", dtype_name(kind));
                eprintln!("{} runs on {}", dtype_name(kind), device_name(dev));
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(dtype_name(kind)) && msg.contains(&device_name(dev)), "{msg}");
                eprintln!("{} refused: {msg}", dtype_name(kind));
            }
        }
    }
    // No plain matrix product in an 8-bit float on CUDA either.
    let e = check_dtype(dev, Kind::Float8e4m3fn).unwrap_err();
    assert!(matches!(e, ModelError::UnsupportedDtype { .. }), "{e}");
    let want = format!("dtype float8_e4m3fn cannot run on {}: ", device_name(dev));
    assert!(e.to_string().starts_with(&want), "{e}");
    let missing = Device::Cuda(tch::Cuda::device_count() as usize);
    let e = lora_boundary::load_model(&model, Placement { device: missing, kind: Kind::Float }).unwrap_err();
    assert!(e.to_string().contains("is not available"), "{e}");
}

#[test]
fn loading_refuses_what_this_machine_cannot_run_by_name() {
    // Runs everywhere: the check sits in load_model, before any weight is read.
    let model = fixtures().join("models/tiny-llama");
    let e = lora_boundary::load_model(&model, Placement { device: Device::Cpu, kind: Kind::Float8e5m2 }).unwrap_err();
    assert!(e.to_string().starts_with("dtype float8_e5m2 cannot run on cpu: "), "{e}");
    if !tch::Cuda::is_available() {
        let e =
            lora_boundary::load_model(&model, Placement { device: Device::Cuda(0), kind: Kind::Float }).unwrap_err();
        assert!(e.to_string().contains("device cuda:0 is not available"), "{e}");
    }
}
