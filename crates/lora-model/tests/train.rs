//! LoRA fine-tuning against torch/PEFT: one and two AdamW steps from the same init and batch
//! (`tests/fixtures/adapters/train-step`, made by `scripts/fixtures/model/make_adapter_fixtures.py`), plus
//! end-to-end training, checkpoint reloading and exact resume on the tiny model.
#[path = "../../../tests/support/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use lora_model::adapter::{LayerList, ModuleSelector};
use lora_model::tch::{Kind, Tensor};
use lora_model::train::{
    causal_lm_loss, encode_sample, train_encoded, Batch, EncodedSample, Padding, Schedule, TrainConfig, TrainProgress,
    TrainSample, Trainer, IGNORE_INDEX,
};
use lora_model::{
    init_lora, load_adapter, ForwardOptions, LayerMask, Llama, LoraConfig, Module, Placement, PromptFormat, Tokenizer,
};

use common::fixtures;

fn tiny() -> Llama {
    Llama::load(fixtures().join("models/tiny-llama"), Placement::default()).unwrap()
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max().double_value(&[])
}

fn compare(what: &str, ours: Vec<(&str, &Tensor)>, theirs: &HashMap<String, Tensor>, tol: f64) {
    assert_eq!(ours.len(), theirs.len(), "{what}: tensor count");
    let mut worst = 0f64;
    for (name, t) in ours {
        let r = theirs.get(name).unwrap_or_else(|| panic!("{what}: reference lacks {name}"));
        let d = max_abs_diff(t, r);
        assert!(d < tol, "{what}: {name} differs by {d}");
        worst = worst.max(d);
    }
    eprintln!("{what}: max abs difference {worst:e}");
}

#[test]
fn one_and_two_adamw_steps_match_torch() {
    let dir = fixtures().join("adapters/train-step");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let num = |k: &str| reference[k].as_f64().unwrap();
    // Attach the init weights through the ordinary PEFT loader.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("adapter_config.json"), tmp.path().join("adapter_config.json")).unwrap();
    std::fs::copy(dir.join("init.safetensors"), tmp.path().join("adapter_model.safetensors")).unwrap();
    let mut model = tiny();
    load_adapter(&mut model, tmp.path()).unwrap();
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
    compare("init", trainer.parameters(), &read(&dir.join("init.safetensors")), 1e-7);

    let b = read(&dir.join("batch.safetensors"));
    let batch = Batch {
        input_ids: b["input_ids"].to_kind(Kind::Int64),
        attention_mask: b["attention_mask"].to_kind(Kind::Int64),
        labels: b["labels"].to_kind(Kind::Int64),
    };
    let n = batch.label_tokens().unwrap();
    assert_eq!(n, 10);

    for (step, loss_key, grads, after) in [
        (1, "loss_step1", "grads1.safetensors", "after.safetensors"),
        (2, "loss_step2", "grads2.safetensors", "after2.safetensors"),
    ] {
        let loss = trainer.accumulate(&model, &batch, n as f64).unwrap() / n as f64;
        eprintln!("step {step}: loss {loss} (torch {})", num(loss_key));
        assert!((loss - num(loss_key)).abs() < 1e-4, "step {step}: loss {loss} vs {}", num(loss_key));
        compare(&format!("grads step {step}"), trainer.gradients(), &read(&dir.join(grads)), 1e-4);
        trainer.apply_step(&mut model, lr).unwrap();
        compare(&format!("weights after step {step}"), trainer.parameters(), &read(&dir.join(after)), 1e-4);
    }
    assert_eq!(trainer.optimizer().steps(), 2);

    // The model itself carries the trained weights: its loss is torch's loss after two steps.
    let mask = LayerMask::all();
    let out = model.forward(&batch.input_ids, Some(&batch.attention_mask), &ForwardOptions::new(&mask)).unwrap();
    let loss = causal_lm_loss(&out.logits.unwrap(), &batch.labels).unwrap().double_value(&[]);
    assert!((loss - num("loss_after_step2")).abs() < 1e-4, "loss after two steps {loss}");
}

