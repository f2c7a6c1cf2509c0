"""Launchers under a fake Slurm: `scontrol`, `srun` and the trainer are small executables on PATH.

The fake `srun` runs every task locally with Slurm's per-task variables and forwards SIGUSR1 to
them, like the real one; the fake trainer records its environment and plays the preemption paths
of engine/train.py (checkpoint-free): rank 0 writes the requeue marker when its "checkpoint" is
complete, a crash writes none. (The real trainer's side of the marker: tests/test_preemption.py.)
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from engine.preemption import REQUEUE_EXIT_CODE, REQUEUE_MARKER_ENV

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "launchers"
SCRIPTS = sorted(LAUNCHERS.glob("*.sh"))
SLURM_SCRIPTS = {
    "slurm_8node.sh": "configs/imagenet256/diffmoe_l_e16_flow.yaml",
    "slurm_t2i.sh": "configs/t2i/diffmoe_l_e16_t2i_256.yaml",
}
SAVED = "checkpoint runs/x/checkpoints/step_0000007"  # what the fake rank 0 writes into the marker

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_DIR/calls"
if [[ "$1 $2" == "show hostnames" ]]; then printf '%s\\n' $FAKE_HOSTS; fi
"""

# Runs the command once per task (--nodes x --ntasks-per-node) with Slurm's task variables and
# forwards SIGUSR1 to the tasks; exits with the largest task exit code.
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_DIR/calls"
nodes=1; per=1
while [[ "$1" == --* ]]; do
    case "$1" in --nodes=*) nodes="${1#*=}" ;; --ntasks-per-node=*) per="${1#*=}" ;; esac
    shift
done
pids=()
for ((n = 0; n < nodes; n++)); do
    for ((l = 0; l < per; l++)); do
        SLURM_PROCID=$((n * per + l)) SLURM_LOCALID=$l SLURM_NODEID=$n SLURM_NTASKS=$((nodes * per)) \\
            SLURM_NTASKS_PER_NODE=$per "$@" &
        pids+=($!)
    done
done
trap 'echo "srun forwards USR1" >> "$FAKE_DIR/calls"; kill -s USR1 "${pids[@]}"' USR1
rc=0
for p in "${pids[@]}"; do
    while true; do r=0; wait "$p" || r=$?; kill -0 "$p" 2>/dev/null || break; done
    if ((r > rc)); then rc=$r; fi
done
exit "$rc"
"""

# Stands in for `python`: records the task environment, then plays FAKE_MODE:
#   exit        exit with FAKE_RC (rank 0 first writes the marker when FAKE_SAVED=1);
#   usr1_save   on SIGUSR1 "checkpoint" (rank 0 writes the marker) and exit with the requeue code;
#   usr1_crash  on SIGUSR1 crash (exit 1, no marker), e.g. a rank failing during the save;
#   slow_save   on SIGUSR1 start saving; the save completes when SIGTERM (the time limit) arrives;
#   term_save   on SIGTERM "checkpoint" and exit with the requeue code.
# The waiting modes write ready_RANK (their pid) once their traps are set.
FAKE_PYTHON = f"""#!/usr/bin/env bash
echo "RANK=$RANK WORLD_SIZE=$WORLD_SIZE LOCAL_RANK=$LOCAL_RANK LOCAL_WORLD_SIZE=$LOCAL_WORLD_SIZE \\
MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT {REQUEUE_MARKER_ENV}=${REQUEUE_MARKER_ENV} ARGS=$*" > "$FAKE_DIR/task_$RANK"
mark() {{ if [[ "$RANK" == 0 ]]; then echo "{SAVED}" > "${REQUEUE_MARKER_ENV}"; fi; }}
saved() {{ mark; exit {REQUEUE_EXIT_CODE}; }}
note() {{ echo "$1" >> "$FAKE_DIR/task_$RANK"; }}
case "$FAKE_MODE" in
    exit) if [[ "$FAKE_SAVED" == 1 ]]; then mark; fi; exit "$FAKE_RC" ;;
    usr1_save) trap 'note usr1; saved' USR1 ;;
    usr1_crash) trap 'note usr1; exit 1' USR1 ;;
    slow_save) trap 'note usr1; touch "$FAKE_DIR/saving_$RANK"' USR1; trap 'note term; saved' TERM ;;
    term_save) trap 'note term; saved' TERM ;;
