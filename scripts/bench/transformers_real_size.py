"""Time to first token, peak RSS and decode speed of an HF checkpoint in transformers (the reference beside
`cargo run --release --example real_size -- report`). A development script: run by scripts/bench/real_size.sh,
never by the library or tests.

usage: transformers_real_size.py MODEL_DIR PROMPT_IDS(comma-separated) NEW_TOKENS
Prints one JSON line. Times start after `import torch, transformers` (reported separately as import_s).
"""
import json
import resource
import sys
import time

t_import = time.perf_counter()
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import_s = time.perf_counter() - t_import


def main():
    model_dir, ids, new_tokens = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3])
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    load_s = time.perf_counter() - t0
    input_ids = torch.tensor([ids])
    common = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    out = model.generate(input_ids, max_new_tokens=1, min_new_tokens=1, **common)
    first_token_s = time.perf_counter() - t0
    # Decode speed, warm: (N + 1 tokens) - (1 token), both timed after the first call.
    t1 = time.perf_counter()
    model.generate(input_ids, max_new_tokens=1, min_new_tokens=1, **common)
    one = time.perf_counter() - t1
    t2 = time.perf_counter()
    model.generate(input_ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **common)
    many = time.perf_counter() - t2
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "impl": "transformers", "dtype": str(model.dtype), "import_s": import_s, "load_s": load_s,
        "first_token_s": first_token_s, "first_token": int(out[0, -1]), "weight_bytes": weight_bytes,
        "peak_rss": peak, "peak_rss_over_weight_bytes": peak / weight_bytes,
        # NaN when timing noise makes the longer call no slower than the one-token call.
        "decode_tokens_per_s": new_tokens / (many - one) if many > one else float("nan"),
        "threads": torch.get_num_threads(),
    }))


main()
