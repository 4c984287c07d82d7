#!/usr/bin/env bash
# Builds an off-GPU CUDA 13.0 toolchain for the `cuda` feature from PyPI wheels (no nvcc or GPU
# needed on this machine), then prints the line to source.
# Usage: scripts/setup-cuda.sh [DIR]   (default ~/.cache/loci-cuda); then: source DIR/env.sh
# CUDA 13.0 on purpose: the GPU machines' driver is 580.x (= CUDA 13.0); PTX from a newer nvcc
# would not JIT there (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
set -euo pipefail
D=${1:-$HOME/.cache/loci-cuda}
mkdir -p "$D"
D=$(cd "$D" && pwd)
if [ -x "$D/cudaroot/bin/nvcc" ] && [ -s "$D/env.sh" ] && [ -s "$D/cudaroot/lib64/stubs/libcuda.so" ]; then
  echo "ok (cached): source $D/env.sh"; exit 0
fi
wheels="cuda-toolkit[nvcc,crt,nvvm,cudart,cublas,curand,nvrtc,cccl]==13.0.2"
if [ -x "$D/venv/bin/pip" ] || python3 -m venv "$D/venv" 2>/dev/null; then
  "$D/venv/bin/pip" install -q "$wheels"
  NV=$(echo "$D"/venv/lib/python3*/site-packages/nvidia/cu13)
else
  # No venv module (e.g. Debian without python3-venv): a plain target folder works as well.
  python3 -m pip install -q --target "$D/site" "$wheels"
  NV="$D/site/nvidia/cu13"
fi
[ -x "$NV/bin/nvcc" ] || { echo "no nvcc in $NV after installing $wheels"; exit 1; }
R=$D/cudaroot
mkdir -p "$R/lib64/stubs"
ln -sfn "$NV/bin" "$R/bin"; ln -sfn "$NV/include" "$R/include"; ln -sfn "$NV/nvvm" "$R/nvvm"
# The wheels ship only versioned .so names; the linker wants unversioned ones.
for l in cublas cublasLt curand nvrtc cudart; do
  ln -sf "$(ls "$NV"/lib/lib$l.so.* | grep -v -e alt -e builtins | head -1)" "$R/lib64/lib$l.so"
done
# No wheel ships the driver's libcuda.so: link against a stub (SONAME libcuda.so.1) that exports
# every cu* symbol cudarc declares. Only the linker sees it; the GPU machine's driver is used at run time.
cargo fetch --manifest-path "$(dirname "$0")/../Cargo.toml" >/dev/null
SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys 2>/dev/null | tail -1)
if [ -z "$SRC" ]; then
  # cudarc is only fetched with the cuda feature resolved; ask cargo for it explicitly.
  tmp=$(mktemp -d); mkdir -p "$tmp/src"; echo 'fn main(){}' > "$tmp/src/main.rs"
  printf '[package]\nname="f"\nversion="0.0.0"\nedition="2021"\n[dependencies]\ncudarc={version="0.19",default-features=false,features=["cuda-13000","driver","dynamic-linking"]}\n' > "$tmp/Cargo.toml"
  cargo fetch --manifest-path "$tmp/Cargo.toml" >/dev/null
  SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys | tail -1)
  rm -rf "$tmp"
fi
grep -oh "pub unsafe fn cu[A-Za-z0-9_]*" "$SRC"/mod.rs | awk '{print $4}' | sort -u \
  | awk '{print "int " $1 "(void){return 999;}"}' > "$D/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 "$D/cuda_stub.c" -o "$R/lib64/stubs/libcuda.so"
cat > "$D/env.sh" <<EOT
export CUDA_ROOT=$R CUDA_PATH=$R CUDA_HOME=$R PATH=$R/bin:\$PATH CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
EOT
"$R/bin/nvcc" --version | tail -2
echo "ok: source $D/env.sh"
