"""Hase et al.'s study — does localisation inform editing? — run by the same code as
``loci study run`` on a copy of the model, and its analysis (regressions of edit success on
the tracing effect) as ``loci study analyze`` makes it, with its chart inline in Jupyter."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

from . import _commands, _loci
from ._commands import Dataset, Output, flag, switch
from ._progress import ProgressArg
from .eval import Cases
from .model import Model

PathLike = Union[str, "os.PathLike[str]"]


class Analysis:
    """A study's analysis (``loci study analyze --json``): the regressions per condition, the
    per-layer means and the peak-layer and large-effect edits; its chart shows inline."""

    def __init__(self, record: Dict[str, Any]) -> None:
        self.record = record

    def __getitem__(self, key: str) -> Any:
        return self.record[key]

    def svg(self) -> str:
        """The chart (``loci study analyze --plot x.svg``'s)."""
        return _loci.study_svg(json.dumps(self.record))

    def _repr_svg_(self) -> str:
        return self.svg()

    def __repr__(self) -> str:
        return f"<Analysis of {self.record.get('cases')} cases, {self.record.get('edits')} edits>"


#: ``study.run``'s options: the CLI's flags (``loci study run --help``) by their Python names.
OPTIONS = {
    "shard",
    "noise",
    "trace_windows",
    "samples",
    "localization",
    "min_prob",
    "all_cases",
    "no_essence",
    "seed",
    "v_steps",
    "batch",
    "stats_dir",
    "corpus",
    "stats_tokens",
    "stats_only",
    "norm_constraint",
    "ft_objective",
}
#: Options whose flag has another name.
RENAMED = {"stats_dir": "stats"}


class Study:
    """A study run: its JSON lines (one per case and one per edit) and their analysis (none
    after ``stats_only=True``, which only computes the key statistics)."""

    def __init__(self, records: List[Dict[str, Any]], analysis: Optional[Analysis]) -> None:
        self.records = records
        self.analysis = analysis

    @property
    def edits(self) -> List[Dict[str, Any]]:
        """The edit lines: case, method, problem, layer, scores and tracing effects."""
        return [r for r in self.records if r.get("record") == "edit"]

    def dataframe(self) -> Any:
        """The edit lines as a pandas DataFrame, nested fields flattened (needs pandas)."""
        import pandas as pd

        return pd.json_normalize(self.edits)


def run(
    model: Model,
    dataset: Cases,
    out: Optional[PathLike] = None,
    methods: Union[str, Sequence[str]] = "rome",
    problems: Union[str, Sequence[str]] = "error_injection",
    layers: Optional[Sequence[int]] = None,
    n: Optional[int] = None,
    progress: ProgressArg = True,
    **options: Any,
) -> Study:
    """Traces and edits each case at each layer (``loci study run``) and analyses the lines.
    ``out`` keeps them (a stopped run continues from it); further options as the CLI's flags:
    ``noise``, ``trace_windows``, ``samples``, ``localization`` (``exact`` or
    ``attribution``), ``min_prob``, ``all_cases``, ``no_essence``, ``seed``, ``v_steps``,
    ``batch``, ``shard``, ``stats_dir``, ``corpus``, ``stats_tokens``, ``stats_only``,
    ``norm_constraint``, ``ft_objective``; another is refused."""
    output = Output(out)
    data = Dataset(dataset)
    try:
        argv = ["study", "run", "--dataset", data.path, "--out", output.path, "--json"]
        argv += flag("methods", _names(methods)) + flag("problems", _names(problems))
        argv += flag("layers", [int(x) for x in layers] if layers is not None else None) + flag(
            "n", n
        )
        for key, value in options.items():
            if key not in OPTIONS:
                raise _loci.LociError(
                    f"study.run has no option {key!r} (its options: {', '.join(sorted(OPTIONS))})"
                )
            name = RENAMED.get(key, key)
            if type(value).__name__ in ("bool", "bool_"):
                argv += switch(name, bool(value))
            else:
                argv += flag(name, value)
        printed = _commands.run(
            model, argv, progress, output, data.total(n), "study cases", _is_case_line
        )
        analysis = Analysis(json.loads(printed[-1])) if printed else None
        return Study(output.records(), analysis)
    finally:
        data.close()
        output.close()


def analyze(results: Union[PathLike, Sequence[PathLike]], window: Optional[int] = None) -> Analysis:
    """Analyses the JSON lines of one or more study runs (files, or folders of shards)."""
    paths = [results] if isinstance(results, (str, os.PathLike)) else list(results)
    argv = ["study", "analyze", *[os.fspath(p) for p in paths], "--json"] + flag("window", window)
    return Analysis(json.loads(_loci.analyze(argv)[-1]))


def _names(v: Union[str, Sequence[str]]) -> str:
    return v if isinstance(v, str) else ",".join(v)


def _is_case_line(line: str) -> bool:
    """Whether a line of the study's output closes a case (its edits come before it)."""
    return '"record":"case"' in line
