#!/usr/bin/env bash
# Real-size load and decode, this tool beside transformers in the same run (a development command, not a test).
#   bash scripts/bench/real_size.sh models/llama-3.2-1b-shaped [models/llama-3.1-8b-shaped ...]
# Checkpoints come from `cargo run --release --example real_size -- make --shape <shape> --out <dir>`.
# The page cache is dropped before every run (needs root; otherwise the runs are warm and the script says so).
# Needs the reference venv (scripts/fixtures/model/setup_venv.sh) for the transformers side.
# Env: TOKENS (new tokens for the decode rate, default 8), DTYPE (our --dtype, default auto).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
tokens="${TOKENS:-8}"
dtype="${DTYPE:-auto}"
py="$root/.venv-ref/bin/python"
[ -x "$py" ] || { echo "real_size.sh: no reference venv at .venv-ref (bash scripts/fixtures/model/setup_venv.sh)" >&2; exit 2; }
cargo build -q --release --example real_size
bin="${CARGO_TARGET_DIR:-$root/target}/release/examples/real_size"
drop() {
  sync
  if ! { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null; then
    echo "real_size.sh: cannot drop the page cache (not root): timings below are WARM" >&2
  fi
}
bw="$(cargo run -q --release --example decode_speed -- --bandwidth-only 2>/dev/null || true)"
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $(nproc) cores; flags: $(grep -m1 -o -w -E 'avx2|avx512f|avx512_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')${bw:+; $bw}"
for dir in "$@"; do
  drop
  ours="$("$bin" report --model "$dir" --dtype "$dtype" --tokens $((tokens + 1)))"
  echo "ours $dir: $ours"
  ids="$(printf '%s' "$ours" | "$py" -c 'import json,sys; print(",".join(map(str, json.load(sys.stdin)["prompt_ids"])))')"
  drop
  theirs="$("$py" scripts/bench/transformers_real_size.py "$dir" "$ids" "$tokens")"
  echo "transformers $dir: $theirs"
  "$py" - "$dir" "$ours" "$theirs" <<'PY'
import json, sys
d, o, t = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"| {d} | {o['dtype']} | {o['weight_bytes']/1e9:.2f} GB | ours {o['peak_rss_over_weight_bytes']:.2f}× / "
      f"transformers {t['peak_rss_over_weight_bytes']:.2f}× | ours {o['load_s']:.1f} s / transformers "
      f"{t['load_s']:.1f} s (lazy) | ours {o['first_token_s']:.1f} s / transformers {t['first_token_s']:.1f} s "
      f"(ratio {o['first_token_s']/t['first_token_s']:.2f}) | ours {o['decode_tokens_per_s']:.2f} / transformers "
      f"{t['decode_tokens_per_s']:.2f} tok/s ({o['decode_tokens_per_s']/t['decode_tokens_per_s']:.2f}×) | "
      f"same first token: {o['first_token'] == t['first_token']} |")
PY
done
