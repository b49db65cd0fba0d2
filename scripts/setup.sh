#!/usr/bin/env bash
# Sets up a local virtual environment (.venv) with tlfast built from this checkout.
#   bash scripts/setup.sh            # runtime only
#   bash scripts/setup.sh test       # + test extras;  bash scripts/setup.sh demo  # + demo extras
# torch is installed first, pinned to the CPU wheel this project's machines carry (2.13.0), so
# that no other torch build is downloaded.  The CUDA kernels are compiled when nvcc is found
# (TLFAST_CUDA=AUTO|ON|OFF overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade "pip>=23.2"
python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.4,<2.14"
if [ -z "${TLFAST_CUDA:-}" ] && command -v nvcc >/dev/null 2>&1; then export TLFAST_CUDA=ON; fi
python -m pip install -q ".${extras:+[$extras]}"
(cd / && python -c "import tlfast; print('tlfast', tlfast.__version__, {k: v.available for k, v in tlfast.backends().items()})")
