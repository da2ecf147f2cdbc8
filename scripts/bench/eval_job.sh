#!/usr/bin/env bash
# The evaluation job of issue #19, this tool beside transformers + PEFT in one run (a development command, not a
# test): SmolLM2-135M-Instruct (the project's GGUF, f32) with the committed E2E adapter, the first 24 E2E test MRs,
# chat template, greedy, at most 40 new tokens, batch 8, under the masks all, 0-14 and none.
#
#   bash scripts/bench/eval_job.sh [--limit N] [--max-new-tokens N] [--dry-run] [--ours-only]
#
# Ours: `lora-boundary eval` in release (continuous batching, at most 8 rows at a time). Reference:
# scripts/bench/peft_eval_job.py with the reference venv's python (PY, default /work/main/.venv-ref/bin/python, else
# .venv-ref/bin/python; scripts/fixtures/model/setup_venv.sh makes it): static left-padded batches of 8 in
# transformers' generate, the 0-14 mask by PEFT's per-layer enable_adapters(False) above block 14, none by
# disable_adapter(). Each side runs as its own process; the wall time of each process is measured here (ours
# includes loading; transformers' is also given without its `import torch, transformers, peft`, which the Python
# side reports). Prints the CPU model and flags, both times, the ratio, and how many predictions agree per mask.
# --dry-run prints the commands without running them. Run it on a quiet machine: the ratio is the figure to quote.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
limit=24
new=40
dry=0
ours_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --limit) limit="$2"; shift 2 ;;
    --max-new-tokens) new="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --ours-only) ours_only=1; shift ;;
    *) echo "eval_job.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
# shellcheck source=ref_python.sh
source "$root/scripts/bench/ref_python.sh"
bin="${CARGO_TARGET_DIR:-$root/target}/release/lora-boundary"
ours=("$bin" eval --adapter adapters/smollm2-e2e-r8 --data data/e2e_nlg/testset_w_refs.csv --task e2e --chat
  --mask all --mask 0-14 --mask none --limit "$limit" --max-new-tokens "$new" --batch-size 8 --dtype f32
  --format json)
theirs=("$py" scripts/bench/peft_eval_job.py --limit "$limit" --max-new-tokens "$new" --batch-size 8)

cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
flags="$(grep -m1 -o -w -E 'avx2|fma|avx512f|avx512_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ' || true)"
echo "# $cpu; $(nproc) cores; flags: $flags"
if [ "$dry" = 1 ]; then
  echo "cargo build -q --release -p lora-boundary --bin lora-boundary"
  echo "${ours[*]}"
  [ "$ours_only" = 1 ] || echo "${theirs[*]}"
  exit 0
fi
if [ "$ours_only" = 0 ] && { [ -z "$py" ] || [ ! -x "$py" ]; }; then
  echo "eval_job.sh: no reference python (set PY, or run scripts/fixtures/model/setup_venv.sh); --ours-only skips it" >&2
  exit 2
fi
cargo build -q --release -p lora-boundary --bin lora-boundary
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
now() { date +%s.%N; }
t0="$(now)"
"${ours[@]}" > "$tmp/ours.json"
t1="$(now)"
echo "ours: $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s wall"
if [ "$ours_only" = 1 ]; then
  cat "$tmp/ours.json"
  exit 0
fi
t2="$(now)"
"${theirs[@]}" > "$tmp/theirs.json"
t3="$(now)"
"$py" - "$t0" "$t1" "$t2" "$t3" "$tmp/ours.json" "$tmp/theirs.json" <<'PY'
import json, sys
t0, t1, t2, t3 = map(float, sys.argv[1:5])
ours, theirs = (json.load(open(p)) for p in sys.argv[5:7])
o, t = t1 - t0, t3 - t2
t_job = t - theirs["import_s"]
print(f"ours (lora-boundary eval, release, f32): {o:.2f} s wall")
print(f"transformers+PEFT: {t:.2f} s wall ({t_job:.2f} s without importing torch/transformers/peft; "
      f"load {theirs['load_s']:.2f} s, generate {theirs['generate_s']:.2f} s, {theirs['threads']} threads)")
print(f"ratio transformers / ours: {t / o:.2f}x wall, {t_job / o:.2f}x without the imports")
for r_o, r_t in zip(ours["results"], theirs["results"]):
    po, pt = r_o.get("predictions", []), r_t["predictions"]
    same = sum(a == b for a, b in zip(po, pt))
    print(f"mask {r_o['mask']:>6} / {r_t['mask']:>5}: {same}/{len(pt)} predictions identical, "
          f"ours {ours['metric']} {r_o['score']:.4f}")
PY
