//! The whole pipeline end to end on the tiny fixture model (CPU, seconds): train LoRA, probe, detect, search,
//! evaluate full vs pruned vs base, export the pruned adapter and the report; then the CLI on the same files.
#[path = "../../../tests/support/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use lora_boundary::pipeline::{run_pipeline, PipelineConfig};
use lora_boundary::{load_adapter, load_model, LayerMask, Placement};

use common::fixtures;

/// GPT-2's byte → printable character map: a 256-token byte-level vocabulary fits the tiny model's 256 ids.
fn byte_vocab() -> serde_json::Map<String, serde_json::Value> {
    let mut extra = 0u32;
    let mut map = serde_json::Map::new();
    for b in 0u32..256 {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        map.insert(char::from_u32(c).unwrap().to_string(), serde_json::json!(b));
    }
    map
}

/// A copy of tiny-llama with a byte-level tokenizer and a minimal chat template.
fn tiny_model_dir(dir: &Path) -> PathBuf {
    let m = dir.join("tiny-llama");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("models/tiny-llama").join(f), m.join(f)).unwrap();
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": byte_vocab(), "merges": []}
    });
    std::fs::write(m.join("tokenizer.json"), tok.to_string()).unwrap();
    let cfg = serde_json::json!({
        "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    });
    std::fs::write(m.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    m
}

fn write_jsonl(path: &Path, n: usize, offset: usize) {
    let rows: Vec<String> = (offset..offset + n)
        .map(|i| {
            let a = ["red", "blue", "green", "gold"][i % 4];
            serde_json::json!({"prompt": format!("colour {i}?"), "answer": format!("{a} {a}")}).to_string()
        })
        .collect();
    std::fs::write(path, rows.join("\n")).unwrap();
}

#[test]
fn pipeline_runs_end_to_end_on_the_tiny_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tiny_model_dir(tmp.path());
    let (train_f, val_f, test_f) =
        (tmp.path().join("train.jsonl"), tmp.path().join("val.jsonl"), tmp.path().join("test.jsonl"));
    write_jsonl(&train_f, 16, 0);
    write_jsonl(&val_f, 8, 100);
    write_jsonl(&test_f, 8, 200);

    // Fine-tune "full LoRA" with the project's trainer.
    let (mut model, tokenizer) = load_model(&model_dir, Placement::default()).unwrap();
    let samples: Vec<_> = lora_boundary::tasks::Task::Jsonl.load(&train_f).unwrap().into_iter().collect();
    let lora = lora_boundary::LoraConfig { r: 4, lora_alpha: 8.0, ..Default::default() };
    let cfg = lora_boundary::model::TrainConfig { epochs: 2, batch_size: 4, learning_rate: 5e-3, ..Default::default() };
    let adapter = tmp.path().join("adapter");
    let summary = lora_boundary::model::train(&mut model, &tokenizer, &samples, &lora, &cfg, &adapter, |_| {}).unwrap();
    assert_eq!(summary.steps, 8);

    let out = tmp.path().join("run");
    let cfg = PipelineConfig {
        model: model_dir.clone(),
        adapter: adapter.clone(),
        task: lora_boundary::tasks::Task::Jsonl,
        validation: val_f.clone(),
        test: test_f.clone(),
        validation_samples: 8,
        test_samples: 8,
        validation_offset: 0,
        test_offset: 0,
        chat: true,
        system: None,
        prompt_suffix: None,
        k: 2,
        metric: Some(lora_boundary::metrics::Metric::RougeL),
        strategy: lora_boundary::search::Strategy::Exhaustive,
        range: None,
        proxy_only: false,
        max_new_tokens: 4,
        batch_size: 4,
        seed: 0,
        out: out.clone(),
        sweep: vec![0, 2],
        ablation: true,
        speed_tokens: 4,
        train: None,
        shuffle_seed: None,
    };
    let report = run_pipeline(&cfg, Placement::default(), |_| {}).unwrap();
    assert_eq!(report.num_layers, 4);
    assert!(report.search.boundary < 4);
    assert_eq!(report.search.candidates.len(), 4, "exhaustive scores every boundary");
    let labels: Vec<&str> = report.evaluation.iter().map(|e| e.label.as_str()).collect();
    assert_eq!(&labels[..2], &["full", "base"]);
    let full = &report.evaluation[0];
    assert!((full.lora_params_kept - 1.0).abs() < 1e-12 && report.evaluation[1].lora_params_kept == 0.0);
    // The Fig. 4 sweep: one row per requested boundary, each with a CI against full LoRA, and its plot; the
    // searched boundary's row agrees with the sweep where both exist (one generation per distinct mask).
    let swept: Vec<Option<usize>> = report.sweep.iter().map(|e| e.boundary).collect();
    assert_eq!(swept, [Some(0), Some(2)]);
    assert!(report.sweep.iter().all(|e| e.ci_vs_full.is_some() && e.item_mean.is_finite()));
    let searched = report.evaluation.iter().find(|e| e.label.starts_with("search")).unwrap();
    if let Some(same) = report.sweep.iter().find(|e| e.mask == searched.mask) {
        assert_eq!(same.scores, searched.scores);
    }
    // Decode speed of base, full, pruned and merged.
    let speed: Vec<&str> = report.speed.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(speed.len(), 4, "{speed:?}");
    assert!(report.speed.iter().all(|s| s.decode_tokens_per_s > 0.0));
    assert!(report.speed[0].vs_base == 0.0);
    for f in ["report.json", "report.md", "probe.svg", "search.svg", "sweep.svg"] {
        assert!(out.join(f).exists(), "{f}");
    }
    assert!(std::fs::read_to_string(out.join("report.md")).unwrap().contains("| full |"));
    let probe_svg = std::fs::read_to_string(out.join("probe.svg")).unwrap();
    assert!(
        probe_svg.contains(&format!("searched boundary b = {}", report.search.boundary)),
        "probe plot marks the boundary"
    );
    // The saved report reads back (what `lora-boundary plot` re-renders from).
    let saved = lora_boundary::pipeline::PipelineReport::load(&out).unwrap();
    assert_eq!((saved.search.boundary, saved.num_layers), (report.search.boundary, report.num_layers));
    assert_eq!(saved.probe.curves.len(), report.probe.curves.len());
    // The pruned adapter holds exactly blocks 0..=boundary and loads.
    let (mut m2, _) = load_model(&model_dir, Placement::default()).unwrap();
    let info = load_adapter(&mut m2, &report.pruned_adapter).unwrap();
    assert_eq!(info.layers().into_iter().collect::<Vec<_>>(), (0..=report.search.boundary).collect::<Vec<_>>());
    // Probe curves have L + 1 points for full, base and the two half-drop ablations (the paper's Fig. 2).
    let curves = &report.probe.curves;
    let names: Vec<&str> = curves.iter().map(|c| c.mask.as_str()).collect();
    assert_eq!(names, ["all", "none", "2-3", "0-1"]);
    assert_eq!(curves[0].gt_prob.len(), 5);
    // A second run into the same directory is refused instead of mixing results.
    assert!(run_pipeline(&cfg, Placement::default(), |_| {}).is_err());

    // The CLI on the same files: eval under two masks, then search, as JSON.
    let bin = env!("CARGO_BIN_EXE_lora-boundary");
    let eval = Command::new(bin)
        .args(["eval", "--model"])
        .arg(&model_dir)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--data")
        .arg(&test_f)
        .args([
            "--chat",
            "--mask",
            "all",
            "--mask",
            "0-1",
            "--max-new-tokens",
            "4",
            "--metric",
            "rougeL",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let v: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    assert_eq!(v["results"][1]["mask"], "0-1");
    let search = Command::new(bin)
        .args(["search", "--model"])
        .arg(&model_dir)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--data")
        .arg(&val_f)
        .args(["--chat", "--metric", "logprob", "--strategy", "exhaustive", "--format", "json"])
        .output()
        .unwrap();
    assert!(search.status.success(), "{}", String::from_utf8_lossy(&search.stderr));
    let v: serde_json::Value = serde_json::from_slice(&search.stdout).unwrap();
    assert!(v["boundary"].as_u64().unwrap() < 4);
    assert_eq!(v["candidates"].as_array().unwrap().len(), 4);
    // Bad input: exit code 2 and a message naming the problem.
    let bad = Command::new(bin)
        .args(["eval", "--model"])
        .arg(&model_dir)
        .args(["--data", "/nonexistent.jsonl"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let bad = Command::new(bin)
        .args(["generate", "--model"])
        .arg(&model_dir)
        .args(["--prompt", "x", "--mask", "9-2"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{}", String::from_utf8_lossy(&bad.stderr));

    // The proxy's shared-prefix sweep equals one teacher-forced pass per boundary.
    let (mut m3, tok3) = load_model(&model_dir, Placement::default()).unwrap();
    load_adapter(&mut m3, &adapter).unwrap();
    let val = lora_boundary::tasks::Task::Jsonl.load(&val_f).unwrap();
    let refs: Vec<&lora_boundary::tasks::Sample> = val.iter().collect();
    let chat = lora_boundary::PromptFormat::chat();
    let sweep = lora_boundary::scoring::answer_logprobs_sweep(&m3, &tok3, &refs, &[0, 1, 2, 3], &chat, 3).unwrap();
    for (b, row) in sweep.iter().enumerate() {
        let one =
            lora_boundary::scoring::answer_logprobs(&m3, &tok3, &refs, &LayerMask::keep_through(b), &chat, 3).unwrap();
        for (x, y) in row.iter().zip(&one) {
            assert!((x - y).abs() < 1e-4, "boundary {b}: sweep {x} vs direct {y}");
        }
    }
    assert!(lora_boundary::scoring::answer_logprobs_sweep(&m3, &tok3, &refs, &[4], &chat, 3).is_err());
    // A raw prompt of no tokens leaves the first answer token nothing to be predicted from: a typed error.
    let raw = lora_boundary::PromptFormat::Raw;
    assert!(tok3.encode_prompt("", &raw).unwrap().is_empty(), "this tokenizer adds a token to an empty prompt");
    let empty = lora_boundary::tasks::Sample { prompt: String::new(), ..val[0].clone() };
    let err = lora_boundary::scoring::answer_logprobs(&m3, &tok3, &[&empty], &LayerMask::all(), &raw, 3).unwrap_err();
    assert!(err.to_string().contains("prompt of no tokens"), "{err}");
    let err = lora_boundary::scoring::answer_logprobs_sweep(&m3, &tok3, &[&empty], &[0, 1], &raw, 3).unwrap_err();
    assert!(err.to_string().contains("prompt of no tokens"), "{err}");
    // Prompts that share a long start (an instruction before each input) take the sweep's shared-prefix path (the
    // prefix runs once per batch, the rest after it): still the values of one pass per boundary.
    let head = "Describe the following item in one or two sentences, using every attribute it lists.\n";
    let long: Vec<lora_boundary::tasks::Sample> = val
        .iter()
        .map(|s| lora_boundary::tasks::Sample { prompt: format!("{head}{}", s.prompt), ..s.clone() })
        .collect();
    let long_refs: Vec<&lora_boundary::tasks::Sample> = long.iter().collect();
    let sweep = lora_boundary::scoring::answer_logprobs_sweep(&m3, &tok3, &long_refs, &[0, 2, 3], &chat, 3).unwrap();
    for (b, row) in [0, 2, 3].into_iter().zip(&sweep) {
        let mask = LayerMask::keep_through(b);
        let one = lora_boundary::scoring::answer_logprobs(&m3, &tok3, &long_refs, &mask, &chat, 3).unwrap();
        for (x, y) in row.iter().zip(&one) {
            assert!((x - y).abs() < 1e-4, "shared prefix, boundary {b}: sweep {x} vs direct {y}");
        }
    }

    // The search's proxy scorer: a prepared sweep of some boundaries, then a boundary it was not given (computed
    // alone), then a sample it has not seen (every candidate at once) all give the values of one pass per boundary.
    {
        use lora_boundary::search::Scorer;
        let mut proxy = lora_boundary::scoring::ProxyScorer::new(&m3, &tok3, &long, chat.clone(), 3);
        let all: Vec<usize> = (0..long.len()).collect();
        let seen = &all[..all.len() - 1];
        proxy.prepare(&[3, 0], seen).unwrap();
        let mut check = |b: usize, which: &[usize]| {
            let mask = LayerMask::keep_through(b);
            let one = lora_boundary::scoring::answer_logprobs(&m3, &tok3, &long_refs, &mask, &chat, 3).unwrap();
            for (i, x) in which.iter().zip(proxy.score(b, which).unwrap()) {
                assert!((x - one[*i]).abs() < 1e-4, "proxy scorer, boundary {b}, sample {i}: {x} vs {}", one[*i]);
            }
        };
        // Boundary 1 on the prepared samples: from the full-LoRA pass the prepared sweep kept.
        check(1, seen);
        for b in [0, 3, 1, 2] {
            check(b, &all);
        }
    }

    // A config with a [train] table trains the adapter when it does not exist yet, then runs as before.
    let trained_dir = tmp.path().join("adapter-trained");
    let cfg2 = PipelineConfig {
        adapter: trained_dir.clone(),
        out: tmp.path().join("run2"),
        sweep: Vec::new(),
        ablation: false,
        speed_tokens: 0,
        proxy_only: true,
        train: Some(lora_boundary::pipeline::TrainSection {
            data: train_f.clone(),
            offset: 0,
            samples: 8,
            r: 2,
            alpha: 4.0,
            lr: 5e-3,
            epochs: 1,
            batch_size: 4,
            grad_accum: 1,
            max_len: 64,
            seed: 1,
            bf16: false,
        }),
        ..cfg.clone()
    };
    let r2 = run_pipeline(&cfg2, Placement::default(), |_| {}).unwrap();
    let trained = r2.trained.expect("the run trained the adapter");
    assert_eq!(trained.steps, 2);
    assert!(trained_dir.join("adapter_config.json").exists());
    assert_eq!(r2.probe.curves.len(), 2, "no ablation curves when switched off");
}

/// `--system` reaches the rendered prompt: `generate --chat --system` produces exactly the tokens the library
/// produces from the conversation (system, user) rendered by hand; `--system` without `--chat` is a usage error,
/// on the CLI and as a pipeline config key.
#[test]
fn system_prompt_reaches_the_prompt_on_the_cli_and_in_the_pipeline_config() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tiny_model_dir(tmp.path());
    let (model, tokenizer) = load_model(&model_dir, Placement::default()).unwrap();
    let (system, prompt) = ("Answer in one word.", "colour 7?");
    // The fixture's template renders each message as `<role>content\n`.
    let by_hand = tokenizer.encode(&format!("<system>{system}\n<user>{prompt}\n<assistant>"), false).unwrap();
    let format = lora_boundary::PromptFormat::chat_with_system(system);
    assert_eq!(tokenizer.encode_prompt(prompt, &format).unwrap(), by_hand);
    let cfg = lora_boundary::GenerationConfig {
        max_new_tokens: 6,
        eos_token_ids: tokenizer.eos_token_ids().to_vec(),
        ..Default::default()
    };
    let (expected, _) = lora_boundary::generate(&model, Some(&tokenizer), &[by_hand], &cfg, &LayerMask::all()).unwrap();

    let bin = env!("CARGO_BIN_EXE_lora-boundary");
    let run = |extra: &[&str]| {
        Command::new(bin)
            .args(["generate", "--max-new-tokens", "6", "--format", "json", "--prompt", prompt, "--model"])
            .arg(&model_dir)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--chat", "--system", system]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<i64> =
        json["outputs"][0]["token_ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(ids, expected[0].token_ids);

    let bad = run(&["--system", system]);
    assert_eq!(bad.status.code(), Some(2), "clap usage error");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--chat"), "{}", String::from_utf8_lossy(&bad.stderr));

    // A template that refuses a system message (Mixtral-8x7B-Instruct-v0.1's) is a usage error naming its reason.
    let mixtral = common::fixtures().join("chat_templates/templates/mistralai-Mixtral-8x7B-Instruct-v0.1.jinja");
    let cfg = serde_json::json!({ "chat_template": std::fs::read_to_string(mixtral).unwrap() });
    std::fs::write(model_dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let refused = run(&["--chat", "--system", system]);
    assert_eq!(refused.status.code(), Some(2), "{}", String::from_utf8_lossy(&refused.stderr));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("rejected the conversation: Conversation roles must alternate"), "{stderr}");
    assert!(run(&["--chat"]).status.success(), "the same template takes a user turn alone");

    // The pipeline config: `system` without `chat = true` is refused before any work.
    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\nadapter = {:?}\ntask = \"jsonl\"\nvalidation = \"v.jsonl\"\ntest = \"t.jsonl\"\n\
             validation_samples = 2\ntest_samples = 2\nout = {:?}\nsystem = \"Be brief.\"\n",
            model_dir,
            tmp.path().join("no-adapter"),
            tmp.path().join("out")
        ),
    )
    .unwrap();
    let bad = Command::new(bin).arg("run").arg(&config).output().unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("`system` needs `chat = true`"), "{stderr}");
    assert!(!tmp.path().join("out").exists());
    // `speed_tokens = 1` (no decode step to time) is refused before any work; an unknown key is named with its
    // 1-based line.
    let body = std::fs::read_to_string(&config).unwrap().replace("system = \"Be brief.\"\n", "");
    std::fs::write(&config, format!("{body}speed_tokens = 1\n")).unwrap();
    let bad = Command::new(bin).arg("run").arg(&config).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("`speed_tokens`"), "{stderr}");
    for key in ["validation_samples", "test_samples"] {
        let zero = body.replace(&format!("{key} = 2"), &format!("{key} = 0"));
        assert_ne!(zero, body);
        std::fs::write(&config, zero).unwrap();
        let bad = Command::new(bin).arg("run").arg(&config).output().unwrap();
        assert_eq!(bad.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert!(stderr.contains(&format!("`{key}` must be at least 1")), "{stderr}");
    }
    std::fs::write(&config, format!("{body}frobnicate = 3\n")).unwrap();
    let line = body.lines().count() + 1;
    let bad = Command::new(bin).arg("run").arg(&config).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains(&format!("run.toml:{line}:")) && stderr.contains("frobnicate"), "{stderr}");
    assert!(!tmp.path().join("out").exists());
}
