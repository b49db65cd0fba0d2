#!/usr/bin/env bash
# The GPU device check (shared/BENCHMARKS.md): on a machine with a GPU, torch, triton and nvcc but
# no network, build tlfast from this working tree, compile the static table for the device's
# architecture, run the gpu-marked tests, run every GPU benchmark script, and leave everything
# under $OUT (logs, junit XML, gpu-<device>.json / .md, gpu-static-device.{json,md}) in < 8 min.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
# Every stage runs under its own time limit; a failing or missing stage is logged and the next one
# still runs.  One line per GPU path in STAGES below: add yours there (name, seconds, command).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
PY="${PYTHON:-python}"
B="$REPO/benchmarks"
TOTAL_S=470  # of the 8 minutes: what is left after this is the margin

# stage NAME SECONDS CMD...: run CMD with at most SECONDS (less if the total is running out),
# logging to $OUT/NAME.log; a script that does not exist yet is reported, not fatal.
stage() {
  local name=$1 budget=$2; shift 2
  local left=$(( TOTAL_S - $(elapsed) ))
  [ "$budget" -gt "$left" ] && budget=$left
  if [ "$budget" -lt 20 ]; then echo "== $name: SKIPPED (no time left)"; return; fi
  for a in "$@"; do
    if [[ "$a" == *.py && ! -f "$a" ]]; then echo "== $name: MISSING ($a)"; return; fi
  done
  echo "== $name ($(elapsed) s, limit $budget s)"
  timeout "$budget" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc$([ $rc -eq 124 ] && echo ' (time limit)') ($OUT/$name.log):"; tail -15 "$OUT/$name.log" | sed 's/^/   /'
}

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

# name                 seconds  command
STAGES=$(cat <<EOF
static-table           90  $PY -m tlfast.triton.static_check --full --archs ${cap:-90} --workers $(nproc) --cuda-dir $REPO/csrc/cuda --out $OUT/static
gpu-tests             150  env TLFAST_TRITON_AUTOTUNE=0 $PY -m pytest $REPO/tests -m gpu -q -rs -p no:cacheprovider --junitxml=$OUT/pytest-gpu.xml
bench-knn             200  $PY $B/bench_gpu.py --out $OUT --budget-s 150
bench-extract          60  $PY $B/bench_gpu_extract.py --out $OUT
bench-ot               60  $PY $B/bench_gpu_ot.py --out $OUT
bench-lowp             40  $PY $B/bench_gpu_lowp.py --out $OUT --queries 2000
bench-index            45  $PY $B/bench_gpu_paths.py index --out $OUT
bench-distributed      45  $PY $B/bench_gpu_paths.py distributed --out $OUT
EOF
)
while read -r name secs cmd; do
  [ -z "$name" ] && continue
  # shellcheck disable=SC2086  # the command is word-split on purpose
  stage "$name" "$secs" $cmd
done <<< "$STAGES"

echo "== predicted vs measured"
"$PY" "$B/bench_gpu.py" --compare "$OUT" || true
echo "== done in $(elapsed) s"
