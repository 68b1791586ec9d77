#!/usr/bin/env bash
# Start one process of a multi-host run; run this on every host.
#
#   COORDINATOR=10.0.0.1:8476 NUM_PROCESSES=4 PROCESS_ID=0 \
#     bash launch/multihost.sh configs/sweep.py:grid results/grid \
#       --config.mesh.adapter=32
#
# Every process calls jax.distributed.initialize with these values before
# JAX touches a device, then sees the devices of all hosts in jax.devices();
# the mesh in the config spans them all. On Cloud TPU slices the three
# variables can be left unset, because JAX reads them from the TPU
# environment. Give every host the same config, workdir and flags. The
# workdir must be on a shared file system: process 0 writes the logs, all
# processes write their shards of the checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
  echo "usage: bash launch/multihost.sh CONFIG[:ARG] WORKDIR [flags]" >&2
  exit 2
fi
config="$1"
workdir="$2"
shift 2
args=(--multihost)
if [[ -n "${COORDINATOR:-}" ]]; then
  args+=(--coordinator_address="${COORDINATOR}"
         --num_processes="${NUM_PROCESSES:?set NUM_PROCESSES}"
         --process_id="${PROCESS_ID:?set PROCESS_ID}")
fi
exec .venv/bin/python -m moral_rl.main --config="${config}" \
  --workdir="${workdir}" "${args[@]}" "$@"
