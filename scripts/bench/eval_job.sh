#!/usr/bin/env bash
# The evaluation job of issue #19, this tool beside transformers + PEFT in one run (a development command, not a
# test): SmolLM2-135M-Instruct (the project's GGUF, f32) with the committed E2E adapter, the first 24 E2E test MRs,
# chat template, greedy, at most 40 new tokens, batch 8, under the masks all, 0-14 and none.
#
#   bash scripts/bench/eval_job.sh [--limit N] [--max-new-tokens N] [--pairs N] [--dry-run] [--ours-only]
#
# Ours: `lora-boundary eval` in release (continuous batching, at most 8 rows at a time). Reference:
# scripts/bench/peft_eval_job.py with the reference venv's python (PY, default /work/main/.venv-ref/bin/python, else
# .venv-ref/bin/python; scripts/fixtures/model/setup_venv.sh makes it): static left-padded batches of 8 in
# transformers' generate, the 0-14 mask by PEFT's per-layer enable_adapters(False) above block 14, none by
# disable_adapter(). Each side runs as its own process; the wall time of each process is measured here (ours
# includes loading; transformers' is also given without its `import torch, transformers, peft`, which the Python
# side reports). Prints the CPU model and flags, both times, the ratio, and how many predictions agree per mask.
# --pairs N runs the two sides N times, alternating which goes first, and prints each pair's ratio and their
# median (this VM's speed drifts by ±10-40 % over minutes, so one pair can mislead; default 1).
# --dry-run prints the commands without running them. Run it on a quiet machine: the ratio is the figure to quote.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
limit=24
new=40
dry=0
ours_only=0
pairs=1
while [ $# -gt 0 ]; do
  case "$1" in
    --limit) limit="$2"; shift 2 ;;
    --max-new-tokens) new="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --ours-only) ours_only=1; shift ;;
    --pairs) pairs="$2"; shift 2 ;;
    *) echo "eval_job.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$pairs" in
  '' | *[!0-9]* | 0) echo "eval_job.sh: --pairs takes a positive integer, got '$pairs'" >&2; exit 2 ;;
esac
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
if [ "$ours_only" = 1 ]; then
  t0="$(now)"
  "${ours[@]}" > "$tmp/ours.json"
  t1="$(now)"
  echo "ours: $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s wall"
  cat "$tmp/ours.json"
  exit 0
fi
# Each pair runs both sides back to back, ours first in odd pairs and transformers first in even ones (whichever
# runs second finds warmer caches); every pair gives its own ratio.
: > "$tmp/times"
for ((i = 1; i <= pairs; i++)); do
  order=(ours theirs)
  [ $((i % 2)) = 0 ] && order=(theirs ours)
  for side in "${order[@]}"; do
    t0="$(now)"
    if [ "$side" = ours ]; then "${ours[@]}" > "$tmp/ours.json"; else "${theirs[@]}" > "$tmp/theirs.json"; fi
    t1="$(now)"
    echo "$i $side $t0 $t1 $(if [ "$side" = theirs ]; then "$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["import_s"])' "$tmp/theirs.json"; else echo 0; fi)" >> "$tmp/times"
    echo "pair $i: $side $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s wall" >&2
  done
done
"$py" - "$tmp/times" "$tmp/ours.json" "$tmp/theirs.json" <<'PY'
import json, statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
ours, theirs = (json.load(open(p)) for p in sys.argv[2:4])
pairs = {}
for i, side, a, b, imp in rows:
    pairs.setdefault(int(i), {})[side] = (float(b) - float(a), float(imp))
ratios, ratios_job = [], []
for i in sorted(pairs):
    o, (t, imp) = pairs[i]["ours"][0], pairs[i]["theirs"]
    ratios.append(t / o)
    ratios_job.append((t - imp) / o)
    first = "ours" if i % 2 else "transformers"
    print(f"pair {i} ({first} first): ours {o:.2f} s wall, transformers+PEFT {t:.2f} s wall "
          f"({t - imp:.2f} s without importing torch/transformers/peft): {t / o:.2f}x wall, {(t - imp) / o:.2f}x")
print(f"last transformers run: load {theirs['load_s']:.2f} s, generate {theirs['generate_s']:.2f} s, "
      f"{theirs['threads']} threads")
print(f"ratio transformers / ours over {len(ratios)} pair(s): median {statistics.median(ratios):.2f}x wall "
      f"(min {min(ratios):.2f}x), {statistics.median(ratios_job):.2f}x without the imports")
for r_o, r_t in zip(ours["results"], theirs["results"]):
    po, pt = r_o.get("predictions", []), r_t["predictions"]
    same = sum(a == b for a, b in zip(po, pt))
    print(f"mask {r_o['mask']:>6} / {r_t['mask']:>5}: {same}/{len(pt)} predictions identical, "
          f"ours {ours['metric']} {r_o['score']:.4f}")
PY
