"""Loci from Python: find where a language model keeps a fact (causal tracing, attribution
patching) and rewrite it (ROME, MEMIT, AlphaEdit, EMMET, constrained fine-tuning), over the
same Rust core as the ``loci`` command line, server and web app — no second implementation.

>>> import loci
>>> model = loci.load("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")
>>> model.trace("The Eiffel Tower is located in the city of", "The Eiffel Tower")   # heatmap
>>> with model.edit("{} is located in the city of", "The Eiffel Tower", "Rome"):
...     model.predict("The Eiffel Tower is located in the city of", top=1)
"""

from . import easyedit, eval, study
from ._loci import CUDA, LociError, LociFileNotFoundError, __version__
from .model import KINDS, METHODS, Edit, Model, load
from .trace import Trace

__all__ = [
    "CUDA",
    "Edit",
    "KINDS",
    "LociError",
    "LociFileNotFoundError",
    "METHODS",
    "Model",
    "Trace",
    "__version__",
    "easyedit",
    "eval",
    "load",
    "study",
]
