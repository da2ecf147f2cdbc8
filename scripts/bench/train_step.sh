#!/usr/bin/env bash
# Issue #19 item 5: one LoRA training step (SmolLM2-135M-Instruct, r = 16 on all seven projections, batch 4 x 128
# tokens, clipping, AdamW) in this tool (`examples/train_step.rs`) beside PEFT + torch
# (`scripts/bench/peft_train_step.py`, the reference venv's python), f32 then bf16, each side in its own process,
# ours first. A development command, not a test; run it on a quiet machine.
#
#   bash scripts/bench/train_step.sh [--steps 5]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
steps=5
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    *) echo "train_step.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
# shellcheck source=ref_python.sh
source "$root/scripts/bench/ref_python.sh"
if [ -z "$py" ] || [ ! -x "$py" ]; then
  echo "train_step.sh: no reference python (set PY, or run scripts/fixtures/model/setup_venv.sh)" >&2
  exit 2
fi
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $(nproc) cores"
cargo build -q --release --example train_step
bin="${CARGO_TARGET_DIR:-$root/target}/release/examples/train_step"
for dtype in f32 bf16; do
  ours="$("$bin" --dtype "$dtype" --steps "$steps")"
  theirs="$("$py" scripts/bench/peft_train_step.py --dtype "$dtype" --steps "$steps" 2>/dev/null | tail -1)"
  "$py" - "$ours" "$theirs" <<'PY'
import json, sys
o, t = (json.loads(a) for a in sys.argv[1:3])
print(f"{o['dtype']}: ours {o['median_s']:.3f} s/step, PEFT + torch {t['median_s']:.3f} s/step "
      f"({t['threads']} threads): {t['median_s'] / o['median_s']:.2f}x")
PY
done
