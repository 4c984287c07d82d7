#!/usr/bin/env bash
# The Python package's overhead on a trace against the `loci` binary's (python/bench/overhead.py;
# JSON out). Installs the package into the test virtualenv first, as scripts/python-test.sh does.
# Usage: scripts/bench-python.sh [--runs N] [--samples S] [--out FILE]
set -euo pipefail
# shellcheck source=python-env.sh
source "$(dirname "$0")/python-env.sh"
install_loci
"$venv/bin/python" python/bench/overhead.py --model "${LOCI_TEST_MODEL:-$root/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf}" \
  --loci "$CARGO_TARGET_DIR/release/loci" "$@"
