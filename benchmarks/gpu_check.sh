#!/usr/bin/env bash
# The GPU check (benchmarks/gpu.py): the `cuda` tests, the CUDA speed rows and a 2-epoch demo on one
# GPU in at most eight minutes, written to benchmarks/results/gpu.json and gpu.md.
#   bash benchmarks/gpu_check.sh [--skip tests,speed,demo] [--out-dir DIR]
# Runs with the python on PATH (or $PYTHON) and the torch (>= 2.4) installed for it; installs nothing.
# Without a CUDA device it says so in one line and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/gpu.py "$@"
