#!/usr/bin/env bash
# Launch train.py on one or more machines with torchrun: run it on every node with the same
# arguments (the configs are the ones you use on one machine).
#
#   scripts/launch/torchrun.sh --config configs/sft.yaml --trainer configs/trainer/fsdp.yaml
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/launch/torchrun.sh --config ...   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 scripts/launch/torchrun.sh --config ...   # on node1
#
# GPUS_PER_NODE defaults to the number of visible CUDA devices; SUBCOMMAND to fit.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")}
if [ "$GPUS_PER_NODE" -lt 1 ]; then
    echo "torchrun.sh: no CUDA device visible; set GPUS_PER_NODE" >&2
    exit 1
fi
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    train.py "${SUBCOMMAND:-fit}" "$@" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE"
