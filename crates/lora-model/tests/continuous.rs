//! Continuous batching (`generate_stream`): a finished row leaves the batch and the next waiting prompt takes its
//! place in the KV cache. Greedy token ids must equal generating each prompt alone, for prompts of very different
//! lengths finishing at different steps, several batch sizes (the fused CPU step for up to 8 rows, libtorch's
//! ragged path above that), LoRA masks, the tiny Llama / Qwen2 / Gemma 3 fixtures and the real SmolLM2 GGUF with
//! the committed E2E adapter; seeded sampling must not depend on the batch size.
#[path = "../../../tests/support/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};

use lora_model::tch::Tensor;
use lora_model::{
    generate, generate_stream, gguf_tokenizer_for, kernels, load_adapter, ForwardOptions, GenerationConfig, LayerMask,
    Llama, Logits, Placement, PromptFormat, Sampling,
};

use common::fixtures;

/// The tests of this file run one at a time: some switch the kernels off for the whole process, and the others
/// count fused steps or compare runs that must take the same path.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn load(base: &str, adapter: Option<&str>) -> Llama {
    let mut m = Llama::load(fixtures().join("models").join(base), Placement::default()).unwrap();
    if let Some(a) = adapter {
        load_adapter(&mut m, fixtures().join("adapters").join(a)).unwrap();
    }
    m
}

/// Fourteen prompts of 1 to 40 tokens (ids 3..256, a fixed pseudo-random sequence).
fn prompts() -> Vec<Vec<i64>> {
    let lens = [1usize, 2, 5, 9, 17, 33, 3, 12, 7, 25, 4, 40, 6, 2];
    let mut x = 12345u64;
    lens.iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    3 + ((x >> 33) % 253) as i64
                })
                .collect()
        })
        .collect()
}

/// Each prompt generated alone.
fn alone(model: &Llama, prompts: &[Vec<i64>], cfg: &GenerationConfig, mask: &LayerMask) -> Vec<Vec<i64>> {
    prompts
        .iter()
        .map(|p| generate(model, None, std::slice::from_ref(p), cfg, mask).unwrap().0.remove(0).token_ids)
        .collect()
}

/// EOS ids taken from what the prompts generate without one (a token some rows reach early, others late or never),
/// so that rows finish at different steps.
fn varied_eos(model: &Llama, prompts: &[Vec<i64>], max_new: usize, mask: &LayerMask) -> Vec<i64> {
    let cfg = GenerationConfig { max_new_tokens: max_new, ..Default::default() };
    let free = alone(model, prompts, &cfg, mask);
    let mut eos = Vec::new();
    for (i, toks) in free.iter().enumerate().step_by(4) {
        if let Some(&t) = toks.get((3 + 5 * i) % max_new) {
            if !eos.contains(&t) {
                eos.push(t);
            }
        }
    }
    eos
}

/// `generate_stream` at each batch size equals one-by-one generation; returns how many distinct lengths the
/// outputs have (so the caller can insist rows really finished at different steps).
fn check(model: &Llama, prompts: &[Vec<i64>], cfg: &GenerationConfig, mask: &LayerMask, what: &str) -> usize {
    let expected = alone(model, prompts, cfg, mask);
    for batch in [1usize, 2, 3, 8, 12] {
        let mut order = Vec::new();
        let (got, _) = generate_stream(model, None, prompts, cfg, mask, batch, |i, g| {
            assert_eq!(g.token_ids, expected[i], "{what} batch {batch}: prompt {i} reported by on_done");
            order.push(i);
        })
        .unwrap();
        assert_eq!(got.len(), prompts.len());
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(&g.token_ids, e, "{what} batch {batch}: prompt {i} ({} tokens)", prompts[i].len());
        }
        order.sort_unstable();
        assert_eq!(order, (0..prompts.len()).collect::<Vec<_>>(), "{what} batch {batch}: every prompt reported once");
    }
    // The static call over all prompts at once (`generate`) too.
    let (all, _) = generate(model, None, prompts, cfg, mask).unwrap();
    for (i, (g, e)) in all.iter().zip(&expected).enumerate() {
        assert_eq!(&g.token_ids, e, "{what} generate over all: prompt {i}");
    }
    expected.iter().map(Vec::len).collect::<BTreeSet<_>>().len()
}

