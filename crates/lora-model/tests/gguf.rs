//! GGUF import: synthetic file against gguf-py, malformed files, and SmolLM2 against transformers.
//!
//! Fixtures come from `scripts/fixtures/gguf/make_gguf_fixtures.py`. The SmolLM2 tests need
//! `models/SmolLM2-135M-Instruct.Q4_1.gguf` (made by `scripts/setup.sh`) and skip with a message
//! when it is absent (`LORA_SMOLLM2_GGUF` overrides the path).
#[path = "../../../tests/support/mod.rs"]
mod common;

use std::path::PathBuf;

use lora_model::error::ModelError;
use lora_model::gguf::{
    gguf_chat_template, gguf_tokenizer, hf_config, hf_tensor_name, unpermute_qk, GgmlType, GgufFile, GgufSpecialTokens,
    GgufValue,
};
use safetensors::SafeTensors;
use serde_json::Value;

fn fixtures() -> PathBuf {
    common::crate_fixtures().join("gguf")
}

fn synthetic() -> GgufFile {
    GgufFile::open(fixtures().join("synthetic.gguf")).expect("open synthetic.gguf")
}

fn expected() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(fixtures().join("synthetic_expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        out.push((name.to_string(), view.shape().to_vec(), data));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn assert_bits_eq(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{name}[{i}]: got {g:e} ({:#x}), want {w:e} ({:#x})",
            g.to_bits(),
            w.to_bits()
        );
    }
}

#[test]
fn synthetic_every_type_matches_gguf_py_bit_exactly() {
    let f = synthetic();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    let mut seen = std::collections::BTreeSet::new();
    for (name, shape, want) in expected() {
        if name.starts_with("hf:") {
            continue;
        }
        let (got, got_shape) = f.dequantize(&name).unwrap();
        assert_eq!(got_shape, shape, "{name}: shape");
        assert_bits_eq(&name, &got, &want);
        seen.insert(f.tensor_info(&name).unwrap().ggml_type.name());
    }
    for ty in ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"] {
        assert!(seen.contains(ty), "no {ty} tensor checked");
    }
}

#[test]
fn synthetic_tensor_infos_use_ggml_dim_order() {
    let f = synthetic();
    let t = f.tensor_info("t.f32").unwrap();
    assert_eq!(t.dims, vec![8, 5, 3]);
    assert_eq!(t.ggml_type, GgmlType::F32);
    assert_eq!(t.shape().unwrap(), vec![3, 5, 8]);
    let q = f.tensor_info("t.q6_k").unwrap();
    assert_eq!(q.dims, vec![512, 2]);
    assert_eq!(q.ggml_type, GgmlType::Q6_K);
    assert_eq!(q.n_bytes(), Some(4 * 210));
    assert!(f.tensor_names().any(|n| n == "blk.0.attn_k.weight"));
    assert!(f.tensor_info("nope").is_none());
    let err = f.dequantize("nope").unwrap_err().to_string();
    assert!(err.contains("nope") && err.contains("synthetic.gguf"), "{err}");
}

