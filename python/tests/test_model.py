"""The Python package against the CLI on the same inputs, and what a notebook user relies
on: numpy shapes and dtypes, bit-exact undo, Ctrl-C, the GIL released, clear errors."""

from __future__ import annotations

import _thread
import json
import threading
import time

import numpy as np
import pytest
from conftest import CORPUS, LAYER, MODEL, PROMPT, STEPS, SUBJECT, cli_json

import loci


def safetensors_parts(path):
    """A safetensors file's header as JSON (its metadata's order varies) and its data."""
    data = path.read_bytes()
    n = 8 + int.from_bytes(data[:8], "little")
    return json.loads(data[8:n]), data[n:]


def weights(model: loci.Model) -> np.ndarray:
    return model.down_proj(LAYER).view(np.uint32).copy()


def test_predict_and_generate_equal_the_cli(model):
    top = model.predict(PROMPT, top=5)
    assert (
        top
        == cli_json("predict", "--model", str(MODEL), "--prompt", PROMPT, "--top", "5", "--json")[
            "top"
        ]
    )
    assert top[0]["token"] == " Paris" and set(top[0]) == {"token", "id", "prob"}
    text = model.generate(PROMPT, max_new_tokens=5)
    assert (
        text
        == cli_json(
            "generate", "--model", str(MODEL), "--prompt", PROMPT, "--max-new-tokens", "5", "--json"
        )["text"]
    )
    ids = model.token_ids(SUBJECT)
    assert ids.dtype == np.uint32 and len(ids) == len(model.tokenize(SUBJECT)) == 4
    assert (
        model.decode(ids) == SUBJECT and model.decode(ids.astype(np.int64)[1:]) == " Eiffel Tower"
    )
    with pytest.raises(loci.LociError, match="outside the vocabulary"):
        model.decode(np.array([10**7]))


def test_trace_scores_equal_the_cli_and_are_numpy(model):
    t = model.trace(PROMPT, SUBJECT, kind=["hidden", "mlp"], samples=2, window=4, progress=False)
    ref = cli_json(
        "trace",
        "--model",
        str(MODEL),
        "--prompt",
        PROMPT,
        "--subject",
        SUBJECT,
        "--kind",
        "hidden,mlp",
        "--samples",
        "2",
        "--window",
        "4",
        "--json",
    )
    n_tokens, n_layer = len(t.tokens), model.n_layer
    assert t.scores.shape == (2, n_tokens, n_layer) and t.scores.dtype == np.float32
    for kind in ("hidden", "mlp"):
        got = t.scores_by_kind[kind]
        assert got.shape == (n_tokens, n_layer)
        np.testing.assert_allclose(got, np.asarray(ref["scores"][kind]), atol=1e-6, rtol=0)
    assert t.tokens == ref["tokens"] and t.answer == ref["answer"]
    assert abs(t.high - ref["high"]) < 1e-6 and abs(t.low - ref["low"]) < 1e-6
    # The last token's residual restored after the last layer is the clean run's own.
    assert abs(t.scores_by_kind["hidden"][-1, -1] - t.high) < 1e-4
    assert "<svg" in t._repr_svg_() and "<figcaption>" in t._repr_html_()
    assert loci.Trace(json.loads(t.to_json())).scores.shape == t.scores.shape


def test_trace_plots_on_a_matplotlib_axis(model):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    t = model.trace(PROMPT, SUBJECT, kind="hidden", samples=1, progress=False)
    ax = t.plot()
    assert len(ax.get_yticklabels()) == len(t.tokens)
    assert sum(label.get_text().endswith("*") for label in ax.get_yticklabels()) == 4


def test_long_calls_draw_a_tqdm_bar(model, capsys):
    pytest.importorskip("tqdm")
    model.trace(PROMPT, SUBJECT, kind="hidden", samples=1)
    assert "tracing: hidden" in capsys.readouterr().err


def test_rome_report_equals_the_cli_and_files_go_both_ways(clean, stats_dir, tmp_path):
    model = clean
    before = weights(model)
    e = model.rome(
        PROMPT, SUBJECT, "Rome", v_num_grad_steps=STEPS, stats_dir=stats_dir, progress=False
    )
    saved = tmp_path / "cli.edit"
    ref = cli_json(
        "edit",
        "--model",
        str(MODEL),
        "--prompt",
        PROMPT,
        "--subject",
        SUBJECT,
        "--target",
        "Rome",
        "--v-steps",
        str(STEPS),
        "--stats",
        str(stats_dir),
        "--save-edit",
        str(saved),
        "--json",
    )
    for r in (e.report, ref):
        r.pop("seconds")
    assert e.report == ref
    assert model.predict(PROMPT, top=1)[0]["token"] == " Rome"
    edited = weights(model)
    # The CLI's file applies in Python; Python's in the CLI.
    e.undo()
    assert np.array_equal(weights(model), before)
    model.apply(saved)
    assert np.array_equal(weights(model), edited)
    model.undo()
    # A handle undoes its own edit only: never one applied after it was undone.
    first = model.apply(saved)
    model.undo()
    second = model.apply(saved)
    first.undo()
    assert first.undone and not second.undone and model.edits == 1
    assert first.method == second.method == "rome"
    second.undo()
    assert model.edits == 0
    mine = tmp_path / "python.edit"
    e.save(mine)
    out = cli_json(
        "predict",
        "--model",
        str(MODEL),
        "--apply-edit",
        str(mine),
        "--prompt",
        PROMPT,
        "--top",
        "1",
        "--json",
    )
    assert out["top"][0]["token"] == " Rome"


