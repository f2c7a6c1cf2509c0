# shellcheck shell=bash
# Shared logic of the launchers (sourced, never run): argument parsing, dry runs, the Slurm step
# with signal forwarding and requeue. Each launcher keeps only its #SBATCH header and defaults.
#
# Why srun starts one task per GPU (not torchrun or the deepspeed launcher): Slurm then delivers
# the preemption signal straight to every training process, and srun's exit code is the trainer's
# own, so REQUEUE_EXIT_CODE reaches this script. torchrun exits with 1 whatever its workers
# returned (and SIGKILLs them after --shutdown-timeout); the deepspeed launcher kills its workers
# on SIGTERM and ignores SIGUSR1 — either would lose the requeue code or the checkpoint.

die() {
    echo "launcher error: $*" >&2
    exit 2
}

# Print a command shell-quoted (copy-pastable) on one line.
print_command() {
    local quoted
    printf -v quoted '%q ' "$@"
    echo "${quoted% }"
}

# The repository root. Under sbatch the script runs from a spool copy, so its own path is useless:
# use REPO_DIR, else the submit directory, else the current directory.
find_repo_dir() {
    REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
    [[ -f "$REPO_DIR/engine/train.py" ]] ||
        die "$REPO_DIR is not the repository root (no engine/train.py): submit from the repository root or set REPO_DIR"
    cd "$REPO_DIR" || die "cannot cd to $REPO_DIR"
}

# The interpreter: PYTHON, else the repository's virtualenv (what `make` creates), else python on PATH.
find_python() {
    if [[ -z "${PYTHON:-}" ]]; then
        PYTHON=python
        [[ -x "$REPO_DIR/.venv/bin/python" ]] && PYTHON="$REPO_DIR/.venv/bin/python"
    fi
    return 0
}

