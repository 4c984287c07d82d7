"""The example notebook runs from top to bottom in a real Jupyter kernel and shows what it
promises: the heatmap inline, Rome after the edit, CounterFact's scores, Paris after undo."""

from __future__ import annotations

import json
import os

import pytest
from conftest import DATA, MODEL, ROOT

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")


def text_of(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.extend(str(v) for k, v in out.get("data", {}).items() if k == "text/plain")
    return "".join(parts)


def test_the_eiffel_notebook_traces_edits_evaluates_and_undoes(tmp_path):
    path = ROOT / "python/examples/eiffel.ipynb"
    nb = nbformat.read(path, as_version=4)
    os.environ["LOCI_TEST_MODEL"], os.environ["LOCI_DATA"] = str(MODEL), str(DATA)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    trace = next(c for c in code if c.source.startswith("trace = "))
    assert any("image/svg+xml" in o.get("data", {}) for o in trace.outputs)
    assert "' Paris'" in text_of(code[1])
    edited = next(c for c in code if "model.rome(" in c.source)
    assert text_of(edited).index("' Rome'") < text_of(edited).find(
        "' Paris'"
    ) or "' Paris'" not in text_of(edited)
    scores = next(c for c in code if "loci.eval.counterfact" in c.source)
    assert "efficacy_score" in text_of(scores)
    undone = next(c for c in code if "edit.undo()" in c.source)
    assert "| bit for bit back: True | edits applied: 0" in text_of(undone)
    assert text_of(undone).index("' Paris'") < text_of(undone).find(
        "' Rome'"
    ) or "' Rome'" not in text_of(undone)
    (tmp_path / "executed.ipynb").write_text(json.dumps(nb))
