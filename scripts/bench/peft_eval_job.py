"""The evaluation job of issue #19 in transformers + PEFT: the reference beside `lora-boundary eval` in
scripts/bench/eval_job.sh. A development script (run with the reference venv's python), never used by the library,
the CLI or the tests.

The job: the first LIMIT E2E test MRs (data/e2e_nlg/testset_w_refs.csv, MRs in first-seen order, as
`lora-boundary eval --task e2e` reads them), the chat template, greedy, at most NEW new tokens, batches of 8 prompts
left-padded, f32, SmolLM2-135M-Instruct from the project's GGUF (dequantized) with the committed E2E adapter, under
three masks: all (the adapter as loaded), 0-14 (LoRA layers of blocks 15.. disabled) and none (disable_adapter).

usage: peft_eval_job.py [--limit 24] [--max-new-tokens 40] [--batch-size 8] [--gguf models/...gguf]
                        [--adapter adapters/smollm2-e2e-r8] [--data data/e2e_nlg/testset_w_refs.csv]
Prints one JSON object: import_s, load_s, generate_s (all masks), job_s (load + generate), per-mask predictions.
"""
import argparse
import csv
import json
import re
import time
from pathlib import Path

t_import = time.perf_counter()
import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig  # noqa: E402

import_s = time.perf_counter() - t_import
ROOT = Path(__file__).resolve().parents[2]


def e2e_prompts(path, limit):
    """The task's prompts, as crates/lora-boundary/src/tasks.rs (`load_e2e`) builds them."""
    order, seen = [], set()
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            mr = row["mr"]
            if mr not in seen:
                seen.add(mr)
                order.append(mr)
    return [f"Describe this restaurant in one or two sentences from its attributes.\n{mr}" for mr in order[:limit]]


def set_lora_above(model, boundary, enabled):
    """Turns the LoRA layers of blocks > boundary on or off (PEFT's per-layer `enable_adapters`)."""
    n = 0
    for name, module in model.named_modules():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) > boundary and hasattr(module, "enable_adapters") and hasattr(module, "lora_A"):
            module.enable_adapters(enabled)
            n += 1
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--gguf", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--adapter", default="adapters/smollm2-e2e-r8")
    ap.add_argument("--data", default="data/e2e_nlg/testset_w_refs.csv")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    gguf = ROOT / args.gguf

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    base = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True))
    model = PeftModel.from_pretrained(base, str(ROOT / args.adapter)).eval()
    load_s = time.perf_counter() - t0

    prompts = e2e_prompts(ROOT / args.data, args.limit)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    tok.padding_side = "left"
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos

    def run():
        out = []
        for i in range(0, len(texts), args.batch_size):
            enc = tok(texts[i:i + args.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=pad)
            new = gen[:, enc["input_ids"].shape[1]:]
            out.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
        return out

    results = {}
    t1 = time.perf_counter()
    results["all"] = run()
    disabled = set_lora_above(model, 14, False)
    results["0-14"] = run()
    set_lora_above(model, 14, True)
    with model.disable_adapter():
        results["none"] = run()
    generate_s = time.perf_counter() - t1
    print(json.dumps({
        "impl": "transformers+peft", "import_s": import_s, "load_s": load_s, "generate_s": generate_s,
        "job_s": load_s + generate_s, "threads": torch.get_num_threads(), "n": len(prompts),
        "lora_layers_disabled_for_0_14": disabled, "eos_token_id": eos, "pad_token_id": pad,
        "results": [{"mask": m, "predictions": p} for m, p in results.items()],
    }))


main()
