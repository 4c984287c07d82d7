"""Puts two load runs of the `many` scenario side by side — the one-lane server and scheduling by
cost, run one after the other on the same machine — with the ratios of answered predictions per
second and of their latencies. Usage: compare.py ONE_LANE_JSON LANES_JSON OUT_JSON."""

import json
import sys

one_path, lanes_path, out = sys.argv[1:4]
one, lanes = json.load(open(one_path)), json.load(open(lanes_path))


def brief(r):
    keep = ("schedule", "seconds", "predictions", "by_endpoint_and_status", "share_503",
            "server_errors_other_than_503", "panics_in_log", "sessions_mismatched")
    b = {k: r[k] for k in keep}
    b["rss_mib_max"] = r["rss_mib"]["after_warm_up_max"]
    return b


def ratio(a, b):
    return a / b if b else None


p1, p2 = one["predictions"], lanes["predictions"]
report = {
    "one_lane": brief(one),
    "lanes": brief(lanes),
    "predictions_answered_per_second_ratio": ratio(p2["answered_per_second"],
                                                   p1["answered_per_second"]),
    "prediction_p99_ms": {"one_lane": p1["p99_ms"], "lanes": p2["p99_ms"]},
    "prediction_503": {"one_lane": p1["refused_503"], "lanes": p2["refused_503"]},
}
json.dump(report, open(out, "w"), indent=1)
print(json.dumps({k: v for k, v in report.items() if k not in ("one_lane", "lanes")}, indent=1))
