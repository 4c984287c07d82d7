"""Turns a load run's locust statistics, the server's memory samples and its log into one JSON
report: latency per endpoint (p50, p99), throughput, the share of 503s, 5xx other than 503,
panics, the server's resident memory over time (and whether it plateaus after warm-up), and the
session checks. Usage: summarize.py STATS_CSV FAILURES_CSV RSS_CSV SERVER_LOG CHECKS_JSONL
TIMES_JSON SECONDS USERS OUT_JSON [SCENARIO SCHEDULE]."""

import csv
import json
import os
import sys

stats_csv, failures_csv, rss_csv, log_path, checks_path, times_path, seconds, users, out = \
    sys.argv[1:10]
seconds, users = float(seconds), int(users)
scenario = sys.argv[10] if len(sys.argv) > 10 else "visitors"
schedule = sys.argv[11] if len(sys.argv) > 11 else "lanes"
checks = [json.loads(l) for l in open(checks_path)] if os.path.exists(checks_path) else []

def percentile(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else None


times = json.load(open(times_path)) if os.path.exists(times_path) else {}
by_status = {
    key: {"requests": len(v), "p50_ms": percentile(v, 0.5), "p99_ms": percentile(v, 0.99)}
    for key, v in sorted(times.items())
}

endpoints = {}
for row in csv.DictReader(open(stats_csv)):
    if row["Name"] == "Aggregated":
        continue
    n = int(row["Request Count"])
    endpoints[row["Name"]] = {
        "requests": n,
        "failures": int(row["Failure Count"]),
        "p50_ms": float(row["50%"] or 0),
        "p99_ms": float(row["99%"] or 0),
        "per_second": n / seconds,
    }

statuses = {}
for row in csv.DictReader(open(failures_csv)):
    err = row["Error"]
    code = next((c for c in ("503", "500", "502", "504", "410", "409", "429") if c in err), "other")
    statuses.setdefault(row["Name"], {}).setdefault(code, 0)
    statuses[row["Name"]][code] += int(row["Occurrences"])

rss = [(float(t), int(k)) for t, k in csv.reader(open(rss_csv))]
warm = [k for t, k in rss if t >= 60] or [k for _, k in rss]
third = max(1, len(warm) // 3)
growth = (sum(warm[-third:]) / third - sum(warm[:third]) / third) / 1024
log = open(log_path, errors="replace").read()

total = sum(e["requests"] for e in endpoints.values())
refused = sum(s.get("503", 0) for s in statuses.values())
server_errors = sum(v for s in statuses.values() for c, v in s.items() if c in ("500", "502"))
endpoints.pop("session check", None)
answered = times.get("/api/predict 200", [])
report = {
    "scenario": scenario,
    "schedule": schedule,
    "seconds": seconds,
    "predictions": {
        "answered": len(answered),
        "answered_per_second": len(answered) / seconds,
        "refused_503": len(times.get("/api/predict 503", [])),
        "p50_ms": percentile(answered, 0.5),
        "p99_ms": percentile(answered, 0.99),
    },
    "endpoints": endpoints,
    "failures_by_status": statuses,
    "by_endpoint_and_status": by_status,
    "requests": total,
    "throughput_per_second": total / seconds,
    "share_503": refused / total if total else 0.0,
    "server_errors_other_than_503": server_errors,
    "panics_in_log": log.count("panicked"),
    "rss_mib": {
        "start": rss[0][1] / 1024 if rss else None,
        "after_warm_up_min": min(warm) / 1024 if warm else None,
        "after_warm_up_max": max(warm) / 1024 if warm else None,
        "end": rss[-1][1] / 1024 if rss else None,
        "growth_last_vs_first_third_after_warm_up": growth,
        "samples": [[t, k / 1024] for t, k in rss],
    },
    "sessions_checked": len(checks),
    "sessions_mismatched": sum(not c["same"] for c in checks),
    "edits_kept_at_the_end": sum(len(c["made"]) for c in checks),
}
json.dump(report, open(out, "w"), indent=1)
print(json.dumps({k: v for k, v in report.items()
                  if k not in ("rss_mib", "endpoints", "by_endpoint_and_status")}, indent=1))
for key, e in by_status.items():
    print(f"{key:26} {e['requests']:6} req  p50 {e['p50_ms']:8.0f} ms  p99 {e['p99_ms']:8.0f} ms")
r = report["rss_mib"]
print(f"RSS MiB: start {r['start']:.0f}, after warm-up {r['after_warm_up_min']:.0f}–"
      f"{r['after_warm_up_max']:.0f}, end {r['end']:.0f}; last third vs first: {growth:+.0f}")
ok = (server_errors == 0 and report["panics_in_log"] == 0 and len(checks) == users
      and report["sessions_mismatched"] == 0)
sys.exit(0 if ok else 1)
