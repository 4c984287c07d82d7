#!/usr/bin/env bash
# The static build end to end: scripts/build-static.sh makes a folder with the tiny GPT-J test
# model (layer 1's statistics shipped), `python3 -m http.server` serves it — no `loci` process —
# and headless Chromium (tests/e2e/static.mjs) computes key statistics in the tab, edits with
# ROME, MEMIT and fine-tuning, undoes bit for bit, refuses bad files and requests, applies an
# edit made natively, runs the study, draws a sequential run's results file (made by `loci eval
# --sequential` of two methods) and follows shareable links. The tab's edit file is then
# applied natively by `loci predict --apply-edit`: the same top token and probabilities within
# 1e-4. A second build with the real SmolLM2-135M (tests/e2e/static-real.mjs) cancels an edit
# mid-way and runs out of a worker's memory on purpose (GPT-2 XL). Needs dist/
# and the release `loci` (scripts/test.sh builds both), Chromium and tests/e2e's node modules
# (scripts/e2e.sh installs them), and ../shared/data for the native statistics.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/loci-target}"
loci="$CARGO_TARGET_DIR/release/loci"
model=tests/fixtures/tiny-gptj
other=tests/fixtures/tiny-gpt2
prompt="The Eiffel Tower is located in the city of"
corpus="${LOCI_DATA:-$root/../shared/data}/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl"
work="$(mktemp -d)"
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT

# Layer 1's statistics ship with the build; layer 2's the page computes.
LOCI_SKIP_BUILD=1 LOCI_STATS_TOKENS=2000 LOCI_STATS_LAYERS=1 LOCI_CORPUS="$corpus" \
  scripts/build-static.sh "$work/site" "$model" >/dev/null 2>&1
# A ROME edit made natively, and statistics of another model, for the page to take and refuse.
"$loci" edit --model "$model" --prompt "$prompt" --subject "Eiffel Tower" --target Rome --layer 2 \
  --stats "$work/stats" --corpus "$corpus" --stats-tokens 2000 --save-edit "$work/native.safetensors" >/dev/null 2>&1
"$loci" stats --model "$other" --layers 2 --tokens 500 --corpus "$corpus" --out "$work/other" >/dev/null 2>&1
# An edit of the other tiny model: the same shapes, so only its recorded model tells them apart.
"$loci" edit --model "$other" --prompt "$prompt" --subject "Eiffel Tower" --target Rome --layer 2 \
  --stats "$work/other" --corpus "$corpus" --stats-tokens 500 --save-edit "$work/other-edit.safetensors" >/dev/null 2>&1
# A sequential run of two methods on the other model, whose results file the page draws.
"$loci" eval --model "$other" --n 3 --sequential --methods rome,grace --layer 2 --checkpoint-every 1 \
  --no-generation --v-steps 2 --health-facts 20 --health-texts 4 --stats "$work/other" --corpus "$corpus" \
  --dataset "${LOCI_DATA:-$root/../shared/data}/counterfact/counterfact_rome_format_sample500.json" \
  --out "$work/sequence.jsonl" >/dev/null 2>&1

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
python3 -m http.server --bind 127.0.0.1 --directory "$work/site" "$port" >/dev/null 2>&1 &
server=$!
python3 - "$port" <<'PY'
import sys, time, urllib.request
for _ in range(100):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/models.json", timeout=1)
        sys.exit(0)
    except Exception:
        time.sleep(0.1)
sys.exit("the static file server did not start")
PY
out="$(node tests/e2e/static.mjs "http://127.0.0.1:$port/" tiny-gptj "$work" \
  "$work/native.safetensors" "$work/other/layer2.safetensors" "$work/other-edit.safetensors" \
  "${LOCI_SHOTS:-$root/docs/screenshots}" "$work/sequence.jsonl")"
echo "$out"
# The real model: a cancelled edit, and a shape too big for a worker.
LOCI_SKIP_BUILD=1 LOCI_STATS_TOKENS=0 scripts/build-static.sh "$work/real" "$(scripts/fetch-model.sh)" >/dev/null 2>&1
rport="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
python3 -m http.server --bind 127.0.0.1 --directory "$work/real" "$rport" >/dev/null 2>&1 &
real_server=$!
sleep 1
real="$(node tests/e2e/static-real.mjs "http://127.0.0.1:$rport/" smollm2-135m)"
kill "$real_server" 2>/dev/null || true
echo "$real"
native="{}"
if [ -s "$work/tab-edit.safetensors" ]; then
  native="$("$loci" predict --model "$model" --prompt "$prompt" --top 10 --json --apply-edit "$work/tab-edit.safetensors")"
