//! The probe against HF transformers + PEFT (tests/fixtures/probe/reference.json, made by
//! scripts/fixtures/probe/make_probe_fixtures.py): per sample, point and position, within 1e-4 in f32.
#[path = "../../../tests/support/mod.rs"]
mod common;

use lora_model::{load_adapter, LayerMask, Llama, Placement};
use lora_probe::{
    parse_masks, read_jsonl, MaskCurve, Probe, ProbeConfig, ProbeError, ProbeMode, ProbeResult, TokenizedSample,
};
use serde_json::Value;

const TOL: f64 = 1e-4;

use common::root;

fn reference() -> Value {
    let text = std::fs::read_to_string(root().join("tests/fixtures/probe/reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference JSON")
}

fn model() -> Llama {
    let mut m = Llama::load(root().join("tests/fixtures/models/tiny-llama"), Placement::default()).expect("model");
    load_adapter(&mut m, root().join("tests/fixtures/adapters/tiny-llama-basic")).expect("adapter");
    m
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().expect("ids").iter().map(|x| x.as_i64().expect("id")).collect()
}

fn samples(r: &Value) -> Vec<TokenizedSample> {
    r["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .map(|s| TokenizedSample { prompt_ids: ids(&s["prompt_ids"]), answer_ids: ids(&s["answer_ids"]) })
        .collect()
}

const SPECS: [&str; 4] = ["all", "none", "0-1", "0,3"];

fn run(mode: ProbeMode, batch_size: usize) -> ProbeResult {
    let r = reference();
    let cfg = ProbeConfig {
        k: r["k"].as_u64().expect("k") as usize,
        mode,
        batch_size,
        bootstrap_resamples: 200,
        seed: 7,
        ..Default::default()
    };
    let masks = parse_masks(&SPECS.map(String::from)).expect("masks");
    Probe::new(cfg).run_labelled(&model(), &samples(&r), &masks).expect("probe")
}

fn check_against_reference(result: &ProbeResult, mode: &str) {
    let r = reference();
    let num_layers = r["num_layers"].as_u64().expect("L") as usize;
    assert_eq!(result.num_layers, num_layers);
    let mut checked = 0;
    for c in r["curves"].as_array().expect("curves") {
        if c["mode"] != mode {
            continue;
        }
        let spec = c["mask"].as_str().expect("mask");
        let curve = result.curve(spec).expect("curve for mask");
        let ps = &curve.per_sample;
        for (s, sample) in c["samples"].as_array().expect("samples").iter().enumerate() {
            let n = sample["positions"].as_u64().expect("positions") as usize;
            assert_eq!(ps.positions[s], n, "{spec} sample {s} positions");
            assert_eq!(ps.answer_ids[s], ids(&sample["answer_ids"]), "{spec} sample {s} probed tokens");
            for (metric, arr) in [
                ("gt_prob", &ps.gt_prob),
                ("max_prob", &ps.max_prob),
                ("gt_rank", &ps.gt_rank),
                ("entropy", &ps.entropy),
            ] {
                let rows = sample[metric].as_array().expect("metric");
                assert_eq!(rows.len(), num_layers + 1);
                for (p, row) in rows.iter().enumerate() {
                    for (j, v) in row.as_array().expect("row").iter().enumerate() {
                        let want = v.as_f64().expect("value");
                        let got = f64::from(arr[[s, p, j]]);
                        assert!(
                            (got - want).abs() <= TOL,
                            "{mode} {spec} sample {s} point {p} position {j} {metric}: got {got}, want {want}"
                        );
                        checked += 1;
                    }
                    // Positions past the answer are zero (never NaN) and excluded from means.
                    for j in row.as_array().expect("row").len()..result.k {
                        assert_eq!(arr[[s, p, j]], 0.0);
                    }
                }
            }
        }
    }
    assert!(checked > 500, "only {checked} values checked");
}

#[test]
fn teacher_forced_matches_transformers_peft() {
    let result = run(ProbeMode::Teacher, 3); // 3 + 1 samples: left padding and two batches
    check_against_reference(&result, "teacher");
}

#[test]
fn free_running_matches_transformers_peft() {
    let result = run(ProbeMode::Free, 4);
    check_against_reference(&result, "free");
    // Greedy tokens: the last point's probed-token probability is the max probability, rank 1.
    for c in &result.curves {
        let last = result.num_layers;
        for s in 0..result.num_samples {
            assert_eq!(c.per_sample.gt_rank[[s, last, 0]], 1.0);
        }
        assert!((c.gt_prob[last] - c.max_prob[last]).abs() < 1e-6);
    }
}

#[test]
fn batch_size_does_not_change_results() {
    let a = run(ProbeMode::Teacher, 1);
    let b = run(ProbeMode::Teacher, 4);
    for (ca, cb) in a.curves.iter().zip(&b.curves) {
        let d = (&ca.per_sample.gt_prob - &cb.per_sample.gt_prob).mapv(f32::abs);
        assert!(d.iter().all(|&x| x < 1e-5), "{}", ca.mask);
    }
}

fn manual_means(c: &MaskCurve, k: usize) -> (Vec<f64>, Vec<Vec<f64>>) {
    let ps = &c.per_sample;
    let (samples, points, _) = ps.gt_prob.dim();
    let mut pooled = vec![0.0; points];
    let mut per_pos = vec![vec![0.0; k]; points];
    for p in 0..points {
        let (mut sum, mut n) = (0.0, 0.0);
        for s in 0..samples {
            for j in 0..ps.positions[s] {
                sum += f64::from(ps.gt_prob[[s, p, j]]);
                n += 1.0;
            }
        }
        pooled[p] = sum / n;
        for (j, slot) in per_pos[p].iter_mut().enumerate() {
            let vals: Vec<f64> =
                (0..samples).filter(|&s| ps.positions[s] > j).map(|s| f64::from(ps.gt_prob[[s, p, j]])).collect();
            *slot = vals.iter().sum::<f64>() / vals.len() as f64;
        }
    }
    (pooled, per_pos)
}

#[test]
fn aggregates_cis_and_differences() {
    let mut result = run(ProbeMode::Teacher, 4);
    let k = result.k;
    for c in &result.curves {
        let (pooled, per_pos) = manual_means(c, k);
        for p in 0..c.points() {
            assert!((c.gt_prob[p] - pooled[p]).abs() < 1e-9);
            for (got, want) in c.gt_prob_per_position[p].iter().zip(&per_pos[p]) {
                assert!((got - want).abs() < 1e-9);
            }
            assert!(c.gt_prob_ci_low[p] <= c.gt_prob[p] + 1e-12 && c.gt_prob[p] <= c.gt_prob_ci_high[p] + 1e-12);
            assert!(c.max_prob_ci_low[p] <= c.max_prob_ci_high[p]);
            assert!(c.gt_rank[p] >= 1.0 && c.entropy[p] > 0.0);
        }
        // Sample 1's answer has 2 tokens (< k = 4): positions 2 and 3 are averaged over 3 samples.
        assert_eq!(c.position_counts, vec![4, 4, 3, 3]);
    }
    // Seeded bootstrap: the same run gives the same CIs.
    let again = run(ProbeMode::Teacher, 2);
    assert_eq!(result.curves[0].gt_prob_ci_low, again.curves[0].gt_prob_ci_low);

    let d = result.add_difference("all", "none").expect("difference").clone();
    let (a, b) = (result.curve("all").expect("all"), result.curve("none").expect("none"));
    for p in 0..a.points() {
        // Same valid positions under both masks in teacher mode: the pooled difference is the difference of means.
        assert!((d.gt_prob[p] - (a.gt_prob[p] - b.gt_prob[p])).abs() < 1e-9);
        assert!(d.gt_prob_ci_low[p] <= d.gt_prob_ci_high[p]);
    }
    // Embeddings are untouched by LoRA: no difference at point 0.
    assert!(d.gt_prob[0].abs() < 1e-7);
    assert!(matches!(result.difference("all", "nope"), Err(ProbeError::Mask { .. })));
}

#[test]
fn json_csv_and_svg_outputs() {
    let mut result = run(ProbeMode::Teacher, 4);
    result.add_difference("0-1", "all").expect("difference");
    let l = result.num_layers;
    let v = result.to_json(false).expect("json");
    assert_eq!(v["num_layers"], l);
    assert_eq!(v["k"], 4);
    let curves = v["curves"].as_array().expect("curves");
    assert_eq!(curves.len(), 4);
    assert_eq!(curves[3]["mask"], "0,3");
    assert_eq!(curves[0]["gt_prob"].as_array().expect("gt").len(), l + 1);
    let pp = curves[0]["gt_prob_per_position"].as_array().expect("pp");
    assert_eq!((pp.len(), pp[0].as_array().expect("row").len()), (l + 1, 4));
    assert!(curves[0].get("per_sample").is_none());
    assert_eq!(v["differences"][0]["a"], "0-1");
    let full = result.to_json(true).expect("json");
    let ps = &full["curves"][0]["per_sample"];
    assert_eq!(ps["positions"], serde_json::json!([4, 2, 4, 4]));
    assert_eq!(ps["gt_prob"][1][0].as_array().expect("row").len(), 2);

    let csv = result.to_csv();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("mask,point,position,gt_prob"));
    assert_eq!(lines.len(), 1 + 4 * (l + 1) + 4 * (l + 1) * 4);
    assert!(lines[1].starts_with("all,0,mean,"));
    assert!(csv.contains("\"0,3\",0,mean,"));

    let dir = tempfile::tempdir().expect("tempdir");
    let svg = dir.path().join("probe.svg");
    result.plot_svg(&svg).expect("plot");
    let text = std::fs::read_to_string(&svg).expect("svg");
    assert!(text.starts_with("<svg") && text.contains("LoRA on blocks 0–1") && text.contains("<polyline"));
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1, "no temp file left behind");
    result.write_csv(dir.path().join("p.csv")).expect("csv");
    result.write_json(dir.path().join("p.json"), true).expect("json file");
}

