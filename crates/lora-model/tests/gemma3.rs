//! Gemma 3 270M (Q4_K_M GGUF) against transformers and gguf-py on the same file: metadata, every tensor's
//! dequantization (Q4_K, Q5_0, Q6_K, Q8_0, F32) and the SentencePiece tokenizer.
//!
//! Fixtures come from `scripts/fixtures/gemma3/make_gemma3_fixtures.py` (`tests/fixtures/gemma3/`). The GGUF is
//! fetched by `bash scripts/fetch-gemma3.sh` (Gemma Terms of Use, never committed); every test that needs it
//! skips with a printed reason when `models/gemma-3-270m-q4_k_m.gguf` is absent (`LORA_GEMMA3_GGUF` overrides the
//! path).
#[path = "../../../tests/support/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use lora_model::gguf::{gguf_chat_template, gguf_tokenizer, GgufFile, GgufSpecialTokens};
use serde_json::Value;

fn gguf_path() -> Option<PathBuf> {
    common::gemma3_gguf()
}

fn gemma3() -> Option<GgufFile> {
    gguf_path().map(|p| GgufFile::open(&p).expect("open the Gemma 3 GGUF"))
}

fn fixture(name: &str) -> Value {
    let p = common::fixtures().join("gemma3").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// The tokenizer is slow to build in a test profile (262 144 tokens, 514 906 rebuilt merges): built once.
fn tokenizer(f: &GgufFile) -> &'static tokenizers::Tokenizer {
    static T: OnceLock<tokenizers::Tokenizer> = OnceLock::new();
    T.get_or_init(|| gguf_tokenizer(f).expect("Gemma 3 tokenizer"))
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn gemma3_metadata_and_special_tokens() {
    let Some(f) = gemma3() else { return };
    assert_eq!(f.get_str("general.architecture").unwrap(), "gemma3");
    assert_eq!(f.tensors().len(), 236);
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "llama");
    let sp = GgufSpecialTokens::from_file(&f).unwrap();
    assert_eq!((sp.bos, sp.eos, sp.unk, sp.pad), (Some(2), Some(1), Some(3), Some(0)));
    assert!(sp.add_bos && !sp.add_eos);
    assert!(gguf_chat_template(&f).is_none(), "the base model has no chat template");
}

