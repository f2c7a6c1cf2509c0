#!/usr/bin/env bash
# Run by srun once per GPU: map Slurm's task ids to the torch.distributed environment, then become
# the command itself (exec), so Slurm's signals reach the training process directly.
set -euo pipefail
: "${SLURM_PROCID:?run by srun}" "${SLURM_NTASKS:?run by srun}" "${SLURM_LOCALID:?run by srun}"
export RANK="$SLURM_PROCID"
export WORLD_SIZE="$SLURM_NTASKS"
export LOCAL_RANK="$SLURM_LOCALID"
export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE%%(*}"
export GROUP_RANK="${SLURM_NODEID:-0}"
exec "$@"