esac
echo $$ > "$FAKE_DIR/ready_$RANK"
while true; do sleep 0.05; done
"""


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def fake(tmp_path: Path) -> dict:
    """A repository skeleton (real launchers, fake trainer files) and fake Slurm tools on PATH."""
    repo = tmp_path / "repo"
    (repo / "engine").mkdir(parents=True)
    (repo / "launchers").symlink_to(LAUNCHERS)
    (repo / "engine" / "train.py").write_text("")
    for config in [*SLURM_SCRIPTS.values(), "configs/quickstart.yaml", "configs/mine.yaml"]:
        (repo / config).parent.mkdir(parents=True, exist_ok=True)
        (repo / config).write_text("name: test\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    _write_exe(bin_dir / "srun", FAKE_SRUN)
    _write_exe(bin_dir / "fake_python", FAKE_PYTHON)
    state = tmp_path / "state"
    state.mkdir()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FAKE_DIR": str(state),
        "FAKE_HOSTS": "gpu-a17 gpu-a18",
        "FAKE_RC": "0",
        "FAKE_MODE": "exit",
        "PYTHON": str(bin_dir / "fake_python"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-a[17-18]",
        "SLURM_NTASKS_PER_NODE": "2(x2)",
        "SLURM_CPUS_PER_TASK": "12",
        "SLURM_SUBMIT_DIR": str(repo),
    }
    marker = repo / "logs" / ".requeue-4242"
    return {"repo": repo, "env": env, "state": state, "bin": bin_dir, "marker": marker}


def _run(fake: dict, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"launchers/{script}", *args], cwd=fake["repo"], env={**fake["env"], **env},
                          capture_output=True, text=True, timeout=60)


def _calls(fake: dict) -> list[str]:
    path = fake["state"] / "calls"
    return path.read_text().splitlines() if path.exists() else []


def _requeues(fake: dict) -> list[str]:
    return [call for call in _calls(fake) if call.startswith("scontrol requeue")]


def test_scripts_parse_and_pass_shellcheck():
    assert {p.name for p in SCRIPTS} >= {"common.sh", "slurm_8node.sh", "slurm_t2i.sh", "local.sh", "slurm_task.sh"}
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (bash -n passed)")
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", sorted(SLURM_SCRIPTS))
def test_slurm_dry_run_prints_hosts_and_launch(fake, script):
    result = _run(fake, script, "configs/mine.yaml", "train.max_steps=5", "model.moe.pool=ep_group", DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "hosts: gpu-a17 gpu-a18" in lines
    assert "master: gpu-a17:24242" in lines  # 20000 + job id % 20000
    assert f"requeue marker: {fake['marker']}" in lines
    assert shlex.split(lines[-1]) == [
        "srun", "--nodes=2", "--ntasks-per-node=2", "--kill-on-bad-exit=1", "--cpus-per-task=12",
        "bash", "launchers/slurm_task.sh", fake["env"]["PYTHON"], "engine/train.py", "--config", "configs/mine.yaml",
        "train.resume=auto", "train.max_steps=5", "model.moe.pool=ep_group"]
    assert _calls(fake) == ["scontrol show hostnames gpu-a[17-18]"]  # nothing launched, nothing requeued


def test_srun_gets_cpus_per_task_only_when_the_job_has_it(fake):
    env = {k: v for k, v in fake["env"].items() if k != "SLURM_CPUS_PER_TASK"}
    result = subprocess.run(["bash", "launchers/slurm_8node.sh", "configs/mine.yaml"], cwd=fake["repo"],
                            env={**env, "DRY_RUN": "1"}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not any(arg.startswith("--cpus-per-task") for arg in shlex.split(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize("script", sorted(SLURM_SCRIPTS))
def test_slurm_default_config_and_header(fake, script):
    result = _run(fake, script, "train.lr=2e-4", DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout.splitlines()[-1])
    assert argv[argv.index("--config") + 1] == SLURM_SCRIPTS[script]
    assert argv[-2:] == ["train.resume=auto", "train.lr=2e-4"]
    header = [line for line in (LAUNCHERS / script).read_text().splitlines() if line.startswith("#SBATCH")]
    for directive in ["--nodes=8", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--exclusive",
                      "--requeue", "--signal=B:USR1@180", "--output=logs/%x-%j.out"]:
        assert f"#SBATCH {directive}" in header


def test_slurm_run_maps_tasks_and_requeues_on_the_marker(fake):
    result = _run(fake, "slurm_8node.sh", "configs/mine.yaml", FAKE_SAVED="1", FAKE_RC="137")
    assert result.returncode == 0, result.stdout + result.stderr
    tasks = sorted(p.read_text().strip() for p in fake["state"].glob("task_*"))
    expected = [f"RANK={r} WORLD_SIZE=4 LOCAL_RANK={r % 2} LOCAL_WORLD_SIZE=2 MASTER_ADDR=gpu-a17 MASTER_PORT=24242 "
                f"{REQUEUE_MARKER_ENV}={fake['marker']} ARGS=engine/train.py --config configs/mine.yaml "
                "train.resume=auto" for r in range(4)]
    assert tasks == expected
    assert _calls(fake)[-1] == "scontrol requeue 4242"
    assert f"state saved ({SAVED})" in result.stdout
    assert not fake["marker"].exists()  # consumed


@pytest.mark.parametrize("rc", [0, 3, REQUEUE_EXIT_CODE])
def test_no_marker_no_requeue(fake, rc):
    """The exit code alone never requeues (not even the requeue code): only a saved state does."""
    result = _run(fake, "slurm_8node.sh", "configs/mine.yaml", FAKE_RC=str(rc))
    assert result.returncode == rc
    assert _requeues(fake) == []
    assert len(list(fake["state"].glob("task_*"))) == 4


def test_a_marker_of_an_earlier_run_is_consumed_at_start(fake):
    fake["marker"].parent.mkdir(parents=True)
    fake["marker"].write_text(SAVED + "\n")  # left by the run before a requeue whose launcher died
    result = _run(fake, "slurm_8node.sh", "configs/mine.yaml", FAKE_RC="1")
    assert result.returncode == 1
    assert _requeues(fake) == []
    assert not fake["marker"].exists()


class Job:
    """A launcher run under the fake Slurm whose tasks wait for signals (FAKE_MODE), driven by the test."""

    def __init__(self, fake: dict, mode: str):
        self.fake = fake
        self.proc = subprocess.Popen(["bash", "launchers/slurm_8node.sh", "configs/mine.yaml"], cwd=fake["repo"],
                                     env={**fake["env"], "FAKE_MODE": mode}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.task_pids = [int(self.wait_for("ready", 4)[r].read_text()) for r in range(4)]

    def wait_for(self, what: str, count: int) -> list[Path]:
        """The state files `what_RANK` of `count` tasks, once they exist (the tasks report progress there)."""
        deadline = time.monotonic() + 30
        while len(found := sorted(self.fake["state"].glob(f"{what}_*"))) < count:
            assert self.proc.poll() is None and time.monotonic() < deadline, f"tasks did not reach '{what}'"
            time.sleep(0.05)
        return found

    def usr1(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)  # what sbatch --signal=B:USR1@180 does: the batch shell only

    def term(self) -> None:
        """Time limit, scancel or preemption: Slurm signals the batch shell and every task."""
        self.proc.send_signal(signal.SIGTERM)
        for pid in self.task_pids:
            os.kill(pid, signal.SIGTERM)

    def finish(self) -> tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, out

    def task_notes(self) -> list[list[str]]:
        return [(self.fake["state"] / f"task_{r}").read_text().splitlines()[1:] for r in range(4)]


@pytest.fixture
def job(fake):
    jobs: list[Job] = []

    def start(mode: str) -> Job:
        jobs.append(Job(fake, mode))
        return jobs[-1]

    yield start
    for j in jobs:
        if j.proc.poll() is None:
            j.proc.kill()
            j.proc.wait()


def test_usr1_reaches_every_rank_and_requeues(fake, job):
    run = job("usr1_save")
    run.usr1()
    rc, out = run.finish()
    assert rc == 0, out
    assert "SIGUSR1 received" in out and f"state saved ({SAVED})" in out
    assert run.task_notes() == [["usr1"]] * 4
    assert _calls(fake)[-2:] == ["srun forwards USR1", "scontrol requeue 4242"]
    assert not fake["marker"].exists()


def test_crash_after_usr1_is_not_requeued(fake, job):
    run = job("usr1_crash")
    run.usr1()
    rc, out = run.finish()
    assert rc == 1, out
    assert run.task_notes() == [["usr1"]] * 4
    assert _requeues(fake) == [], out
    assert "exit code 1 (not requeued)" in out


def test_sigterm_after_a_complete_checkpoint_requeues(fake, job):
    """USR1, a save slower than the warning, the time limit's SIGTERM, then the save completes."""
    run = job("slow_save")
    run.usr1()
    run.wait_for("saving", 4)
    run.term()
    rc, out = run.finish()
    assert rc == 0, out
    assert run.task_notes() == [["usr1", "term"]] * 4
    assert _calls(fake)[-1] == "scontrol requeue 4242", out


