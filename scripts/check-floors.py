#!/usr/bin/env python3
"""Checks that loci-core's modules import only downward.

Every top-level module of core/src stands on a floor; a file may name `crate::M` (or `super::`
paths that leave its own module) only for modules on lower floors. Run by scripts/test.sh.
"""
import os
import re
import sys

FLOORS = [
    ["error", "clock", "progress", "rng", "threads", "tfidf"],
    ["config", "tokenizer", "hooks", "flops", "kernels", "blas"],
    ["model"],
    ["loader"],
    ["predict", "presets", "request"],
    ["trace"],
    ["edit"],
    ["eval"],
    ["study"],
    ["plot"],
]
RANK = {m: i for i, floor in enumerate(FLOORS) for m in floor}


def module_of(path, src):
    rel = os.path.relpath(path, src)
    return rel.split(os.sep)[0].removesuffix(".rs")


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(root, "core", "src")
    bad = []
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs") or (dirpath == src and f == "lib.rs"):
                continue
            path = os.path.join(dirpath, f)
            me = module_of(path, src)
            if me not in RANK:
                bad.append(f"{path}: module {me!r} has no floor in scripts/check-floors.py")
                continue
            text = open(path, encoding="utf-8").read()
            for n, line in enumerate(text.split("\n"), 1):
                code = line.split("//")[0]
                for used in re.findall(r"\bcrate::([a-z_]+)", code):
                    if used == me or used not in RANK:
                        continue
                    if RANK[used] >= RANK[me]:
                        bad.append(f"{path}:{n}: {me} (floor {RANK[me]}) imports {used} "
                                   f"(floor {RANK[used]})")
    for b in bad:
        print(b)
    print(f"core floors: {len(bad)} upward or sideways imports")
    sys.exit(1 if bad else 0)


main()
