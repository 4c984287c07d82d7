#!/usr/bin/env bash
# GPU checks and benchmarks, on a machine with an NVIDIA GPU and the CUDA 13 runtime libraries.
# From the repo root: bash tests/gpu/run.sh [BUNDLE]   (BUNDLE: made by scripts/build-cuda.sh,
# default gpu-bundle/; or set LOCI_BIN to a cuda build of loci).
# 1. prints the GPU; 2. `loci check-device`: the tiny test models, and SmolLM2 when both parts
# of its GGUF are here (gpu-model-a/, gpu-model-b/ from scripts/build-cuda.sh), give the CPU's
# answers on the GPU (f32 within 1e-3, f16 1e-2, bf16 5e-2; top-1 tokens; in f32 also a
# whole-answer trace, a ROME edit's vectors, key statistics, MEMIT and fine-tuning edits); 3. the
# server's API on the GPU (tests/gpu/serve_check.py: model list, predict, trace, edit, undo);
# 4. benchmarks on a full-size GPT-J-6B with random weights made on the GPU (f16): one 12-token
# forward pass, a trace of all kinds (12 tokens, 10 samples, window 10), one ROME edit at layer 5
# (statistics timed apart), and 64 predictions and generations one at a time vs batched as the
# server batches them (`loci bench batch`), and GPT-J's products one by one (`loci bench matmul`);
# each states its FLOPs and its fraction of cuBLAS's peak measured in the same run. Every result
# is one JSON line on stdout and in $OUT/gpu-results.jsonl, with the GPU's peak memory during each step.
set -uo pipefail
bundle=${1:-gpu-bundle}
OUT=${OUT:-/tmp/loci-gpu}
mkdir -p "$OUT"
results="$OUT/gpu-results.jsonl"
# Seconds one step may take (a device call has 600 in all).
step_timeout=${STEP_TIMEOUT:-200}
: > "$results"
log() { printf '%s\n' "$1" | tee -a "$results"; }

smi=$(command -v nvidia-smi || echo /usr/local/nvidia/bin/nvidia-smi)
"$smi" --query-gpu=name,driver_version,compute_cap,memory.total --format=csv || echo "no nvidia-smi"

# The CUDA libraries: the driver's libcuda, and cublas/curand/cudart/nvrtc from wherever they are
# (the GPU machines have them in a torch virtualenv's nvidia/cu13/lib).
py=$(command -v python3 || echo /opt/torch/.venv/bin/python3)
[ -x /opt/torch/.venv/bin/python3 ] && py=/opt/torch/.venv/bin/python3
dirs=()
for d in /opt/*/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
         /usr/local/lib/python3*/dist-packages/nvidia/cu13/lib \
         $("$py" -c 'import glob,os,site
for sp in site.getsitepackages(): print(*glob.glob(os.path.join(sp, "nvidia", "*", "lib")))' 2>/dev/null) \
         /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64 \
         /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
         /usr/lib/x86_64-linux-gnu /usr/lib64 /lib/x86_64-linux-gnu; do
  [ -d "$d" ] && dirs+=("$d")
done
ldp=""
for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  found=""
  for d in "${dirs[@]}"; do [ -e "$d/$lib" ] && { found=$d; break; }; done
  if [ -z "$found" ]; then   # last resort: the ldconfig cache, then a bounded search
    p=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1==l {print $NF; exit}')
    [ -z "$p" ] && p=$(timeout 60 find / -xdev -name "$lib" -not -path '/proc/*' 2>/dev/null | head -1)
    [ -n "$p" ] && found=$(dirname "$p")
  fi
  if [ -n "$found" ]; then
    case ":$ldp:" in *":$found:"*) ;; *) ldp="${ldp:+$ldp:}$found";; esac
  else
    echo "missing $lib"
  fi
done
export LD_LIBRARY_PATH="$ldp${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

bin=${LOCI_BIN:-$bundle/bin/loci}
if [ ! -x "$bin" ] && [ -s "$bin.xz" ]; then
  # xz may be missing there; Python's lzma reads the same file.
  { xz -dc "$bin.xz" 2>/dev/null || "$py" -c 'import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' "$bin.xz"; } > "$bin" \
    && chmod +x "$bin"
fi
[ -x "$bin" ] || { echo "no loci binary at $bin (run scripts/build-cuda.sh)"; exit 2; }