def test_sigterm_without_warning_is_not_requeued(fake, job):
    """scancel (or a Slurm preemption, which requeues by itself): checkpoint, but no requeue."""
    run = job("term_save")
    run.term()
    rc, out = run.finish()
    assert rc == REQUEUE_EXIT_CODE, out
    assert _requeues(fake) == []
    assert "not requeued; resubmitting resumes from" in out
    assert not fake["marker"].exists()


def test_slurm_errors_name_the_problem(fake):
    result = _run(fake, "slurm_8node.sh", "configs/missing.yaml", DRY_RUN="1")
    assert result.returncode == 2 and "config file not found: configs/missing.yaml" in result.stderr
    result = _run(fake, "slurm_8node.sh", "configs/mine.yaml", "max_steps", DRY_RUN="1")
    assert result.returncode == 2 and "'max_steps' is not of the form key.path=value" in result.stderr
    result = _run(fake, "slurm_8node.sh", DRY_RUN="1", SLURM_JOB_ID="")
    assert result.returncode == 2 and "SLURM_JOB_ID is not set" in result.stderr


@pytest.mark.parametrize("gpus, nproc_env, expected", [(0, None, 1), (0, "2", 2), (4, None, 4)])
def test_local_dry_run(fake, gpus, nproc_env, expected):
    if gpus:
        listing = "".join(f"GPU {i}: Fake (UUID: GPU-{i})\\n" for i in range(gpus))
        _write_exe(fake["bin"] / "nvidia-smi", f"#!/usr/bin/env bash\nprintf '{listing}'\n")
    env = {"DRY_RUN": "1", **({"NPROC": nproc_env} if nproc_env else {})}
    result = subprocess.run(["bash", "launchers/local.sh", "model.depth=2"], cwd=fake["repo"],
                            env={**fake["env"], **env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout.splitlines()[-1]) == [
        fake["env"]["PYTHON"], "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        f"--nproc-per-node={expected}", "--shutdown-timeout=600", "engine/train.py",
        "--config", "configs/quickstart.yaml", "train.resume=auto", "model.depth=2"]


def test_repository_virtualenv_is_the_default_interpreter(fake):
    venv_python = fake["repo"] / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    _write_exe(venv_python, "#!/usr/bin/env bash\n")
    env = {k: v for k, v in fake["env"].items() if k != "PYTHON"}
    for script in ["slurm_8node.sh", "local.sh"]:
        result = subprocess.run(["bash", f"launchers/{script}", "configs/mine.yaml"], cwd=fake["repo"],
                                env={**env, "DRY_RUN": "1"}, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert str(venv_python) in shlex.split(result.stdout.splitlines()[-1])
