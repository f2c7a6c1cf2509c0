#!/usr/bin/env bash
# Text-to-image training (captions shards, text encoder) on 8 nodes x 8 GPUs, requeued across time limits.
#   sbatch launchers/slurm_t2i.sh [CONFIG] [key.path=value ...]
#   DRY_RUN=1 sbatch ... (or bash launchers/slurm_t2i.sh ... inside an allocation) prints the launch.
# Submit from the repository root; the ranks run the repository's .venv/bin/python when it exists,
# else `python` of the submitting shell (sbatch passes the environment on); PYTHON=... overrides.
# See docs/launchers.md.
# One task per GPU (see launchers/common.sh for why not torchrun); USR1 180 s before the time
# limit makes the trainer checkpoint, and the job requeues itself and resumes (train.resume=auto).
#SBATCH --job-name=diffmoe-t2i
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.out
set -euo pipefail

# shellcheck source=SCRIPTDIR/common.sh
source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}/launchers/common.sh"
slurm_main configs/t2i/diffmoe_l_e16_t2i_256.yaml 8 "$@"