/// The HF config transformers derives (`config.json`) agrees with the file's own metadata, key by key: the
/// mapping a Gemma 3 `hf_config` has to make.
#[test]
fn gemma3_config_fixture_agrees_with_gguf_metadata() {
    let Some(f) = gemma3() else { return };
    let c = fixture("config.json");
    let u = |k: &str| f.get_u64(k).unwrap();
    assert_eq!(c["model_type"], "gemma3_text");
    assert_eq!(c["num_hidden_layers"].as_u64(), Some(u("gemma3.block_count")));
    assert_eq!(c["hidden_size"].as_u64(), Some(u("gemma3.embedding_length")));
    assert_eq!(c["intermediate_size"].as_u64(), Some(u("gemma3.feed_forward_length")));
    assert_eq!(c["num_attention_heads"].as_u64(), Some(u("gemma3.attention.head_count")));
    assert_eq!(c["num_key_value_heads"].as_u64(), Some(u("gemma3.attention.head_count_kv")));
    assert_eq!(c["head_dim"].as_u64(), Some(u("gemma3.attention.key_length")));
    assert_eq!(c["head_dim"].as_u64(), Some(u("gemma3.attention.value_length")));
    assert_eq!(c["sliding_window"].as_u64(), Some(u("gemma3.attention.sliding_window")));
    assert_eq!(c["max_position_embeddings"].as_u64(), Some(u("gemma3.context_length")));
    assert_eq!(c["vocab_size"].as_u64(), Some(f.get_str_array("tokenizer.ggml.tokens").unwrap().len() as u64));
    assert_eq!(
        c["rms_norm_eps"].as_f64().unwrap() as f32,
        f.get_f32("gemma3.attention.layer_norm_rms_epsilon").unwrap()
    );
    let rope = &c["rope_parameters"];
    assert_eq!(
        rope["full_attention"]["rope_theta"].as_f64().unwrap() as f32,
        f.get_f32("gemma3.rope.freq_base").unwrap()
    );
    assert_eq!(rope["sliding_attention"]["rope_theta"].as_f64(), Some(10000.0), "not in the file: Gemma 3's default");
    assert_eq!(c["query_pre_attn_scalar"].as_u64(), Some(256));
    assert_eq!(c["hidden_activation"], "gelu_pytorch_tanh");
    assert_eq!(c["tie_word_embeddings"], true);
    assert!(f.tensor_info("output.weight").is_none(), "tied head: no output.weight");
    let types: Vec<&str> = c["layer_types"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(types.len(), 18);
    for (i, t) in types.iter().enumerate() {
        let want = if (i + 1) % 6 == 0 { "full_attention" } else { "sliding_attention" };
        assert_eq!(*t, want, "layer {i}");
    }
    assert_eq!(
        (c["bos_token_id"].as_u64(), c["eos_token_id"].as_u64(), c["pad_token_id"].as_u64()),
        (Some(2), Some(1), Some(0))
    );
    assert!(c["final_logit_softcapping"].is_null() && c["attn_logit_softcapping"].is_null());
}

/// Every tensor of the file (F32, Q4_K, Q5_0, Q6_K, Q8_0) decodes to gguf-py's values: sums over all 236 tensors,
/// bit-exact rows of one tensor per type.
#[test]
fn gemma3_every_tensor_matches_gguf_py() {
    let Some(f) = gemma3() else { return };
    let reference = fixture("tensors.json");
    let tensors = reference["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), f.tensors().len());
    let mut kinds = BTreeSet::new();
    let mut exact = BTreeSet::new();
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let info = f.tensor_info(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(info.ggml_type.name(), t["type"].as_str().unwrap(), "{name}: type");
        assert_eq!(info.dims, t["dims"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect::<Vec<_>>());
        let (data, shape) = f.dequantize(name).unwrap();
        let want_shape: Vec<usize> =
            t["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(shape, want_shape, "{name}: shape");
        let sum: f64 = data.iter().map(|&v| f64::from(v)).sum();
        let abs: f64 = data.iter().map(|&v| f64::from(v).abs()).sum();
        let (ws, wa) = (t["sum"].as_f64().unwrap(), t["abs_sum"].as_f64().unwrap());
        assert!((sum - ws).abs() <= 1e-9 * wa.max(1.0), "{name}: sum {sum} vs {ws}");
        assert!((abs - wa).abs() <= 1e-9 * wa.max(1.0), "{name}: abs sum {abs} vs {wa}");
        kinds.insert(info.ggml_type.name());
        let to_f32 =
            |v: &Value| -> Vec<f32> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect() };
        let bits_eq = |what: &str, got: &[f32], want: &[f32]| {
            assert_eq!(got.len(), want.len(), "{what}: length");
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: {g:e} vs {w:e}");
            }
        };
        if let Some(values) = t.get("values") {
            bits_eq(name, &data, &to_f32(values));
            exact.insert(info.ggml_type.name());
        }
        if let Some(rows) = t.get("rows") {
            let cols = shape[1];
            for (r, values) in rows.as_object().unwrap() {
                let r: usize = r.parse().unwrap();
                bits_eq(&format!("{name} row {r}"), &data[r * cols..(r + 1) * cols], &to_f32(values));
            }
            exact.insert(info.ggml_type.name());
        }
    }
    let want: BTreeSet<String> = ["F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"].iter().map(|s| s.to_string()).collect();
    assert_eq!(kinds, want, "storage types of the file");
    assert_eq!(exact, want, "storage types checked row by row");
}

#[test]
fn gemma3_tokenizer_matches_transformers() {
    let Some(f) = gemma3() else { return };
    let tok = tokenizer(&f);
    let reference = fixture("tokenizer.json");
    assert_eq!(tok.get_vocab_size(true), reference["vocab_size_with_added"].as_u64().unwrap() as usize);
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = u32s(&case["ids"]);
        let enc = tok.encode(text, true).unwrap();
        assert_eq!(enc.get_ids(), &want[..], "ids of {text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), case["decoded"].as_str().unwrap(), "decode of {text:?}");
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "decode (skipping special tokens) of {text:?}"
        );
    }
    for case in reference["decodes"].as_array().unwrap() {
        let ids = u32s(&case["ids"]);
        assert_eq!(tok.decode(&ids, false).unwrap(), case["decoded"].as_str().unwrap(), "decode of {ids:?}");
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "decode of {ids:?}"
        );
    }
    // Added tokens: every control token special, the user-defined ones still in the vocabulary plain.
    let added = tok.get_added_tokens_decoder();
    let plain: BTreeSet<u32> = added.iter().filter(|(_, t)| !t.special).map(|(&id, _)| id).collect();
    let want_plain: BTreeSet<u32> = u32s(&reference["added_plain_ids"]).into_iter().collect();
    assert_eq!(plain, want_plain, "plain added tokens");
    let special = added.values().filter(|t| t.special).count();
    assert_eq!(special as u64, reference["added_special_count"].as_u64().unwrap(), "special added tokens");
    for pair in reference["added_special_sample"].as_array().unwrap() {
        let (id, content) = (pair[0].as_u64().unwrap() as u32, pair[1].as_str().unwrap());
        assert_eq!(added.get(&id).map(|t| (t.content.as_str(), t.special)), Some((content, true)), "added token {id}");
    }
}

