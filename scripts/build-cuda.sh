#!/usr/bin/env bash
# Builds `loci` with the `cuda` feature on a machine without a GPU or nvcc (CUDA 13.0 from PyPI
# wheels, see scripts/setup-cuda.sh) and packs what a GPU machine needs into gpu-bundle/:
# bin/loci.xz (stripped, xz'd: ~5 MiB instead of ~50) and a slice of the Wikipedia corpus for key
# statistics. Then, on the GPU machine, from the repo root: bash tests/gpu/run.sh
# Usage: scripts/build-cuda.sh [--check]   (--check: type-check only, as CI does)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
"$root/scripts/setup-cuda.sh" >/dev/null
# shellcheck disable=SC1091
source "${LOCI_CUDA_DIR:-$HOME/.cache/loci-cuda}/env.sh"
# Its own target folder: the CUDA kernels take ~12 minutes to compile once and are kept.
export CARGO_TARGET_DIR="${LOCI_CUDA_TARGET:-$HOME/.cache/loci-target-cuda}"
if [ "${1:-}" = "--check" ]; then
  cargo check --release -p loci-backend --features cuda
  exit 0
fi
cargo build --release -p loci-backend --features cuda
out="$root/gpu-bundle"
mkdir -p "$out/bin" "$out/data"
strip -o "$out/bin/loci" "$CARGO_TARGET_DIR/release/loci"
xz -T0 -6 -f "$out/bin/loci"
corpus="${LOCI_DATA:-$root/../shared/data}/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl"
if [ -f "$corpus" ]; then
  head -c 3000000 "$corpus" | head -n -1 > "$out/data/wiki-slice.jsonl"
fi
du -sh "$out"/bin/* "$out"/data/* 2>/dev/null
echo "carry gpu-bundle/ to the GPU machine and run: bash tests/gpu/run.sh"
