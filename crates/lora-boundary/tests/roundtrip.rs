//! What the tool writes loads in the ecosystem's own tools, and computes there what it computes here.
//!
//! Fixtures: `scripts/fixtures/model/make_roundtrip_fixtures.py` ran this tool's `prune` and `merge` on the tiny
//! fixtures (outputs committed under `tests/fixtures/roundtrip/{prune,merge}-*`), loaded those outputs with PEFT
//! 0.21 (`PeftModel.from_pretrained`) and transformers 5.24 (`AutoModelForCausalLM.from_pretrained`,
//! `AutoTokenizer.from_pretrained`), and recorded their logits and greedy tokens in `references/`.
//!
//! Each test (1) re-runs the tool and checks that it writes exactly the committed output (so a change in what we
//! write cannot pass unnoticed: the reference libraries were run on those bytes), then (2) checks the tool's own
//! logits and tokens against what PEFT/transformers computed from them.
#[path = "../../../tests/support/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use lora_boundary::tch::{Kind, Tensor};
use lora_boundary::{load_adapter, prune_adapter, ForwardOptions, LayerMask, Llama, Placement};

use common::fixtures;

fn rt() -> PathBuf {
    fixtures().join("roundtrip")
}

fn reference(case: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(rt().join("references").join(format!("{case}.safetensors"))).unwrap().into_iter().collect()
}

fn reference_json(case: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(rt().join("references").join(format!("{case}.json"))).unwrap())
        .unwrap()
}

/// Max |a − b| over the positions where `mask` is 1.
fn diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let m = mask.to_kind(Kind::Float).unsqueeze(-1);
    ((a.to_kind(Kind::Float) - b.to_kind(Kind::Float)) * m).abs().max().double_value(&[])
}

fn logits(m: &Llama, r: &HashMap<String, Tensor>, mask: &LayerMask) -> Tensor {
    m.forward(&r["input_ids"], Some(&r["attention_mask"]), &ForwardOptions::new(mask)).unwrap().logits.unwrap()
}

/// Every tensor of every safetensors file in `dir`, by name, as raw bytes with dtype and shape.
fn tensors_of(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                out.insert(name, (format!("{:?}", view.dtype()), view.shape().to_vec(), view.data().to_vec()));
            }
        }
    }
    out
}

fn json_file(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// The tool's output equals the committed one: same files, same JSON documents (key order included, since PEFT's
/// `rank_pattern` is order-sensitive), same tensors byte for byte.
fn assert_same_output(fresh: &Path, committed: &Path) {
    assert_eq!(file_names(fresh), file_names(committed), "{}: file list", committed.display());
    for f in file_names(committed) {
        let (a, b) = (fresh.join(&f), committed.join(&f));
        if f.ends_with(".json") {
            let (ja, jb) = (json_file(&a), json_file(&b));
            assert_eq!(ja, jb, "{f}: differs from the committed output");
            assert_eq!(ja.to_string(), jb.to_string(), "{f}: key order differs from the committed output");
        } else if !f.ends_with(".safetensors") {
            assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "{f} differs");
        }
    }
    assert!(tensors_of(fresh) == tensors_of(committed), "{}: tensors differ", committed.display());
}

fn prune_case(case: &str) {
    let meta = reference_json(&format!("prune-{case}"));
    let root = fixtures().join("../..");
    let adapter = root.join(meta["adapter"].as_str().unwrap());
    let base = root.join(meta["base"].as_str().unwrap());
    let b = meta["keep_through"].as_u64().unwrap() as usize;
    let committed = rt().join(format!("prune-{case}"));

    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("pruned");
    prune_adapter(&adapter, &LayerMask::keep_through(b), &fresh).unwrap();
    assert_same_output(&fresh, &committed);
    // PEFT accepted the written config (no string target with layers_to_transform).
    let cfg = json_file(&committed.join("adapter_config.json"));
    assert!(cfg["target_modules"].is_array(), "{case}: target_modules must be an explicit list: {cfg}");
    assert!(meta["peft_lora_modules_loaded"].as_u64().unwrap() > 0);

    let r = reference(&format!("prune-{case}"));
    let am = &r["attention_mask"];
    // The pruned adapter here gives what PEFT gives with it.
    let mut m = Llama::load(&base, Placement::default()).unwrap();
    load_adapter(&mut m, &committed).unwrap();
    let d = diff(&logits(&m, &r, &LayerMask::all()), &r["logits_pruned"], am);
    assert!(d < 1e-4, "{case}: pruned adapter differs from PEFT's by {d}");
    // ... which is the full adapter under keep-through(b), here and in PEFT.
    let mut full = Llama::load(&base, Placement::default()).unwrap();
    load_adapter(&mut full, &adapter).unwrap();
    let d = diff(&logits(&full, &r, &LayerMask::keep_through(b)), &r["logits_masked_full"], am);
    assert!(d < 1e-4, "{case}: masked full adapter differs from PEFT by {d}");
}

#[test]
fn pruned_list_adapter_loads_in_peft() {
    prune_case("list");
}

#[test]
fn pruned_all_linear_adapter_with_rank_patterns_and_rslora_loads_in_peft() {
    prune_case("all-linear");
}

#[test]
fn pruned_regex_adapter_loads_in_peft() {
    prune_case("regex");
}

#[test]
fn pruned_layers_pattern_adapter_loads_in_peft() {
    prune_case("layers-pattern");
}

#[test]
fn pruned_qwen2_adapter_loads_in_peft() {
    prune_case("qwen2");
}