/// The rebuilt merges are transformers' (count, first and last), and the rest of the pipeline serializes as it does.
#[test]
fn gemma3_tokenizer_pipeline_matches_transformers() {
    let Some(f) = gemma3() else { return };
    let tok = tokenizer(&f);
    let reference = fixture("tokenizer.json");
    let ours: Value = serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
    for key in ["normalizer", "pre_tokenizer", "post_processor", "decoder"] {
        assert_eq!(ours[key], reference[key], "{key}");
    }
    let model = &ours["model"];
    assert_eq!(model["type"], "BPE");
    assert_eq!(
        (&model["byte_fallback"], &model["fuse_unk"], &model["unk_token"]),
        (&Value::Bool(true), &Value::Bool(true), &Value::from("<unk>"))
    );
    let merges = model["merges"].as_array().unwrap();
    assert_eq!(merges.len() as u64, reference["merges"].as_u64().unwrap());
    let first = reference["first_merges"].as_array().unwrap();
    let last = reference["last_merges"].as_array().unwrap();
    assert_eq!(&merges[..first.len()], &first[..]);
    assert_eq!(&merges[merges.len() - last.len()..], &last[..]);
}

/// The crate's [`lora_model::Tokenizer`] over the file: BOS from the metadata, EOS for generation.
#[test]
fn gemma3_tokenizer_wrapper() {
    let Some(p) = gguf_path() else { return };
    let tk = lora_model::gguf_tokenizer_for(&p).unwrap();
    assert_eq!(tk.bos_token_id(), Some(2));
    assert_eq!(tk.eos_token_ids(), &[1]);
    assert_eq!(tk.pad_token_id(), Some(0));
    assert!(tk.chat_template().is_none());
    let reference = fixture("tokenizer.json");
    let case = &reference["cases"][0];
    let want: Vec<i64> = u32s(&case["ids"]).into_iter().map(i64::from).collect();
    assert_eq!(tk.encode(case["text"].as_str().unwrap(), true).unwrap(), want);
    assert_eq!(want[0], 2, "BOS first");
    assert_eq!(tk.encode(case["text"].as_str().unwrap(), false).unwrap(), want[1..].to_vec());
}