#[test]
fn synthetic_metadata_of_every_value_type() {
    let f = synthetic();
    assert_eq!(f.get("test.u8"), Some(&GgufValue::U8(200)));
    assert_eq!(f.get("test.i8"), Some(&GgufValue::I8(-100)));
    assert_eq!(f.get("test.u16"), Some(&GgufValue::U16(60000)));
    assert_eq!(f.get("test.i16"), Some(&GgufValue::I16(-30000)));
    assert_eq!(f.get("test.u32"), Some(&GgufValue::U32(4_000_000_000)));
    assert_eq!(f.get("test.i32"), Some(&GgufValue::I32(-2_000_000_000)));
    assert_eq!(f.get("test.f32"), Some(&GgufValue::F32(0.15625)));
    assert_eq!(f.get("test.u64"), Some(&GgufValue::U64((1 << 40) + 7)));
    assert_eq!(f.get("test.i64"), Some(&GgufValue::I64(-(1 << 40) - 7)));
    assert_eq!(f.get("test.f64"), Some(&GgufValue::F64(std::f64::consts::E)));
    assert_eq!(f.get("test.bool"), Some(&GgufValue::Bool(true)));
    assert_eq!(f.get_str("test.string").unwrap(), "héllo wörld 🙂");
    assert_eq!(f.get_str_array("test.array_str").unwrap(), vec!["a", "bc", "", "中"]);
    assert_eq!(f.get_i64_array("test.array_i32").unwrap(), vec![1, -2, 3]);
    assert_eq!(f.get_f32_array("test.array_f32").unwrap(), vec![0.5, -1.25]);
    // integer widths coerce
    assert_eq!(f.get_u64("test.u8").unwrap(), 200);
    assert_eq!(f.get_u64("test.u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_i64("test.i16").unwrap(), -30000);
    assert_eq!(f.get_f32("test.u16").unwrap(), 60000.0);
    assert!(f.get_bool("test.bool").unwrap());
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    // missing and mistyped keys name the file and key
    let e = f.get_u64("no.such.key").unwrap_err().to_string();
    assert!(e.contains("synthetic.gguf") && e.contains("no.such.key"), "{e}");
    let e = f.get_u64("test.i8").unwrap_err().to_string();
    assert!(e.contains("test.i8") && e.contains("int8"), "{e}");
    let e = f.get_str("test.u8").unwrap_err().to_string();
    assert!(e.contains("test.u8"), "{e}");
    assert!(f.get_str_array("test.array_i32").is_err());
    assert_eq!(f.get_u64_opt("no.such.key").unwrap(), None);
    assert!(f.get_u64_opt("test.string").is_err());
}

#[test]
fn synthetic_unpermute_matches_transformers() {
    let f = synthetic();
    let exp = expected();
    let find = |n: &str| exp.iter().find(|e| e.0 == n).unwrap();
    let (_, q_shape, q_want) = find("hf:blk.0.attn_q.weight");
    let (_, k_shape, k_want) = find("hf:blk.0.attn_k.weight");
    let (q, shape) = f.dequantize("blk.0.attn_q.weight").unwrap();
    assert_eq!(&shape, q_shape);
    assert_bits_eq("q", &unpermute_qk(&q, &shape, 4).unwrap(), q_want);
    let (k, shape) = f.dequantize("blk.0.attn_k.weight").unwrap();
    assert_eq!(&shape, k_shape);
    assert_bits_eq("k", &unpermute_qk(&k, &shape, 2).unwrap(), k_want);
    // the file-level helper picks the head counts from the metadata
    let (hf, data, _) = f.load_hf_tensor("blk.0.attn_k.weight").unwrap();
    assert_eq!(hf, "model.layers.0.self_attn.k_proj.weight");
    assert_bits_eq("k via load_hf_tensor", &data, k_want);
    // bad arguments are errors
    assert!(unpermute_qk(&q, &[64, 64], 3).is_err());
    assert!(unpermute_qk(&q, &[64, 63], 4).is_err());
    assert!(unpermute_qk(&q, &[64, 64], 0).is_err());
    // A head count whose double overflows (read from a file) is an error, not a division by zero.
    assert!(unpermute_qk(&q, &[64, 64], 1 << 63).is_err());
    assert!(unpermute_qk(&q, &[64, 64], usize::MAX).is_err());
}

#[test]
fn synthetic_hf_config() {
    let f = synthetic();
    let c = hf_config(&f).unwrap();
    assert_eq!(c["architectures"][0], "LlamaForCausalLM");
    assert_eq!(c["model_type"], "llama");
    assert_eq!(c["hidden_size"], 64);
    assert_eq!(c["intermediate_size"], 96);
    assert_eq!(c["num_hidden_layers"], 2);
    assert_eq!(c["num_attention_heads"], 4);
    assert_eq!(c["num_key_value_heads"], 2);
    assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-6));
    assert_eq!(c["rope_theta"].as_f64(), Some(10000.0));
    assert_eq!(c["max_position_embeddings"], 256);
    assert_eq!(c["vocab_size"], 50);
    assert_eq!(c["tie_word_embeddings"], true);
}

