#!/usr/bin/env bash
# The GPU device check (shared/BENCHMARKS.md): on a machine with a GPU, torch, triton and nvcc but
# no network, build tlfast from this working tree, run the gpu-marked tests, run the GPU benchmark
# cases, and leave everything under $OUT (logs, junit XML, gpu-<device>.json / .md) in < 8 min.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
# Each stage has its own time limit; a failing stage is logged and the next one still runs.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
PY="${PYTHON:-python}"

echo "== device"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true
"$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
nvcc --version | tail -1

echo "== build ($(elapsed) s)"
# No network here: the build needs what --no-build-isolation finds installed.
"$PY" -c "import setuptools, wheel, pybind11" || { echo "missing build requirement (setuptools, wheel, pybind11)"; exit 1; }
cmake --version | head -1 || { echo "cmake is missing"; exit 1; }
# Only this device's architecture: half the nvcc time of the default 80;90.
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')"
export TLFAST_CUDA=ON CMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-${cap:-80;90}}"
if ! (cd "$REPO" && timeout 240 "$PY" -m pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1); then
  echo "build FAILED (see build.log):"; tail -40 "$OUT/build.log"; exit 1
fi
# From $OUT, so that `import tlfast` is the installed, compiled package and not the source tree.
cd "$OUT"
"$PY" -c "import tlfast; [print(f'  {k}: {v}') for k, v in tlfast.backends().items()]"

echo "== gpu tests ($(elapsed) s)"
# A fixed Triton config keeps compile time bounded; the benchmarks below autotune.
TLFAST_TRITON_AUTOTUNE=0 timeout 180 "$PY" -m pytest "$REPO/tests" -m gpu -q -rs -p no:cacheprovider \
  --junitxml="$OUT/pytest-gpu.xml" > "$OUT/pytest-gpu.log" 2>&1
echo "pytest exit $? (pytest-gpu.log):"; tail -25 "$OUT/pytest-gpu.log"

echo "== benchmarks ($(elapsed) s)"
left=$(( 460 - $(elapsed) ))
if [ "$left" -gt 60 ]; then
  timeout "$left" "$PY" "$REPO/benchmarks/bench_gpu.py" --out "$OUT" --budget-s $(( left - 90 ))
  echo "bench exit $?"
else
  echo "no time left for the benchmarks"
fi
timeout 80 "$PY" "$REPO/benchmarks/bench_gpu_extract.py" --out "$OUT" --n 4096; echo "bench_gpu_extract exit $?"
echo "== done in $(elapsed) s"
