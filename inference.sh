#!/usr/bin/env bash
# Evaluate a trained run:  bash inference.sh {gpu} {name} {seed} {dataset} [options...]
#   the same arguments as main.sh, all passed to `main.py eval`: the options of main.sh that say what the run
#   is (--model, --backbone, --unaligned, --task, --set, --epochs) are checked against the run's config, the
#   purely training ones (--resume, --logger, --progress-every) change nothing; and eval's own, e.g.
#   --checkpoint best_loss, --remove a, --remove sweep, --analyze, --split test_ood, --data-file PATH
# Example: bash inference.sh 0 causalmer 1 iemocap --remove sweep
set -euo pipefail
MAIN_COMMAND=eval exec bash "$(dirname "$0")/main.sh" "$@"
