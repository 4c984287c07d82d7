"""A causal trace as Python sees it: numpy scores, the tokens and the answer, and its heatmap
inline in Jupyter (the same SVG as ``loci trace --plot``) or on a matplotlib axis."""

from __future__ import annotations

import html
import json
from typing import Any, Dict, List, Optional

import numpy as np

from . import _loci


class Trace:
    """One fact's trace: for each kind (``hidden``, ``mlp``, ``attn``), p(answer) with each
    (token, layer) state restored from the clean run into the corrupted one.

    Attributes:
        tokens: the prompt's tokens.
        subject_range: ``[first, end)`` of the corrupted subject tokens.
        answer: the traced answer token (``{"id", "token"}``).
        high: p(answer) in the clean run; ``low``: in the corrupted run.
        kinds: the traced kinds, in order.
        scores_by_kind: ``{kind: array (tokens × layers)}``, float32.
        record: the whole result, as ``loci trace --json`` writes it.
    """

    def __init__(self, record: Dict[str, Any]) -> None:
        self.record = record
        self.tokens: List[str] = record["tokens"]
        self.subject_range: List[int] = record["subject_range"]
        self.answer: Dict[str, Any] = record["answer"]
        self.high: float = record["high"]
        self.low: float = record["low"]
        self.kinds: List[str] = list(record["scores"].keys())
        self.scores_by_kind: Dict[str, np.ndarray] = {
            k: np.asarray(v, dtype=np.float32) for k, v in record["scores"].items()
        }

    @property
    def scores(self) -> np.ndarray:
        """The scores (tokens × layers) of the one kind traced; with several, an array
        (kinds × tokens × layers) in ``kinds`` order."""
        if len(self.kinds) == 1:
            return self.scores_by_kind[self.kinds[0]]
        return np.stack([self.scores_by_kind[k] for k in self.kinds])

    @property
    def method(self) -> str:
        """``exact`` (causal tracing), ``attribution`` (attribution patching's estimate) or
        ``neurons`` (knowledge neurons)."""
        return self.record.get("method", "exact")

    @property
    def neurons(self) -> List[Dict[str, Any]]:
        """With ``method="neurons"``: the knowledge neurons (``{"token", "layer", "neuron",
        "attribution"}``), largest attribution first; otherwise empty."""
        return list(self.record.get("neurons", []))

    @property
    def seconds(self) -> float:
        """Time the core spent on the trace."""
        return float(self.record["seconds"])

    def to_json(self) -> str:
        """The trace as ``loci trace --json`` writes it."""
        return json.dumps(self.record)

    def svg(self) -> str:
        """The heatmap as SVG (``loci trace --plot x.svg``'s picture)."""
        return _loci.trace_svg(self.to_json())

    def _repr_svg_(self) -> str:
        return self.svg()

    def _repr_html_(self) -> str:
        caption = html.escape(
            f"{self.record['prompt']!r} → {self.answer['token']!r}: "
            f"p = {self.high:.3f} clean, {self.low:.3f} corrupted"
        )
        return f"<figure>{self.svg()}<figcaption>{caption}</figcaption></figure>"

    def plot(self, ax: Any = None, kind: Optional[str] = None) -> Any:
        """Draws one kind's heatmap (default: the first) on a matplotlib axis (a new one by
        default); returns the axis. Needs matplotlib."""
        import matplotlib.pyplot as plt

        kind = kind or self.kinds[0]
        if kind not in self.scores_by_kind:
            raise ValueError(f"this trace has no {kind!r} scores (it has {self.kinds})")
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 0.3 * len(self.tokens) + 1))
        image = ax.imshow(self.scores_by_kind[kind], aspect="auto", cmap="Purples")
        first, end = self.subject_range
        labels = [t + ("*" if first <= i < end else "") for i, t in enumerate(self.tokens)]
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel(f"restored {kind} layer")
        ax.set_title(f"p({self.answer['token'].strip()!r}) with one state restored")
        ax.figure.colorbar(image, ax=ax)
        return ax

    def __repr__(self) -> str:
        shape = "×".join(str(n) for n in self.scores.shape)
        return (
            f"<Trace {self.record['prompt']!r} → {self.answer['token']!r} "
            f"({', '.join(self.kinds)}; {shape}; high {self.high:.3f}, low {self.low:.3f})>"
        )
