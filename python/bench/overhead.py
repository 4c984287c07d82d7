"""What a Python call adds to a trace: the same trace through `loci.Model.trace` and through the
`loci trace` binary, alternated, each run's wall time beside the time the core reports for the
trace itself. JSON out (scripts/bench-python.sh)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import loci

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--loci", required=True, help="the loci binary")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    load_started = time.perf_counter()
    model = loci.load(a.model)
    load_s = time.perf_counter() - load_started
    args = dict(kind="all", samples=a.samples, window=10, progress=False)
    model.trace(PROMPT, SUBJECT, **args)  # warm: noise estimate cached, pages in
    py_wall, py_core, cli_wall, cli_core = [], [], [], []
    for _ in range(a.runs):
        started = time.perf_counter()
        t = model.trace(PROMPT, SUBJECT, **args)
        py_wall.append(time.perf_counter() - started)
        py_core.append(t.seconds)
        started = time.perf_counter()
        out = subprocess.run(
            [
                a.loci,
                "trace",
                "--model",
                a.model,
                "--prompt",
                PROMPT,
                "--subject",
                SUBJECT,
                "--samples",
                str(a.samples),
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        cli_wall.append(time.perf_counter() - started)
        cli_core.append(json.loads(out.stdout)["seconds"])
    overhead = [w - c for w, c in zip(py_wall, py_core)]
    med = statistics.median
    report = {
        "what": "one trace (3 kinds, 10 tokens x 30 layers) of SmolLM2-135M, Python vs CLI",
        "runs": a.runs,
        "samples": a.samples,
        "python_load_seconds": load_s,
        "python_wall_seconds": py_wall,
        "python_core_seconds": py_core,
        "python_call_overhead_seconds": overhead,
        "python_call_overhead_percent": 100 * med(overhead) / med(py_core),
        "cli_wall_seconds": cli_wall,
        "cli_core_seconds": cli_core,
        "python_wall_over_cli_core": med(py_wall) / med(cli_core),
        "python_wall_over_cli_wall": med(py_wall) / med(cli_wall),
    }
    text = json.dumps(report, indent=2)
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
