#!/usr/bin/env bash
# Run any sweep config as one program on this machine.
#
#   bash launch/sweep.sh configs/sweep.py:unlearning results/unlearning
#   bash launch/sweep.sh configs/population.py:population results/pop \
#       --config.num_updates=12
#
# All agents share one frozen base model and one jitted update. When the
# machine's memory does not hold all adapters' activations, pass
# --config.adapter_batch=K: the update then runs K adapters at a time,
# still in one program. Devices: --config.mesh.adapter=N splits the agents
# over N accelerators (see README, "Sweeps, learning opponents and devices").
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
  echo "usage: bash launch/sweep.sh CONFIG[:ARG] WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
config="$1"
workdir="$2"
shift 2
exec .venv/bin/python -m moral_rl.main --config="${config}" \
  --workdir="${workdir}" "$@"
