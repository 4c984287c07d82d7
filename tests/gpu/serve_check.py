"""The API of a running `loci serve` (on the GPU machine): the model list names the device and
dtype, a prediction, a streamed trace, a ROME edit that moves the prediction, and an undo that
restores the first prediction exactly. Prints one JSON object; exits 1 when a check fails.
Usage: python3 serve_check.py BASE_URL MODEL LAYER"""
import json
import os
import sys
import time
import urllib.request

base, model = sys.argv[1], sys.argv[2]


def call(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read().decode()


for _ in range(120):  # the server loads before it listens
    try:
        json.loads(call("/api/models"))
        break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit("the server never answered")

prompt = "The Eiffel Tower is located in the city of"
before = json.loads(call("/api/predict", {"model": model, "prompt": prompt, "top": 5}))["top"]
t0 = time.time()
stream = call("/api/trace", {"model": model, "prompt": prompt, "subject": "Eiffel Tower", "samples": 10})
trace_seconds = time.time() - t0
events = [line[len("event: "):] for line in stream.splitlines() if line.startswith("event: ")]
t0 = time.time()
edit = json.loads(call("/api/edit", {"model": model, "prompt": "{} is located in the city of",
                                     "subject": "Eiffel Tower", "target": "Rome", "layer": int(sys.argv[3])}))
edit_seconds = time.time() - t0
after = json.loads(call("/api/predict", {"model": model, "prompt": prompt, "top": 5}))["top"]
call("/api/undo", {"model": model, "all": True})
undone = json.loads(call("/api/predict", {"model": model, "prompt": prompt, "top": 5}))["top"]
listed = [m for m in json.loads(call("/api/models")) if m["name"] == model][0]
out = {
    "model": model,
    "device": listed["device"],
    "dtype": listed["dtype"],
    "top_before": before[0],
    "trace_rows": events.count("row"),
    "trace_result": "result" in events,
    "trace_seconds": round(trace_seconds, 3),
    "edit_id": edit.get("id"),
    "edit_seconds": round(edit_seconds, 3),
    "top_after_edit": after[0],
    "undo_restores": undone == before,
}
out["pass"] = (out["device"] == os.environ.get("EXPECT_DEVICE", "cuda") and out["trace_result"] and out["edit_id"] is not None
               and after != before and out["undo_restores"])
print(json.dumps(out))
sys.exit(0 if out["pass"] else 1)