/// The decoder references (`reference.json`) start from the ids this tokenizer gives, and their greedy text is
/// this tokenizer's decode: a decoder test can feed them straight through.
#[test]
fn gemma3_reference_prompts_tokenize_as_transformers() {
    let Some(f) = gemma3() else { return };
    let tok = tokenizer(&f);
    let reference = fixture("reference.json");
    let prompts = reference["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 3);
    for p in prompts {
        let text = p["prompt"].as_str().unwrap();
        assert_eq!(tok.encode(text, true).unwrap().get_ids(), &u32s(&p["prompt_ids"])[..], "ids of {text:?}");
        let greedy = u32s(&p["greedy_ids"]);
        assert_eq!(greedy.len() as u64, reference["new_tokens"].as_u64().unwrap());
        assert_eq!(tok.decode(&greedy, false).unwrap(), p["greedy_text"].as_str().unwrap(), "greedy text of {text:?}");
        assert_eq!(greedy[0], u32s(&p["top_ids"])[0], "the first greedy token is the top logit");
    }
}

/// A 307-token Gemma-style vocabulary (`tiny-spm.gguf`, no model file needed): every merge in transformers' order,
/// the added tokens, and the ids and decodes of texts that use space runs, byte fallback, control and user-defined
/// tokens.
#[test]
fn tiny_sentencepiece_vocabulary_matches_transformers() {
    let f = GgufFile::open(common::fixtures().join("gemma3/tiny-spm.gguf")).unwrap();
    let tok = gguf_tokenizer(&f).unwrap();
    let reference = fixture("tiny-spm.json");
    assert_eq!(tok.get_vocab_size(true), reference["vocab_size_with_added"].as_u64().unwrap() as usize);
    let ours: Value = serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
    assert_eq!(ours["model"]["merges"], reference["merges"], "merges");
    let added = tok.get_added_tokens_decoder();
    let want = reference["added_tokens"].as_array().unwrap();
    assert_eq!(added.len(), want.len(), "added tokens");
    for a in want {
        let (id, content, special) = (a[0].as_u64().unwrap() as u32, a[1].as_str().unwrap(), a[2].as_bool().unwrap());
        assert_eq!(
            added.get(&id).map(|t| (t.content.as_str(), t.special)),
            Some((content, special)),
            "added token {id}"
        );
    }
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want = u32s(&case["ids"]);
        assert_eq!(tok.encode(text, true).unwrap().get_ids(), &want[..], "ids of {text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), case["decoded"].as_str().unwrap(), "decode of {text:?}");
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "decode of {text:?}"
        );
    }
}

/// A `llama` (SentencePiece) vocabulary of an architecture whose transformers tokenizer is not Gemma's is refused by
/// name rather than built wrongly; so is an unknown tokenizer model.
#[test]
fn other_sentencepiece_vocabularies_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read(common::fixtures().join("gemma3/tiny-spm.gguf")).unwrap();
    // Same length, so the file stays well-formed: `gemma3` -> `llama3`, then `llama` -> `bpe00` as the model name.
    let renamed =
        replace_once(&src, b"\x06\x00\x00\x00\x00\x00\x00\x00gemma3", b"\x06\x00\x00\x00\x00\x00\x00\x00llama3");
    let p = dir.path().join("llama3-spm.gguf");
    std::fs::write(&p, &renamed).unwrap();
    let e = gguf_tokenizer(&GgufFile::open(&p).unwrap()).unwrap_err().to_string();
    assert!(e.contains("llama3") && e.contains("gemma3") && e.contains("llama3-spm.gguf"), "{e}");
    let other = replace_once(&src, b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00bpe00");
    let p = dir.path().join("other-model.gguf");
    std::fs::write(&p, &other).unwrap();
    let e = gguf_tokenizer(&GgufFile::open(&p).unwrap()).unwrap_err().to_string();
    assert!(e.contains("`bpe00`") && e.contains("supported"), "{e}");
}

fn replace_once(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    assert_eq!(needle.len(), with.len());
    let at = haystack.windows(needle.len()).position(|w| w == needle).expect("needle in the fixture");
    let mut out = haystack.to_vec();
    out[at..at + needle.len()].copy_from_slice(with);
    out
}