fi
python3 - "$out" "$native" "$real" <<'PY'
import json, sys
r, native, real = (json.loads(a) for a in sys.argv[1:])
top = lambda p: p[0]["token"] if p else None
st = lambda k: r.get(k, {}).get("kind")
txt = lambda k: r.get(k, {}).get("text", "")
d0 = r.get("digest_original")
tab_edited = {t["id"]: t["prob"] for t in r.get("edited", [])}
native_top = {t["id"]: t["prob"] for t in native.get("top", [])}
checks = {
    "no page errors and no console errors": not r["errors"],
    "the page says once that there is no server, and offers no server engine":
        "No Loci server" in r.get("ready", "") and r.get("server_option_disabled") is True,
    "edits run in the tab, and the page says why": r.get("edit_badge") == "tab"
        and "only in this tab" in r.get("edit_where", ""),
    "an edit before statistics asks for them and changes nothing":
        st("no_stats") == "error" and "key statistics for layer 2" in txt("no_stats"),
    "statistics are computed in the tab's workers and say their tokens":
        st("stats") == "done" and "tokens" in txt("stats") and "layer 2" in r.get("stats_held", ""),
    "garbage and another model's statistics are refused, nothing changes":
        st("bad_stats") == "error" and st("other_stats") == "error"
        and "made for model" in txt("other_stats") and r.get("held_after_bad") == 1,
    "a subject not in the prompt and an empty target are refused, the weights unchanged":
        st("bad_subject") == "error" and st("empty_target") == "error"
        and r.get("digest_after_bad") == d0,
    "ROME in the tab: listed, steps streamed, the new target's probability rises, the prediction changes":
        st("rome") == "edited" and r.get("rome_listed") == 1 and "loss" in r.get("rome_steps", "")
        and r.get("rome_p_new", [1, 0])[1] > r.get("rome_p_new", [1, 0])[0]
        and r.get("edited") != r.get("before") and r.get("digest_edited") != d0,
    "the tab's edit downloads as an edit file": r.get("download_name", "").endswith(".safetensors"),
    "undo restores the weights bit for bit": st("undo") == "undone"
        and r.get("digest_undone") == d0 and r.get("undone") == r.get("before"),
    "a garbage edit file, and another model's of the same shape, are refused":
        st("bad_edit") == "error" and st("other_edit") == "error"
        and "made for model tiny-gpt2" in txt("other_edit") and r.get("other_edit_listed") == 0,
    "an edit made by `loci edit --save-edit` applies in the tab":
        st("native") == "edited" and r.get("native_listed") == 1
        and top(r.get("native_top")) == top(r.get("edited")),
    "MEMIT of two facts in the tab (layer 1's statistics shipped with the build), undone exactly":
        st("memit") == "edited" and "layer 1: 2" in r.get("memit_held", "")
        and "shipped with this page" in r.get("memit_held", "")
        and r.get("memit_facts") == 2 and "MEMIT layers 1,2" in r.get("memit_label", "")
        and r.get("digest_memit_undone") == d0,
    "AlphaEdit (two facts, null space 30% of the trace) then EMMET in the tab, undone exactly":
        st("alphaedit") == "edited" and r.get("alphaedit_facts") == 2
        and "ALPHAEDIT layers 1,2" in r.get("alphaedit_label", "")
        and st("emmet") == "edited" and "EMMET layer 2" in r.get("emmet_label", "")
        and r.get("emmet_title", "").startswith("EMMET: 2 facts")
        and r.get("digest_family_undone") == d0,
    "statistics downloaded from a URL": st("url_stats") == "done"
        and "from models/tiny-gptj/stats/layer1.safetensors" in r.get("url_held", ""),
    "a sequential run's results file is drawn in the tab: one row per method, the health panels":
        r.get("sequence_rows") == 2 and "perplexity change" in r.get("sequence_chart", "")
        and "grace" in r.get("sequence_chart", ""),
    "a study of the fact runs in the tab: 2 edits scored, the model left as it was":
        r.get("study_badge") == "tab" and st("study") == "done" and r.get("study_edits") == 2
        and r.get("digest_study") == d0,
    "a shareable link reproduces a trace (MLP only) in a new tab":
        "kinds=mlp" in r.get("trace_link", "") and r.get("trace_linked", {}).get("panels") == 1
        and r["trace_linked"].get("engine", "").startswith("this tab"),
    "attribution patching in the tab (the MLP grid, one backward pass)":
        st("attribution") == "done" and "attribution patching" in txt("attribution")
        and r.get("attribution_panels") == 1,
    "fine-tuning in the tab, undone exactly": st("ft") == "edited"
        and "FT layer 1" in r.get("ft_label", "") and r.get("digest_ft_undone") == d0,
    "GRACE in the tab: a codebook entry at layer 2 (in the digest), undone exactly":
        st("grace") == "edited" and "GRACE layer 2" in r.get("grace_label", "")
        and r.get("digest_grace") != d0 and r.get("digest_grace_undone") == d0,
    "knowledge neurons in the tab (the MLP grid, integrated gradients)":
        st("neurons") == "done" and "knowledge neurons" in txt("neurons")
        and r.get("neurons_panels") == 1,
    "a shareable link reproduces the edit in a new tab, statistics from the browser's cache":
        r.get("linked", {}).get("kind") == "edited"
        and r.get("linked_form") == ["The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "2"]
        and "kept in this browser" in r.get("linked_stats", "") and r.get("linked_digest") == r.get("digest_edited"),
    "the tab's edit file applied natively: the same top token, probabilities within 1e-4":
        top(native.get("top")) == top(r.get("edited"))
        and bool(tab_edited) and all(abs(p - native_top[i]) < 1e-4 for i, p in tab_edited.items() if i in native_top)
        and len(set(tab_edited) & set(native_top)) >= 5,
    "SmolLM2: an edit cancelled after its first step leaves every copy as it was, bit for bit":
        not real["errors"] and "loss" in real.get("steps_seen", "")
        and real.get("cancelled") == "Edit cancelled: the model is unchanged."
        and real.get("listed") == 0 and "Digest" in real.get("digest", "")
        and real.get("after") == real.get("before") and top(real.get("before")) == " Paris",
    "a model too big for a worker: the page names the memory limit, and the model's workers go on":
        "ran out of memory" in real.get("oom", "") and "4 GiB" in real.get("oom", "")
        and real.get("after_oom") == real.get("before"),
}
for name, ok in checks.items():
    print(("ok   " if ok else "FAIL ") + name)
failed = sum(not ok for ok in checks.values())
print(f"static e2e: {len(checks) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
