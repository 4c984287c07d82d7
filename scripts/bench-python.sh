#!/usr/bin/env bash
# The Python package's overhead on a trace against the `loci` binary's (python/bench/overhead.py;
# JSON out). Installs the package into the test virtualenv first, as scripts/python-test.sh does.
# Usage: scripts/bench-python.sh [--runs N] [--samples S] [--out FILE]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/loci-target}"
venv="${LOCI_VENV:-$CARGO_TARGET_DIR/python-venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip --disable-pip-version-check -q install "$root/python"
cargo build --release -p loci-backend --bin loci
"$venv/bin/python" python/bench/overhead.py --model "${LOCI_TEST_MODEL:-$root/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf}" \
  --loci "$CARGO_TARGET_DIR/release/loci" "$@"
