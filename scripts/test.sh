#!/usr/bin/env bash
# The README's test command: set-up (idempotent), then every test of the workspace.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
cargo test --workspace --all-targets "$@"
cargo test --workspace --doc "$@"
