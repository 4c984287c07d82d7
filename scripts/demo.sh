#!/usr/bin/env bash
# Builds Loci (the CLI and server, and the web app), fetches the default model (SmolLM2-135M),
# asks it a fact, then serves the app and the API and prints the URL.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/loci-target}"
export PATH="$HOME/.cargo/bin:$PATH"
"$root/scripts/install-tools.sh"
model="$("$root/scripts/fetch-model.sh")"
cargo build --release -p loci-backend
trunk build
loci="$CARGO_TARGET_DIR/release/loci"
"$loci" predict --model "$model" --prompt "The Eiffel Tower is located in the city of" --top 5
exec "$loci" serve --models "$model" --addr "${LOCI_ADDR:-127.0.0.1:8080}"
