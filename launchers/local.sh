#!/usr/bin/env bash
# One machine, no Slurm: torchrun on the local GPUs (NPROC ranks on CPU with gloo when there is none).
#   launchers/local.sh [CONFIG] [key.path=value ...]      e.g. NPROC=2 launchers/local.sh configs/quickstart.yaml
#   DRY_RUN=1 launchers/local.sh ...                      prints the command instead of running it
# torchrun rather than the deepspeed launcher: it forwards SIGINT/SIGTERM to the ranks and waits
# SHUTDOWN_TIMEOUT seconds, so the preemption checkpoint completes; re-running resumes (train.resume=auto).
set -euo pipefail

REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=SCRIPTDIR/common.sh
source "$REPO_DIR/launchers/common.sh"
find_repo_dir
find_python
parse_args configs/quickstart.yaml "$@"

if [[ -z "${NPROC:-}" ]]; then
    NPROC=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        NPROC="$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)"
    fi
    [[ "$NPROC" -gt 0 ]] || NPROC=1
fi
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$NPROC'"

LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$NPROC"
    --shutdown-timeout="${SHUTDOWN_TIMEOUT:-600}"
    engine/train.py --config "$CONFIG" "${OVERRIDES[@]}")
echo "local: $NPROC rank(s) on $(hostname)"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    print_command "${LAUNCH[@]}"
    exit 0
fi
exec "${LAUNCH[@]}"