fn merge_case(case: &str, logit_tol: f64) {
    let meta = reference_json(&format!("merge-{case}"));
    let root = fixtures().join("../..");
    let base = root.join(meta["base"].as_str().unwrap());
    let adapter = root.join(meta["adapter"].as_str().unwrap());
    let committed = rt().join(format!("merge-{case}"));
    let flags: Vec<String> =
        meta["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();

    // The CLI with its defaults (dtype auto: the input's dtype) writes exactly the committed directory.
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("merged");
    let out = Command::new(env!("CARGO_BIN_EXE_lora-boundary"))
        .args(["merge", "--model"])
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter)
        .args(&flags)
        .arg("--out")
        .arg(&fresh)
        .output()
        .unwrap();
    assert!(out.status.success(), "merge failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_same_output(&fresh, &committed);

    let r = reference(&format!("merge-{case}"));
    let am = &r["attention_mask"];
    // transformers loaded the committed directory in its dtype; so do we.
    let kind = lora_boundary::model::weights::checkpoint_kind(&committed).unwrap();
    let want_kind = if meta["transformers_dtype"] == "torch.bfloat16" { Kind::BFloat16 } else { Kind::Float };
    assert_eq!(kind, want_kind, "merged dtype");
    let merged = Llama::load(&committed, Placement { kind, ..Placement::default() }).unwrap();
    let d = diff(&logits(&merged, &r, &LayerMask::none()), &r["logits_merged"], am);
    assert!(d < logit_tol, "{case}: merged logits differ from transformers' by {d}");

    // Greedy tokens of the merged directory: ours = transformers' = the unmerged adapter under the same mask.
    let gen_ids = &r["gen_input_ids"];
    let gen_att = &r["gen_attention_mask"];
    let prompts: Vec<Vec<i64>> = (0..gen_ids.size()[0])
        .map(|i| {
            let ids = Vec::<i64>::try_from(gen_ids.get(i)).unwrap();
            let att = Vec::<i64>::try_from(gen_att.get(i)).unwrap();
            ids.into_iter().zip(att).filter(|(_, a)| *a == 1).map(|(t, _)| t).collect()
        })
        .collect();
    let want: Vec<Vec<i64>> =
        (0..prompts.len()).map(|i| Vec::<i64>::try_from(r["tokens_merged"].get(i as i64)).unwrap()).collect();
    let cfg = lora_boundary::GenerationConfig { max_new_tokens: 10, ..Default::default() };
    let (got, _) = lora_boundary::generate(&merged, None, &prompts, &cfg, &LayerMask::none()).unwrap();
    let got: Vec<Vec<i64>> = got.into_iter().map(|g| g.token_ids).collect();
    assert_eq!(got, want, "{case}: greedy tokens of the merged model differ from transformers'");
    if let Some(blocks) = meta["merged_blocks"].as_array() {
        let mask = LayerMask::from_layers(blocks.iter().map(|b| b.as_u64().unwrap() as usize));
        let mut unmerged = Llama::load(&base, Placement { kind, ..Placement::default() }).unwrap();
        load_adapter(&mut unmerged, &adapter).unwrap();
        let (got, _) = lora_boundary::generate(&unmerged, None, &prompts, &cfg, &mask).unwrap();
        let got: Vec<Vec<i64>> = got.into_iter().map(|g| g.token_ids).collect();
        assert_eq!(got, want, "{case}: the tool under mask {mask} generates unlike its merged output");
    }
}

#[test]
fn masked_sharded_merge_loads_in_transformers_and_generates_like_the_tool() {
    let dir = rt().join("merge-masked-sharded");
    let index = json_file(&dir.join("model.safetensors.index.json"));
    let shards: std::collections::BTreeSet<&str> =
        index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(shards.len(), 4, "200KB shards of an 800KB model");
    for s in &shards {
        let size = std::fs::metadata(dir.join(s)).unwrap().len();
        assert!(size <= 200_000 + 4_096, "{s} is {size} bytes");
    }
    // f32: the merged weights hold W + s·BA rounded once; transformers and we agree to float noise.
    merge_case("masked-sharded", 1e-4);
}

#[test]
fn bf16_merge_keeps_the_input_dtype_and_loads_in_transformers() {
    // bf16 logits: both sides round every matmul input to bf16 (8 significant bits); over the tiny model's four
    // blocks with logits of magnitude ≈ 3, differences of a few bf16 ulps (2^-7 · 4 ≈ 0.03 each) accumulate.
    merge_case("bf16", 0.25);
}

#[test]
fn prune_keeps_rank_pattern_key_order_and_drops_keys_that_match_nothing_kept() {
    // PEFT takes the first `rank_pattern` key that matches: order is meaning. Here the generic key comes first.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let basic = fixtures().join("adapters/tiny-llama-basic");
    std::fs::copy(basic.join("adapter_model.safetensors"), src.join("adapter_model.safetensors")).unwrap();
    let mut cfg = json_file(&basic.join("adapter_config.json"));
    cfg["alpha_pattern"] =
        serde_json::from_str(r#"{"v_proj": 4, "layers.3.self_attn.q_proj": 2, "o_proj": 3}"#).unwrap();
    std::fs::write(src.join("adapter_config.json"), cfg.to_string()).unwrap();
    prune_adapter(&src, &LayerMask::keep_through(1), &tmp.path().join("out")).unwrap();
    let out = json_file(&tmp.path().join("out/adapter_config.json"));
    let keys: Vec<&String> = out["alpha_pattern"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["v_proj", "o_proj"], "order kept, the block-3 key (pruned away) dropped");
    assert_eq!(out["layers_to_transform"], serde_json::json!([0, 1]));
}