#[test]
fn greedy_equals_one_by_one_on_tiny_models_with_masks() {
    let _serial = serial();
    let _g = lora_model::tch::no_grad_guard();
    let prompts = prompts();
    let cases = [
        ("tiny-llama", Some("tiny-llama-rslora-patterns")),
        ("tiny-qwen2", Some("tiny-qwen2-basic")),
        ("tiny-llama3-rope", None),
        // Gemma 3: sliding window 4, so most rows run past it (windowed per row in the ragged cache).
        ("tiny-gemma3", Some("tiny-gemma3-patterns")),
    ];
    for (base, adapter) in cases {
        let model = load(base, adapter);
        let masks = if adapter.is_some() {
            vec![LayerMask::all(), LayerMask::keep_through(1), LayerMask::none()]
        } else {
            vec![LayerMask::all()]
        };
        for mask in masks {
            let max_new = 24;
            let eos = varied_eos(&model, &prompts, max_new, &mask);
            let cfg = GenerationConfig { max_new_tokens: max_new, eos_token_ids: eos, ..Default::default() };
            let before = kernels::fused_decode_steps();
            let distinct = check(&model, &prompts, &cfg, &mask, &format!("{base} {mask}"));
            assert!(distinct >= 3, "{base} {mask}: rows should finish at different steps ({distinct} lengths)");
            if kernels::enabled() {
                assert!(kernels::fused_decode_steps() > before, "{base}: the ragged steps did not run fused");
            }
            // Budgets of one token (every row done at its prefill) and of a few.
            for max_new in [1, 3] {
                let cfg = GenerationConfig { max_new_tokens: max_new, ..cfg.clone() };
                check(&model, &prompts, &cfg, &mask, &format!("{base} {mask} max_new {max_new}"));
            }
        }
    }
}

/// Prompts that share their first 12 tokens (a system prompt, an instruction): the prefix is prefilled once and
/// each prefill computes only the rest, after it (one prompt is the prefix and a single token). Greedy tokens
/// still equal one-by-one generation, on the fused and the libtorch decode paths, with LoRA masks and Gemma 3's
/// sliding window (4, shorter than the prefix).
#[test]
fn a_shared_prefix_is_prefilled_once_and_changes_nothing() {
    let _serial = serial();
    let _g = lora_model::tch::no_grad_guard();
    let head: Vec<i64> = (0..12).map(|i| 5 + 17 * i % 200).collect();
    let mut prompts: Vec<Vec<i64>> = prompts().into_iter().map(|p| head.iter().copied().chain(p).collect()).collect();
    prompts.push(head.iter().copied().chain([9]).collect());
    for (base, adapter) in [("tiny-llama", "tiny-llama-rslora-patterns"), ("tiny-gemma3", "tiny-gemma3-patterns")] {
        let model = load(base, Some(adapter));
        for mask in [LayerMask::all(), LayerMask::keep_through(1)] {
            let eos = varied_eos(&model, &prompts, 16, &mask);
            let cfg = GenerationConfig { max_new_tokens: 16, eos_token_ids: eos, ..Default::default() };
            let (_, timing) = generate_stream(&model, None, &prompts, &cfg, &mask, 4, |_, _| {}).unwrap();
            assert_eq!(timing.shared_prefix_tokens, 12, "{base} {mask}: the shared prefix was not used");
            let distinct = check(&model, &prompts, &cfg, &mask, &format!("{base} {mask} shared prefix"));
            assert!(distinct >= 3, "{base} {mask}: rows should finish at different steps ({distinct} lengths)");
        }
    }
    // One prompt alone, or prompts sharing fewer than MIN_SHARED_PREFIX tokens, take the plain path.
    let model = load("tiny-llama", None);
    let cfg = GenerationConfig { max_new_tokens: 4, ..Default::default() };
    let (_, alone) = generate(&model, None, &prompts[..1], &cfg, &LayerMask::all()).unwrap();
    assert_eq!(alone.shared_prefix_tokens, 0);
    let few_head = &head[..lora_model::MIN_SHARED_PREFIX - 1];
    let short: Vec<Vec<i64>> = prompts.iter().map(|p| few_head.iter().chain(&p[12..]).copied().collect()).collect();
    let (_, few) = generate(&model, None, &short, &cfg, &LayerMask::all()).unwrap();
    assert_eq!(few.shared_prefix_tokens, 0);
}

