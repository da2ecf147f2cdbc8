//! Property tests over the data loaders: every task's reader (E2E CSV, HotpotQA JSON/JSONL, GSM8K, SciTLDR,
//! generic JSONL), the probe's JSONL reader and the metrics' pairs reader get arbitrary bytes and near-valid rows.
//! Property: samples or a typed error naming the file, never a panic. Bounded: a few hundred cases, seconds.
use lora_boundary::tasks::Task;
use proptest::prelude::*;

/// Bytes that look like the formats: quotes, commas, newlines, braces, `####`, invalid UTF-8 and JSON fragments.
fn data() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"\"".to_vec()),
        Just(b",".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\"\"".to_vec()),
        Just(b"mr,ref\n".to_vec()),
        Just(b"{\"prompt\": \"a\", \"answer\": \"b\"}\n".to_vec()),
        Just(b"{\"question\": \"q\", \"answer\": \"x #### 4\"}\n".to_vec()),
        Just(b"{\"source\": [\"s\"], \"target\": [\"t\"]}\n".to_vec()),
        Just(b"[{\"question\": \"q\", \"answer\": \"a\"}".to_vec()),
        Just(b"{\"prediction\": \"p\", \"references\": [\"r\"]}\n".to_vec()),
        Just(b"]".to_vec()),
        Just(b"\xff\xfe".to_vec()),
        Just("\u{feff}".as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 0..12),
        "[a-z #0-9\\[\\]{}:]{0,12}".prop_map(|s| s.into_bytes()),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn loaders_return_samples_or_a_typed_error(bytes in data()) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data.txt");
        std::fs::write(&p, &bytes).unwrap();
        for task in [Task::E2e, Task::Hotpotqa, Task::Gsm8k, Task::Scitldr, Task::Jsonl] {
            match task.load(&p) {
                Ok(samples) => prop_assert!(!samples.is_empty(), "{task:?}: Ok with no samples"),
                Err(e) => prop_assert!(e.to_string().contains("data.txt"), "{task:?}: error names no file: {e}"),
            }
        }
        let _ = lora_boundary::probe::data::read_jsonl(&p);
        let _ = lora_boundary::metrics::score_jsonl(lora_boundary::metrics::MetricGroup::from_name("rouge").unwrap(), &p);
    }
}