#[test]
fn tensor_name_mapping() {
    let cases = [
        ("token_embd.weight", Some("model.embed_tokens.weight")),
        ("blk.0.attn_q.weight", Some("model.layers.0.self_attn.q_proj.weight")),
        ("blk.12.attn_k.weight", Some("model.layers.12.self_attn.k_proj.weight")),
        ("blk.3.attn_v.weight", Some("model.layers.3.self_attn.v_proj.weight")),
        ("blk.3.attn_output.weight", Some("model.layers.3.self_attn.o_proj.weight")),
        ("blk.29.ffn_gate.weight", Some("model.layers.29.mlp.gate_proj.weight")),
        ("blk.29.ffn_up.weight", Some("model.layers.29.mlp.up_proj.weight")),
        ("blk.29.ffn_down.weight", Some("model.layers.29.mlp.down_proj.weight")),
        ("blk.1.attn_norm.weight", Some("model.layers.1.input_layernorm.weight")),
        ("blk.1.ffn_norm.weight", Some("model.layers.1.post_attention_layernorm.weight")),
        ("blk.1.attn_q.bias", Some("model.layers.1.self_attn.q_proj.bias")),
        ("output_norm.weight", Some("model.norm.weight")),
        ("output.weight", Some("lm_head.weight")),
        ("rope_freqs.weight", None),
        ("blk.x.attn_q.weight", None),
        ("blk.1.unknown.weight", None),
        ("token_embd", None),
    ];
    for (g, h) in cases {
        assert_eq!(hf_tensor_name(g).as_deref(), h, "{g}");
    }
}

// ---------------------------------------------------------------- malformed input

/// A minimal GGUF v3 writer for hand-made (and deliberately broken) files.
struct Builder {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
}

impl Builder {
    fn new() -> Self {
        Builder { kv: Vec::new(), n_kv: 0, infos: Vec::new(), n_tensors: 0, data: Vec::new() }
    }
    fn string(buf: &mut Vec<u8>, s: &str) {
        buf.extend((s.len() as u64).to_le_bytes());
        buf.extend(s.as_bytes());
    }
    fn kv_u32(mut self, k: &str, v: u32) -> Self {
        Self::string(&mut self.kv, k);
        self.kv.extend(4u32.to_le_bytes());
        self.kv.extend(v.to_le_bytes());
        self.n_kv += 1;
        self
    }
    fn kv_raw(mut self, k: &str, ty: u32, payload: &[u8]) -> Self {
        Self::string(&mut self.kv, k);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(payload);
        self.n_kv += 1;
        self
    }
    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, offset: u64, data: &[u8]) -> Self {
        Self::string(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend(offset.to_le_bytes());
        self.data.extend(data);
        self.n_tensors += 1;
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(self.n_tensors.to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kv);
        b.extend(&self.infos);
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        b.extend(&self.data);
        b
    }
}

fn open_bytes(bytes: &[u8]) -> Result<GgufFile, ModelError> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.gguf");
    std::fs::write(&p, bytes).unwrap();
    GgufFile::open(&p)
}

fn assert_gguf_err(r: Result<GgufFile, ModelError>, needle: &str) {
    match r {
        Err(e @ ModelError::Gguf { .. }) => {
            let m = e.to_string();
            assert!(m.contains("broken.gguf") && m.contains(needle), "{m}");
        }
        Err(e) => panic!("wrong error kind: {e}"),
        Ok(_) => panic!("accepted a malformed file (expected an error about {needle})"),
    }
}

fn good() -> Builder {
    let vals: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    Builder::new().kv_u32("a.b", 7).tensor("w", &[2, 2], 0, 0, &vals)
}

#[test]
fn hand_made_file_reads() {
    let f = open_bytes(&good().bytes()).unwrap();
    let (v, s) = f.dequantize("w").unwrap();
    assert_eq!((v, s), (vec![1.0, 2.0, 3.0, 4.0], vec![2, 2]));
    assert_eq!(f.get_u64("a.b").unwrap(), 7);
}

