#!/usr/bin/env bash
# Builds `loci` with the `cuda` feature on a machine without a GPU or nvcc (CUDA 13.0 from PyPI
# wheels, see scripts/setup-cuda.sh) and packs what a GPU machine needs into gpu-bundle/:
# bin/loci.xz (stripped, xz'd: ~5 MiB instead of ~50) and a slice of the Wikipedia corpus for key
# statistics; SmolLM2's GGUF (when models/ has it, scripts/fetch-model.sh) split in two parts,
# gpu-model-a/ and gpu-model-b/, carried in two calls (one transfer holds 64 MiB).
# Then, on the GPU machine, from the repo root: bash tests/gpu/run.sh
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
  cargo check --release -p loci-backend -p loci-python --features loci-backend/cuda,loci-python/cuda
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
# SmolLM2 for check-device, in two parts: 42 MiB travel with the bundle (~12 MiB) and the
# working tree (~6 MiB), the rest (~52 MiB) in the next call; each under the 64 MiB of one call.
gguf="$root/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$gguf" ]; then
  first=$(( 42 * 1024 * 1024 ))
  mkdir -p "$root/gpu-model-a" "$root/gpu-model-b"
  head -c "$first" "$gguf" > "$root/gpu-model-a/smollm2.gguf.part"
  tail -c +$(( first + 1 )) "$gguf" > "$root/gpu-model-b/smollm2.gguf.part"
  sha256sum "$gguf" | cut -d' ' -f1 > "$root/gpu-model-b/smollm2.gguf.sha256"
fi
du -sh "$out"/bin/* "$out"/data/* "$root"/gpu-model-* 2>/dev/null
echo "carry gpu-bundle/ (and gpu-model-a/, then gpu-model-b/) to the GPU machine and run: bash tests/gpu/run.sh"
