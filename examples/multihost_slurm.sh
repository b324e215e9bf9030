#!/usr/bin/env bash
#SBATCH --nodes=2 --ntasks-per-node=2 --gpus-per-node=2
# A 4-stage pipeline over two Slurm nodes: the controller on the batch host, one worker per task
# by srun. Each worker takes its rank from SLURM_PROCID and its GPU from SLURM_LOCALID; the token
# reaches the tasks through the environment srun passes on (never the command line).
#     sbatch examples/multihost_slurm.sh
set -euo pipefail
MODEL=${MODEL:-random:llama-tiny}
export DEJAVU_CLUSTER_TOKEN=${DEJAVU_CLUSTER_TOKEN:-$(python -c 'import secrets; print(secrets.token_hex(16))')}
HOST=$(hostname -I | awk '{print $1}')
CONTROLLER=$HOST:${PORT:-29500}
dejavu serve --model "$MODEL" --pp 4 --launcher external --cluster-address "$CONTROLLER" \
  --replicate --port 8000 &
SERVER=$!
srun --export=ALL dejavu worker --controller "$CONTROLLER" &
wait "$SERVER"
