#!/usr/bin/env bash
# Runs every check and test of Loci on a fresh machine: installs tools, fetches the real test
# model, then formatting, lints, native tests, the Python package's tests and notebook, the
# study's Slurm array job on a real one-node Slurm, the wasm32 build of the core and the web
# app, the browser end-to-end runs (served by `loci serve`, and as a static build with no
# server), and a short run of the server's load test.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/loci-target}"
export PATH="$HOME/.cargo/bin:$PATH"
step() { printf '\n=== %s (%s)\n' "$1" "$(date +%T)"; }

step "tools"
"$root/scripts/install-tools.sh"
step "default model"
"$root/scripts/fetch-model.sh"
step "format"
cargo fmt --all -- --check
step "core floors (imports run only downward)"
python3 "$root/scripts/check-floors.py"
step "clippy (native)"
cargo clippy --release --workspace --all-targets -- -D warnings
step "clippy (wasm32)"
cargo clippy --release -p loci-core -p loci-frontend --target wasm32-unknown-unknown -- -D warnings
step "tests (and the core examples' build)"
cargo test --release --workspace
step "python package (pip install ./python, pytest, the example notebook executed)"
"$root/scripts/python-test.sh"
step "study on a real one-node Slurm (array job, a task requeued mid-way)"
"$root/scripts/slurm-test.sh"
step "core API docs (missing docs denied, warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --release -p loci-core --no-deps
step "web app (trunk)"
trunk build
test -s dist/index.html && ls dist/*.wasm >/dev/null
step "browser end-to-end"
"$root/scripts/e2e.sh"
step "static build end-to-end (no server: the tab computes statistics and edits)"
"$root/scripts/e2e-static.sh"
step "load tests, short (10 visitors, 1 minute each; the full runs: scripts/load-test.sh)"
"$root/scripts/load-test.sh" --users 10 --minutes 1 --out "$CARGO_TARGET_DIR/load-smoke.json"
"$root/scripts/load-test.sh" --scenario many --users 10 --minutes 1 \
  --out "$CARGO_TARGET_DIR/load-smoke-many.json"
step "cuda feature (type-check; no GPU here)"
"$root/scripts/build-cuda.sh" --check
step "done"