#[test]
fn bad_magic_is_an_error() {
    let mut b = good().bytes();
    b[0] = b'X';
    assert_gguf_err(open_bytes(&b), "not a GGUF file");
}

#[test]
fn unsupported_version_is_an_error() {
    let mut b = good().bytes();
    b[4] = 1;
    assert_gguf_err(open_bytes(&b), "version 1");
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let b = good().bytes();
    for len in 0..b.len() {
        let r = open_bytes(&b[..len]);
        assert!(matches!(r, Err(ModelError::Gguf { .. })), "truncated to {len} bytes: accepted");
    }
    let real = std::fs::read(fixtures().join("synthetic.gguf")).unwrap();
    for len in [0, 3, 8, 23, 100, 1000, real.len() / 2, real.len() - 1] {
        assert!(open_bytes(&real[..len]).is_err(), "synthetic truncated to {len}");
    }
}

#[test]
fn tensor_past_eof_is_an_error() {
    let vals = [0u8; 16];
    let b = Builder::new().tensor("w", &[2, 2], 0, 32, &vals).bytes();
    assert_gguf_err(open_bytes(&b), "`w`");
    let b = Builder::new().tensor("w", &[2, 2], 0, u64::MAX - 4, &vals).bytes();
    assert_gguf_err(open_bytes(&b), "`w`");
}

#[test]
fn overflowing_dims_are_an_error() {
    let b = Builder::new().tensor("w", &[u64::MAX, 4], 0, 0, &[0u8; 16]).bytes();
    assert_gguf_err(open_bytes(&b), "`w`");
    let b = Builder::new().tensor("w", &[1 << 62, 1], 2, 0, &[0u8; 16]).bytes();
    assert_gguf_err(open_bytes(&b), "`w`");
}

#[test]
fn partial_block_rows_are_an_error() {
    // Q8_0 rows must be multiples of 32 elements
    let b = Builder::new().tensor("w", &[16, 1], 8, 0, &[0u8; 34]).bytes();
    assert_gguf_err(open_bytes(&b), "`w`");
}

#[test]
fn unknown_tensor_type_fails_on_dequantize() {
    let b = Builder::new().tensor("odd", &[32], 99, 0, &[0u8; 32]).bytes();
    let f = open_bytes(&b).unwrap();
    let e = f.dequantize("odd").unwrap_err().to_string();
    assert!(e.contains("odd") && e.contains("type 99") && e.contains("broken.gguf"), "{e}");
    // a known but undecoded type too
    let b = Builder::new().tensor("iq", &[256], 16, 0, &[0u8; 66]).bytes();
    let e = open_bytes(&b).unwrap().dequantize("iq").unwrap_err().to_string();
    assert!(e.contains("IQ2_XXS"), "{e}");
}

