#!/usr/bin/env bash
# The README's test command: set-up (idempotent), then every test of the workspace.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# Gemma 3 270M (docs/models.md); its tests skip with a printed reason when it cannot be fetched.
bash scripts/fetch-gemma3.sh || echo "test: models/gemma-3-270m-q4_k_m.gguf not fetched; the Gemma 3 tests will skip" >&2
cargo test --workspace --all-targets "$@"
cargo test --workspace --doc "$@"
