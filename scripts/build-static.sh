#!/usr/bin/env bash
# Writes a folder that any static file server can host, with no `loci` server behind it:
# the web app (dist/), its data, one model with its key statistics, and models.json.
# Usage: build-static.sh DIR [MODEL|none]. MODEL: a Hugging Face folder or a .gguf (default: the
#   demo model from fetch-model.sh); `none` ships no model (the page then offers only GPT-2).
# Env: LOCI_SKIP_BUILD=1 reuses dist/ and the CLI; LOCI_STATS_TOKENS (20000; 0: no statistics);
#   LOCI_STATS_LAYERS (default: ROME's and MEMIT's layers); LOCI_CORPUS (JSONL, "text" field).
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then echo "usage: $0 DIR [MODEL|none]" >&2; exit 2; fi
root="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/loci-target}"
export PATH="$HOME/.cargo/bin:$PATH"
# Resolve the arguments against the caller's folder before moving to the repository root.
mkdir -p "$1"
out="$(cd "$1" && pwd)"
model="${2:-}"
if [ -n "$model" ] && [ "$model" != none ]; then
  model="$(cd "$(dirname "$model")" && pwd)/$(basename "$model")"
fi
cd "$root"

if [ "${LOCI_SKIP_BUILD:-0}" != 1 ]; then
  trunk build
  cargo build --release -p loci-backend --bin loci
fi
loci="$CARGO_TARGET_DIR/release/loci"
if [ -z "$model" ]; then model="$("$root/scripts/fetch-model.sh")"; fi

# Start from a clean models/ and static/ so a rerun leaves no files from an earlier model.
# DIR itself is never removed: it may be the caller's folder holding other things.
rm -rf "$out/models" "$out/static"
cp -R "$root/dist/." "$out/"
mkdir -p "$out/static/data"
cp "$root"/static/data/{known_1000.json,counterfact_50.json,wiki_slice.json} "$out/static/data/"
cp "$root/static/loci.css" "$out/static/"

name=""
if [ "$model" != none ]; then
  if [ -d "$model" ]; then
    name="$(basename "$model")"
    shopt -s nullglob; weights=("$model"/*.safetensors); shopt -u nullglob
    [ ${#weights[@]} -gt 0 ] || { echo "no *.safetensors in $model" >&2; exit 1; }
    mkdir -p "$out/models/$name"
    cp "$model/config.json" "$model/tokenizer.json" "${weights[@]}" "$out/models/$name/"
  elif [ -f "$model" ] && [[ "$model" == *.gguf ]]; then
    # A .gguf is named after its folder (models/smollm2-135m/X.gguf -> smollm2-135m).
    name="$(basename "$(dirname "$model")")"
    mkdir -p "$out/models/$name"
    cp "$model" "$out/models/$name/"
  else
    echo "MODEL must be a Hugging Face folder, a .gguf file or 'none': $model" >&2; exit 1
  fi

  tokens="${LOCI_STATS_TOKENS:-20000}"
  if [ "$tokens" != 0 ]; then
    [ -x "$loci" ] || { echo "$loci is missing: run without LOCI_SKIP_BUILD=1" >&2; exit 1; }
    corpus="${LOCI_CORPUS:-$root/../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl}"
    if [ ! -f "$corpus" ]; then
      # No Wikipedia dump here: use the slice the repository ships, one {"text": ...} a line.
      tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
      corpus="$tmp/wiki_slice.jsonl"
      python3 -c 'import json, sys
for t in json.load(open(sys.argv[1], encoding="utf-8")):
    print(json.dumps({"text": t}, ensure_ascii=False))' "$root/static/data/wiki_slice.json" >"$corpus"
    fi
    cmd=("$loci" stats --model "$model" --out "$out/models/$name/stats" --tokens "$tokens" --corpus "$corpus")
    if [ -n "${LOCI_STATS_LAYERS:-}" ]; then cmd+=(--layers "$LOCI_STATS_LAYERS"); fi
    "${cmd[@]}"
  fi
fi

# models.json tells the page which models the folder holds and which statistics come with them.
python3 - "$out" "$name" <<'PY'
import json, os, re, sys
out, name = sys.argv[1], sys.argv[2]
models = []
if name:
    d = os.path.join(out, "models", name)
    files = sorted(f for f in os.listdir(d) if os.path.isfile(os.path.join(d, f)))
    weights = [f for f in files if f.endswith((".gguf", ".safetensors"))]
    sd = os.path.join(d, "stats")
    names = os.listdir(sd) if os.path.isdir(sd) else []
    layers = sorted(int(m[1]) for m in (re.fullmatch(r"layer(\d+)\.safetensors", f) for f in names) if m)
    models.append({
        "name": name,
        "format": "gguf" if any(f.endswith(".gguf") for f in weights) else "safetensors",
        "size_bytes": sum(os.path.getsize(os.path.join(d, f)) for f in weights),
        "files": [{"name": f} for f in files],
        "stats": [{"layer": l, "file": f"stats/layer{l}.safetensors"} for l in layers],
    })
with open(os.path.join(out, "models.json"), "w", encoding="utf-8") as f:
    f.write(json.dumps(models, indent=1) + "\n")
PY

printf 'Static build in %s\nServe it: python3 -m http.server -d %q 8000\nthen open http://127.0.0.1:8000/\n' "$out" "$out"
