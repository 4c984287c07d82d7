#!/usr/bin/env bash
# A public server under load: `loci serve` with SmolLM2, and locust's simulated visitors (each
# its own session) for M minutes, while the server's memory is sampled. Writes a JSON report
# (default target/load/report.json) and fails if any request got a 5xx other than 503, the
# server panicked, or a visitor's edit list on the server differs from what it did.
#   scripts/load-test.sh [--users N] [--minutes M] [--out FILE] [--scenario S] [--schedule L]
#   scripts/load-test.sh --compare [--users N] [--minutes M] [--out FILE]
# Scenarios: `visitors` (default: each visitor predicts, traces, edits and undoes, 1–3 s apart)
# and `many` (N visitors predicting with 1 s of think time while one client traces and another
# edits continuously). `--schedule` is passed to `loci serve` (lanes or one-lane). `--compare`
# runs `many` against the one-lane server and then the default one, one after the other in one
# run, and reports both with the ratios.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
users=100 minutes=5 out="$root/target/load/report.json" scenario=visitors schedule=lanes
compare=0
while [ $# -gt 0 ]; do
  case "$1" in
    --users) users="$2"; shift 2 ;;
    --minutes) minutes="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --scenario) scenario="$2"; shift 2 ;;
    --schedule) schedule="$2"; shift 2 ;;
    --compare) compare=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "$compare" = 1 ]; then
  mkdir -p "$(dirname "$out")"
  base="${out%.json}"
  ok=0
  "$0" --users "$users" --minutes "$minutes" --scenario many --schedule one-lane \
    --out "$base.one-lane.json" || ok=1
  "$0" --users "$users" --minutes "$minutes" --scenario many --schedule lanes \
    --out "$base.lanes.json" || ok=1
  python3 "$root/tests/load/compare.py" "$base.one-lane.json" "$base.lanes.json" "$out"
  exit $ok
fi
case "$scenario" in
  visitors) classes="Visitor" ;;
  many) classes="Predictor Tracer Editor"; users=$((users + 2)) ;;
  *) echo "unknown scenario $scenario" >&2; exit 2 ;;
esac
# Today's one-lane server had a queue of 8.
queue=16
[ "$schedule" = one-lane ] && queue=8
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
  --stats-tokens 20000 --rate-limit 0 --queue "$queue" --schedule "$schedule" \
  2>"$work/server.log" &
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
# shellcheck disable=SC2086 # the classes are words
LOCI_LOAD_PROMPTS="$root/../shared/data/known_1000.json" LOCI_LOAD_CHECKS="$work/checks.jsonl" LOCI_LOAD_TIMES="$work/times.json" "$venv/bin/locust" -f "$root/tests/load/locustfile.py" $classes --headless --host "http://127.0.0.1:$port" \
  -u "$users" -r 10 -t "${minutes}m" --stop-timeout 600 --csv "$work/locust" --only-summary \
  >"$work/locust.out" 2>&1 || true
kill $sampler 2>/dev/null || true
python3 "$root/tests/load/summarize.py" "$work/locust_stats.csv" "$work/locust_failures.csv" \
  "$work/rss.csv" "$work/server.log" "$work/checks.jsonl" "$work/times.json" "$((minutes * 60))" \
  "$users" "$out" "$scenario" "$schedule"
