//! Property tests over untrusted inputs: the safetensors reader, the GGUF reader, `adapter_config.json` parsing
//! (through `load_adapter` and `prune_adapter`) and the mask-spec parser. Each property is "a typed error or a
//! valid value, never a panic, never an unbounded allocation": inputs include corrupted counts and lengths of up to
//! 2^64, and a reader that trusted one would abort the test process. Bounded: a few hundred cases per property,
//! seconds each.
#[path = "../../../tests/support/mod.rs"]
mod common;

use std::path::{Path, PathBuf};

use lora_model::{
    load_adapter, prune_adapter, GgufWeights, LayerMask, Llama, Placement, SafetensorsWeights, WeightSource,
};
use proptest::prelude::*;

use common::fixtures;

/// A byte-level corruption of a valid file.
#[derive(Debug, Clone)]
enum Corruption {
    /// Overwrite one byte.
    Byte { at: usize, value: u8 },
    /// Overwrite 8 bytes with a little-endian u64 (a count, length or offset in the header).
    U64 { at: usize, value: u64 },
    /// Cut the file.
    Truncate { len: usize },
}

fn corruption(header: usize) -> impl Strategy<Value = Corruption> {
    let big = prop_oneof![Just(u64::MAX), Just(u64::MAX / 2), Just(1u64 << 40), Just(1u64 << 32), 0u64..4096];
    prop_oneof![
        (0..header, any::<u8>()).prop_map(|(at, value)| Corruption::Byte { at, value }),
        (0..header, big).prop_map(|(at, value)| Corruption::U64 { at, value }),
        (0..header * 2).prop_map(|len| Corruption::Truncate { len }),
    ]
}

fn corrupt(mut bytes: Vec<u8>, cs: &[Corruption]) -> Vec<u8> {
    for c in cs {
        match *c {
            Corruption::Byte { at, value } => {
                if let Some(b) = bytes.get_mut(at) {
                    *b = value;
                }
            }
            Corruption::U64 { at, value } => {
                if at + 8 <= bytes.len() {
                    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
                }
            }
            Corruption::Truncate { len } => bytes.truncate(len),
        }
    }
    bytes
}

fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Every tensor of a source loads or fails with an error; nothing panics.
fn load_all(src: &dyn WeightSource) {
    for n in src.names() {
        let _ = src.load(&n, None);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn safetensors_reader_never_panics(cs in prop::collection::vec(corruption(600), 1..4)) {
        let good = std::fs::read(fixtures().join("adapters/tiny-llama-basic/adapter_model.safetensors")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = write_tmp(dir.path(), "a.safetensors", &corrupt(good, &cs));
        if let Ok(w) = SafetensorsWeights::open_file(&p) {
            load_all(&w);
        }
    }

    #[test]
    fn gguf_reader_never_panics(cs in prop::collection::vec(corruption(4096), 1..4)) {
        let good = std::fs::read(common::crate_fixtures().join("gguf/synthetic.gguf")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = write_tmp(dir.path(), "m.gguf", &corrupt(good, &cs));
        if let Ok(w) = GgufWeights::open(&p) {
            load_all(&w);
        }
    }

    #[test]
    fn mask_parser_returns_a_mask_or_an_error(spec in prop_oneof![
        "\\PC{0,40}",
        "[0-9]{1,25}(-[0-9]{1,25})?(,[0-9]{1,25}(-[0-9]{1,25})?){0,3}(@[a-z_,]{0,20})?",
        "keep-through:[0-9]{1,25}",
    ]) {
        if let Ok(m) = spec.parse::<LayerMask>() {
            // A parsed mask is small, prints, and re-parses to itself.
            prop_assert!(m.max_block().is_none_or(|b| b < lora_model::mask::MAX_BLOCKS));
            prop_assert_eq!(m.to_string().parse::<LayerMask>().unwrap(), m);
        }
    }
}

/// A JSON value for an `adapter_config.json` field: plausible and implausible types.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    let leaf = prop_oneof![
        Just(json!(null)),
        any::<bool>().prop_map(|b| json!(b)),
        (-3i64..40).prop_map(|n| json!(n)),
        Just(json!(u64::MAX)),
        Just(json!(1e308)),
        Just(json!(-0.5)),
        prop_oneof![
            Just("all-linear"),
            Just("q_proj"),
            Just("layers"),
            Just(".*"),
            Just("(q|v)_proj"),
            Just("(("),
            Just("lora"),
            Just("LORA"),
            Just("none"),
            Just("all"),
            Just(".*\\.layers\\.(0|2)\\.self_attn\\.q_proj")
        ]
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::vec(("[a-z_.0-9]{1,12}", inner), 0..3)
                .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
        ]
    })
}

const FIELDS: &[&str] = &[
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "lora_dropout",
    "bias",
    "use_dora",
    "modules_to_save",
    "layer_replication",
    "target_parameters",
    "lora_bias",
    "fan_in_fan_out",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn adapter_config_parsing_never_panics(
        edits in prop::collection::vec((prop::sample::select(FIELDS), json_value()), 0..5),
        raw in prop::option::of("\\PC{0,60}"),
    ) {
        let src = fixtures().join("adapters/tiny-llama-basic");
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("adapter");
        std::fs::create_dir(&a).unwrap();
        std::fs::copy(src.join("adapter_model.safetensors"), a.join("adapter_model.safetensors")).unwrap();
        let body = match raw {
            Some(text) => text,
            None => {
                let mut cfg: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
                for (k, v) in edits {
                    cfg[k] = v;
                }
                cfg.to_string()
            }
        };
        std::fs::write(a.join("adapter_config.json"), body).unwrap();
        let mut model = Llama::load(fixtures().join("models/tiny-llama"), Placement::default()).unwrap();
        let loaded = load_adapter(&mut model, &a);
        let pruned = prune_adapter(&a, &LayerMask::keep_through(1), &dir.path().join("pruned"));
        // Whatever prune accepts, a loader accepts too (it validates like one).
        if pruned.is_ok() {
            let mut m2 = Llama::load(fixtures().join("models/tiny-llama"), Placement::default()).unwrap();
            prop_assert!(load_adapter(&mut m2, dir.path().join("pruned")).is_ok(), "pruned output does not load");
            prop_assert!(loaded.is_ok(), "prune accepted an adapter the loader refuses");
        }
    }
}
