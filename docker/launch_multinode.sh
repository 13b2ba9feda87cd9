#!/usr/bin/env bash
# Starts this node's share of a multi-node `lightning-cil fit` run with torchrun.
#
# Run it once on every node, with the same NNODES, MASTER_ADDR and MASTER_PORT everywhere and NODE_RANK
# 0 .. NNODES-1; the arguments are those of `lightning-cil fit`:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 docker/launch_multinode.sh --config configs/der_imagenet100.yaml
#
# Variables:
#   NNODES          number of nodes (required)
#   NODE_RANK       this node's rank, 0 .. NNODES-1 (required)
#   MASTER_ADDR     address of the node with rank 0, reachable from every node (required)
#   MASTER_PORT     a free TCP port on that node (default 29500)
#   NPROC_PER_NODE  processes on this node, one per GPU (default: the number of visible GPUs, or 1 without one)
#   TORCHRUN_ARGS   more torchrun options, e.g. "--max-restarts 3" (default none)
#
# `--trainer.num_nodes $NNODES --trainer.devices $NPROC_PER_NODE` go after the arguments, so that they win over a
# config's values (Lightning refuses a mismatch with torchrun), unless the arguments set them. `--trainer.strategy ddp`
# goes before the arguments, so that a config or an argument can choose another strategy.
set -euo pipefail

fail() {
    echo "launch_multinode.sh: $*" >&2
    exit 2
}

for var in NNODES NODE_RANK MASTER_ADDR; do
    [[ -n "${!var:-}" ]] || fail "$var is not set; set NNODES, NODE_RANK and MASTER_ADDR on every node (see the header)"
done
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi

for var in NNODES NODE_RANK MASTER_PORT NPROC_PER_NODE; do
    [[ "${!var}" =~ ^[0-9]+$ ]] || fail "$var must be a non-negative integer, got '${!var}'"
done
((NNODES >= 1 && NPROC_PER_NODE >= 1)) || fail "NNODES and NPROC_PER_NODE must be at least 1"
((NODE_RANK < NNODES)) || fail "NODE_RANK must be in 0 .. $((NNODES - 1)), got $NODE_RANK"

read -ra torchrun_args <<<"${TORCHRUN_ARGS:-}"

# Arguments that must match the launch, unless given on the command line.
launch_args=()
for pair in "num_nodes=$NNODES" "devices=$NPROC_PER_NODE"; do
    key=--trainer.${pair%%=*}
    given=false
    for arg in "$@"; do
        [[ "$arg" == "$key" || "$arg" == "$key="* ]] && given=true
    done
    $given || launch_args+=("$key" "${pair#*=}")
done

exec torchrun \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    "${torchrun_args[@]}" \
    -m lightning_cil fit --trainer.strategy ddp "$@" "${launch_args[@]}"
