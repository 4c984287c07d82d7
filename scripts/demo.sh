#!/usr/bin/env bash
# Builds Loci, fetches the default model (SmolLM2-135M) and asks it a factual question.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/loci-target}"
model="$("$root/scripts/fetch-model.sh")"
cargo build --release -p loci-backend
loci="$CARGO_TARGET_DIR/release/loci"
"$loci" predict --model "$model" --prompt "The Eiffel Tower is located in the city of" --top 5
"$loci" generate --model "$model" --prompt "The Eiffel Tower is located in the city of" --max-new-tokens 20
