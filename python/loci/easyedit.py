"""EasyEdit's files in Loci: its hyper-parameter YAML for ROME, MEMIT, AlphaEdit, EMMET and
FT becomes the keyword arguments of ``Model.edit`` and ``loci.eval``; its CounterFact and zsRE
JSON become facts. Keys Loci has no use for (module names, devices, caches) are named in a
warning; keys that contradict what Loci does are refused."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from . import _loci

PathLike = Union[str, "os.PathLike[str]"]

#: EasyEdit's ``alg_name`` → Loci's method.
ALGORITHMS = {
    "ROME": "rome",
    "MEMIT": "memit",
    "AlphaEdit": "alphaedit",
    "EMMET": "emmet",
    "FT": "ft",
}

#: Keys with the same meaning under the same name.
SAME = {
    "rome": {
        "v_num_grad_steps",
        "v_lr",
        "v_weight_decay",
        "clamp_norm_factor",
        "kl_factor",
        "mom2_adjustment",
    },
    "memit": {
        "v_num_grad_steps",
        "v_lr",
        "v_weight_decay",
        "clamp_norm_factor",
        "kl_factor",
        "mom2_update_weight",
    },
    "ft": {"lr", "norm_constraint"},
}
SAME["alphaedit"] = SAME["memit"] - {"mom2_update_weight"}
SAME["emmet"] = SAME["memit"] | {"emmet_lambda"}

#: Keys renamed: EasyEdit's name → Loci's.
RENAMED = {
    "alphaedit": {"nullspace_threshold": "null_threshold", "L2": "l2"},
    "ft": {"num_steps": "steps"},
}

#: Keys whose only allowed values are what Loci does (checked, then dropped).
CHECKED = {
    "ft": {"kl_factor"},
    "memit": {"mom2_adjustment"},
    "emmet": {"mom2_adjustment", "update_norm_lambda"},
    "alphaedit": {"mom2_adjustment"},
}

#: Keys that say how EasyEdit runs, not what the method does: no Loci equivalent needed.
RUNTIME = {
    "alg_name",
    "model_name",
    "device",
    "model_parallel",
    "fp16",
    "stats_dir",
    "mom2_dataset",
    "mom2_n_samples",
    "mom2_dtype",
    "rewrite_module_tmp",
    "layer_module_tmp",
    "mlp_module_tmp",
    "attn_module_tmp",
    "ln_f_module",
    "lm_head_module",
    "v_loss_layer",
    "batch_size",
    "max_length",
    "layer_selection",
    "fact_token",
    "context_template_length_params",
    "objective_optimization",
    "weight_decay",
    "max_epochs",
}


def hparams(
    source: Union[PathLike, Mapping[str, Any]], method: Optional[str] = None
) -> Dict[str, Any]:
    """EasyEdit hyper-parameters (a YAML file or its dict) as keyword arguments of
    ``Model.edit`` / ``loci.eval.counterfact``: ``method``, ``layer`` or ``layers`` and the
    method's settings under Loci's names.

    Raises:
        LociError: ``alg_name`` disagrees with ``method``, or a key contradicts Loci (ROME at
            several layers, a key read at another token than the subject's last, MEMIT without
            key statistics, fine-tuning with weight decay or a KL term).
    """
    h = {k: _number(v) for k, v in _read(source).items()}
    alg = h.get("alg_name")
    name = ALGORITHMS.get(str(alg)) if alg is not None else None
    if alg is not None and name is None:
        raise _loci.LociError(
            f"EasyEdit's {alg!r} is not a method Loci has ({', '.join(ALGORITHMS)})"
        )
    if method and name and method != name:
        raise _loci.LociError(f"the hyper-parameters are {alg}'s, not {method}'s")
    method = method or name
    if method is None:
        raise _loci.LociError("no alg_name in the hyper-parameters: say method=…")
    _refuse_contradictions(method, h)
    kwargs: Dict[str, Any] = {"method": method}
    layers = [int(x) for x in h.get("layers", [])]
    if method == "rome":
        if len(layers) != 1:
            raise _loci.LociError(f"ROME edits one layer; the hyper-parameters name {layers}")
        kwargs["layer"] = layers[0]
    elif layers:
        kwargs["layers"] = layers
    if method == "rome" and "context_template_length_params" in h:
        # EasyEdit's lengths count the template's start token; Loci's count new tokens only.
        kwargs["context_templates"] = [
            [int(length) - 1, int(n)] for length, n in h["context_template_length_params"]
        ]
    if method == "ft" and "objective_optimization" in h:
        kwargs["objective"] = {"prompt_last": "last_token", "target_new": "sequence"}[
            h["objective_optimization"]
        ]
    unknown = []
    for key, value in h.items():
        if key == "layers":
            continue
        if key in SAME[method]:
            kwargs[key] = value
        elif key in RENAMED.get(method, {}):
            kwargs[RENAMED[method][key]] = value
        elif key not in RUNTIME and key not in CHECKED.get(method, ()):
            unknown.append(key)
    if unknown:
        warnings.warn(
            f"EasyEdit keys Loci does not use: {', '.join(sorted(unknown))}", stacklevel=2
        )
    return kwargs


def _refuse_contradictions(method: str, h: Mapping[str, Any]) -> None:
    def refuse(why: str) -> None:
        raise _loci.LociError(f"EasyEdit hyper-parameters: {why}")

    if h.get("fact_token", "subject_last") != "subject_last":
        refuse(f"fact_token {h['fact_token']!r}: Loci reads the key at the subject's last token")
    if method in ("memit", "emmet", "alphaedit") and h.get("mom2_adjustment") is False:
        refuse(f"{method.upper()} solves with the key statistics: mom2_adjustment cannot be false")
    if method == "emmet" and float(h.get("update_norm_lambda", 0) or 0) != 0:
        refuse("EMMET with update_norm_lambda: Loci's EMMET has no penalty on the update's norm")
    if h.get("layer_selection", "all") != "all":
        refuse(f"layer_selection {h['layer_selection']!r}: Loci edits all the given layers")
    if method == "ft":
        if float(h.get("weight_decay", 0) or 0) != 0:
            refuse("fine-tuning with weight decay: Loci's FT has an L∞ constraint instead")
        if float(h.get("kl_factor", 0) or 0) != 0:
            refuse("fine-tuning with a KL term: Loci's FT has none")
        if h.get("objective_optimization", "prompt_last") not in ("prompt_last", "target_new"):
            refuse(f"objective_optimization {h['objective_optimization']!r}")


def _number(v: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``5e-1`` as a string; EasyEdit's files are full of them."""
    if isinstance(v, str):
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
    return v


