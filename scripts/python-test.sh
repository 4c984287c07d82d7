#!/usr/bin/env bash
# The Python package on a fresh machine: a virtualenv, its lints (ruff, mypy), `pip install
# ./python` (maturin builds the abi3 wheel over the same core; only Rust and pip are needed),
# then pytest — the Python results against the `loci` binary's JSON, undo, Ctrl-C, errors,
# EasyEdit's files — and the example notebook executed in a real Jupyter kernel with its outputs
# checked.
set -euo pipefail
# shellcheck source=python-env.sh
source "$(dirname "$0")/python-env.sh"
pip install "maturin>=1.7,<2" pytest nbclient nbformat ipykernel matplotlib tqdm pandas ruff mypy
# The Python side's lints: ruff (style, imports, bugs) and mypy (types), as clippy for the Rust.
(cd "$root/python" && "$venv/bin/ruff" format --check . && "$venv/bin/ruff" check . &&
  "$venv/bin/mypy" loci)
install_loci
(cd "$root/python/tests" &&
  LOCI_BIN="$CARGO_TARGET_DIR/release/loci" MPLBACKEND=Agg "$venv/bin/python" -m pytest -q "$@")
# The other way in: the wheel itself (maturin's abi3 wheel), installed into a bare virtualenv
# with nothing but its own dependencies, imports and predicts.
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
"$venv/bin/maturin" build --release --quiet -m "$root/python/Cargo.toml" -o "$wheels/dist"
python3 -m venv "$wheels/venv"
"$wheels/venv/bin/python" -m pip --disable-pip-version-check -q install "$wheels"/dist/loci-*-abi3-*.whl
(cd "$wheels" && "$wheels/venv/bin/python" -c "
import loci, sys
m = loci.load(sys.argv[1])
top = m.predict('The Eiffel Tower is located in the city of', top=1)[0]['token']
assert top == ' Paris', top
print('wheel', loci.__version__, 'predicts', repr(top))
" "${LOCI_TEST_MODEL:-$root/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf}")