/// The libtorch path of the ragged cache (kernels off: every step, at every row count) gives the same tokens.
#[test]
fn greedy_equals_one_by_one_on_the_libtorch_path() {
    let _serial = serial();
    let _g = lora_model::tch::no_grad_guard();
    let prompts = prompts();
    for (base, adapter) in [("tiny-llama", Some("tiny-llama-basic")), ("tiny-gemma3", Some("tiny-gemma3-patterns"))] {
        let model = load(base, adapter);
        let mask = LayerMask::keep_through(2);
        let eos = varied_eos(&model, &prompts, 20, &mask);
        let cfg = GenerationConfig { max_new_tokens: 20, eos_token_ids: eos, ..Default::default() };
        let expected = alone(&model, &prompts, &cfg, &mask);
        let was = kernels::set_enabled(false);
        let before = kernels::fused_decode_steps();
        let got = generate_stream(&model, None, &prompts, &cfg, &mask, 3, |_, _| {});
        let fused = kernels::fused_decode_steps() - before;
        kernels::set_enabled(was);
        let (got, _) = got.unwrap();
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(&g.token_ids, e, "{base} libtorch path: prompt {i}");
        }
        assert_eq!(fused, 0, "{base}: fused steps with the kernels off");
    }
}

/// A row installed into a used cache sees none of the old row's keys: its logits equal its uncached forward.
#[test]
fn an_installed_row_attends_only_to_its_own_keys() {
    let _serial = serial();
    let _g = lora_model::tch::no_grad_guard();
    let model = load("tiny-llama", Some("tiny-llama-basic"));
    let all = LayerMask::all();
    let opts = ForwardOptions { logits: Logits::Last, ..ForwardOptions::new(&all) };
    let long: Vec<i64> = (0..12).map(|i| 10 + i).collect();
    let short = vec![7i64, 8, 9];
    // Two rows of the long prompt, decoded a few steps.
    let ids = Tensor::from_slice(&[long.clone(), long.clone()].concat()).view([2, 12]);
    let mut cache = model.new_cache(2, 20).unwrap();
    model.forward_cached(&ids, None, &mut cache, &opts).unwrap();
    for _ in 0..3 {
        model.forward_cached(&Tensor::from_slice(&[5i64, 5]).view([2, 1]), None, &mut cache, &opts).unwrap();
    }
    // Row 1 becomes the short prompt, prefilled left-padded beside a longer one.
    let group = Tensor::from_slice(&[0i64, 0, 7, 8, 9, 1, 2, 3, 4, 6]).view([2, 5]);
    let att = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1]).view([2, 5]);
    let mut side = model.new_cache(2, 5).unwrap();
    model.forward_cached(&group, Some(&att), &mut side, &opts).unwrap();
    cache.install_row(1, &side, 0, 2, 3).unwrap();
    assert!(cache.is_ragged());
    assert_eq!((cache.row_len(0), cache.row_len(1), cache.row_len(2)), (Some(15), Some(3), None));
    for kernels_on in [true, false] {
        let was = kernels::set_enabled(kernels_on);
        let mut c = model.new_cache(2, 20).unwrap();
        c.install_row(0, &cache, 0, 0, 15).unwrap();
        c.install_row(1, &cache, 1, 0, 3).unwrap();
        let out = model.forward_cached(&Tensor::from_slice(&[5i64, 42]).view([2, 1]), None, &mut c, &opts);
        kernels::set_enabled(was);
        let step = out.unwrap().logits.unwrap();
        let mut seq = short.clone();
        seq.push(42);
        let full = model.forward(&Tensor::from_slice(&seq).view([1, 4]), None, &opts).unwrap().logits.unwrap();
        let d = (step.get(1) - full.get(0)).abs().max().double_value(&[]);
        assert!(d < 1e-4, "kernels {kernels_on}: the new row's logits differ from its own forward by {d}");
        let mut seq = long.clone();
        seq.extend([5, 5, 5, 5]);
        let full = model.forward(&Tensor::from_slice(&seq).view([1, 16]), None, &opts).unwrap().logits.unwrap();
        let d = (step.get(0) - full.get(0)).abs().max().double_value(&[]);
        assert!(d < 1e-4, "kernels {kernels_on}: the old row's logits differ from its own forward by {d}");
        assert_eq!((c.row_len(0), c.row_len(1)), (Some(16), Some(4)));
    }
    // Bad requests are errors, not panics.
    assert!(cache.install_row(2, &side, 0, 0, 3).is_err());
    assert!(cache.install_row(0, &side, 0, 3, 3).is_err());
    assert!(cache.retain_rows(&[]).is_err());
    assert!(cache.retain_rows(&[5]).is_err());
    let err = model.forward_cached(&group, None, &mut cache, &opts).unwrap_err();
    assert!(err.to_string().contains("one token per row"), "{err}");
    cache.retain_rows(&[1]).unwrap();
    assert_eq!((cache.rows(), cache.row_len(0)), (1, Some(3)));
}

