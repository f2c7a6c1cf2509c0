# shellcheck shell=bash
# Shared logic of the launchers (sourced, never run): argument parsing, dry runs, the Slurm step
# with signal forwarding and requeue. Each launcher keeps only its #SBATCH header and defaults.
#
# Why srun starts one task per GPU (not torchrun or the deepspeed launcher): Slurm then delivers
# the preemption signal straight to every training process, which checkpoints before it exits.
# torchrun SIGKILLs its workers after --shutdown-timeout; the deepspeed launcher kills its workers
# on SIGTERM and ignores SIGUSR1 — either would lose the checkpoint.

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

# The requeue marker of this job: rank 0 of the trainer writes it (engine/preemption.py, variable
# REQUEUE_MARKER) once a preemption stop has its state on disk. One file per job id, on the shared
# file system of the repository; a marker of an earlier run of this (requeued) job is consumed here.
prepare_requeue_marker() {
    export REQUEUE_MARKER
    mkdir -p "$(dirname "$REQUEUE_MARKER")" || die "cannot create the folder of $REQUEUE_MARKER"
    rm -f "$REQUEUE_MARKER"
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
    LAUNCH=(srun --nodes="$NNODES" --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1)
    # Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: without it every rank and
    # its data-loader workers would share one core.
    [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && LAUNCH+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    LAUNCH+=(bash launchers/slurm_task.sh
        "$PYTHON" engine/train.py --config "$CONFIG" "${OVERRIDES[@]}")
}

# Process environment of the training step.
export_step_env() {
    # NCCL (docs/launchers.md has the why of each): the defaults are right on most clusters; set these
    # here or export them before sbatch when your fabric needs them.
    # export NCCL_SOCKET_IFNAME=ib0         # bootstrap interface if auto-detection picks a slow/unrouted one
    # export NCCL_IB_HCA=mlx5               # restrict to the InfiniBand adapters of the GPU fabric
    # export NCCL_IB_TIMEOUT=22             # per-retry IB timeout 4.096 us * 2^N; raise on flaky large fabrics
    # export NCCL_IB_RETRY_CNT=7            # IB retries before a link error (default 7)
    # export NCCL_DEBUG=WARN                # INFO only to debug (prints rings/trees and transports)
    # PyTorch's watchdog already ends a rank whose collective outlives the process-group timeout
    # (TORCH_NCCL_ASYNC_ERROR_HANDLING default 3: tear the process down); TORCH_NCCL_BLOCKING_WAIT=1 would
    # raise in Python instead, at the cost of a host wait on every collective: debugging only.
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

# Requeue when, and only when, the trainer left the marker: its preemption stop has the state on
# disk (exit codes do not tell: ranks killed by --kill-on-bad-exit while the first one exits make
# srun report 137, and a crash after the warning must not loop). The one veto: a SIGTERM that no
# SIGUSR1 announced is scancel (the user wants the job gone) or a preemption Slurm requeues itself.
# A SIGTERM after the warning is the time limit catching a slow save: requeued once the save is done.
requeue_if_preempted() {
    local saved=""
    if [[ -f "$REQUEUE_MARKER" ]]; then
        saved="$(head -n 1 "$REQUEUE_MARKER")"
        rm -f "$REQUEUE_MARKER"
    fi
    if [[ -n "$saved" && ( "$GOT_TERM" -eq 0 || "$GOT_USR1" -eq 1 ) ]]; then
        echo "launcher: preemption stop with the state saved ($saved), step exit $LAUNCH_RC: scontrol requeue $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    if [[ -n "$saved" ]]; then
        echo "launcher: SIGTERM without warning (scancel or Slurm preemption): not requeued; resubmitting resumes from $saved"
    fi
    echo "launcher: training step finished with exit code $LAUNCH_RC (not requeued)"
    exit "$LAUNCH_RC"
}

# Entry point of the Slurm launchers.
slurm_main() {
    local default_config="$1" default_gpus_per_node="$2"
    shift 2
    find_repo_dir
    find_python
    parse_args "$default_config" "$@"
    slurm_topology "$default_gpus_per_node"
    build_slurm_command
    export_step_env
    echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): $NNODES nodes x $GPUS_PER_NODE GPUs = $WORLD_SIZE ranks"
    echo "hosts: ${HOSTS[*]}"
    echo "master: $MASTER_ADDR:$MASTER_PORT"
    REQUEUE_MARKER="${REQUEUE_MARKER:-$REPO_DIR/logs/.requeue-$SLURM_JOB_ID}"
    echo "requeue marker: $REQUEUE_MARKER"
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        print_command "${LAUNCH[@]}"
        return 0
    fi
    prepare_requeue_marker
    run_step
    requeue_if_preempted
}
