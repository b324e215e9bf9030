#!/usr/bin/env bash
# A 2-stage x 2-way tensor-parallel pipeline whose workers are started by mpirun.
#
# Either let the controller run mpirun itself:
#     dejavu generate --model random:llama-tiny --pp 2 --tp 2 --launcher mpirun --prompt "Hello"
#
# or start the controller with --launcher external and the workers by hand (this script):
# the controller prints its address and token, which you export before calling mpirun.
#     dejavu -v generate --model random:llama-tiny --pp 2 --tp 2 --launcher external --prompt "Hello" &
#     export DEJAVU_CLUSTER_TOKEN=<token from the log> CONTROLLER=127.0.0.1:<port from the log>
#     bash examples/mpirun_pipeline.sh
set -euo pipefail
: "${CONTROLLER:?set CONTROLLER=host:port of the controller}"
: "${DEJAVU_CLUSTER_TOKEN:?set DEJAVU_CLUSTER_TOKEN to the token of the controller}"
ROOT=()
[ "$(id -u)" = 0 ] && ROOT=(--allow-run-as-root)
exec mpirun "${ROOT[@]}" --oversubscribe -n "${WORKERS:-4}" ${HOSTFILE:+--hostfile "$HOSTFILE"} \
  -x DEJAVU_CLUSTER_TOKEN python -m dejavu worker --controller "$CONTROLLER"
