#!/usr/bin/env bash
# Browser end-to-end: a real `loci serve` with the tiny test models, the built web app (dist/),
# and headless Chromium driven by Playwright (tests/e2e/smoke.mjs): predict and trace on the
# server and in the tab's workers (every heatmap cell drawn, the same numbers, no layout shift
# while rows stream, the heatmaps read out and saved as SVG and PNG), edit (the tab's top
# prediction changes), undo (it returns), upload of the downloaded edit (it changes again), a
# MEMIT edit of two facts and a fine-tuning edit made from the page (listed, then undone
# exactly), a study of the fact (its edits streamed and charted, the model unchanged after), a
# CounterFact case evaluated on the server (its metrics shown, the model unchanged after), a
# ROME edit the tab makes itself with the server's key statistics (engine: in this tab), the
# in-tab benchmark, the screens as URL routes (back, forward, a deep link), axe-core on every
# screen (no serious or critical violation), no console error, and screenshots of every screen
# at 1440×900 and 390×844 into docs/screenshots/ (LOCI_SHOTS overrides). Needs the release
# `loci` binary and dist/ (scripts/test.sh builds both first), and ../shared/data for the key
# statistics corpus.
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
stats="$(mktemp -d)"
corpus="${LOCI_DATA:-$root/../shared/data}/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl"
"$CARGO_TARGET_DIR/release/loci" serve --addr "127.0.0.1:$port" --models tests/fixtures \
  --corpus "$corpus" --stats "$stats" --stats-tokens 2000 >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$stats"' EXIT
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
shots="${LOCI_SHOTS:-$root/docs/screenshots}"
out="$(node tests/e2e/smoke.mjs "http://127.0.0.1:$port/" "$shots" tiny-gptj)"
echo "$out"
python3 - "$out" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
checks = {
    "no page errors and no console errors": not r["errors"],
    "server trace drew every cell": r.get("server", {}).get("cells", 0) > 0
        and r["server"]["rects"] == r["server"]["cells"] and r["server"]["engine"] == "the server",
    "tab trace drew every cell, in workers": r.get("tab", {}).get("cells", 0) == r.get("server", {}).get("cells")
        and r["tab"]["rects"] == r["tab"]["cells"] and r["tab"]["engine"].startswith("this tab"),
    "tab and server give the same numbers": r.get("max_abs_diff", 1) < 1e-4,
    "tab and server predict the same": r.get("tab_top") == r.get("server_top"),
    "the edit is listed and changes the tab's prediction": r.get("edits_listed") == 1
        and r.get("edited_top") != r.get("tab_top"),
    "undo restores the prediction exactly": r.get("undone_top") == r.get("tab_top"),
    "an uploaded edit file re-applies the edit": r.get("uploaded_top") == r.get("edited_top"),
    "a MEMIT edit of two facts is made from the page, listed, and undone exactly":
        r.get("memit_status", "").startswith("Edited") and r.get("memit_facts") == 2
        and r.get("memit_listed") == 2 and "MEMIT layers 1,2" in r.get("memit_label", "")
        and r.get("memit_undone_top") == r.get("uploaded_top"),
    "a fine-tuning edit is made from the page, reported, listed, and undone exactly":
        r.get("ft_status", "").startswith("Edited") and r.get("ft_result") == 1
        and "FT layer 1" in r.get("ft_label", "") and r.get("ft_undone_top") == r.get("uploaded_top"),
    "a study runs from the page: 8 edits streamed, charted, and the model left as it was":
        r.get("study_status", "").startswith("Study done") and r.get("study_edits") == 8
        and r.get("study_rows") == 9 and r.get("study_chart") == 8
        and r.get("study_after_top") == r.get("uploaded_top"),
    "the heatmaps: three kinds side by side, a cell read out, saved as SVG and PNG; the curves as PNG":
        r.get("heatmap_panels") == 3 and "layer 1" in r.get("readout", "")
        and r.get("save_svg", {}).get("name") == "trace-hidden.svg" and r["save_svg"]["head"].startswith("<svg")
        and r.get("save_png", {}).get("name") == "trace-hidden.png" and r["save_png"]["head"] == "\x89PNG\r\n\x1a\n"
        and r.get("save_chart_png", {}).get("head") == "\x89PNG\r\n\x1a\n",
    "no layout shift while the trace's rows stream": r.get("trace_layout_shift", 1) < 0.01,
    "the engine badge: the tab for the trace, the server for edit, study and evaluate":
        r.get("engine_badge") == "tab" and r.get("edit_badge") == "server"
        and r.get("study_badge") == "server" and r.get("eval_badge") == "server",
    "a CounterFact case is evaluated on the server: metrics shown, the model left as it was":
        r.get("eval_status", "").startswith("Evaluated") and r.get("eval_metrics") == 11
        and r.get("eval_prompts", 0) >= 3 and r.get("eval_after_top") == r.get("uploaded_top"),
    "the tab edits a server model itself when asked, with the server's key statistics, and undoes":
        r.get("tab_edit_badge") == "tab" and r.get("tab_edit_status", "").startswith("Edited in this tab")
        and "from the server" in r.get("tab_edit_stats", "")
        and r.get("tab_undo_status", "").startswith("Undone in this tab")
        and r.get("after_tab_edit_top") == r.get("uploaded_top"),
    "the in-tab benchmark runs from its screen": r.get("bench_status") == "Benchmark done."
        and r.get("bench_kinds") == 3,
    "screens are routes: back, forward and a deep link work": r.get("back_screen") == "nav-trace"
        and r.get("forward_screen") == "nav-bench" and r.get("deep_link") is True,
    "axe-core: no serious or critical violation on any screen (desktop, phone, dark theme)":
        len(r.get("axe", {})) == 11 and not any(r["axe"].values()),
    "screenshots of the five screens on a desktop and a phone": len(r.get("shots", [])) == 11,
    "a link to a server edit fills the form and waits for a click":
        r.get("server_link", {}).get("target") == "Berlin" and r["server_link"].get("edits") == 1,
    "a second visit loads the model from the browser cache": r.get("second_visit_files_fetched") == 0
        and r.get("second_visit_status") == "Done.",
    "a new page's tab copy carries the server's edits": r.get("second_visit_top") == r.get("uploaded_top"),
}
for name, ok in checks.items():
    print(("ok   " if ok else "FAIL ") + name)
failed = sum(not ok for ok in checks.values())
print(f"e2e: {len(checks) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
echo "screenshots: $shots"