#[test]
fn bad_input_is_a_typed_error_naming_the_row() {
    let m = model();
    let probe = Probe::new(ProbeConfig::default());
    let samples = vec![
        TokenizedSample { prompt_ids: vec![5, 6], answer_ids: vec![7] },
        TokenizedSample { prompt_ids: vec![5, 6], answer_ids: vec![] },
    ];
    let e = probe.run_tokenized(&m, &samples, &[LayerMask::all()]).expect_err("empty answer");
    assert!(matches!(e, ProbeError::Row { row: 2, .. }), "{e}");
    assert!(e.to_string().contains("row 2"), "{e}");
    let bad_tok = vec![TokenizedSample { prompt_ids: vec![5, 999], answer_ids: vec![7] }];
    assert!(matches!(probe.run_tokenized(&m, &bad_tok, &[LayerMask::all()]), Err(ProbeError::Row { row: 1, .. })));
    let e = probe.run_tokenized(&m, &samples[..1], &[LayerMask::keep_through(9)]).expect_err("mask beyond the model");
    assert!(matches!(e, ProbeError::Mask { .. }), "{e}");
    assert!(matches!(parse_masks(&["0-x".to_string()]), Err(ProbeError::Mask { .. })));
    // Free-running mode needs no answer.
    let free = Probe::new(ProbeConfig { mode: ProbeMode::Free, k: 2, ..Default::default() });
    let r = free.run_tokenized(&m, &samples, &[LayerMask::none()]).expect("free run");
    assert_eq!(r.curves[0].per_sample.positions, vec![2, 2]);

    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a\", \"answer\": \"b\"}\n\n{\"prompt\": 3}\n").expect("write");
    let e = read_jsonl(&data).expect_err("bad row");
    assert!(matches!(e, ProbeError::Row { row: 3, .. }), "{e}");
}

