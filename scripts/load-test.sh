#!/usr/bin/env bash
# A public server under load: `loci serve` with SmolLM2, and locust's simulated visitors (100 by
# default, each its own session) predicting, tracing (SSE), editing and undoing for 5 minutes,
# while the server's memory is sampled. Writes a JSON report (default target/load/report.json)
# and fails if any request got a 5xx other than 503, the server panicked, or a visitor's edit
# list on the server differs from what it did.
#   scripts/load-test.sh [--users N] [--minutes M] [--out FILE]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
users=100 minutes=5 out="$root/target/load/report.json"
while [ $# -gt 0 ]; do
  case "$1" in
    --users) users="$2"; shift 2 ;;
    --minutes) minutes="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/loci-target}"
venv="$HOME/.cache/loci-load-venv"
[ -x "$venv/bin/locust" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet locust; }
(cd "$root" && cargo build --release --quiet -p loci-backend)
loci="$CARGO_TARGET_DIR/release/loci"
gguf="$(bash "$root/scripts/fetch-model.sh")"
work="$(mktemp -d)"
mkdir -p "$(dirname "$out")"
corpus="${LOCI_CORPUS:-$root/../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl}"
echo "key statistics for the edits (20,000 tokens)…" >&2
"$loci" stats --model "$gguf" --tokens 20000 --corpus "$corpus" --out "$work/stats" 2>/dev/null
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# One address sends every visitor's requests here, so the per-client rate limit is off.
"$loci" serve --addr "127.0.0.1:$port" --models "$gguf" --stats "$work/stats" \
  --stats-tokens 20000 --rate-limit 0 --queue 16 2>"$work/server.log" &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done
( start=$(date +%s.%N)
  while kill -0 $server 2>/dev/null; do
    rss=$(awk '/VmRSS/ {print $2}' /proc/$server/status 2>/dev/null || true)
    [ -n "$rss" ] && echo "$(awk -v s="$start" -v n="$(date +%s.%N)" 'BEGIN { print n - s }'),$rss" >>"$work/rss.csv"
    sleep 5
  done ) &
sampler=$!
LOCI_LOAD_CHECKS="$work/checks.jsonl" LOCI_LOAD_TIMES="$work/times.json" "$venv/bin/locust" -f "$root/tests/load/locustfile.py" --headless --host "http://127.0.0.1:$port" \
  -u "$users" -r 10 -t "${minutes}m" --stop-timeout 600 --csv "$work/locust" --only-summary \
  >"$work/locust.out" 2>&1 || true
kill $sampler 2>/dev/null || true
python3 "$root/tests/load/summarize.py" "$work/locust_stats.csv" "$work/locust_failures.csv" \
  "$work/rss.csv" "$work/server.log" "$work/checks.jsonl" "$work/times.json" "$((minutes * 60))" \
  "$users" "$out"
