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
# Order per checkpoint: ours (for the prompt ids), then transformers, ours, ours, transformers (ABBA): in a VM, dropping
# the guest's page cache leaves the host's, so a later run reads faster; ABBA cancels that trend. The first run only
# supplies the prompt ids (and a warm host cache for the four that count).
for dir in "$@"; do
  drop
  first="$("$bin" report --model "$dir" --dtype "$dtype" --tokens $((tokens + 1)))"
  ids="$(printf '%s' "$first" | "$py" -c 'import json,sys; print(",".join(map(str, json.load(sys.stdin)["prompt_ids"])))')"
  runs=()
  for who in tf ours ours tf; do
    drop
    if [ "$who" = ours ]; then
      runs+=("$("$bin" report --model "$dir" --dtype "$dtype" --tokens $((tokens + 1)))")
    else
      runs+=("$("$py" scripts/bench/transformers_real_size.py "$dir" "$ids" "$tokens")")
    fi
    echo "$who $dir: ${runs[-1]}"
  done
  "$py" - "$dir" "${runs[@]}" <<'PY'
import json, sys
d = sys.argv[1]
t1, o1, o2, t2 = (json.loads(x) for x in sys.argv[2:6])
ttft_o, ttft_t = o1["first_token_s"] + o2["first_token_s"], t1["first_token_s"] + t2["first_token_s"]
dec_o = (o1["decode_tokens_per_s"] + o2["decode_tokens_per_s"]) / 2
dec_t = (t1["decode_tokens_per_s"] + t2["decode_tokens_per_s"]) / 2
print(f"| {d} | {o1['dtype']} | {o1['weight_bytes']/1e9:.2f} GB | ours {max(o1['peak_rss_over_weight_bytes'], o2['peak_rss_over_weight_bytes']):.2f}× / "
      f"transformers {max(t1['peak_rss_over_weight_bytes'], t2['peak_rss_over_weight_bytes']):.2f}× | first token (ABBA sums) "
      f"ours {ttft_o:.1f} s / transformers {ttft_t:.1f} s (ratio {ttft_o/ttft_t:.2f}) | decode ours {dec_o:.2f} / "
      f"transformers {dec_t:.2f} tok/s ({dec_o/dec_t:.2f}×) | same first token: "
      f"{len({r['first_token'] for r in (t1, o1, o2, t2)}) == 1} |")
PY
done
