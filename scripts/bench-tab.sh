#!/usr/bin/env bash
# In-tab tracing benchmark (issue #5's numbers): serves the built app, opens it in headless
# Chromium and runs the page's benchmark (random GPT-2-small weights, all kinds, 10 tokens,
# 10 samples, one worker per core). Prints one JSON object. Needs dist/ and the release loci.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/loci-target}"
(cd tests/e2e && npm install --silent --no-audit --no-fund)
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$CARGO_TARGET_DIR/release/loci" serve --addr "127.0.0.1:$port" --models tests/fixtures >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
sleep 1
node tests/e2e/bench.mjs "http://127.0.0.1:$port/"
