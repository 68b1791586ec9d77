#!/usr/bin/env bash
# The paper's main grid on one machine: four moral rewards against
# Tit-for-Tat, five seeds each, one run after another. Each run goes to
# results/grid/<reward>__seed<seed>; a run that was interrupted resumes
# from its last checkpoint when the script is started again, and a run
# that finished is skipped.
#
#   bash launch/grid.sh                       # 4 rewards x 5 seeds
#   SEEDS="0 1 2" bash launch/grid.sh --config.num_updates=8
set -euo pipefail
cd "$(dirname "$0")/.."
rewards="${REWARDS:-game deontological utilitarian game_deontological}"
seeds="${SEEDS:-0 1 2 3 4}"
for reward in $rewards; do
  for seed in $seeds; do
    workdir="results/grid/${reward}__seed${seed}"
    echo "== ${reward}, seed ${seed} -> ${workdir}"
    .venv/bin/python -m moral_rl.main --config="configs/ipd.py:${reward}" \
      --config.seed="${seed}" --workdir="${workdir}" "$@"
  done
done
