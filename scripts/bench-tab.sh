#!/usr/bin/env bash
# The in-tab benchmarks (headless Chromium on this machine), one JSON object out:
# - trace: random GPT-2-small weights, all kinds, 10 tokens, 10 samples, one worker per core;
# - edit: random GPT-2-small weights in 2 workers, key statistics of layer 6 over 20k tokens of
#   the bundled Wikipedia slice, then one ROME edit there — and `loci bench edit` doing the same
#   natively in the same run, with the tab / native ratios;
# - smollm2: the real SmolLM2-135M in a static build (no server): one ROME edit with the
#   statistics the build ships, Eiffel Tower → Rome, the Louvre checked.
# Needs dist/ and the release `loci` (scripts/test.sh or scripts/demo.sh build both).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/loci-target}"
loci="$CARGO_TARGET_DIR/release/loci"
(cd tests/e2e && npm install --silent --no-audit --no-fund)
work="$(mktemp -d)"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {
  python3 - "$1" <<'PY'
import sys, time, urllib.request
for _ in range(300):
    try:
        urllib.request.urlopen(sys.argv[1], timeout=1)
        sys.exit(0)
    except Exception:
        time.sleep(0.2)
sys.exit(f"{sys.argv[1]} did not answer")
PY
}
# The slice as JSONL, for the native benchmark to read the same texts.
python3 -c 'import json, sys
for t in json.load(open(sys.argv[1], encoding="utf-8")):
    print(json.dumps({"text": t}, ensure_ascii=False))' static/data/wiki_slice.json >"$work/slice.jsonl"

port="$(free_port)"
"$loci" serve --addr "127.0.0.1:$port" --models tests/fixtures >/dev/null 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$port/api/models"
trace="$(node tests/e2e/bench.mjs "http://127.0.0.1:$port/")"
edit="$(node tests/e2e/bench.mjs "http://127.0.0.1:$port/" edit)"
native="$("$loci" bench edit --random gpt2 --layer 6 --stats-tokens 20000 --corpus "$work/slice.jsonl" --json)"

LOCI_SKIP_BUILD=1 LOCI_CORPUS="$work/slice.jsonl" scripts/build-static.sh "$work/site" >/dev/null 2>&1
sport="$(free_port)"
python3 -m http.server --bind 127.0.0.1 --directory "$work/site" "$sport" >/dev/null 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$sport/models.json"
smol="$(node tests/e2e/bench-smollm2.mjs "http://127.0.0.1:$sport/" smollm2-135m)"

python3 - "$trace" "$edit" "$native" "$smol" <<'PY'
import json, sys
trace, edit, native, smol = (json.loads(a) for a in sys.argv[1:])
ratio = lambda a, b: round(a / b, 2) if b else None
print(json.dumps({
    "trace": trace,
    "edit": {"tab": edit, "native": native,
             "edit_ratio_tab_over_native": ratio(edit["edit_seconds"], native["edit_seconds"]),
             "stats_ratio_tab_over_native": ratio(edit["stats_seconds_per_100k_tokens"],
                                                  native["stats_seconds_per_100k_tokens"])},
    "smollm2": smol,
}, indent=1))
PY