/// bf16: the same samples teacher-forced with model and adapter in bfloat16, against transformers + PEFT in
/// bfloat16 (`make_probe_fixtures.py --bf16`). Both round every intermediate to bf16 but at different points
/// (libtorch vs our fused ops), so each sits about one "bf16-vs-f32 gap" from the f32 curve and the two can be up
/// to two gaps apart. The tolerance is three times the reference's own largest bf16-vs-f32 gap for that metric
/// (recorded in the fixture): met with room (measured: gt_prob 1.35×, max_prob 1.24×, entropy 1.97× the gap), and a
/// bf16 path that lost precision somewhere (an f16 round trip, a bf16 softmax) would exceed it. Ranks (integers
/// that flip on near-ties) are not compared.
#[test]
fn bf16_teacher_forced_curves_match_transformers_peft_bf16() {
    let text =
        std::fs::read_to_string(root().join("tests/fixtures/probe/reference_bf16.json")).expect("reference_bf16");
    let r: Value = serde_json::from_str(&text).expect("reference JSON");
    let place = Placement { kind: lora_model::tch::Kind::BFloat16, ..Placement::default() };
    let mut m = Llama::load(root().join("tests/fixtures/models/tiny-llama"), place).expect("model");
    load_adapter(&mut m, root().join("tests/fixtures/adapters/tiny-llama-basic")).expect("adapter");
    let cfg = ProbeConfig { k: r["k"].as_u64().expect("k") as usize, batch_size: 3, ..Default::default() };
    let masks = parse_masks(&SPECS.map(String::from)).expect("masks");
    let result = Probe::new(cfg).run_labelled(&m, &samples(&r), &masks).expect("probe");
    let mut worst = std::collections::BTreeMap::new();
    for c in r["curves"].as_array().expect("curves") {
        let spec = c["mask"].as_str().expect("mask");
        let ps = &result.curve(spec).expect("curve").per_sample;
        for (s, sample) in c["samples"].as_array().expect("samples").iter().enumerate() {
            for (metric, arr) in [("gt_prob", &ps.gt_prob), ("max_prob", &ps.max_prob), ("entropy", &ps.entropy)] {
                let tol = 3.0 * r["f32_gap"][metric].as_f64().expect("gap");
                for (p, row) in sample[metric].as_array().expect("metric").iter().enumerate() {
                    for (j, v) in row.as_array().expect("row").iter().enumerate() {
                        let d = (f64::from(arr[[s, p, j]]) - v.as_f64().expect("value")).abs();
                        let w = worst.entry(metric).or_insert(0.0f64);
                        *w = w.max(d);
                        assert!(d <= tol, "bf16 {spec} sample {s} point {p} position {j} {metric}: off by {d} > {tol}");
                    }
                }
            }
        }
    }
    eprintln!("bf16 probe vs transformers+PEFT bf16, largest differences: {worst:?}");
}
