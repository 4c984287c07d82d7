"""Running the CLI's ``eval`` and ``study`` commands on a held model: the arguments as the CLI
spells them, the dataset written where the command reads it, and a case bar that follows the
records the command appends."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from . import _json
from ._progress import ProgressArg, _tqdm, has_tqdm

#: The MEMIT family's update-rule settings, which the CLI takes as flags.
RULE_FLAGS = {
    "null_threshold": "--null-threshold",
    "null_energy": "--null-energy",
    "l2": "--l2",
    "emmet_lambda": "--emmet-lambda",
    "mom2_weight": "--mom2-weight",
}


def flag(name: str, value: Any) -> List[str]:
    """``--name value`` (nothing for ``None`` or an empty list; lists joined by commas)."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return []
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return [f"--{name.replace('_', '-')}", str(value)]


def switch(name: str, on: bool) -> List[str]:
    return [f"--{name.replace('_', '-')}"] if on else []


def method_flags(
    method: str, layer: Optional[int], layers: Optional[Sequence[int]], settings: Dict[str, Any]
) -> List[str]:
    """The method's arguments: its layers, where statistics come from, the update rule's flags
    and every other setting through ``--hparams``."""
    settings = dict(settings)
    argv = ["--method", method] + flag("layer", layer)
    if layers is not None and len(layers):
        argv += flag("layers", [int(x) for x in layers])
    argv += flag("stats", settings.pop("stats_dir", None))
    argv += flag("corpus", settings.pop("corpus", None))
    argv += flag("stats_tokens", settings.pop("stats_tokens", None))
    for key, name in RULE_FLAGS.items():
        if key in settings:
            argv += [name, str(settings.pop(key))]
    if settings:
        argv += ["--hparams", _json.dumps(settings)]
    return argv


class Dataset:
    """A dataset as a file the command reads: the given path, or a temporary JSON file of the
    given records."""

    def __init__(self, cases: Union[str, "os.PathLike[str]", Iterable[Dict[str, Any]]]) -> None:
        self._temp: Optional[str] = None
        if isinstance(cases, (str, os.PathLike)):
            self.path = os.fspath(cases)
            self.count: Optional[int] = None
        else:
            records = list(cases)
            fd, self._temp = tempfile.mkstemp(suffix=".json", prefix="loci-cases-")
            with os.fdopen(fd, "w") as f:
                _json.dump(records, f)
            self.path = self._temp
            self.count = len(records)

    def total(self, n: Optional[int]) -> Optional[int]:
        """How many cases a run of the first ``n`` (default: all) takes, when known."""
        return self.count if n is None else min(n, self.count or n)

    def close(self) -> None:
        if self._temp:
            os.unlink(self._temp)


class Output:
    """The command's JSON-lines output: the given file, or a temporary one read back and
    removed (with the states a sequence saves beside it, ``PATH.state``)."""

    def __init__(self, out: Optional[Union[str, "os.PathLike[str]"]]) -> None:
        self.keep = out is not None
        if out is None:
            fd, path = tempfile.mkstemp(suffix=".jsonl", prefix="loci-out-")
            os.close(fd)
            os.unlink(path)
            out = path
        self.path = os.fspath(out)

    def records(self) -> List[Dict[str, Any]]:
        p = Path(self.path)
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.keep:
            return
        if os.path.exists(self.path):
            os.unlink(self.path)
        shutil.rmtree(self.path + ".state", ignore_errors=True)


class LineBar:
    """A tqdm bar of the lines (records) a command has appended to its output, advanced at
    each optimisation step the core reports, so it moves while the command runs. Only the bytes
    appended since the last step are read."""

    def __init__(self, path: str, total: Optional[int], desc: str, count: Any = None) -> None:
        self.path = path
        self.count = count or (lambda line: True)
        self.read = 0
        self.bar = _tqdm()(total=total, desc=desc, leave=False)

    def __call__(self, done: int, total: int, what: str, loss: Optional[float]) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.read)
                new = f.read()
        except OSError:
            return
        whole = new[: new.rfind(b"\n") + 1]  # lines are appended whole; a partial one waits
        if whole:
            self.read += len(whole)
            lines = whole.decode().splitlines()
            self.bar.update(sum(1 for line in lines if self.count(line)))

    def close(self) -> None:
        self.bar.close()


def run(
    model: Any,
    argv: List[str],
    progress: ProgressArg,
    out: "Output",
    total: Optional[int],
    desc: str,
    count: Any = None,
) -> List[str]:
    """Runs the command line ``argv`` on a copy of ``model``, heard by ``progress`` (the
    caller's callable, or a :class:`LineBar` over ``out``'s lines that ``count``); returns the
    JSON texts it printed."""
    bar: Optional[LineBar] = None
    callback: Any = None
    if callable(progress):
        callback = progress
    elif progress and has_tqdm():
        bar = callback = LineBar(out.path, total, desc, count)
    try:
        return model._engine.run_command(argv, callback)
    finally:
        if bar is not None:
            bar.close()
