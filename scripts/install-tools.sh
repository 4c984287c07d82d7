#!/usr/bin/env bash
# Installs what building and testing Loci needs on a fresh machine; skips what is already there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
need_version() { # tool, wanted version string
  command -v "$1" >/dev/null 2>&1 && "$1" --version 2>/dev/null | grep -qF "$2"
}
rustup component add rustfmt clippy >/dev/null 2>&1 || true
if ! rustup target list --installed | grep -q '^wasm32-unknown-unknown$'; then
  rustup target add wasm32-unknown-unknown
fi
# trunk 0.22 needs a newer Rust than this toolchain; 0.21.14 is the newest that builds here.
if ! need_version trunk "trunk 0.21.14"; then
  cargo install trunk --version 0.21.14 --locked
fi
# The CLI must equal the wasm-bindgen crate in Cargo.lock. Its own lockfile pins a crate the
# registry no longer serves, so it is installed without --locked.
wbg="$(grep -A1 '^name = "wasm-bindgen"$' "$root/Cargo.lock" | sed -n 's/^version = "\(.*\)"/\1/p')"
if ! need_version wasm-bindgen "wasm-bindgen $wbg"; then
  cargo install wasm-bindgen-cli --version "$wbg"
fi
# OpenBLAS: not linked, but opened at run time when present (core/src/blas.rs). The benchmarks
# measure the machine's peak with it, and the kernel test checks it against candle's product.
if ! ldconfig -p 2>/dev/null | grep 'libopenblas\.so\.0' >/dev/null && command -v apt-get >/dev/null; then
  apt_blas() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libopenblas0-pthread >/dev/null; }
  apt_blas || { apt-get update -qq && apt_blas; } || echo "OpenBLAS not installed: benchmarks measure the peak with candle's kernel only" >&2
fi