def eiffel_to_rome(model: loci.Model, stats_dir) -> loci.Edit:
    """A quick ROME edit of the Eiffel Tower to Rome (few steps, no generations)."""
    return model.edit(
        PROMPT,
        SUBJECT,
        "Rome",
        v_num_grad_steps=STEPS,
        stats_dir=stats_dir,
        generate_tokens=0,
        progress=False,
    )


def test_the_context_manager_undoes_bit_exactly_also_when_the_block_raises(clean, stats_dir):
    model = clean
    before = weights(model)
    with eiffel_to_rome(model, stats_dir) as e:
        assert model.edits == 1 and not np.array_equal(weights(model), before)
        assert e.report["after"]["rewrite"]["target_new"] > 0.5
    assert model.edits == 0 and np.array_equal(weights(model), before)
    with pytest.raises(RuntimeError, match="inside"):
        with eiffel_to_rome(model, stats_dir):
            raise RuntimeError("inside the block")
    assert model.edits == 0 and np.array_equal(weights(model), before)


def test_memit_family_and_finetuning_edit_and_undo(clean, stats_dir, tmp_path):
    model = clean
    model.stats(layers=[4, 5, 6], corpus=CORPUS, tokens=4000, out=stats_dir, progress=False)
    before = [model.down_proj(layer).copy() for layer in (4, 5, 6)]
    facts = [{"prompt": PROMPT, "subject": SUBJECT, "target": "Rome"}]
    # Settings may come straight from numpy.
    e = model.memit(
        facts,
        method="alphaedit",
        layers=np.array([4, 5, 6]),
        v_num_grad_steps=np.int64(STEPS),
        stats_dir=stats_dir,
        null_energy=np.float32(0.3),
        generate_tokens=0,
        progress=False,
    )
    assert e.report["method"] == "alphaedit" and len(e.report["delta_norms"]) == 3
    ft = model.finetune(
        PROMPT, SUBJECT, "Rome", layers=[6], steps=3, generate_tokens=0, progress=False
    )
    assert model.edits == 2
    # Statistics computed now are the unedited model's: layer 8 reads its keys through the
    # edited layers, and the files are cached under the unedited model's fingerprint.
    model.stats(layers=[8], corpus=CORPUS, tokens=1000, out=tmp_path / "edited", progress=False)
    with pytest.raises(loci.LociError, match="undo the 1 later"):
        e.undo()
    ft.undo()
    e.undo()
    for layer, w in zip((4, 5, 6), before):
        assert np.array_equal(model.down_proj(layer), w)
    model.stats(layers=[8], corpus=CORPUS, tokens=1000, out=tmp_path / "plain", progress=False)
    plain, edited = (tmp_path / d / "layer8.safetensors" for d in ("plain", "edited"))
    assert safetensors_parts(plain) == safetensors_parts(edited)


def test_grace_answers_its_prompt_without_changing_weights(clean):
    model = clean
    filled = PROMPT  # the subject written out: the prompt GRACE answers
    other = "Michael Jordan plays the sport of"
    before, other_before = model.predict(filled, top=1), model.predict(other, top=3)
    w = weights(model)
    with model.grace(filled, SUBJECT, "Rome", layer=20, generate_tokens=0, progress=False) as e:
        assert e.report["delta_norm"] == 0.0 and e.report["layer"] == 20
        assert model.predict(filled, top=1)[0]["token"] == " Rome"
        assert model.predict(other, top=3) == other_before
        assert np.array_equal(weights(model), w)
    assert model.predict(filled, top=1) == before
    with pytest.raises(loci.LociError, match="has no setting"):
        model.grace(filled, SUBJECT, "Rome", v_lr=0.5, progress=False)


