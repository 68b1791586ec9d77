#!/usr/bin/env bash
# Run one moral fine-tuning experiment.
#
#   bash launch/run.sh utilitarian                 # vs Tit-for-Tat
#   bash launch/run.sh game,random --config.seed=3 # extra flags pass through
#
# The first argument is the config switch string of configs/ipd.py; the
# run folder is results/<game>__<reward>__<opponent>__seed<seed>.
set -euo pipefail
cd "$(dirname "$0")/.."
switches="${1:-utilitarian}"
shift || true
exec .venv/bin/python -m moral_rl.main --config="configs/ipd.py:${switches}" "$@"
