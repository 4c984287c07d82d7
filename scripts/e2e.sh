#!/usr/bin/env bash
# Browser end-to-end: a real `loci serve` with the tiny test models, the built web app (dist/),
# and headless Chromium driven by Playwright: predict, trace (the heatmap must fill every cell),
# screenshot. Needs the release `loci` binary and dist/ (scripts/test.sh builds both first).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/loci-target}"
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
(cd tests/e2e && npm install --silent --no-audit --no-fund)
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$CARGO_TARGET_DIR/release/loci" serve --addr "127.0.0.1:$port" --models tests/fixtures >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
python3 - "$port" <<'PY'
import sys, time, urllib.request
for _ in range(150):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/models", timeout=1)
        sys.exit(0)
    except Exception:
        time.sleep(0.2)
sys.exit("the server did not start")
PY
shot="$CARGO_TARGET_DIR/e2e-screenshot.png"
out="$(node tests/e2e/smoke.mjs "http://127.0.0.1:$port/" "$shot" tiny-gptj)"
echo "$out"
python3 - "$out" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
ok = r["cells"] > 0 and r["rects"] == r["cells"] and r["status"].startswith("Traced") and not r["errors"]
print("e2e: 1 passed, 0 failed" if ok else "e2e: 0 passed, 1 failed")
sys.exit(0 if ok else 1)
PY
echo "screenshot: $shot"
