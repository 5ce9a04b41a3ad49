#!/usr/bin/env bash
# Train a run:  bash main.sh {gpu} {name} {seed} {dataset} [options...]
#   gpu      a CUDA device index (e.g. 0), cpu, or auto (CUDA when present)      default auto
#   name     run name: checkpoints/<dataset>/<name>/seed<seed>/                   default causalmer
#   seed     random seed                                                          default 1
#   dataset  iemocap | mosei_senti | mosi | sims                                  default iemocap
#   options  passed to `main.py train`, e.g. --model mult, --unaligned, --data-file PATH, --set train.epochs=5, --resume
# Example: bash main.sh 0 causalmer 1 iemocap
# inference.sh runs this same script with MAIN_COMMAND=eval.
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
exec "$PYTHON" main.py "${MAIN_COMMAND:-train}" --device "$device" --name "$name" --seed "$seed" --dataset "$dataset" "$@"
