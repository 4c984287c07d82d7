"""JSON for what crosses into the core: numpy scalars and arrays are taken as numbers and
lists, so settings and records can come straight from numpy code."""

from __future__ import annotations

import json
from typing import Any


def _plain(v: Any) -> Any:
    tolist = getattr(v, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return tolist()
    raise TypeError(f"{type(v).__name__} is not JSON: pass numbers, strings, lists or dicts")


def dumps(v: Any) -> str:
    """``json.dumps`` that also takes numpy values."""
    return json.dumps(v, default=_plain)


def dump(v: Any, f: Any) -> None:
    """``json.dump`` that also takes numpy values."""
    json.dump(v, f, default=_plain)
