#!/usr/bin/env python3
"""PEFT + transformers beside `real_size bench` (scripts/gpu-check.sh): the same checkpoint, the same adapter, the
same measurement, one Markdown row per variant in the same columns.

Variants: base (adapters disabled), full LoRA, LoRA pruned to blocks 0..=B (the adapter `lora-boundary prune` wrote,
loaded as a second PEFT adapter), merged (PEFT's merge_adapter, undone after). Measurement, as `generate` does it:
batch 1, the prompt ids 100..115, a cached prefill (timed alone), then greedy steps, each step's token read back to
the host; decode tokens/s = (tokens - 1) / time of the steps after the prefill. Median over interleaved rounds after
a warm-up.

A benchmark helper, never needed at run time. Exit status 3 (with a `skipped:` line) when torch, transformers or
peft cannot be imported.
"""
import argparse
import inspect
import statistics
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--pruned", required=True, help="the adapter pruned to blocks 0..=B")
    p.add_argument("--keep-through", type=int, required=True, help="B, for the row's label")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    if a.tokens < 2 or a.rounds < 1:
        p.error("--tokens must be at least 2 and --rounds at least 1")
    try:
        import torch
        import transformers
        import peft
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
    except ImportError as e:
        print(f"skipped: the PEFT comparison needs torch, transformers and peft in {sys.executable} ({e})")
        return 3

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"skipped: torch {torch.__version__} in {sys.executable} sees no CUDA device")
        return 3
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    # transformers 4.56+ takes `dtype`; earlier releases take only `torch_dtype` (and would keep an unknown `dtype`
    # as a config field, loading f32).
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    base = AutoModelForCausalLM.from_pretrained(a.model, **{key: dtype})
    base.to(device)
    loaded = next(base.parameters()).dtype
    if loaded != dtype:
        print(f"error: transformers {transformers.__version__} loaded {loaded}, not {dtype}", file=sys.stderr)
        return 1
    model = PeftModel.from_pretrained(base, a.adapter, adapter_name="full")
    model.load_adapter(a.pruned, adapter_name="pruned")
    model.eval()
    sync()
    load_s = time.perf_counter() - t0

    # transformers 5.2x names the KV cache `cache`; earlier releases `past_key_values`.
    cache_kw = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"

    def cache_of(out):
        return getattr(out, cache_kw)

    @torch.inference_mode()
    def decode(tokens):
        ids = torch.arange(100, 116, device=device).view(1, 16)
        sync()
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        sync()
        prefill_s = time.perf_counter() - t
        past, logits = cache_of(out), out.logits[:, -1]
        got = []
        t = time.perf_counter()
        for step in range(tokens):
            nxt = logits.argmax(-1, keepdim=True)
            got.append(int(nxt.item()))
            if step + 1 == tokens:
                break
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: past})
            past, logits = cache_of(out), out.logits[:, -1]
        decode_s = time.perf_counter() - t
        return (tokens - 1) / decode_s, prefill_s, got[:4]

    def run(variant, tokens):
        if variant == "base":
            with model.disable_adapter():
                return decode(tokens)
        model.set_adapter("pruned" if variant == "pruned" else "full")
        if variant == "merged":
            model.merge_adapter()
            try:
                return decode(tokens)
            finally:
                model.unmerge_adapter()
        return decode(tokens)

    variants = ["base", "full", "pruned", "merged"]
    labels = {"base": "base", "full": "full LoRA", "pruned": f"LoRA 0-{a.keep_through}", "merged": "merged"}
    run("full", 4)  # warm-up
    speeds = {v: [] for v in variants}
    prefill = {v: [] for v in variants}
    first = {}
    for _ in range(a.rounds):
        for v in variants:
            tps, pre, toks = run(v, a.tokens)
            speeds[v].append(tps)
            prefill[v].append(pre)
            first[v] = toks
    impl = f"peft {peft.__version__} + transformers {transformers.__version__}"
    dev = f"cuda:{device.index or 0}" if device.type == "cuda" else device.type
    base_tps = statistics.median(speeds["base"])
    for v in variants:
        s = statistics.median(speeds[v])
        print(
            f"| {impl} | {labels[v]} | {a.dtype} | {dev} | {load_s:.1f} | {statistics.median(prefill[v]):.3f} "
            f"| {s:.1f} | {(s / base_tps - 1) * 100:+.1f} % | {first[v]} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