#[test]
fn seeded_sampling_does_not_depend_on_the_batch() {
    let _serial = serial();
    let _g = lora_model::tch::no_grad_guard();
    let prompts = prompts();
    let model = load("tiny-llama", Some("tiny-llama-basic"));
    let mask = LayerMask::all();
    let eos = varied_eos(&model, &prompts, 16, &mask);
    let cfg = GenerationConfig {
        max_new_tokens: 16,
        eos_token_ids: eos,
        sampling: Sampling::Sample { temperature: 1.3, top_p: 0.95, seed: 7 },
        ..Default::default()
    };
    let (reference, _) = generate_stream(&model, None, &prompts, &cfg, &mask, 1, |_, _| {}).unwrap();
    for batch in [2usize, 3, 8, 14] {
        let (got, _) = generate_stream(&model, None, &prompts, &cfg, &mask, batch, |_, _| {}).unwrap();
        assert_eq!(got, reference, "batch {batch}");
    }
    // Not the greedy tokens, and a different seed gives different streams.
    let greedy = GenerationConfig { sampling: Sampling::Greedy, ..cfg.clone() };
    let (g, _) = generate_stream(&model, None, &prompts, &greedy, &mask, 4, |_, _| {}).unwrap();
    assert_ne!(g, reference);
    let other = GenerationConfig { sampling: Sampling::Sample { temperature: 1.3, top_p: 0.95, seed: 8 }, ..cfg };
    let (o, _) = generate_stream(&model, None, &prompts, &other, &mask, 4, |_, _| {}).unwrap();
    assert_ne!(o, reference);
}

#[test]
fn bad_arguments_are_errors() {
    let _serial = serial();
    let model = load("tiny-llama", None);
    let cfg = GenerationConfig { max_new_tokens: 4, ..Default::default() };
    let all = LayerMask::all();
    let err = generate_stream(&model, None, &[vec![1, 2]], &cfg, &all, 0, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("batch size"), "{err}");
    let err = generate_stream(&model, None, &[vec![1, 2], vec![]], &cfg, &all, 2, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("prompt 1"), "{err}");
    let (none, _) = generate_stream(&model, None, &[], &cfg, &all, 2, |_, _| {}).unwrap();
    assert!(none.is_empty());
    let zero = GenerationConfig { max_new_tokens: 0, ..cfg };
    let (z, _) = generate_stream(&model, None, &[vec![1, 2], vec![3]], &zero, &all, 1, |_, _| {}).unwrap();
    assert!(z.iter().all(|g| g.token_ids.is_empty()));
}

/// SmolLM2-135M-Instruct (GGUF) with the committed E2E adapter, chat prompts of E2E meaning representations, EOS
/// from the tokenizer: batched continuously equals one by one under full LoRA and LoRA on blocks 0-14.
#[test]
fn smollm2_with_the_e2e_adapter_equals_one_by_one() {
    let Some(path) = common::smollm2_gguf() else { return };
    let _serial = serial();
    let _g = lora_model::tch::no_grad_guard();
    let mut model = Llama::load(&path, Placement::default()).unwrap();
    load_adapter(&mut model, common::root().join("adapters/smollm2-e2e-r8")).unwrap();
    let tk = gguf_tokenizer_for(&path).unwrap();
    let mrs = [
        "name[The Eagle], eatType[coffee shop], food[Japanese], priceRange[less than £20], customerRating[low], \
         area[riverside], familyFriendly[yes], near[Burger King]",
        "name[Zizzi], eatType[pub]",
        "name[The Punter], food[Indian], priceRange[cheap]",
        "name[Blue Spice], eatType[restaurant], food[Chinese], area[city centre], familyFriendly[no], near[Rainbow \
         Vegetarian Café]",
        "name[Aromi], eatType[coffee shop], customer rating[5 out of 5]",
    ];
    let prompts: Vec<Vec<i64>> =
        mrs.iter().map(|m| tk.encode_prompt(&format!("Describe: {m}"), &PromptFormat::chat()).unwrap()).collect();
    let cfg = GenerationConfig { max_new_tokens: 20, eos_token_ids: tk.eos_token_ids().to_vec(), ..Default::default() };
    for mask in [LayerMask::all(), LayerMask::keep_through(14)] {
        let expected: Vec<_> = prompts
            .iter()
            .map(|p| generate(&model, Some(&tk), std::slice::from_ref(p), &cfg, &mask).unwrap().0.remove(0))
            .collect();
        for batch in [2usize, 8] {
            let (got, _) = generate_stream(&model, Some(&tk), &prompts, &cfg, &mask, batch, |_, _| {}).unwrap();
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                assert_eq!(g.token_ids, e.token_ids, "{mask} batch {batch}: prompt {i}");
                assert_eq!(g.text, e.text, "{mask} batch {batch}: prompt {i}");
            }
        }
    }
}
