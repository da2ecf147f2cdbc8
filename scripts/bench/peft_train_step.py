"""One LoRA training step in PEFT + torch: the reference beside `cargo run --release --example train_step` in
scripts/bench/train_step.sh (issue #19 item 5). A development script (run with the reference venv's python), never
used by the library, the CLI or the tests.

The step: SmolLM2-135M-Instruct from the project's GGUF (dequantized) in f32 or bf16, a fresh PEFT LoRA of rank 16
(alpha 32, no dropout) on all seven projections of every block, a batch of 4 rows x 128 random tokens (every
position but the first is a label), forward, loss, backward, global gradient-norm clipping at 1.0, AdamW (lr 2e-4)
and zero_grad: what `Trainer::accumulate` + `Trainer::apply_step` do. One warm-up step, then STEPS timed steps.

usage: peft_train_step.py [--dtype f32|bf16] [--steps 5] [--gguf models/SmolLM2-135M-Instruct.Q4_1.gguf]
Prints one JSON object: dtype, threads, the median and every step's seconds.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GgufConfig

ROOT = Path(__file__).resolve().parents[2]
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--gguf", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    args = ap.parse_args()
    gguf = ROOT / args.gguf
    dtype = torch.float32 if args.dtype == "f32" else torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=dtype,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True))
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=MODULES, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (4, 128), generator=g)
    labels = ids.clone()
    labels[:, 0] = -100
    mask = torch.ones_like(ids)
    times = []
    for step in range(args.steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            times.append(time.perf_counter() - t)
    print(json.dumps({"dtype": args.dtype, "threads": torch.get_num_threads(), "median_s": statistics.median(times),
                      "steps_s": times, "loss": float(loss)}))


if __name__ == "__main__":
    main()
