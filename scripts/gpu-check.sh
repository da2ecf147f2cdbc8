#!/usr/bin/env bash
# The GPU check (#20), run on a GPU machine from the bundle scripts/gpu-build.sh stages (no Rust toolchain and no
# network needed there):
#   1. the CUDA tests (tiny fixtures: CUDA vs CPU and the references);
#   2. an 8B-shaped bf16 checkpoint (Llama-3.1-8B shapes, random weights), made there by `real_size make` on the GPU;
#   3. a random r = 16 PEFT adapter on all seven projections (`real_size adapter`), pruned to blocks 0-15 by
#      `lora-boundary prune`;
#   4. batch-1 decode of base / full LoRA / LoRA 0-15 / merged with lora-boundary (`real_size bench`);
#   5. the same in PEFT + transformers (scripts/gpu/peft_decode.py with the machine's python; a `skipped:` line
#      where torch/transformers/peft are missing);
#   6. `generate --device cuda:0,cpu` (multi-device placement by free memory);
# then a summary. Every phase has its own time limit and the whole stays within GPU_CHECK_BUDGET_S (default 470 s,
# under 8 minutes); a phase the budget no longer allows is reported as not run.
#
#   bash scripts/gpu-check.sh             # on the GPU machine (device runner: carry gpu-bundle)
#   bash scripts/gpu-check.sh --dry-run   # anywhere: CPU, the tiny shape, the same phases (checks this script)
#
# Environment: TORCH_VENV (default /opt/torch/.venv; --dry-run: .venv-ref, else .venv) supplies libtorch via
# LD_LIBRARY_PATH (its torch/lib and nvidia/*/lib) and the python for step 5; GPU_BUNDLE (default gpu-bundle/);
# GPU_WORK (default /tmp/lora-boundary-gpu-check; a complete checkpoint there is reused); GPU_CHECK_BUDGET_S.
# Exit status: 0 when no phase failed or ran out of time (skips are not failures), else 1.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: scripts/gpu-check.sh [--dry-run]" >&2; exit 2 ;;
esac

bundle="${GPU_BUNDLE:-$root/gpu-bundle}"
budget="${GPU_CHECK_BUDGET_S:-470}"
if [ "$dry" = 1 ]; then
  device=cpu shape=tiny keep=1 tokens=16 rounds=1
  venv="${TORCH_VENV:-}"
  [ -n "$venv" ] || for v in "$root/.venv-ref" "$root/.venv"; do [ -d "$v" ] && venv="$v" && break; done
  work="${GPU_WORK:-/tmp/lora-boundary-gpu-check-dry}"
else
  device=cuda:0 shape=llama-3.1-8b keep=15 tokens=64 rounds=2
  venv="${TORCH_VENV:-/opt/torch/.venv}"
  work="${GPU_WORK:-/tmp/lora-boundary-gpu-check}"
fi
bin="$bundle/bin"
logs="$work/logs"
mkdir -p "$logs"
start=$SECONDS

