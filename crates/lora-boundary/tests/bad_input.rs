//! Bad input at the edges of the command line: every case gets a typed refusal naming what is wrong, with the
//! exit code docs/cli.md gives (2 = bad usage or input data, 1 = model/adapter/file errors), before any long work,
//! and leaves no partial output behind. docs/reliability.md lists each class and the test here that proves it.
#[path = "../../../tests/support/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lora_boundary::tch::Tensor;

use common::fixtures;

/// tiny-llama with a byte-level tokenizer (256 ids = 256 bytes; context 256 tokens).
fn model() -> PathBuf {
    fixtures().join("roundtrip/inputs/tiny-llama-tok")
}

fn adapter() -> PathBuf {
    fixtures().join("adapters/tiny-llama-basic")
}

fn run(args: &[&str], cwd: Option<&Path>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lora-boundary"));
    c.args(args);
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    c.output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts the exit code and that stderr mentions every `needles` entry.
fn expect(out: &Output, code: i32, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`: {err}");
    }
}

/// A copy of tiny-llama-basic whose block-2 `up_proj` lora_B holds NaN.
fn nan_adapter(dir: &Path) -> PathBuf {
    let out = dir.join("nan-adapter");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(adapter().join("adapter_config.json"), out.join("adapter_config.json")).unwrap();
    let mut tensors = Tensor::read_safetensors(adapter().join("adapter_model.safetensors")).unwrap();
    let bad = "base_model.model.model.layers.2.mlp.up_proj.lora_B.weight";
    for (name, t) in tensors.iter_mut() {
        if name == bad {
            *t = t.full_like(f64::NAN);
        }
    }
    Tensor::write_safetensors(&tensors, out.join("adapter_model.safetensors")).unwrap();
    out
}

fn jsonl(dir: &Path, name: &str, rows: &[serde_json::Value]) -> PathBuf {
    let p = dir.join(name);
    let body: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(&p, body.join("\n")).unwrap();
    p
}

#[test]
fn a_prompt_past_the_context_is_refused_naming_row_tokens_and_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let long = "x".repeat(300); // 300 byte tokens > 256 positions
    let input =
        jsonl(tmp.path(), "p.jsonl", &[serde_json::json!({"prompt": "ok"}), serde_json::json!({"prompt": long})]);
    let out = run(&["generate", "--model", s(&model()), "--input", s(&input), "--max-new-tokens", "4"], None);
    expect(&out, 2, &["p.jsonl line 2", "300 prompt tokens", "context of 256 tokens"]);
    // Within the context but not with the new tokens.
    let out = run(&["generate", "--model", s(&model()), "--prompt", &"y".repeat(250), "--max-new-tokens", "10"], None);
    expect(&out, 2, &["--prompt", "250 prompt tokens + 10 new tokens = 260"]);
}

#[test]
fn nan_in_an_adapter_is_refused_by_every_command_naming_tensor_and_block() {
    let tmp = tempfile::tempdir().unwrap();
    let nan = nan_adapter(tmp.path());
    let want = ["layers.2.mlp.up_proj.lora_B.weight", "(block 2)", "non-finite"];
    let out = run(&["generate", "--model", s(&model()), "--adapter", s(&nan), "--prompt", "hi"], None);
    expect(&out, 1, &want);
    let merged = tmp.path().join("merged");
    let out = run(&["merge", "--model", s(&model()), "--adapter", s(&nan), "--out", s(&merged)], None);
    expect(&out, 1, &want);
    assert!(!merged.exists());
    let pruned = tmp.path().join("pruned");
    let out = run(&["prune", "--adapter", s(&nan), "--keep-through", "2", "--out", s(&pruned)], None);
    expect(&out, 1, &want);
    assert!(!pruned.exists());
    let data = jsonl(tmp.path(), "d.jsonl", &[serde_json::json!({"prompt": "a", "answer": "b"})]);
    let out = run(&["probe", "--model", s(&model()), "--adapter", s(&nan), "--data", s(&data)], None);
    expect(&out, 1, &want);
    // A `--k` past the context is refused before the per-position arrays are sized by it.
    let out = run(&["probe", "--model", s(&model()), "--data", s(&data), "--k", "100000000"], None);
    expect(&out, 2, &["k = 100000000", "context of 256 tokens"]);
    // Output flags the chosen format would leave out are refused, not ignored; the text output has the differences.
    let (m, ad) = (model(), adapter());
    let probe = ["probe", "--model", s(&m), "--adapter", s(&ad), "--data", s(&data)];
    let out = run(&[&probe[..], &["--per-sample"]].concat(), None);
    expect(&out, 2, &["--per-sample", "--format json"]);
    let out = run(&[&probe[..], &["--diff", "all,none", "--format", "csv"]].concat(), None);
    expect(&out, 2, &["--diff", "not in CSV"]);
    let out = run(&[&probe[..], &["--diff", "all,none"]].concat(), None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("all − none: gt_prob difference per point"), "{stdout}");
}

#[test]
fn nan_in_model_weights_is_refused_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("model");
    std::fs::create_dir(&m).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model().join(f), m.join(f)).unwrap();
    }
    let mut tensors = Tensor::read_safetensors(model().join("model.safetensors")).unwrap();
    for (name, t) in tensors.iter_mut() {
        if name == "model.layers.1.self_attn.o_proj.weight" {
            let _ = t.get(0).get(3).fill_(f64::INFINITY);
        }
    }
    Tensor::write_safetensors(&tensors, m.join("model.safetensors")).unwrap();
    let out = run(&["generate", "--model", s(&m), "--prompt", "hi"], None);
    expect(&out, 1, &["model.layers.1.self_attn.o_proj.weight", "(block 1)", "1 non-finite"]);
}

#[test]
fn masks_past_the_model_or_the_adapter_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("merged");
    let out = run(
        &["merge", "--model", s(&model()), "--adapter", s(&adapter()), "--mask", "40-50", "--out", s(&merged)],
        None,
    );
    expect(&out, 2, &["names block 40", "4 blocks"]);
    assert!(!merged.exists());
    let out = run(
        &["merge", "--model", s(&model()), "--adapter", s(&adapter()), "--mask", "none", "--out", s(&merged)],
        None,
    );
    expect(&out, 2, &["merges no LoRA module"]);
    let pruned = tmp.path().join("pruned");
    let out = run(&["prune", "--adapter", s(&adapter()), "--keep-through", "4", "--out", s(&pruned)], None);
    expect(&out, 2, &["names block 4", "ends at block 3"]);
    assert!(!pruned.exists());
    let out = run(&["generate", "--model", s(&model()), "--prompt", "hi", "--mask", "0-9"], None);
    expect(&out, 2, &["`0-9` names block 4", "4 blocks"]);
    let out = run(&["prune", "--adapter", s(&adapter()), "--mask", "0-99999999999", "--out", s(&pruned)], None);
    expect(&out, 2, &["past the largest supported index"]);
}

#[test]
fn prune_validates_its_input_like_a_loader() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("bad");
    std::fs::create_dir(&src).unwrap();
    std::fs::copy(adapter().join("adapter_model.safetensors"), src.join("adapter_model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter().join("adapter_config.json")).unwrap()).unwrap();
    cfg["layers_to_transform"] = serde_json::json!([99]);
    std::fs::write(src.join("adapter_config.json"), cfg.to_string()).unwrap();
    let out = run(&["prune", "--adapter", s(&src), "--keep-through", "1", "--out", s(&tmp.path().join("o"))], None);
    expect(&out, 1, &["weights for `model.layers.0.self_attn.q_proj`, which the config does not target"]);
    cfg["layers_to_transform"] = serde_json::Value::Null;
    cfg["r"] = serde_json::json!(8);
    std::fs::write(src.join("adapter_config.json"), cfg.to_string()).unwrap();
    let out = run(&["prune", "--adapter", s(&src), "--keep-through", "1", "--out", s(&tmp.path().join("o"))], None);
    expect(&out, 1, &["rank 4 in the file but 8 by the config"]);
    assert!(!tmp.path().join("o").exists());
}

#[test]
fn train_refuses_an_output_it_would_clobber_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = jsonl(tmp.path(), "t.jsonl", &[serde_json::json!({"prompt": "a", "answer": "b"})]);
    let m = model();
    let base = ["train", "--model", s(&m), "--data", s(&data), "--out"];
    // An existing adapter.
    let existing = tmp.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::copy(adapter().join("adapter_config.json"), existing.join("adapter_config.json")).unwrap();
    let out = run(&[&base[..], &[s(&existing)]].concat(), None);
    expect(&out, 2, &["already holds an adapter"]);
    // An unrelated non-empty directory.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    let out = run(&[&base[..], &[s(&other)]].concat(), None);
    expect(&out, 2, &["non-empty directory"]);
    assert_eq!(std::fs::read_to_string(other.join("notes.txt")).unwrap(), "mine");
    // A file.
    let out = run(&[&base[..], &[s(&data)]].concat(), None);
    expect(&out, 2, &["not a directory"]);
    // LoRA settings beside `--resume` (which takes the checkpoint's) and a target naming no projection.
    let fresh = tmp.path().join("fresh");
    for flag in [["--r", "4"], ["--alpha", "8"], ["--targets", "q_proj"], ["--dropout", "0.1"]] {
        let out = run(&[&base[..], &[s(&fresh), "--resume", s(&existing)], &flag[..]].concat(), None);
        expect(&out, 2, &[&format!("{} <", flag[0]), "cannot be used with", "--resume"]);
    }
    let out = run(&[&base[..], &[s(&fresh), "--targets", "q_proj,v_prj", "--epochs", "1"]].concat(), None);
    expect(&out, 1, &["`v_prj`", "names no projection"]);
    assert!(!fresh.exists(), "a refused run left {}", fresh.display());
}

#[test]
fn numeric_flags_are_validated_at_parse_time() {
    let tmp = tempfile::tempdir().unwrap();
    let data = jsonl(tmp.path(), "d.jsonl", &[serde_json::json!({"prompt": "a", "answer": "b"})]);
    let m = model();
    let a = adapter();
    let common = ["--model", s(&m), "--adapter", s(&a), "--data", s(&data)];
    for (cmd, flag, value) in [
        ("eval", "--max-new-tokens", "0"),
        ("search", "--max-new-tokens", "0"),
        ("eval", "--batch-size", "0"),
        ("search", "--batch-size", "0"),
        ("probe", "--k", "0"),
        ("eval", "--limit", "0"),
    ] {
        let out = run(&[&[cmd][..], &common, &[flag, value]].concat(), None);
        expect(&out, 2, &[flag]);
    }
    for args in [
        vec!["generate", "--prompt", "hi", "--temperature", "0.7", "--top-p", "2"],
        vec!["generate", "--prompt", "hi", "--top-p", "0.9"], // without a temperature it would be ignored
        vec!["generate", "--prompt", "hi", "--temperature", "-1"],
        vec!["generate", "--prompt", "hi", "--max-new-tokens", "0"],
        vec!["merge", "--adapter", "x", "--out", "y", "--max-shard-size", "0"],
        vec!["train", "--data", "x", "--out", "y", "--lr", "nan"],
        vec!["train", "--data", "x", "--out", "y", "--dropout", "1"],
    ] {
        let out = run(&args, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn empty_and_non_utf8_data_exit_2_naming_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    let out = run(&["generate", "--model", s(&model()), "--input", s(&empty)], None);
    expect(&out, 2, &["empty.jsonl", "no prompts"]);
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, b"{\"prompt\": \"a\", \"answer\": \"b\"}\n{\"prompt\": \"\xff\xfe\", \"answer\": \"b\"}\n")
        .unwrap();
    let (m, a) = (model(), adapter());
    for cmd in ["eval", "probe"] {
        let out = run(&[cmd, "--model", s(&m), "--adapter", s(&a), "--data", s(&bad)], None);
        expect(&out, 2, &["bad.jsonl", "2", "invalid UTF-8"]);
    }
    let out = run(&["generate", "--model", s(&m), "--input", s(&bad)], None);
    expect(&out, 2, &["bad.jsonl:2", "invalid UTF-8"]);
}

#[test]
fn a_broken_model_under_probe_exits_1_not_2() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("model");
    std::fs::create_dir(&m).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        std::fs::copy(model().join(f), m.join(f)).unwrap();
    }
    std::fs::write(m.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let data = jsonl(tmp.path(), "d.jsonl", &[serde_json::json!({"prompt": "a", "answer": "b"})]);
    let out = run(&["probe", "--model", s(&m), "--data", s(&data)], None);
    expect(&out, 1, &["config.json", "hidden_size"]);
}

#[test]
fn outputs_left_by_a_killed_run_are_cleaned_by_the_next_and_failed_runs_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // What a SIGKILL during `merge` leaves: a partial directory of a process that no longer runs
    // (4294967295 is above Linux's pid_max).
    let stale = tmp.path().join(".lora-boundary-partial.4294967295.merged.tmp");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), vec![0u8; 1024]).unwrap();
    let out =
        run(&["prune", "--adapter", s(&adapter()), "--keep-through", "1", "--out", s(&tmp.path().join("p"))], None);
    expect(&out, 0, &[]);
    if cfg!(target_os = "linux") {
        assert!(!stale.exists(), "the stale partial output was not removed");
    }
    let names: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["p"], "only the finished output remains");

    // `run` that fails early (missing validation file) creates no out directory.
    let out_dir = tmp.path().join("run-out");
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\nadapter = {:?}\ntask = \"jsonl\"\nvalidation = \"missing.jsonl\"\ntest = \"missing.jsonl\"\nout = {:?}\n",
            s(&model()),
            s(&adapter()),
            s(&out_dir)
        ),
    )
    .unwrap();
    let out = run(&["run", s(&cfg)], None);
    assert_ne!(out.status.code(), Some(0));
    assert!(!out_dir.exists(), "a failed run left {}", out_dir.display());
}

#[test]
fn the_default_model_is_found_from_any_directory() {
    let root = common::root();
    if !root.join(lora_boundary::DEFAULT_MODEL).exists() {
        common::skip(&format!("{} is not set up (run scripts/setup.sh)", lora_boundary::DEFAULT_MODEL));
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = run(&["generate", "--prompt", "Hi", "--max-new-tokens", "2", "--format", "json"], Some(tmp.path()));
    expect(&out, 0, &[]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outputs"][0]["token_ids"].as_array().unwrap().len(), 2);
}

#[test]
fn huge_generation_batches_are_refused_by_the_memory_estimate() {
    // 8 rows × 250 tokens on the tiny model is small; the estimate grows with rows·T² and the KV cache. Check
    // the estimate itself against the machine: a batch the estimate says is too large must be refused.
    let m = lora_boundary::Llama::load(model(), lora_boundary::Placement::default()).unwrap();
    let small = lora_boundary::model::generate::generation_memory_bytes(&m, 8, 250, 6);
    assert!(small < 64 << 20, "estimate for a tiny batch: {small} bytes");
    let huge_rows = 1usize << 40;
    let err = lora_boundary::model::generate::check_generation_memory(&m, huge_rows, 250, 6).unwrap_err();
    assert!(err.to_string().contains("GiB are available"), "{err}");
}

/// `--model gemma3-270m` names the fetched Gemma 3 GGUF from any directory and generates transformers' greedy
/// tokens; the base model has no chat template, so `--chat` is a typed refusal (exit 1) saying so.
#[test]
fn gemma3_shortcut_generates_and_refuses_chat() {
    let root = common::root();
    if !root.join(lora_boundary::model::GEMMA3_270M).exists() {
        common::skip(&format!("{} not found (run `bash scripts/fetch-gemma3.sh`)", lora_boundary::model::GEMMA3_270M));
        return;
    }
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("gemma3/reference.json")).unwrap()).unwrap();
    let case = &reference["prompts"][0];
    let prompt = case["prompt"].as_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let args = ["generate", "--model", "gemma3-270m", "--prompt", prompt, "--max-new-tokens", "4", "--format", "json"];
    let out = run(&args, Some(tmp.path()));
    expect(&out, 0, &[]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outputs"][0]["token_ids"], serde_json::json!(case["greedy_ids"].as_array().unwrap()[..4]));
    let out = run(&["generate", "--model", "gemma3-270m", "--prompt", prompt, "--chat"], Some(tmp.path()));
    expect(&out, 1, &["no chat template", "without `--chat`"]);
}
