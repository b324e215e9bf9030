#!/usr/bin/env bash
# A 2-stage x 2-way tensor-parallel pipeline whose workers are started by mpirun.
#
# Either let the controller run mpirun itself, over the hosts of an Open MPI hostfile (the
# controller must listen on an address those hosts reach):
#     dejavu generate --model random:llama-tiny --pp 2 --tp 2 --launcher mpirun --hostfile hosts.txt \
#         --cluster-address 10.0.0.1:29500 --prompt "Hello"
#
# or start the controller with --launcher external and the workers with mpirun yourself (this
# script), with the same token on both sides:
#     export DEJAVU_CLUSTER_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(16))')
#     dejavu generate --model random:llama-tiny --pp 2 --tp 2 --launcher external \
#         --cluster-address 10.0.0.1:29500 --prompt "Hello" &
#     CONTROLLER=10.0.0.1:29500 HOSTFILE=hosts.txt bash examples/mpirun_pipeline.sh
# Ranks come from OMPI_COMM_WORLD_RANK, GPUs from OMPI_COMM_WORLD_LOCAL_RANK.
set -euo pipefail
: "${CONTROLLER:?set CONTROLLER=host:port of the controller}"
: "${DEJAVU_CLUSTER_TOKEN:?set DEJAVU_CLUSTER_TOKEN to the token of the controller}"
# With a hostfile its slots place the ranks; without one, all run here (oversubscribed).
FLAGS=()
[ "$(id -u)" = 0 ] && FLAGS+=(--allow-run-as-root)
if [ -n "${HOSTFILE:-}" ]; then FLAGS+=(--hostfile "$HOSTFILE"); else FLAGS+=(--oversubscribe); fi
exec mpirun "${FLAGS[@]}" -n "${WORKERS:-4}" \
  -x DEJAVU_CLUSTER_TOKEN python -m dejavu worker --controller "$CONTROLLER"
