#!/usr/bin/env bash
# The CUDA build (#20): the workspace's CLI, the real_size example and the CUDA tests, built in release against a
# CUDA libtorch (PyPI torch==2.11.0 with its CUDA dependencies, made by `scripts/setup.sh --cuda` in .venv-cuda),
# stripped and staged in gpu-bundle/ (git-ignored) for scripts/gpu-check.sh to run on a GPU machine.
#
#   bash scripts/gpu-build.sh              # one command: CUDA libtorch (set-up, idempotent), build, stage
#   bash scripts/gpu-build.sh --workspace  # the same, after building every target of the workspace against it
#
# Environment: LIBTORCH_CUDA=<torch dir> uses another CUDA libtorch 2.11.0 instead of .venv-cuda's (its lib/ must
# hold libtorch_cuda.so); CARGO_TARGET_DIR (default target-cuda/, kept apart from the CPU build's target/);
# GPU_BUNDLE (default gpu-bundle/). The ordinary CPU-only build is untouched: it is `cargo build` with neither
# LORA_BOUNDARY_CUDA=1 nor this libtorch.
#
# The binaries find libtorch through their RUNPATH here, and through LD_LIBRARY_PATH on another machine
# (scripts/gpu-check.sh sets it to that machine's torch/lib). Without a GPU they run on the CPU and the CUDA tests
# print `skipped: no CUDA device (...)`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
workspace=0
case "${1:-}" in
  --workspace) workspace=1 ;;
  "") ;;
  *) echo "usage: scripts/gpu-build.sh [--workspace]" >&2; exit 2 ;;
esac

torch="${LIBTORCH_CUDA:-}"
if [ -z "$torch" ]; then
  bash scripts/setup.sh --cuda
  torch="$(ls -d "$root"/.venv-cuda/lib/python3*/site-packages/torch 2>/dev/null | head -n 1)"
fi
if [ ! -f "$torch/lib/libtorch_cuda.so" ]; then
  echo "gpu-build: ${torch:-<none>}/lib/libtorch_cuda.so not found: not a CUDA libtorch" >&2
  exit 1
fi
version="$(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$torch/version.py" 2>/dev/null || true)"
case "$version" in
  2.11.0*) ;;
  *) echo "gpu-build: $torch is torch ${version:-of unknown version}; tch 0.24 needs 2.11.0" >&2; exit 1 ;;
esac

export LIBTORCH="$torch" LORA_BOUNDARY_CUDA=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target-cuda}"
bundle="${GPU_BUNDLE:-$root/gpu-bundle}"
echo "gpu-build: libtorch $version at $LIBTORCH, target $CARGO_TARGET_DIR" >&2

[ "$workspace" = 1 ] && cargo build --release --workspace --all-targets
cargo build --release -p lora-boundary --bin lora-boundary
cargo build --release -p lora-boundary-workspace --example real_size
tests="$(cargo test --release -p lora-boundary --test cuda --no-run --message-format=json \
  | grep -o '"executable":"[^"]*/cuda-[0-9a-f]*"' | tail -n 1 | sed 's/^"executable":"//; s/"$//')"
if [ -z "$tests" ] || [ ! -x "$tests" ]; then
  echo "gpu-build: the CUDA test binary was not found in cargo's output" >&2
  exit 1
fi

split_tests="$(cargo test --release -p lora-model --test device_map --no-run --message-format=json \
  | grep -o '"executable":"[^"]*/device_map-[0-9a-f]*"' | tail -n 1 | sed 's/^"executable":"//; s/"$//')"
if [ -z "$split_tests" ] || [ ! -x "$split_tests" ]; then
  echo "gpu-build: the device-map test binary was not found in cargo's output" >&2
  exit 1
fi

stage="$bundle.part"
rm -rf "$stage"
mkdir -p "$stage/bin"
cp "$CARGO_TARGET_DIR/release/lora-boundary" "$stage/bin/lora-boundary"
cp "$CARGO_TARGET_DIR/release/examples/real_size" "$stage/bin/real_size"
cp "$tests" "$stage/bin/cuda-tests"
cp "$split_tests" "$stage/bin/device-map-tests"
for b in "$stage"/bin/*; do
  strip --strip-unneeded "$b"
  if ! readelf -d "$b" | grep -q 'NEEDED.*\[libtorch_cuda\.so\]'; then
    echo "gpu-build: $(basename "$b") does not need libtorch_cuda.so (was LORA_BOUNDARY_CUDA=1 seen by build/rpath.rs?)" >&2
    exit 1
  fi
done

# What the binaries need from the machine that runs them: its glibc and libstdc++ must be at least these.
max_ver() { objdump -T "$stage"/bin/* | grep -o "$1_[0-9.]*" | sort -u -V | tail -n 1; }
{
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo '+changes')"
  echo "libtorch: $version ($LIBTORCH)"
  echo "needs: $(max_ver GLIBC), $(max_ver GLIBCXX)"
  echo "libraries: $(readelf -d "$stage/bin/cuda-tests" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
  (cd "$stage/bin" && ls -l --block-size=K | tail -n +2 | awk '{print "size: " $NF " " $5}')
} > "$stage/MANIFEST"

total_kib="$(du -sk "$stage" | cut -f1)"
if [ "$total_kib" -gt $((60 * 1024)) ]; then
  echo "gpu-build: the bundle is ${total_kib} KiB; the device runner carries at most 64 MiB" >&2
  exit 1
fi
rm -rf "$bundle"
mv "$stage" "$bundle"
cat "$bundle/MANIFEST"
echo "gpu-build: $bundle ready (${total_kib} KiB); on the GPU machine: bash scripts/gpu-check.sh" >&2