# parse_args DEFAULT_CONFIG [CONFIG] [key.path=value ...] -> CONFIG, OVERRIDES (train.resume=auto first,
# so the user's own train.resume=... wins).
parse_args() {
    local default_config="$1"
    shift
    CONFIG="$default_config"
    if [[ $# -gt 0 && "$1" != *=* ]]; then
        CONFIG="$1"
        shift
    fi
    [[ "$CONFIG" != -* ]] || die "unknown option '$CONFIG' (usage: [CONFIG] [key.path=value ...])"
    [[ -f "$CONFIG" ]] || die "config file not found: $CONFIG"
    OVERRIDES=("train.resume=auto")
    local item
    for item in "$@"; do
        [[ "$item" == *=* && "$item" != =* ]] || die "argument '$item' is not of the form key.path=value"
        OVERRIDES+=("$item")
    done
}

# The exit code engine/preemption.py returns after its preemption checkpoint (one source of truth).
read_requeue_exit_code() {
    local file="engine/preemption.py"
    [[ -f "$file" ]] || die "$file not found: cannot read REQUEUE_EXIT_CODE"
    REQUEUE_EXIT_CODE="$(sed -n 's/^REQUEUE_EXIT_CODE[^=]*= *\([0-9][0-9]*\).*/\1/p' "$file" | head -n 1)"
    [[ -n "$REQUEUE_EXIT_CODE" ]] || die "no 'REQUEUE_EXIT_CODE = <int>' line in $file"
}

# Hosts, world size and rendezvous address of the allocation (Slurm's own variables; the #SBATCH
# header sets them under sbatch, a test or an salloc shell can set them by hand).
slurm_topology() {
    local default_gpus_per_node="$1"
    [[ -n "${SLURM_JOB_ID:-}" ]] || die "SLURM_JOB_ID is not set: submit with sbatch (or use launchers/local.sh)"
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "SLURM_JOB_NODELIST is not set"
    mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    [[ ${#HOSTS[@]} -gt 0 ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' returned no host"
    NNODES="${#HOSTS[@]}"
    GPUS_PER_NODE="${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$default_gpus_per_node}}"
    GPUS_PER_NODE="${GPUS_PER_NODE%%(*}"  # Slurm writes e.g. "8(x8)" when the value repeats per node
    WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
    MASTER_ADDR="${MASTER_ADDR:-${HOSTS[0]}}"
    # A port derived from the job id: two jobs sharing a first node do not collide.
    MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    export MASTER_ADDR MASTER_PORT
}

# The one srun step of the job: one task per GPU, each mapped to torch.distributed env variables by
# launchers/slurm_task.sh and then replaced by the trainer process itself.
build_slurm_command() {
    # --kill-on-bad-exit: one crashed rank ends the step instead of leaving the others hung in NCCL.
    LAUNCH=(srun --nodes="$NNODES" --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1
        bash launchers/slurm_task.sh
        "$PYTHON" engine/train.py --config "$CONFIG" "${OVERRIDES[@]}")
}

# Process environment of the training step.
export_step_env() {
    # NCCL: the defaults are right on most clusters; uncomment to debug or to pin the fabric.
    # export NCCL_DEBUG=INFO                # WARN in production; INFO prints rings/trees and transports
    # export NCCL_SOCKET_IFNAME=ib0         # bootstrap interface if auto-detection picks a slow one
    # export NCCL_IB_HCA=mlx5               # restrict to the InfiniBand adapters of the GPU fabric
    # export NCCL_IB_DISABLE=0              # 1 only on clusters without InfiniBand (falls back to TCP)
    # export NCCL_NVLS_ENABLE=0             # if NVLink SHARP is unavailable or misbehaves
    # export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a lost rank becomes an error, not a silent hang
    # The GPUs do the math; leave the host cores to the data workers (what torchrun does too).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
}

GOT_USR1=0
GOT_TERM=0
LAUNCH_PID=""

# SIGUSR1 (sbatch --signal=B:USR1@...) comes to this shell only: hand it to srun, which forwards it
# to every task. SIGTERM (scancel, preemption, time limit) reaches the tasks from Slurm directly.
on_usr1() {
    GOT_USR1=1
    echo "launcher: SIGUSR1 received, forwarding to the training step (checkpoint and exit)"
    [[ -n "$LAUNCH_PID" ]] && kill -s USR1 "$LAUNCH_PID" 2>/dev/null
    return 0
}

on_term() {
    GOT_TERM=1
    echo "launcher: SIGTERM received (job ending); waiting for the training step"
}

# Run LAUNCH in the background and wait for it through signals; sets LAUNCH_RC.
run_step() {
    trap on_usr1 USR1
    trap on_term TERM
    "${LAUNCH[@]}" &
    LAUNCH_PID=$!
    while true; do
        LAUNCH_RC=0
        wait "$LAUNCH_PID" || LAUNCH_RC=$?
        # A trapped signal interrupts `wait` (status > 128) while the step still runs: wait again.
        kill -0 "$LAUNCH_PID" 2>/dev/null || break
    done
    trap - USR1 TERM
}

# Requeue after a preemption checkpoint: on the trainer's requeue exit code, or when the time-limit
# warning arrived and the step did not finish cleanly (ranks killed by --kill-on-bad-exit while the
# first one exits make srun report 128+9 rather than the requeue code). Never after a SIGTERM: that is scancel (the
# user wants the job gone) or a preemption that Slurm requeues by itself.
requeue_if_preempted() {
    local preempted=0
    if [[ "$LAUNCH_RC" -eq "$REQUEUE_EXIT_CODE" ]]; then
        preempted=1
    elif [[ "$GOT_USR1" -eq 1 && "$LAUNCH_RC" -ne 0 ]]; then
        preempted=1
    fi
    if [[ "$preempted" -eq 1 && "$GOT_TERM" -eq 0 ]]; then
        echo "launcher: training stopped for preemption (exit $LAUNCH_RC): scontrol requeue $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "launcher: training step finished with exit code $LAUNCH_RC"
    exit "$LAUNCH_RC"
}

# Entry point of the Slurm launchers.
slurm_main() {
    local default_config="$1" default_gpus_per_node="$2"
    shift 2
    find_repo_dir
    find_python
    parse_args "$default_config" "$@"
    read_requeue_exit_code
    slurm_topology "$default_gpus_per_node"
    build_slurm_command
    export_step_env
    echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): $NNODES nodes x $GPUS_PER_NODE GPUs = $WORLD_SIZE ranks"
    echo "hosts: ${HOSTS[*]}"
    echo "master: $MASTER_ADDR:$MASTER_PORT"
    echo "requeue exit code: $REQUEUE_EXIT_CODE"
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        print_command "${LAUNCH[@]}"
        return 0
    fi
    run_step
    requeue_if_preempted
}
