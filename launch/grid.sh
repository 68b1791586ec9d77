#!/usr/bin/env bash
# The paper's main grid on one machine as one program: four moral rewards
# against Tit-for-Tat x five seeds, every agent an adapter of one frozen
# base model. Each agent's results go to results/grid/<agent>; starting
# the script again resumes an interrupted sweep from its last checkpoint.
#
#   bash launch/grid.sh                                 # 4 rewards x 5 seeds
#   SEEDS=0,1,2 bash launch/grid.sh --config.num_updates=8
#   bash launch/grid.sh --config.adapter_batch=4        # 4 adapters at once
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m moral_rl.main --config=configs/sweep.py:grid \
  --config.sweep.seeds="${SEEDS:-0,1,2,3,4}" \
  --workdir="${WORKDIR:-results/grid}" "$@"