#[test]
fn huge_counts_and_bad_values_are_errors() {
    // metadata count far beyond the file
    let mut b = good().bytes();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_gguf_err(open_bytes(&b), "metadata count");
    // tensor count far beyond the file
    let mut b = good().bytes();
    b[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert_gguf_err(open_bytes(&b), "tensor count");
    // an unknown value type
    let b = Builder::new().kv_raw("k", 77, &[0; 8]).bytes();
    assert_gguf_err(open_bytes(&b), "unknown value type 77");
    // an array claiming 2^60 strings
    let mut payload = 8u32.to_le_bytes().to_vec();
    payload.extend((1u64 << 60).to_le_bytes());
    let b = Builder::new().kv_raw("arr", 9, &payload).bytes();
    assert_gguf_err(open_bytes(&b), "arr");
    // a string that is not UTF-8
    let mut payload = 2u64.to_le_bytes().to_vec();
    payload.extend([0xff, 0xfe]);
    let b = Builder::new().kv_raw("s", 8, &payload).bytes();
    assert_gguf_err(open_bytes(&b), "UTF-8");
    // bad alignment
    let b = Builder::new().kv_u32("general.alignment", 3).bytes();
    assert_gguf_err(open_bytes(&b), "alignment");
    // duplicate tensor names
    let b = Builder::new().tensor("w", &[1], 0, 0, &[0; 4]).tensor("w", &[1], 0, 0, &[]).bytes();
    assert_gguf_err(open_bytes(&b), "duplicate");
}

#[test]
fn missing_file_is_an_io_error() {
    let e = GgufFile::open("/nonexistent/dir/x.gguf").unwrap_err();
    assert!(matches!(e, ModelError::Io { .. }), "{e}");
}

#[test]
fn non_llama_arch_is_rejected_by_hf_config() {
    let mut payload = 5u64.to_le_bytes().to_vec();
    payload.extend(b"gemma");
    let b = Builder::new().kv_raw("general.architecture", 8, &payload).bytes();
    let f = open_bytes(&b).unwrap();
    let e = hf_config(&f).unwrap_err().to_string();
    assert!(e.contains("gemma") && e.contains("llama"), "{e}");
    assert!(gguf_tokenizer(&f).is_err());
}

// ---------------------------------------------------------------- SmolLM2

fn smollm2() -> Option<GgufFile> {
    // `LORA_SMOLLM2_GGUF` points elsewhere (e.g. when the crate is built outside the workspace).
    let p = match std::env::var_os("LORA_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => common::root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    if !p.exists() {
        eprintln!("skipping: {} not found (run scripts/setup.sh)", p.display());
        return None;
    }
    Some(GgufFile::open(&p).expect("open SmolLM2"))
}

fn json_fixture(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

#[test]
fn smollm2_metadata_and_config() {
    let Some(f) = smollm2() else { return };
    assert_eq!(f.tensors().len(), 272);
    assert_eq!(f.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    let c = hf_config(&f).unwrap();
    let reference = json_fixture("smollm2_tensors.json");
    let rc = &reference["config"];
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "vocab_size",
        "head_dim",
        "bos_token_id",
        "eos_token_id",
        "unk_token_id",
        "pad_token_id",
    ] {
        assert!(rc[key].is_u64(), "{key} missing in the reference");
        assert_eq!(c[key].as_u64(), rc[key].as_u64(), "{key}");
    }
    for key in ["rms_norm_eps", "rope_theta"] {
        let (a, b) = (c[key].as_f64().unwrap(), rc[key].as_f64().unwrap());
        assert_eq!(a as f32, b as f32, "{key}");
    }
    assert_eq!(c["hidden_size"], 576);
    assert_eq!(c["num_hidden_layers"], 30);
    assert_eq!(c["num_attention_heads"], 9);
    assert_eq!(c["num_key_value_heads"], 3);
    assert_eq!(c["vocab_size"], 49152);
    assert_eq!(c["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["tie_word_embeddings"], rc["tie_word_embeddings"]);
    assert_eq!(c["head_dim"], 64);
    assert_eq!(c["bos_token_id"], 1);
    assert_eq!(c["eos_token_id"], 2);
    let sp = GgufSpecialTokens::from_file(&f).unwrap();
    assert_eq!((sp.bos, sp.eos, sp.unk, sp.pad), (Some(1), Some(2), Some(0), Some(2)));
    assert!(!sp.add_bos && !sp.add_eos);
    let tpl = gguf_chat_template(&f).unwrap();
    assert!(tpl.contains("<|im_start|>"), "{tpl}");
}

#[test]
fn smollm2_tensors_match_gguf_py_and_transformers_permute() {
    let Some(f) = smollm2() else { return };
    let reference = json_fixture("smollm2_tensors.json");
    for t in reference["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let (hf_name, data, shape) = f.load_hf_tensor(name).unwrap();
        assert_eq!(Some(hf_name), hf_tensor_name(name));
        let want_shape: Vec<usize> =
            t["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(shape, want_shape, "{name}");
        let sum: f64 = data.iter().map(|&v| f64::from(v)).sum();
        let want = t["sum"].as_f64().unwrap();
        assert!((sum - want).abs() <= 1e-6 * want.abs().max(1.0), "{name}: sum {sum} vs {want}");
        let abs: f64 = data.iter().map(|&v| f64::from(v).abs()).sum();
        let want = t["abs_sum"].as_f64().unwrap();
        assert!((abs - want).abs() <= 1e-6 * want, "{name}: abs sum {abs} vs {want}");
        let to_f32 =
            |v: &Value| -> Vec<f32> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect() };
        if let Some(values) = t.get("values") {
            assert_bits_eq(name, &data, &to_f32(values));
        }
        if let Some(rows) = t.get("rows") {
            let cols = shape[1];
            for (r, values) in rows.as_object().unwrap() {
                let r: usize = r.parse().unwrap();
                assert_bits_eq(&format!("{name} row {r}"), &data[r * cols..(r + 1) * cols], &to_f32(values));
            }
        }
    }
}

#[test]
fn smollm2_tokenizer_matches_transformers() {
    let Some(f) = smollm2() else { return };
    let tok = gguf_tokenizer(&f).unwrap();
    let reference = json_fixture("smollm2_tokenizer.json");
    assert_eq!(tok.get_vocab_size(true), reference["vocab_size_with_added"].as_u64().unwrap() as usize);
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let enc = tok.encode(text, true).unwrap();
        assert_eq!(enc.get_ids(), &want[..], "ids of {text:?}");
        let dec = tok.decode(&want, false).unwrap();
        assert_eq!(dec, case["decoded"].as_str().unwrap(), "decode of {text:?}");
        let dec = tok.decode(&want, true).unwrap();
        assert_eq!(dec, case["decoded_skip_special"].as_str().unwrap(), "decode(skip) of {text:?}");
    }
    for (id, content, special) in reference["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a[0].as_u64().unwrap() as u32, a[1].as_str().unwrap(), a[2].as_bool().unwrap()))
    {
        assert!(special);
        assert_eq!(tok.token_to_id(content), Some(id), "{content}");
    }
}

#[test]
fn smollm2_full_dequantize_is_fast_enough() {
    let Some(f) = smollm2() else { return };
    let start = std::time::Instant::now();
    let mut n = 0usize;
    let names: Vec<String> = f.tensor_names().map(str::to_owned).collect();
    for name in &names {
        n += f.dequantize(name).unwrap().0.len();
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!("dequantized {n} values in {secs:.2} s");
    assert!(n > 130_000_000);
}

/// Rotary scaling declared by GGUF files (`scripts/fixtures/gguf/make_gguf_fixtures.py --only rope` writes them):
/// Llama 3.x `rope_freqs.weight` divisors become llama3 `rope_scaling`, linear scaling maps directly, and yarn or
/// divisors no known rule gives are refused by name (never run as plain RoPE).
#[test]
fn rope_scaling_from_gguf_metadata_and_rope_freqs() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("rope_expected.json")).unwrap()).unwrap();
    let cases = expected.as_object().unwrap();
    assert_eq!(cases.len(), 4);
    for (file, want) in cases {
        let f = GgufFile::open(fixtures().join(file)).unwrap();
        match want.get("error").and_then(|e| e.as_str()) {
            Some(needle) => {
                let e = hf_config(&f).unwrap_err().to_string();
                assert!(e.contains(needle) && e.contains("not implemented"), "{file}: {e}");
            }
            None => {
                let c = hf_config(&f).unwrap();
                assert_eq!(&c["rope_scaling"], want, "{file}");
                let raw: lora_model::config::HfConfig = serde_json::from_value(c).unwrap();
                let cfg = lora_model::ModelConfig::from_hf(&raw, std::path::Path::new(file)).unwrap();
                let is_llama3 = matches!(cfg.rope_scaling, lora_model::config::RopeScaling::Llama3 { factor, original_max_position_embeddings: 8192, .. } if factor == 8.0);
                assert_eq!(is_llama3, want["rope_type"] == "llama3", "{file}: {:?}", cfg.rope_scaling);
            }
        }
    }
}