# Peak GPU memory of one step: sample nvidia-smi every 50 ms while it runs.
step() {
  local name=$1; shift
  local mem="$OUT/mem-$name.txt"
  "$smi" --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$mem" 2>/dev/null &
  local sampler=$!
  local t0 out rc
  t0=$(date +%s.%N)
  out=$(timeout "$step_timeout" "$bin" "$@" 2> "$OUT/stderr-$name.txt"); rc=$?
  kill $sampler 2>/dev/null; wait $sampler 2>/dev/null
  local peak wall
  peak=$(sort -n "$mem" 2>/dev/null | tail -1)
  wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.3f", b - a}')
  [ $rc -ne 0 ] && tail -5 "$OUT/stderr-$name.txt"
  log "{\"step\":\"$name\",\"exit\":$rc,\"wall_seconds\":$wall,\"gpu_peak_mib\":${peak:-null},\"result\":${out:-null}}"
  return $rc
}

models=(--models tests/fixtures/tiny-gpt2 --models tests/fixtures/tiny-gptj --models tests/fixtures/tiny-llama)
if [ -s gpu-model-a/smollm2.gguf.part ] && [ -s gpu-model-b/smollm2.gguf.part ]; then
  gguf="$(mktemp -d)/SmolLM2-135M-Instruct.Q4_1.gguf"
  cat gpu-model-a/smollm2.gguf.part gpu-model-b/smollm2.gguf.part > "$gguf"
  if [ "$(sha256sum "$gguf" | cut -d' ' -f1)" = "$(cat gpu-model-b/smollm2.gguf.sha256 2>/dev/null)" ]; then
    models+=(--models "$gguf")
  else
    echo "SmolLM2's parts do not join into the original file: checking the tiny models only"
  fi
else
  echo "no SmolLM2 parts (gpu-model-a/, gpu-model-b/): checking the tiny models only"
fi

# The API of `loci serve` on the GPU: SmolLM2 when it is here, else the tiny GPT-J (f16).
serve_step() {
  local model=$1 name=$2 layer=$3 port=18080 out rc
  "$bin" serve --addr 127.0.0.1:$port --models "$model" --dtype f16 --dist "$OUT/no-dist" \
    --stats "$OUT/serve-stats" --corpus "$corpus" --stats-tokens 20000 > "$OUT/stderr-serve.txt" 2>&1 &
  local pid=$!
  out=$(timeout "$step_timeout" "$py" tests/gpu/serve_check.py "http://127.0.0.1:$port" "$name" "$layer"); rc=$?
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
  [ $rc -ne 0 ] && tail -5 "$OUT/stderr-serve.txt"
  log "{\"step\":\"serve\",\"exit\":$rc,\"result\":${out:-null}}"
  return $rc
}

# STEPS picks some of them (e.g. STEPS="check-device serve" when a second call brings SmolLM2's
# other part).
steps=" ${STEPS:-check-device serve matmul forward trace edit batch} "
want() { [[ "$steps" == *" $1 "* ]]; }
corpus="$bundle/data/wiki-slice.jsonl"
rc=0
want check-device && { step check-device check-device "${models[@]}" || rc=1; }
if want serve; then
  if [ -n "${gguf:-}" ]; then
    serve_step "$gguf" SmolLM2-135M-Instruct.Q4_1 6 || rc=1
  else
    serve_step tests/fixtures/tiny-gptj tiny-gptj 2 || rc=1
  fi
fi
[ -n "${gguf:-}" ] && rm -rf "$(dirname "$gguf")"
want matmul && { step matmul bench matmul --random gptj-6b --dtype f16 --rows 12 --json || rc=1; }
want forward && { step forward bench forward --random gptj-6b --dtype f16 --tokens 12 --reps 20 --json || rc=1; }
want trace && { step trace bench trace --random gptj-6b --dtype f16 --prompt-tokens 12 --samples 10 --window 10 --json || rc=1; }
want edit && { step edit bench edit --random gptj-6b --dtype f16 --layer 5 --stats-tokens 20000 --corpus "$corpus" --json || rc=1; }
want batch && { step batch bench batch --random gptj-6b --dtype f16 --rows 64 --new-tokens 16 --json || rc=1; }
# Not in the default steps (STEPS="methods"): every editing method's sequence of 3 edits on a
# GPT-2-small-shaped model (AlphaEdit's null space as 30% of the random model's trace).
want methods && { step methods bench edit --random gpt2 --layer 6 --stats-tokens 20000 --corpus "$corpus" --methods all --edits 3 --null-energy 0.3 --json || rc=1; }
exit $rc
