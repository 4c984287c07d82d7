"""Shared fixtures: the real SmolLM2-135M model (scripts/fetch-model.sh), the `loci` binary
the same checkout built (to compare with the CLI's JSON), and small key statistics computed
once per session (both Python and the CLI edit with them)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import loci

ROOT = Path(__file__).resolve().parents[2]
MODEL = Path(
    os.environ.get("LOCI_TEST_MODEL", ROOT / "models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")
)
DATA = Path(os.environ.get("LOCI_DATA", ROOT.parent / "shared/data"))
LOCI_BIN = Path(
    os.environ.get(
        "LOCI_BIN",
        Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/loci-target"))
        / "release/loci",
    )
)

CORPUS = DATA / "wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl"
PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
#: ROME's layer for SmolLM2 in Loci's shipped settings.
LAYER = 6
#: Few v* steps: the same edit in Python and in the CLI, quickly.
STEPS = 6


@pytest.fixture(scope="session")
def model() -> loci.Model:
    if not MODEL.exists():
        pytest.fail(f"the test model is missing at {MODEL}: run scripts/fetch-model.sh")
    return loci.load(MODEL)


@pytest.fixture(scope="session")
def stats_dir(model: loci.Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stats")
    model.stats(layers=[LAYER], corpus=CORPUS, tokens=4000, out=out, progress=False)
    return out


@pytest.fixture
def clean(model: loci.Model):
    """The model with no edit, before and after the test."""
    assert model.edits == 0
    yield model
    model.undo_all()


def cli(*args: str) -> str:
    """Runs the `loci` binary; its standard output."""
    if not LOCI_BIN.exists():
        pytest.fail(f"no loci binary at {LOCI_BIN}: cargo build --release first")
    done = subprocess.run(
        [str(LOCI_BIN), *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def cli_json(*args: str):
    return json.loads(cli(*args).strip().splitlines()[-1])