#[test]
fn grad_accumulation_equals_one_big_batch() {
    let samples = toy_samples();
    let rows: Vec<&EncodedSample> = samples.iter().take(4).collect();
    let cfg = TrainConfig { max_grad_norm: 0.0, ..TrainConfig::default() };
    let lora = LoraConfig::default();

    let mut m1 = tiny();
    let mut t1 = Trainer::new(&mut m1, lora.clone(), cfg.clone()).unwrap();
    let full = Batch::collate(&rows, 0, Padding::Right).unwrap();
    let n = full.label_tokens().unwrap() as f64;
    // One identical step first moves B off zero, so every gradient below is non-trivial.
    t1.accumulate(&m1, &full, n).unwrap();
    t1.apply_step(&mut m1, 1e-2).unwrap();
    let l1 = t1.accumulate(&m1, &full, n).unwrap();

    let mut m2 = tiny();
    let mut t2 = Trainer::new(&mut m2, lora, cfg).unwrap();
    t2.accumulate(&m2, &full, n).unwrap();
    t2.apply_step(&mut m2, 1e-2).unwrap();
    let halves =
        [Batch::collate(&rows[..2], 0, Padding::Left).unwrap(), Batch::collate(&rows[2..], 0, Padding::Right).unwrap()];
    let l2: f64 = halves.iter().map(|h| t2.accumulate(&m2, h, n).unwrap()).sum();
    assert!((l1 - l2).abs() < 1e-4, "summed loss {l1} vs {l2}");
    let g2: HashMap<String, Tensor> =
        t2.gradients().into_iter().map(|(k, v)| (k.to_string(), v.shallow_clone())).collect();
    let a_grad = t1.gradients()[0].1.abs().max().double_value(&[]);
    assert!(a_grad > 0.0, "lora_A gradients are non-zero after the first step");
    compare("accumulated grads", t1.gradients(), &g2, 1e-5);
}

/// Prompt `[1, p, p+1]`, answer `[a, a+1, 2]`: a toy task the tiny model can memorise.
fn toy_samples() -> Vec<EncodedSample> {
    (0..12)
        .map(|i| {
            let p = 10 + 3 * (i % 4);
            let a = 100 + 2 * (i % 4);
            EncodedSample::new(&[1, p, p + 1, p + 2][..3 + (i as usize % 2)], &[a, a + 1, 2], 0)
        })
        .collect()
}

fn word_tokenizer() -> Tokenizer {
    let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
        "model":{"type":"WordLevel","vocab":{"<unk>":0,"</s>":2,"what":10,"is":11,"red":12,"blue":13,"a":20,
        "colour":21,"sky":22,"rose":23},"unk_token":"<unk>"}}"#;
    let inner = tokenizers::Tokenizer::from_str(json).unwrap();
    Tokenizer::new(inner, None, Some(1), vec![2], None)
}

