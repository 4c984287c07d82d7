"""Editing benchmarks: CounterFact (ROME's and Hase et al.'s metrics) and zsRE (token
accuracy), run by the same code as ``loci eval`` on a copy of the model (the model itself never
changes), returned as records a DataFrame takes."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from ._commands import Dataset, Output, flag, method_flags, run, switch
from ._progress import ProgressArg
from .model import Model

Cases = Union[str, "os.PathLike[str]", Iterable[Dict[str, Any]]]


class Evaluation:
    """An evaluation's results.

    Attributes:
        records: one dict per case (``loci eval --out``'s lines): the metrics after its edit
            (and after the last edit, in a sequence).
        summary: the summary ``loci eval --summary`` prints (means ×100 with their spread).
    """

    def __init__(self, records: List[Dict[str, Any]], summary: Dict[str, Any]) -> None:
        self.records = records
        self.summary = summary

    def dataframe(self) -> Any:
        """The records as a pandas DataFrame, nested fields flattened (needs pandas)."""
        import pandas as pd

        return pd.json_normalize(self.records)

    def __repr__(self) -> str:
        return f"<Evaluation of {len(self.records)} cases: {json.dumps(self.summary)[:200]}>"


def counterfact(model: Model, cases: Cases, method: str = "rome", **options: Any) -> Evaluation:
    """Evaluates ``method`` on CounterFact cases: a file (ROME's format or EasyEdit's flattened
    records) or a list of records. Options (as ``loci eval``'s flags): ``n``, ``layer``,
    ``layers``, ``batch`` (facts per MEMIT-family edit), ``sequential``, ``checkpoint_every``,
    ``checkpoint_cases``, ``methods`` (with ``sequential``: each method's sequence in turn),
    ``health_texts``, ``health_tokens``, ``health_facts``, ``known`` (a sequence's health
    measures), ``generation`` (the fluency test; default off), ``snippets``, ``out`` (a
    JSON-lines file to keep, and to continue a stopped run from), ``stats_dir``, ``corpus``,
    ``stats_tokens``, ``progress``; any other keyword is a setting of the method (``v_lr=…``)."""
    return _evaluate(model, cases, method, None, options)


def zsre(
    model: Model, cases: Cases, method: str = "rome", target: str = "answer", **options: Any
) -> Evaluation:
    """Evaluates ``method`` on zsRE records (MEND's schema, as EasyEdit's and ROME's files):
    ``target`` ``answer`` writes ``answers[0]`` (ROME's evaluation), ``alt`` the alternative
    (MEND's and EasyEdit's). Options as :func:`counterfact`'s."""
    return _evaluate(model, cases, method, target, options)


def _evaluate(
    model: Model, cases: Cases, method: str, zsre_target: Optional[str], options: Dict[str, Any]
) -> Evaluation:
    options = dict(options)
    progress: ProgressArg = options.pop("progress", True)
    out = Output(options.pop("out", None))
    dataset = Dataset(cases)
    try:
        n = options.pop("n", None)
        argv = ["eval", "--dataset", dataset.path, "--out", out.path, "--summary"]
        argv += flag("n", n) + flag("batch", options.pop("batch", None))
        argv += flag("zsre_target", zsre_target)
        argv += switch("sequential", options.pop("sequential", False))
        argv += flag("checkpoint_every", options.pop("checkpoint_every", None))
        argv += flag("checkpoint_cases", options.pop("checkpoint_cases", None))
        argv += flag("methods", options.pop("methods", None))
        for health in ("health_texts", "health_tokens", "health_facts", "known"):
            argv += flag(health, options.pop(health, None))
        argv += switch("no_generation", not options.pop("generation", False))
        argv += flag("snippets", options.pop("snippets", None))
        layers: Optional[Sequence[int]] = options.pop("layers", None)
        argv += method_flags(method, options.pop("layer", None), layers, options)
        printed = run(model, argv, progress, out, dataset.total(n), f"{method} cases", _is_case)
        summary = json.loads(printed[-1]) if printed else {}
        # A sequence's file holds its checkpoints too: the records are its cases (of a case
        # written again by a sequence continued to more cases, the last).
        records = _current([r for r in out.records() if r.get("kind", "case") == "case"])
        return Evaluation(records, summary)
    finally:
        dataset.close()
        out.close()


def _is_case(line: str) -> bool:
    """Whether a line of the output is a case's record (a sequence's checkpoints are not)."""
    return '"kind":"checkpoint"' not in line


def _current(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The records, each method's last of a case kept, in the order of those kept."""
    last = {(r.get("method"), r.get("case_id")): i for i, r in enumerate(records)}
    return [r for i, r in enumerate(records) if last[(r.get("method"), r.get("case_id"))] == i]
