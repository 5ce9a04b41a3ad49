#!/usr/bin/env bash
# Evaluate a trained run:  bash inference.sh {gpu} {name} {seed} {dataset} [options...]
#   options  passed to `main.py eval`, e.g. --checkpoint best_loss, --remove a, --remove sweep, --analyze
# Example: bash inference.sh 0 causalmer 1 iemocap --remove sweep
set -euo pipefail
cd "$(dirname "$0")"
gpu=${1:-auto}; name=${2:-causalmer}; seed=${3:-1}; dataset=${4:-iemocap}
shift $(( $# < 4 ? $# : 4 ))
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
case "$gpu" in
  cpu) device=cpu ;;
  auto) device=auto ;;
  *) export CUDA_VISIBLE_DEVICES="$gpu"; device=cuda ;;
esac
exec "$PYTHON" main.py eval --device "$device" --name "$name" --seed "$seed" --dataset "$dataset" "$@"