#[test]
fn encoding_labels_answer_tokens_only() {
    let tok = word_tokenizer();
    let s = TrainSample::new("what is sky", "blue colour");
    let e = encode_sample(&tok, &s, &PromptFormat::raw(), 0).unwrap();
    assert_eq!(e.input_ids, vec![10, 11, 22, 13, 21, 2]);
    assert_eq!(e.labels, vec![IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 13, 21, 2]);
    assert_eq!(e.label_tokens(), 3);
    let t = encode_sample(&tok, &s, &PromptFormat::raw(), 4).unwrap();
    assert_eq!(t.input_ids, vec![10, 11, 22, 13]);
    assert_eq!(t.labels, vec![IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 13]);
    assert!(encode_sample(&tok, &s, &PromptFormat::chat(), 0).is_err(), "no chat template: chat mode must fail");

    let short = EncodedSample::new(&[1], &[5, 2], 0);
    for (padding, expected) in [(Padding::Right, [1i64, 5, 2, 0, 0, 0]), (Padding::Left, [0, 0, 0, 1, 5, 2])] {
        let b = Batch::collate(&[&e, &short], 0, padding).unwrap();
        assert_eq!(b.input_ids.size(), [2, 6]);
        let row1: Vec<i64> = Vec::try_from(b.input_ids.get(1)).unwrap();
        let m1: Vec<i64> = Vec::try_from(b.attention_mask.get(1)).unwrap();
        let l1: Vec<i64> = Vec::try_from(b.labels.get(1)).unwrap();
        assert_eq!(row1, expected);
        assert_eq!(m1, expected.iter().map(|&x| i64::from(x != 0)).collect::<Vec<_>>());
        assert_eq!(m1.iter().sum::<i64>(), 3);
        assert_eq!(l1.iter().filter(|&&x| x != IGNORE_INDEX).count(), 2);
        assert_eq!(b.label_tokens().unwrap(), 5);
        assert_eq!(b.tokens().unwrap(), 9);
    }
}

#[test]
fn init_follows_peft_rules_and_seed() {
    let mut model = tiny();
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(ModuleSelector::List(vec!["q_proj".into(), "down_proj".into()])),
        layers_to_transform: Some(LayerList::Many(vec![1, 3])),
        rank_pattern: vec![("down_proj".into(), 2)],
        ..LoraConfig::default()
    };
    // A listed target that names no projection is refused (it used to be dropped as long as another matched).
    let typo =
        LoraConfig { target_modules: Some(ModuleSelector::List(vec!["q_proj".into(), "v_prj".into()])), ..cfg.clone() };
    let err = init_lora(&mut model, &typo, 7).unwrap_err().to_string();
    assert!(err.contains("`v_prj`"), "{err}");
    assert!(model.projections().all(|(_, _, p)| p.lora.is_none()), "a refused config attached LoRA");
    let info = init_lora(&mut model, &cfg, 7).unwrap();
    let got: Vec<(usize, Module, usize)> = info.modules.iter().map(|m| (m.0, m.1, m.2)).collect();
    assert_eq!(got, vec![(1, Module::Q, 4), (1, Module::Down, 2), (3, Module::Q, 4), (3, Module::Down, 2)]);
    assert!((info.modules[1].3 - 4.0).abs() < 1e-12, "down_proj scaling alpha/r = 8/2");
    let q = model.projection(1, Module::Q).unwrap().lora.as_ref().unwrap();
    let bound = 1.0 / 64f64.sqrt();
    assert!(q.a.abs().max().double_value(&[]) <= bound);
    assert!(q.a.abs().max().double_value(&[]) > 0.8 * bound);
    assert!(q.a.std(true).double_value(&[]) > 0.8 * bound / 3f64.sqrt());
    assert_eq!(q.b.abs().max().double_value(&[]), 0.0);
    assert!(model.projection(0, Module::Q).unwrap().lora.is_none());
    assert!(model.projection(1, Module::K).unwrap().lora.is_none());
    let down = model.projection(3, Module::Down).unwrap().lora.as_ref().unwrap();
    assert_eq!(down.a.size(), [2, 128]);

    let a1 = q.a.copy();
    let mut m2 = tiny();
    init_lora(&mut m2, &cfg, 7).unwrap();
    let a2 = m2.projection(1, Module::Q).unwrap().lora.as_ref().unwrap().a.copy();
    assert_eq!(max_abs_diff(&a1, &a2), 0.0, "same seed, same init");
    init_lora(&mut m2, &cfg, 8).unwrap();
    let a3 = m2.projection(1, Module::Q).unwrap().lora.as_ref().unwrap().a.copy();
    assert!(max_abs_diff(&a1, &a3) > 0.0, "another seed, another init");

    let none =
        LoraConfig { target_modules: Some(ModuleSelector::List(vec!["lm_head".into()])), ..LoraConfig::default() };
    assert!(init_lora(&mut m2, &none, 0).is_err());
}

