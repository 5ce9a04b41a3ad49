#!/usr/bin/env bash
# Evaluate a trained run:  bash inference.sh {gpu} {name} {seed} {dataset} [options...]
#   the same arguments as main.sh; options are passed to `main.py eval`, e.g. --checkpoint best_loss,
#   --remove a, --remove sweep, --analyze
# Example: bash inference.sh 0 causalmer 1 iemocap --remove sweep
set -euo pipefail
MAIN_COMMAND=eval exec bash "$(dirname "$0")/main.sh" "$@"
