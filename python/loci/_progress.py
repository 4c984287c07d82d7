"""Progress of long calls: a tqdm bar when tqdm is installed (the notebook's own in Jupyter),
a callable of the caller's, or nothing."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

#: ``progress=`` of every long call: ``True`` (a tqdm bar when tqdm is installed), ``False``
#: (none), or a callable ``f(done, total, what, loss)`` called at each step.
ProgressArg = Union[bool, Callable[[int, int, str, Optional[float]], Any]]


class Bar:
    """Turns the core's steps (done of total, what, loss) into a tqdm bar."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: Any = None
        self._phase = ""

    def __call__(self, done: int, total: int, what: str, loss: Optional[float]) -> None:
        phase = what.split(" ")[0]
        if self.bar is None or phase != self._phase or total != self.bar.total:
            self.close()
            self.bar = _tqdm()(total=total, desc=f"{self.desc}: {phase}", leave=False)
            self._phase = phase
        self.bar.n = done
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _tqdm() -> Any:
    # tqdm.auto draws a widget in Jupyter, but warns and falls back when ipywidgets is missing.
    try:
        import ipywidgets  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm
    return tqdm


def has_tqdm() -> bool:
    try:
        _tqdm()
    except ImportError:
        return False
    return True


class heard:
    """``with heard(progress, "tracing") as cb:`` gives the callback to hand to the core and
    closes the bar afterwards."""

    def __init__(self, progress: ProgressArg, desc: str) -> None:
        self.bar: Optional[Bar] = None
        if callable(progress):
            self.callback: Optional[Callable[..., Any]] = progress
        elif progress and has_tqdm():
            self.bar = Bar(desc)
            self.callback = self.bar
        else:
            self.callback = None

    def __enter__(self) -> Optional[Callable[..., Any]]:
        return self.callback

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()