fn toy_config() -> TrainConfig {
    TrainConfig {
        learning_rate: 1e-2,
        epochs: 3,
        batch_size: 4,
        warmup_steps: Some(1),
        schedule: Schedule::Cosine,
        save_every: Some(3),
        log_every: 1,
        ..TrainConfig::default()
    }
}

#[test]
fn training_lowers_loss_and_checkpoints_reload() {
    let mut model = tiny();
    let out = tempfile::tempdir().unwrap();
    let samples = toy_samples();
    let lora = LoraConfig { r: 4, lora_alpha: 8.0, ..LoraConfig::default() };
    let mut seen: Vec<TrainProgress> = Vec::new();
    let summary =
        train_encoded(&mut model, &samples, 0, &lora, &toy_config(), out.path(), |p| seen.push(p.clone())).unwrap();
    assert_eq!(summary.steps, 9);
    assert_eq!(seen.len(), 9);
    assert_eq!(seen[0].lr, 0.0, "HF warmup: the first step has learning rate 0");
    assert!(seen.iter().all(|p| p.tokens_per_sec > 0.0 && p.loss.is_finite()));
    let first = seen[0].loss;
    let last = seen[8].loss;
    assert!(last < 0.7 * first, "loss {first} -> {last}");

    // The saved adapter is PEFT-shaped and reloads to the same model.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    let saved = read(&out.path().join("adapter_model.safetensors"));
    assert_eq!(saved.len(), 4 * 7 * 2);
    assert!(saved.contains_key("base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"));
    assert!(out.path().join("checkpoint-3/optimizer.safetensors").exists());
    assert!(out.path().join("checkpoint-6/trainer_state.json").exists());
    assert!(out.path().join("trainer_state.json").exists());

    let q = model.projection(0, Module::Q).unwrap().lora.as_ref().unwrap();
    assert!(!q.a.requires_grad() && !q.b.requires_grad(), "train() releases the LoRA tensors");
    let mut reloaded = tiny();
    load_adapter(&mut reloaded, out.path()).unwrap();
    let rows: Vec<&EncodedSample> = samples.iter().collect();
    let batch = Batch::collate(&rows, 0, Padding::Right).unwrap();
    let mask = LayerMask::all();
    let opts = ForwardOptions::new(&mask);
    let a = model.forward(&batch.input_ids, Some(&batch.attention_mask), &opts).unwrap().logits.unwrap();
    let b = reloaded.forward(&batch.input_ids, Some(&batch.attention_mask), &opts).unwrap().logits.unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-5);
}