def test_knowledge_neurons_localise_from_python(model):
    t = model.trace(PROMPT, SUBJECT, method="neurons", samples=4, progress=False)
    assert t.method == "neurons" and t.kinds == ["mlp"] and t.low == 0.0
    assert t.scores.shape == (len(t.tokens), 30)
    assert t.neurons and t.neurons[0]["attribution"] >= t.neurons[-1]["attribution"]
    with pytest.raises(loci.LociError, match="MLP neurons"):
        model.trace(PROMPT, SUBJECT, method="neurons", kind="hidden", progress=False)


def interrupt_when(ready) -> threading.Thread:
    """A thread that sends the main thread Ctrl-C once `ready()` holds."""

    def wait_then_interrupt() -> None:
        while not ready():
            time.sleep(0.01)
        _thread.interrupt_main()

    t = threading.Thread(target=wait_then_interrupt)
    t.start()
    return t


def test_ctrl_c_mid_trace_and_mid_edit_leaves_the_model_unchanged(clean, stats_dir, tmp_path):
    model = clean
    before, top = weights(model), model.predict(PROMPT, top=3)
    rows, steps = [], []
    t = interrupt_when(lambda: len(rows) >= 2)
    with pytest.raises(KeyboardInterrupt):
        model.trace(PROMPT, SUBJECT, samples=4, progress=lambda *a: rows.append(a))
    t.join()
    assert 2 <= len(rows) < rows[0][1]  # stopped after some rows, before all of them
    t = interrupt_when(lambda: len(steps) >= 2)
    with pytest.raises(KeyboardInterrupt):
        model.rome(
            PROMPT,
            SUBJECT,
            "Rome",
            v_num_grad_steps=200,
            stats_dir=stats_dir,
            progress=lambda *a: steps.append(a),
        )
    t.join()
    assert 2 <= len(steps) < 200 and steps[0][2] == "value"
    assert model.edits == 0 and np.array_equal(weights(model), before)
    passes = []
    t = interrupt_when(lambda: len(passes) >= 1)
    with pytest.raises(KeyboardInterrupt):
        model.stats(
            layers=[3],
            corpus=CORPUS,
            tokens=10**6,
            out=tmp_path,
            progress=lambda *a: passes.append(a),
        )
    t.join()
    assert passes[0][2] == "key statistics" and not list(tmp_path.iterdir())
    assert model.predict(PROMPT, top=3) == top


def test_the_gil_is_released_while_the_core_works(model):
    ticks = 0
    worker = threading.Thread(
        target=lambda: model.trace(PROMPT, SUBJECT, kind="hidden", samples=2, progress=False)
    )
    worker.start()
    while worker.is_alive():
        ticks += 1
        time.sleep(0.001)
    assert ticks > 100  # Python ran on while the trace took its ~second


def test_bad_input_raises_with_the_cores_message_and_changes_nothing(clean, stats_dir, tmp_path):
    model = clean
    before = weights(model)
    with pytest.raises(ValueError, match="the subject .the Louvre. does not occur in the prompt"):
        model.trace(PROMPT, "the Louvre", progress=False)
    with pytest.raises(loci.LociError, match="the prompt is empty"):
        model.predict("", top=1)
    with pytest.raises(loci.LociError, match='has no setting "v_learning_rate".*v_lr'):
        model.rome(PROMPT, SUBJECT, "Rome", v_learning_rate=0.1, stats_dir=stats_dir)
    with pytest.raises(loci.LociError, match="settings of the MEMIT family"):
        model.rome(PROMPT, SUBJECT, "Rome", null_threshold=0.02, stats_dir=stats_dir)
    with pytest.raises(loci.LociFileNotFoundError, match="no model at"):
        loci.load(tmp_path / "no-such-model.gguf")
    assert issubclass(loci.LociFileNotFoundError, FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        model.stats(
            layers=[LAYER], corpus=tmp_path / "no-corpus.jsonl", out=tmp_path / "s", progress=False
        )
    with pytest.raises(loci.LociError, match="dtype"):
        loci.load(MODEL, dtype="f8")
    with pytest.raises(loci.LociError, match="device"):
        loci.load(MODEL, device="tpu")
    corrupt = tmp_path / "corrupt.edit"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    with pytest.raises(loci.LociError):
        model.apply(corrupt)
    # Statistics of another layer under this layer's name: refused, not used.
    wrong = tmp_path / "wrong-stats"
    wrong.mkdir()
    (wrong / "layer5.safetensors").write_bytes(
        (stats_dir / f"layer{LAYER}.safetensors").read_bytes()
    )
    with pytest.raises(loci.LociError, match="these statistics are for layer 6, not 5"):
        model.rome(PROMPT, SUBJECT, "Rome", layer=5, stats_dir=wrong, progress=False)
    with pytest.raises(loci.LociError, match="study|eval"):
        model._engine.run_command(["predict", "--prompt", "x"])
    assert model.edits == 0 and np.array_equal(weights(model), before)
