#!/usr/bin/env bash
# A 2-stage pipeline across two hosts, workers started by hand (--launcher external).
#
# On every host: the same secret in DEJAVU_CLUSTER_TOKEN (never on a command line), e.g.
#     export DEJAVU_CLUSTER_TOKEN=$(cat ~/.dejavu-token)          # a mode-600 file you copied over
# On the controller's host (10.0.0.1 here):
#     ROLE=controller CONTROLLER=10.0.0.1:29500 bash examples/multihost_external.sh
# On each worker host, any order, before or after the controller (a worker waits up to 60 s for it):
#     ROLE=worker CONTROLLER=10.0.0.1:29500 bash examples/multihost_external.sh
# The controller gives ranks in the order workers connect (pass --rank N to choose); a worker
# advertises its address on the route to the controller (--advertise-address to choose). With
# replication, a worker started with --standby on a third host takes over a failed host's rank.
set -euo pipefail
: "${CONTROLLER:?set CONTROLLER=HOST:PORT the controller listens on}"
: "${DEJAVU_CLUSTER_TOKEN:?set DEJAVU_CLUSTER_TOKEN to the same secret on every host}"
MODEL=${MODEL:-random:llama-tiny}
case "${ROLE:-worker}" in
  controller)
    exec dejavu serve --model "$MODEL" --pp 2 --launcher external --cluster-address "$CONTROLLER" \
      --replicate --recovery standby --port "${PORT:-8000}" ;;
  worker)
    exec dejavu worker --controller "$CONTROLLER" ${RANK:+--rank "$RANK"} ${ADVERTISE:+--advertise-address "$ADVERTISE"} ;;
  standby)
    exec dejavu worker --controller "$CONTROLLER" --standby ;;
  *) echo "ROLE must be controller, worker or standby" >&2; exit 2 ;;
esac