#[test]
fn resume_continues_exactly() {
    let samples = toy_samples();
    let lora = LoraConfig { r: 2, lora_alpha: 4.0, lora_dropout: 0.1, ..LoraConfig::default() };
    let cfg = TrainConfig { batch_size: 2, grad_accum: 2, epochs: 2, save_every: Some(2), ..toy_config() };
    let full = tempfile::tempdir().unwrap();
    let mut model = tiny();
    train_encoded(&mut model, &samples, 0, &lora, &cfg, full.path(), |_| {}).unwrap();

    let resumed = tempfile::tempdir().unwrap();
    let mut model2 = tiny();
    let mut steps = Vec::new();
    let cfg2 = TrainConfig { resume_from: Some(full.path().join("checkpoint-2")), ..cfg.clone() };
    train_encoded(&mut model2, &samples, 0, &lora, &cfg2, resumed.path(), |p| steps.push(p.step)).unwrap();
    assert_eq!(steps, vec![3, 4, 5, 6]);
    let a = read(&full.path().join("adapter_model.safetensors"));
    let b = read(&resumed.path().join("adapter_model.safetensors"));
    let b_refs: Vec<(&str, &Tensor)> = b.iter().map(|(k, v)| (k.as_str(), v)).collect();
    compare("resumed vs uninterrupted", b_refs, &a, 1e-7);

    // Resuming on other data is refused.
    let other: Vec<EncodedSample> = samples.iter().take(8).cloned().collect();
    let mut model3 = tiny();
    assert!(train_encoded(&mut model3, &other, 0, &lora, &cfg2, resumed.path(), |_| {}).is_err());

    // A checkpoint whose optimizer step is out of range is refused naming its state file.
    let bad = tempfile::tempdir().unwrap();
    let ckpt = bad.path().join("checkpoint-2");
    std::fs::create_dir(&ckpt).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors"] {
        std::fs::copy(full.path().join("checkpoint-2").join(f), ckpt.join(f)).unwrap();
    }
    let state = std::fs::read_to_string(full.path().join("checkpoint-2/trainer_state.json")).unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&state).unwrap();
    state["adam_step"] = serde_json::json!(-5);
    std::fs::write(ckpt.join("trainer_state.json"), state.to_string()).unwrap();
    let cfg4 = TrainConfig { resume_from: Some(ckpt), ..cfg.clone() };
    let out4 = tempfile::tempdir().unwrap();
    let err = train_encoded(&mut tiny(), &samples, 0, &lora, &cfg4, out4.path(), |_| {}).unwrap_err().to_string();
    assert!(err.contains("trainer_state.json") && err.contains("adam_step -5"), "{err}");
}

#[test]
fn train_from_text_samples() {
    let tok = word_tokenizer();
    let samples: Vec<TrainSample> = ["sky blue", "rose red"]
        .iter()
        .map(|s| {
            let (q, a) = s.split_once(' ').unwrap();
            TrainSample::new(format!("what colour is a {q}"), a)
        })
        .collect();
    let out = tempfile::tempdir().unwrap();
    let cfg = TrainConfig { chat: false, epochs: 2, save_bf16: true, ..toy_config() };
    let mut model = tiny();
    let s = lora_model::train(&mut model, &tok, &samples, &LoraConfig::default(), &cfg, out.path(), |_| {}).unwrap();
    assert_eq!((s.steps, s.samples, s.dropped_samples), (2, 2, 0));
    let saved = read(&out.path().join("adapter_model.safetensors"));
    assert!(saved.values().all(|t| t.kind() == Kind::BFloat16));
}

#[test]
fn bf16_model_trains_with_f32_masters() {
    let place = Placement { kind: Kind::BFloat16, ..Placement::default() };
    let mut model = Llama::load(fixtures().join("models/tiny-llama"), place).unwrap();
    let samples = toy_samples();
    let cfg = TrainConfig { max_grad_norm: 1.0, ..toy_config() };
    let mut trainer = Trainer::new(&mut model, LoraConfig::default(), cfg).unwrap();
    let rows: Vec<&EncodedSample> = samples.iter().take(4).collect();
    let batch = Batch::collate(&rows, 0, Padding::Right).unwrap();
    let n = batch.label_tokens().unwrap() as f64;
    for _ in 0..2 {
        trainer.accumulate(&model, &batch, n).unwrap();
        trainer.apply_step(&mut model, 1e-2).unwrap();
    }
    for (name, master) in trainer.parameters() {
        assert_eq!(master.kind(), Kind::Float, "{name}");
    }
    let (name, master) = trainer.parameters()[1];
    assert!(name.ends_with("layers.0.self_attn.q_proj.lora_B.weight"), "{name}");
    let work = &model.projection(0, Module::Q).unwrap().lora.as_ref().unwrap().b;
    assert_eq!(work.kind(), Kind::BFloat16);
    assert!(master.abs().max().double_value(&[]) > 0.0, "B moved off zero");
    assert_eq!(max_abs_diff(&master.to_kind(Kind::BFloat16), work), 0.0, "working copy = rounded master");
}
