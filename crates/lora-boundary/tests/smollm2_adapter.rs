//! A PEFT adapter on SmolLM2 through the CLI against PEFT (fixture `tests/fixtures/adapters/smollm2-r2`, made by
//! `scripts/fixtures/model/make_adapter_fixtures.py`): full LoRA, keep-through-14, the pruned adapter, and the base
//! model, greedy token for token.
#[path = "../../../tests/support/mod.rs"]
mod common;

use std::process::Command;

use common::root;

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

fn generate(extra: &[&str]) -> Vec<i64> {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/smollm2/reference.json")).unwrap())
            .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lora-boundary"))
        .current_dir(root())
        .args(["generate", "--chat", "--max-new-tokens", "16", "--format", "json", "--prompt"])
        .arg(r["prompts"][0].as_str().unwrap())
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    ids(&v["outputs"][0]["token_ids"])
}

#[test]
fn cli_with_a_peft_adapter_on_smollm2_matches_peft() {
    let gguf = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(gguf.exists(), "{} is missing: run `bash scripts/setup.sh` first", gguf.display());
    let fx = root().join("tests/fixtures/adapters/smollm2-r2");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("reference.json")).unwrap()).unwrap();
    let adapter = fx.to_str().unwrap();
    assert_eq!(generate(&["--adapter", adapter]), ids(&r["greedy_full"]), "full LoRA");
    assert_eq!(generate(&["--adapter", adapter, "--keep-through", "14"]), ids(&r["greedy_keep_through_14"]), "0-14");
    // The pruned adapter, written by the CLI, gives the masked model's tokens.
    let tmp = tempfile::tempdir().unwrap();
    let pruned = tmp.path().join("pruned");
    let st = Command::new(env!("CARGO_BIN_EXE_lora-boundary"))
        .args(["prune", "--adapter", adapter, "--keep-through", "14", "--out"])
        .arg(&pruned)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(generate(&["--adapter", pruned.to_str().unwrap()]), ids(&r["greedy_keep_through_14"]), "pruned");
    // Base: PEFT ran without an EOS stop; ours stops at the first EOS (id 2), which it keeps.
    let base = ids(&r["greedy_base"]);
    let stop = base.iter().position(|&t| t == 2).map_or(base.len(), |p| p + 1);
    assert_eq!(generate(&["--adapter", adapter, "--mask", "none"]), base[..stop].to_vec(), "base");
}