site="$(ls -d "$venv"/lib/python3*/site-packages 2>/dev/null | head -n 1)"
libpath="$site/torch/lib"
for d in "$site"/nvidia/*/lib; do
  [ -d "$d" ] && libpath="$libpath:$d"
done
export LD_LIBRARY_PATH="$libpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LORA_BOUNDARY_HOME="$root"
python="$venv/bin/python"
model="$work/$shape"
adapter="$work/$shape-r16"
export root bin device shape keep tokens rounds dry python model adapter

phases=()
failed=0
# phase NAME CAP_S CMD...: runs CMD under the smaller of CAP_S and what is left of the budget, output shown and kept
# in $logs/NAME.log; records ok / failed / timed out / skipped (exit status 3 with a `skipped:` line).
phase() {
  local name="$1" cap="$2"
  shift 2
  local left=$((budget - (SECONDS - start)))
  if [ "$left" -lt 10 ]; then
    phases+=("| $name | not run (the ${budget} s budget is spent) | 0 |")
    failed=1
    return 1
  fi
  local limit=$((cap < left ? cap : left))
  local log="$logs/${name// /-}.log"
  echo
  echo "== $name (limit ${limit} s)"
  local t0=$SECONDS
  # A fresh bash runs the step (functions and settings are exported), so `timeout` can stop all of it.
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0)) status
  if [ "$rc" = 0 ]; then
    status=ok
    local skips
    skips="$(grep -c 'skipped: ' "$log")"
    [ "$skips" -gt 0 ] && status="ok, $skips line(s) \`skipped: ...\`"
  elif [ "$rc" = 3 ] && grep -q '^skipped: ' "$log"; then
    status="skipped: $(grep -m1 '^skipped: ' "$log" | cut -c10-)"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    status="TIMED OUT after ${limit} s"
    failed=1
  else
    status="FAILED (exit status $rc)"
    failed=1
  fi
  phases+=("| $name | $status | $took |")
  return "$rc"
}

# The steps that are more than one command; exported, since each phase runs in a fresh bash.
environment() {
  local missing
  missing="$(ldd "$bin/cuda-tests" "$bin/lora-boundary" "$bin/real_size" | grep 'not found' | sort -u)"
  if [ -n "$missing" ]; then
    echo "libraries not found (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):"
    echo "$missing"
    return 1
  fi
  ldd "$bin/cuda-tests" | grep -E 'libtorch_cuda|libc10_cuda|libcudart' || { echo "libtorch_cuda is not loaded"; return 1; }
  if [ -x "$python" ]; then
    "$python" -c 'import torch; print("python torch", torch.__version__, "cuda available:", torch.cuda.is_available())' \
      || echo "($python cannot import torch)"
  fi
}

# 2. The checkpoint (reused when a complete one is there).
make_model() {
  if [ -f "$model/model.safetensors.index.json" ]; then
    echo "reusing $model"
    return 0
  fi
  rm -rf "$model"
  "$bin/real_size" make --shape "$shape" --dtype bf16 --device "$device" --out "$model"
}

# 3. The r = 16 adapter on all seven projections, and its pruned copy.
make_adapters() {
  rm -rf "$adapter" "$adapter-pruned"
  "$bin/real_size" adapter --shape "$shape" --r 16 --out "$adapter" &&
    "$bin/lora-boundary" prune --adapter "$adapter" --keep-through "$keep" --out "$adapter-pruned"
}

# 5. PEFT + transformers with the machine's python.
peft_decode() {
  if [ ! -x "$python" ]; then
    echo "skipped: no python at $python for the PEFT comparison"
    return 3
  fi
  "$python" "$root/scripts/gpu/peft_decode.py" --model "$model" --adapter "$adapter" --pruned "$adapter-pruned" \
    --keep-through "$keep" --device "${device%%:*}" --dtype bf16 --tokens "$tokens" --rounds "$rounds"
}

# 6. `--device cuda:0,cpu` through the CLI: the 8B shape fits on one H200, so the plan keeps every block on cuda:0
# (the split itself is covered by the device-map tests above); a build that does not parse the flag is a skip.
multi_device() {
  local out rc
  out="$("$bin/lora-boundary" generate --model "$model" --device cuda:0,cpu --dtype bf16 --prompt "The capital of" \
    --max-new-tokens 4 2>&1)"
  rc=$?
  echo "$out"
  if [ "$rc" != 0 ] && echo "$out" | grep -qiE "unknown device|invalid value .*--device"; then
    echo "skipped: --device cuda:0,cpu is not supported by this build yet (multi-device placement pending)"
    return 3
  fi
  if [ "$rc" != 0 ] && [ "$dry" = 1 ] && echo "$out" | grep -q "not available"; then
    echo "skipped: dry run, no CUDA device for cuda:0,cpu"
    return 3
  fi
  return "$rc"
}

export -f environment make_model make_adapters peft_decode multi_device

echo "gpu-check: $([ "$dry" = 1 ] && echo 'DRY RUN (cpu, tiny shape)' || echo "$device, $shape"), bundle $bundle, work $work, budget ${budget} s"
cat "$bundle/MANIFEST" 2>/dev/null || { echo "gpu-check: $bundle/MANIFEST missing: run scripts/gpu-build.sh and carry gpu-bundle" >&2; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "machine: $(ldd --version 2>/dev/null | head -n 1); libtorch from ${site:-<none>}"

phase "libraries" 30 environment || { echo "gpu-check: the bundle cannot run here; stopping" >&2; }

if [ "$failed" = 0 ]; then
  # 1. CUDA tests; --nocapture shows each test's own notes (skip lines show either way).
  phase "CUDA tests" 150 "$bin/cuda-tests" --test-threads=1 --nocapture
  # Blocks split over cuda:0 + cpu on the tiny fixtures: logits and greedy tokens equal to the CPU.
  phase "cuda:0+cpu split tests" 60 "$bin/device-map-tests" --test-threads=1 --nocapture

  # 2. The 8B-shaped checkpoint.
  phase "make checkpoint" 180 make_model

  # 3. The adapters.
  phase "make adapter" 60 make_adapters

  # 4-5. Decode: lora-boundary, then PEFT + transformers.
  phase "decode lora-boundary" 150 "$bin/real_size" bench --model "$model" --adapter "$adapter" --device "$device" \
    --dtype bf16 --keep-through "$keep" --tokens "$tokens" --rounds "$rounds"
  phase "decode PEFT" 180 peft_decode

  # 6. PLACEHOLDER: multi-device placement (see multi_device above).
  phase "generate --device cuda:0,cpu" 60 multi_device
fi

echo
echo "## gpu-check summary ($([ "$dry" = 1 ] && echo "dry run: cpu, $shape" || echo "$device, $shape bf16, r = 16 on all seven projections"), $((SECONDS - start)) s of ${budget} s)"
echo
echo "| phase | result | seconds |"
echo "|---|---|---|"
printf '%s\n' "${phases[@]}"
echo
echo "| implementation | variant | dtype | device | load s | prefill s | decode tok/s | vs base | first tokens |"
echo "|---|---|---|---|---|---|---|---|---|"
cat "$logs/decode-lora-boundary.log" "$logs/decode-PEFT.log" 2>/dev/null | grep '^| ' || echo "(no decode rows)"
exit "$failed"
