# Sourced by the bench scripts: sets `py` to the reference venv's python (transformers, PEFT), or leaves it empty.
# PY overrides; otherwise /work/main/.venv-ref or this checkout's .venv-ref (scripts/fixtures/model/setup_venv.sh).
# Needs `root` (the repository root) set.
py="${PY:-}"
if [ -z "$py" ]; then
  for c in /work/main/.venv-ref/bin/python "$root/.venv-ref/bin/python"; do
    if [ -x "$c" ]; then py="$c"; break; fi
  done
fi