def _read(source: Union[PathLike, Mapping[str, Any]]) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    import yaml

    text = Path(source).read_text()
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise _loci.LociError(f"{os.fspath(source)}: not a YAML mapping of hyper-parameters")
    return data


def facts(source: Union[PathLike, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Facts for ``Model.edit``/``Model.memit`` from EasyEdit's CounterFact records
    (``prompt``, ``subject``, ``target_new``, ``ground_truth``), its zsRE records (``src``,
    ``subject``, ``alt``, ``answers``) or ROME's CounterFact records."""
    records = (
        json.loads(Path(source).read_text()) if isinstance(source, (str, os.PathLike)) else source
    )
    out = []
    for r in records:
        if "requested_rewrite" in r:
            rw = r["requested_rewrite"]
            out.append(
                {
                    "prompt": rw["prompt"],
                    "subject": rw["subject"],
                    "target": rw["target_new"]["str"],
                    "target_true": rw["target_true"]["str"],
                }
            )
        elif "src" in r:
            out.append(
                {
                    "prompt": r["src"],
                    "subject": r["subject"],
                    "target": r["alt"],
                    "target_true": r["answers"][0],
                }
            )
        elif "ground_truth" in r:
            out.append(
                {
                    "prompt": r["prompt"],
                    "subject": r["subject"],
                    "target": r["target_new"],
                    "target_true": r["ground_truth"],
                }
            )
        else:
            raise _loci.LociError(f"not an EasyEdit CounterFact or zsRE record: {sorted(r)}")
    return out
