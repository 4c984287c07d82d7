"""loci.eval and loci.study run the CLI's own code on a copy of the model: their records and
summaries equal the CLI's for the same inputs, and the model is left as it was. EasyEdit's
hyper-parameters and datasets carry over."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS, DATA, LAYER, MODEL, ROOT, STEPS, cli_json

import loci

FIXTURES = ROOT / "python/tests/fixtures"
ROME_CASES = DATA / "counterfact/counterfact_rome_format_sample500.json"
EASYEDIT_CASES = DATA / "counterfact/easyedit_counterfact-edit.json"


def without_timing(v):
    """A record with its wall-clock fields dropped (they differ run to run)."""
    if isinstance(v, dict):
        return {k: without_timing(x) for k, x in v.items() if not k.endswith("seconds")}
    if isinstance(v, list):
        return [without_timing(x) for x in v]
    return v


def test_counterfact_eval_equals_the_clis(clean, stats_dir, tmp_path):
    model = clean
    before = model.down_proj(LAYER).copy()
    got = loci.eval.counterfact(
        model, ROME_CASES, n=2, v_num_grad_steps=STEPS, stats_dir=stats_dir, progress=False
    )
    out = tmp_path / "cli.jsonl"
    summary = cli_json(
        "eval",
        "--model",
        str(MODEL),
        "--dataset",
        str(ROME_CASES),
        "--n",
        "2",
        "--hparams",
        json.dumps({"v_num_grad_steps": STEPS}),
        "--stats",
        str(stats_dir),
        "--no-generation",
        "--summary",
        "--out",
        str(out),
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got.records) == 2
    assert without_timing(got.records) == without_timing(records)
    assert without_timing(got.summary) == without_timing(summary)
    assert np.array_equal(model.down_proj(LAYER), before) and model.edits == 0
    frame = pytest.importorskip("pandas") and got.dataframe()
    assert len(frame) == 2


def test_a_sequence_reports_its_health_and_leaves_no_saved_state(clean, stats_dir):
    model = clean
    before = model.down_proj(LAYER).copy()
    kept = set(Path(tempfile.gettempdir()).glob("loci-out-*.state"))
    got = loci.eval.counterfact(
        model,
        ROME_CASES,
        n=2,
        sequential=True,
        checkpoint_every=1,
        health_facts=20,
        health_texts=2,
        health_tokens=64,
        corpus=CORPUS,
        v_num_grad_steps=STEPS,
        stats_dir=stats_dir,
        progress=False,
    )
    assert [r["kind"] for r in got.records] == ["case", "case"]
    points = got.summary["checkpoints"]
    assert [p["cases_done"] for p in points] == [0, 1, 2]
    assert points[0]["health"]["layers"][0]["growth"] == 1.0
    assert points[2]["health"]["layers"][0]["growth"] > 1.0
    assert points[2]["health"]["perplexity"] > 1.0
    assert set(Path(tempfile.gettempdir()).glob("loci-out-*.state")) == kept
    assert np.array_equal(model.down_proj(LAYER), before) and model.edits == 0


def test_easyedit_records_and_hyper_parameters_carry_over(clean, stats_dir, capsys):
    model = clean
    records = json.loads(EASYEDIT_CASES.read_text())[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of EasyEdit's file is understood
        kwargs = loci.easyedit.hparams(FIXTURES / "easyedit-rome-smollm2.yaml")
    assert kwargs == {
        "method": "rome",
        "layer": 6,
        "v_num_grad_steps": 6,
        "v_lr": 0.5,
        "v_weight_decay": 0.001,
        "clamp_norm_factor": 4,
        "kl_factor": 0.0625,
        "mom2_adjustment": True,
        "context_templates": [[4, 10], [9, 10]],
    }
    got = loci.eval.counterfact(model, records, stats_dir=stats_dir, progress=False, **kwargs)
    assert len(got.records) == 1 and got.records[0]["case_id"] == records[0]["case_id"]
    fact = loci.easyedit.facts(records)[0]
    assert fact == {
        "prompt": records[0]["prompt"],
        "subject": records[0]["subject"],
        "target": records[0]["target_new"],
        "target_true": records[0]["ground_truth"],
    }
    method = kwargs.pop("method")
    with model.edit(
        **fact, method=method, stats_dir=stats_dir, generate_tokens=0, progress=False, **kwargs
    ) as e:
        assert (
            e.report["after"]["rewrite"]["target_new"] > e.report["before"]["rewrite"]["target_new"]
        )
    zsre_file = DATA / "zsre/zsre_mend_train-1k.json"
    zsre = loci.easyedit.facts(zsre_file)
    assert zsre[0]["prompt"].endswith("?") and zsre[0]["subject"] in zsre[0]["prompt"]
    scored = loci.eval.zsre(
        model,
        zsre_file,
        target="alt",
        n=1,
        v_num_grad_steps=STEPS,
        stats_dir=stats_dir,
    )
    assert "rome cases" in capsys.readouterr().err  # the case bar (tqdm) was drawn
    assert (
        len(scored.records) == 1 and scored.summary["cases"] == 1 and "efficacy" in scored.summary
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memit = loci.easyedit.hparams(FIXTURES / "easyedit-memit-smollm2.yaml")
    assert memit["method"] == "memit" and memit["layers"] == [4, 5, 6]
    assert memit["mom2_update_weight"] == 15000


def test_easyedit_unknown_keys_warn_and_contradictions_are_refused():
    with pytest.warns(UserWarning, match="does not use: shiny_new_knob"):
        loci.easyedit.hparams({"alg_name": "ROME", "layers": [6], "shiny_new_knob": 1})
    for bad, why in [
        ({"alg_name": "ROME", "layers": [5, 6]}, "one layer"),
        ({"alg_name": "ROME", "layers": [6], "fact_token": "last"}, "subject's last token"),
        ({"alg_name": "MEMIT", "layers": [6], "mom2_adjustment": False}, "mom2_adjustment"),
        ({"alg_name": "FT", "layers": [6], "weight_decay": 0.1}, "weight decay"),
        ({"alg_name": "EMMET", "layers": [6], "update_norm_lambda": 0.5}, "norm"),
        ({"alg_name": "GRACE", "layers": [6]}, "not a method Loci has"),
    ]:
        with pytest.raises(loci.LociError, match=why):
            loci.easyedit.hparams(bad)
    with pytest.raises(loci.LociError, match="MEMIT's, not rome's|not rome's"):
        loci.easyedit.hparams({"alg_name": "MEMIT", "layers": [6]}, method="rome")


def test_study_run_and_analysis_equal_the_clis(model, stats_dir, tmp_path):
    out = tmp_path / "study.jsonl"
    study = loci.study.run(
        model,
        ROME_CASES,
        out=out,
        n=1,
        layers=[2, LAYER],
        samples=2,
        trace_windows=3,
        no_essence=True,
        v_steps=STEPS,
        stats_dir=stats_dir,
        corpus=CORPUS,
        stats_tokens=4000,
        all_cases=True,
        min_prob=0,
        progress=False,
    )
    assert len(study.edits) == 2 and {e["layer"] for e in study.edits} == {2, LAYER}
    # The same study by the CLI: the same lines, the same analysis.
    cli_out = tmp_path / "cli.jsonl"
    cli_analysis = cli_json(
        "study",
        "run",
        "--model",
        str(MODEL),
        "--dataset",
        str(ROME_CASES),
        "--out",
        str(cli_out),
        "--n",
        "1",
        "--layers",
        f"2,{LAYER}",
        "--samples",
        "2",
        "--trace-windows",
        "3",
        "--no-essence",
        "--v-steps",
        str(STEPS),
        "--stats",
        str(stats_dir),
        "--corpus",
        str(CORPUS),
        "--stats-tokens",
        "4000",
        "--all-cases",
        "--min-prob",
        "0",
        "--json",
    )
    cli_lines = [json.loads(line) for line in cli_out.read_text().splitlines()]
    assert without_timing(study.records) == without_timing(cli_lines)
    assert without_timing(study.analysis.record) == without_timing(cli_analysis)
    again = loci.study.analyze(out)
    assert again.record == study.analysis.record and "<svg" in again._repr_svg_()
    assert model.edits == 0


def test_ctrl_c_stops_an_evaluation_at_once_and_the_model_is_unchanged(
    clean, stats_dir, tmp_path, capfd
):
    import _thread
    import threading
    import time

    model = clean
    before = model.down_proj(LAYER).copy()
    steps = []

    def interrupt() -> None:
        while len(steps) < 2:
            time.sleep(0.01)
        _thread.interrupt_main()

    t = threading.Thread(target=interrupt)
    t.start()
    out = tmp_path / "eval.jsonl"
    with pytest.raises(KeyboardInterrupt):
        loci.eval.counterfact(
            model,
            ROME_CASES,
            n=30,
            stats_dir=stats_dir,
            out=out,
            progress=lambda *a: steps.append(a),
        )
    t.join()
    # No later case was prepared, and none was recorded as failed.
    assert "cancelled" not in capfd.readouterr().err
    assert (len(out.read_text().splitlines()) if out.exists() else 0) <= 1
    assert np.array_equal(model.down_proj(LAYER), before) and model.edits == 0
