#!/usr/bin/env bash
# The README's main job: set-up (idempotent), then the quickstart example on the embedded default model.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
cargo run --release --example quickstart -- "$@"
