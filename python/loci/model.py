"""A loaded model: predictions, tracing, key statistics and edits (ROME, MEMIT, AlphaEdit,
EMMET, fine-tuning) that stay applied until undone, bit for bit."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from . import _json, _loci
from ._progress import ProgressArg, heard
from .trace import Trace

PathLike = Union[str, "os.PathLike[str]"]

#: The editing methods, as ``method=`` names them.
METHODS = ("rome", "memit", "alphaedit", "emmet", "ft", "grace")
#: The kinds a trace restores.
KINDS = ("hidden", "mlp", "attn")


def load(path: PathLike, device: str = "cpu", dtype: str = "f32") -> "Model":
    """Loads a model: a Hugging Face folder (config.json, safetensors, tokenizer.json) or a
    .gguf file, on ``device`` (``cpu``, or ``cuda`` in a CUDA build) in ``dtype`` (``f32``,
    ``f16`` or ``bf16``).

    Raises:
        LociFileNotFoundError: nothing at ``path``.
        LociError: the files are corrupt, inconsistent or of an unsupported family.
    """
    return Model(_loci.Engine.load(os.fspath(path), device, dtype), Path(path))


class Edit:
    """An edit applied to a model. ``report`` is what ``loci edit --json`` prints for it
    (probabilities before and after, ‖ΔW‖, losses); ``data`` the edit file's bytes, the same
    file ``loci edit --save-edit`` writes. As a context manager it is undone on exit."""

    def __init__(
        self, model: "Model", method: str, report: Dict[str, Any], data: bytes, number: int
    ) -> None:
        self.model = model
        self.method = method
        self.report = report
        self.data = data
        self._number = number

    @property
    def undone(self) -> bool:
        """Whether the edit is no longer applied (undone here or by ``Model.undo``)."""
        return self.model._engine.position(self._number) is None

    def save(self, path: PathLike) -> None:
        """Writes the edit file (apply it with ``Model.apply``, ``loci … --apply-edit`` or the
        web app's upload)."""
        Path(path).write_bytes(self.data)

    def undo(self) -> None:
        """Undoes this edit, bit for bit; it must be the newest one still applied (nothing
        happens if it is already undone)."""
        self.model._engine.undo(self._number)

    def __enter__(self) -> "Edit":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "undone" if self.undone else "applied"
        norms = self.report.get("delta_norm", self.report.get("delta_norms"))
        return f"<Edit {self.method} ({state}), ‖ΔW‖ {norms}>"


class Model:
    """A model with the edits applied to it (newest last). Long calls release the GIL, show
    a progress bar (``progress=``) and stop at Ctrl-C or a notebook's stop button, leaving the
    model as it was."""

    def __init__(self, engine: "_loci.Engine", path: Path) -> None:
        self._engine = engine
        self.path = path

    # --- reading the model -------------------------------------------------------------

    @property
    def info(self) -> Dict[str, Any]:
        """``name``, ``n_layer``, ``d_model``, ``d_ff``, ``edits``, and under ``info`` the
        family, parameters, dtype, device, format and fingerprint."""
        return json.loads(self._engine.info())

    @property
    def n_layer(self) -> int:
        """The number of transformer blocks."""
        return int(self.info["n_layer"])

    @property
    def edits(self) -> int:
        """How many edits are applied."""
        return self._engine.edits()

    def predict(self, prompt: str, top: int = 10) -> List[Dict[str, Any]]:
        """The ``top`` most likely next tokens: ``[{"token", "id", "prob"}, …]``, as
        ``loci predict --json``'s ``top``."""
        return json.loads(self._engine.predict(prompt, top))["top"]

    def generate(
        self, prompt: str, max_new_tokens: int = 30, top_k: Optional[int] = None, seed: int = 0
    ) -> str:
        """Continues ``prompt``: greedily, or sampling among the ``top_k`` most likely tokens.
        Returns the prompt and its continuation."""
        return json.loads(self._engine.generate(prompt, max_new_tokens, top_k, seed))["text"]

    def tokenize(self, text: str) -> List[str]:
        """The tokens the model reads for ``text`` (``token_ids`` gives their ids)."""
        return self._engine.tokenize(text)[1]

    def token_ids(self, text: str) -> np.ndarray:
        """The token ids of ``text`` (with the special tokens the model adds), a uint32
        array."""
        return np.asarray(self._engine.tokenize(text)[0], dtype=np.uint32)

    def decode(self, ids: Any) -> str:
        """The text of token ids: a list or any integer numpy array."""
        return self._engine.decode([int(i) for i in np.asarray(ids).ravel()])

    def down_proj(self, layer: int) -> np.ndarray:
        """Layer ``layer``'s MLP output matrix (d_model × d_ff, float32): the one ROME and
        MEMIT rewrite."""
        data, rows, cols = self._engine.down_proj(layer)
        return np.frombuffer(data, dtype="<f4").reshape(rows, cols).copy()

    # --- tracing -----------------------------------------------------------------------

    def trace(
        self,
        prompt: str,
        subject: str,
        kind: Union[str, Sequence[str], None] = None,
        samples: Optional[int] = None,
        window: int = 10,
        noise: Union[str, float] = "3x",
        answer: Optional[str] = None,
        full_answer: bool = False,
        seed: int = 1,
        method: str = "exact",
        progress: ProgressArg = True,
    ) -> Trace:
        """Causal tracing of ``subject`` in ``prompt`` (``loci trace``): the subject's
        embeddings noised (``3x`` their std, a σ, or ``u0.1`` uniform), each state restored in
        turn. ``kind`` is ``hidden``, ``mlp``, ``attn``, ``all`` (the default) or a list;
        ``method`` is ``exact``, ``attribution`` (attribution patching's one-backward estimate)
        or ``neurons`` (knowledge neurons: integrated gradients over the MLP neurons at the
        subject's last token and the last, ``samples`` points of the path, default 20; the
        neurons past the threshold in ``Trace.neurons``)."""
        neurons = method == "neurons"
        if kind is None:
            kind = "mlp" if neurons else "all"
        kinds = list(KINDS) if kind == "all" else [kind] if isinstance(kind, str) else list(kind)
        if samples is None:
            samples = 20 if neurons else 10
        with heard(progress, "tracing") as cb:
            text = self._engine.trace(
                prompt,
                subject,
                kinds,
                samples,
                window,
                str(noise),
                answer,
                full_answer,
                seed,
                method,
                cb,
            )
        return Trace(json.loads(text))

    # --- editing -----------------------------------------------------------------------

    def stats(
        self,
        layers: Optional[Sequence[int]] = None,
        corpus: Optional[PathLike] = None,
        tokens: int = 100_000,
        max_len: int = 1024,
        out: Optional[PathLike] = None,
        progress: ProgressArg = True,
    ) -> Path:
        """Key statistics E[kkᵀ] of ``layers`` (default: where ROME and MEMIT edit) over the
        first ``tokens`` tokens of ``corpus`` (JSONL with a ``text`` field, or plain text;
        default: the Wikipedia sample), as ``loci stats`` computes them, into ``out`` (default:
        the model's cache, where edits look). Layers already there are kept. Returns the
        folder."""
        layers = [int(x) for x in layers] if layers is not None else self._engine.default_layers()
        with heard(progress, "key statistics") as cb:
            folder = self._engine.stats(layers, _path(corpus), tokens, max_len, _path(out), cb)
        return Path(folder)

    def rome(
        self, prompt: str, subject: str, target: str, layer: Optional[int] = None, **settings: Any
    ) -> Edit:
        """ROME: rewrites one fact at ``layer`` (default: the model's). ``prompt`` holds the
        subject, or ``{}`` where it goes. Keyword arguments change ROME's settings
        (``v_lr``, ``v_num_grad_steps``, ``kl_factor``, …); see ``Model.edit``."""
        return self.edit(prompt, subject, target, method="rome", layer=layer, **settings)

    def memit(
        self,
        facts: Sequence[Dict[str, Any]],
        method: str = "memit",
        layers: Optional[Sequence[int]] = None,
        **settings: Any,
    ) -> Edit:
        """MEMIT (or ``alphaedit``, ``emmet``): many facts at once over ``layers``. Each fact
        is ``{"prompt", "subject", "target"}`` (``target_true`` optional), or a CounterFact
        ``requested_rewrite``."""
        return self._edit(method, [_fact(f) for f in facts], None, layers, settings)

    def finetune(
        self,
        prompt: str,
        subject: str,
        target: str,
        layers: Optional[Sequence[int]] = None,
        **settings: Any,
    ) -> Edit:
        """Constrained fine-tuning of ``layers``' MLP output matrices on one fact."""
        return self.edit(prompt, subject, target, method="ft", layers=layers, **settings)

    def grace(
        self, prompt: str, subject: str, target: str, layer: Optional[int] = None, **settings: Any
    ) -> Edit:
        """GRACE: a codebook entry at ``layer``'s MLP (the prompt's key there and the output it
        gets instead); no weight changes, and only this prompt (within the radius ``eps``) is
        answered differently. Settings: ``eps``, ``edit_lr``, ``n_iter``, ``init`` (``cold`` or
        ``warm``), ``seed``."""
        return self.edit(prompt, subject, target, method="grace", layer=layer, **settings)

    def edit(
        self,
        prompt: str,
        subject: str,
        target: str,
        method: str = "rome",
        layer: Optional[int] = None,
        layers: Optional[Sequence[int]] = None,
        target_true: Optional[str] = None,
        **settings: Any,
    ) -> Edit:
        """Rewrites one fact by ``method`` (rome, memit, alphaedit, emmet, ft, grace) and keeps the
        edit applied; returns it. Use it as ``with model.edit(...) as e:`` to undo it on exit,
        also when the block raises.

        Keyword arguments: the method's settings by their Loci names (``v_lr``,
        ``v_num_grad_steps``, ``clamp_norm_factor``, ``kl_factor``, ``mom2_update_weight``,
        ``norm_constraint``, ``null_threshold``, …; an unknown name is refused, listing the
        known ones), and ``paraphrase=[…]``, ``neighborhood=[…]`` (prompts read before and
        after), ``generate_tokens`` (default 20), ``stats_dir``, ``corpus``, ``stats_tokens``
        (where key statistics come from), ``progress``."""
        fact = {"prompt": prompt, "subject": subject, "target": target}
        if target_true is not None:
            fact["target_true"] = target_true
        return self._edit(method, [fact], layer, layers, settings)

    def _edit(
        self,
        method: str,
        facts: List[Dict[str, Any]],
        layer: Optional[int],
        layers: Optional[Sequence[int]],
        settings: Dict[str, Any],
    ) -> Edit:
        settings = dict(settings)
        progress = settings.pop("progress", True)
        probes = {
            "paraphrase": list(settings.pop("paraphrase", [])),
            "neighborhood": list(settings.pop("neighborhood", [])),
            "generate_tokens": int(settings.pop("generate_tokens", 20)),
        }
        source = {
            "dir": _path(settings.pop("stats_dir", None)),
            "corpus": _path(settings.pop("corpus", None)),
            "tokens": settings.pop("stats_tokens", None),
        }
        layers = [int(x) for x in (layers if layers is not None else [])]
        before = self.edits
        try:
            with heard(progress, method) as cb:
                report, data, number = self._engine.edit(
                    method,
                    _json.dumps(facts),
                    layer,
                    layers,
                    _json.dumps(settings),
                    _json.dumps(source),
                    _json.dumps(probes),
                    cb,
                )
            return Edit(self, method, json.loads(report), bytes(data), number)
        except BaseException:
            # A Ctrl-C that lands as the call returns: the edit has no handle yet, so it goes.
            while self.edits > before:
                self._engine.undo()
            raise

    def apply(self, path: PathLike) -> Edit:
        """Applies a saved edit file (``Edit.save``'s, ``loci edit --save-edit``'s or the web
        app's download); returns it, undoable like any other."""
        data = Path(path).read_bytes()
        summary, number = self._engine.apply_file(data)
        summary = json.loads(summary)
        return Edit(self, str(summary["method"]), summary, data, number)

    def undo(self) -> bool:
        """Undoes the newest edit, bit for bit; ``False`` when none is applied."""
        return bool(self._engine.undo())

    def undo_all(self) -> int:
        """Undoes every edit; returns how many there were."""
        n = 0
        while self.undo():
            n += 1
        return n

    def __repr__(self) -> str:
        info = self.info
        return f"<loci.Model {info['name']} ({info['n_layer']} layers, {self.edits} edits)>"


def _path(p: Optional[PathLike]) -> Optional[str]:
    return None if p is None else os.fspath(p)


def _fact(f: Dict[str, Any]) -> Dict[str, Any]:
    """A fact from Python's short form or a CounterFact ``requested_rewrite``."""
    if "target_new" in f:
        new = f["target_new"]
        fact = {
            "prompt": f["prompt"],
            "subject": f["subject"],
            "target": new["str"] if isinstance(new, dict) else new,
        }
        true = f.get("target_true")
        if true is not None:
            fact["target_true"] = true["str"] if isinstance(true, dict) else true
        return fact
    unknown = set(f) - {"prompt", "subject", "target", "target_true"}
    if unknown:
        raise _loci.LociError(
            f"a fact has prompt, subject, target and target_true; not {sorted(unknown)}"
        )
    return dict(f)
