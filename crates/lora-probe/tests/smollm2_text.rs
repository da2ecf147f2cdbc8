//! The text path (tokenizer, chat template, JSONL, what `lora-boundary probe` does) on SmolLM2-135M-Instruct when
//! `models/SmolLM2-135M-Instruct.Q4_1.gguf` is present (skipped otherwise: the file is not committed).
#[path = "../../../tests/support/mod.rs"]
mod common;

use std::path::PathBuf;

use lora_probe::{
    parse_masks, read_jsonl, tokenize_samples, Probe, ProbeConfig, ProbeMode, PromptFormat, TokenizedSample,
};

fn gguf() -> Option<PathBuf> {
    common::smollm2_gguf()
}

#[test]
fn text_samples_through_the_probe_command_path() {
    let Some(model) = gguf() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"What is the capital of France?\", \"answer\": \"The capital of France is Paris.\"}\n\
         {\"prompt\": \"What is 2 + 3?\", \"answer\": \"5\"}\n",
    )
    .expect("write data");
    // What `lora-boundary probe --chat --mask none --plot probe.svg` does, step by step.
    let config =
        ProbeConfig { k: 4, prompt_format: PromptFormat::chat(), bootstrap_resamples: 100, ..Default::default() };
    let masks = parse_masks(&["none".to_string()]).expect("masks");
    let samples = read_jsonl(&data).expect("data");
    let tok = lora_model::load_tokenizer(&model).expect("tokenizer");
    let tokenized = tokenize_samples(&tok, &samples, &PromptFormat::chat(), true, Some(&data)).expect("tokenize");
    let m = lora_model::Llama::load(&model, lora_model::Placement::default()).expect("model");
    let result = Probe::new(config).run_labelled(&m, &tokenized, &masks).expect("probe");
    result.plot_svg(dir.path().join("probe.svg")).expect("plot");
    assert_eq!(result.num_layers, 30);
    let c = &result.curves[0];
    assert_eq!(c.gt_prob.len(), 31);
    assert!(c.gt_prob.iter().all(|p| (0.0..=1.0).contains(p)));
    // Answers are tokenized on their own, without special tokens, and appended as they are.
    let first = tok.encode("The capital of France is Paris.", false).expect("encode");
    assert_eq!(c.per_sample.answer_ids[0], first[..4].to_vec());
    assert_eq!(c.per_sample.positions, vec![4, tok.encode("5", false).expect("encode").len().min(4)]);
    // The instruct model is surer of the reference answer at the output than at the embeddings (where the tied
    // embeddings mostly predict the input token itself).
    assert!(c.gt_prob[30] > c.gt_prob[0]);
    assert!(std::fs::read_to_string(dir.path().join("probe.svg")).expect("svg").contains("<svg"));

    // Same numbers from pre-tokenized samples.
    let tokenized = vec![TokenizedSample {
        prompt_ids: tok.encode_prompt("What is the capital of France?", &PromptFormat::chat()).expect("prompt"),
        answer_ids: first,
    }];
    let again = Probe::new(ProbeConfig { mode: ProbeMode::Teacher, ..Default::default() })
        .run_tokenized(&m, &tokenized, &[lora_model::LayerMask::none()])
        .expect("probe");
    for p in 0..31 {
        for j in 0..4 {
            let (x, y) = (again.curves[0].per_sample.gt_prob[[0, p, j]], c.per_sample.gt_prob[[0, p, j]]);
            assert!((x - y).abs() < 1e-4, "point {p} position {j}: {x} vs {y}");
        }
    }
}
