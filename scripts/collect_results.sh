#!/usr/bin/env bash
# Copies the reports and plots of `lora-boundary run configs/paper/<task>.toml` (in runs/paper/<task>/) into
# docs/results/<task>/, which docs/results.md links to. Usage: bash scripts/collect_results.sh [task ...]
set -euo pipefail
cd "$(dirname "$0")/.."
tasks=("$@")
[ ${#tasks[@]} -eq 0 ] && tasks=(e2e hotpotqa gsm8k scitldr)
for t in "${tasks[@]}"; do
  src="runs/paper/$t"
  if [ ! -f "$src/report.json" ]; then
    echo "skip $t: no $src/report.json (run: lora-boundary run configs/paper/$t.toml)" >&2
    continue
  fi
  dst="docs/results/$t"
  mkdir -p "$dst"
  cp "$src/report.md" "$src/report.json" "$dst/"
  for f in probe.svg search.svg proxy.svg sweep.svg; do
    [ -f "$src/$f" ] && cp "$src/$f" "$dst/"
  done
  echo "collected $t into $dst"
done
