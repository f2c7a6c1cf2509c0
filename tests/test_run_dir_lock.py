"""The run-dir lock (engine/run_dir.py) between real processes: a second live job refuses naming the
holder, a dead holder's lock is taken over, a requeued job (same Slurm job id) takes its own lock
back, the lock goes at every exit (the requeue code included), and ranks learn rank 0's outcome.
Holders on other hosts are lock files written here by hand, judged by a fake `scontrol` on PATH."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.preemption import REQUEUE_EXIT_CODE
from engine.run_dir import LOCK_FILE, RunLockError, run_dir_lock
from tests.dist_utils import DistributedPool
from tests.train_utils import QUICKSTART, REPO, TINY, TRAIN, child_env, free_port

# A job holding the lock on sys.argv[1] until its stdin closes, then exiting with sys.argv[2].
HOLDER = """
import sys
from pathlib import Path
from engine.run_dir import RunLockError, run_dir_lock
try:
    with run_dir_lock(Path(sys.argv[1]), True) as job:
        print("locked", job, flush=True)
        sys.stdin.readline()
        raise SystemExit(int(sys.argv[2]))
except RunLockError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(1)
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No Slurm job unless asked; PATH holds only the fake scontrol folder (if any) and the system."""
    env = {k: v for k, v in child_env().items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{tmp_path / 'bin'}:/usr/bin:/bin"
    env.update(extra)
    return env


def _start_holder(run: Path, env: dict[str, str], exit_code: int = 0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), str(exit_code)], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("locked"), line + proc.communicate()[1]
    return proc


def _try_lock(run: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A second job: takes the lock (and releases it at once) or refuses."""
    return subprocess.run([sys.executable, "-c", HOLDER, str(run), "0"], cwd=REPO, env=env, input="\n",
                          capture_output=True, text=True, timeout=120)


def _release(proc: subprocess.Popen) -> tuple[int, str]:
    """Let a holder go; its exit code and stderr."""
    _, err = proc.communicate(input="\n", timeout=60)
    return proc.returncode, err


def _fake_scontrol(tmp_path: Path, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\n" + script)
    (bin_dir / "scontrol").chmod(0o755)


def _write_lock(run: Path, **fields) -> None:
    record = {"job_id": "555", "host": "gpu-other-node", "pid": 4321, "pid_start": "", "slurm": True,
              "since": "2026-01-01T00:00:00Z", **fields}
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_FILE).write_text(json.dumps(record))


def test_second_live_job_refuses_with_one_line_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    first = _start_holder(run, _env(tmp_path, SLURM_JOB_ID="1001"))
    try:
        second = _try_lock(run, _env(tmp_path, SLURM_JOB_ID="1002"))
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith(f"error: train.output_dir: {run} is in use by job 1001 (host "
                                   f"{socket.gethostname()}, pid {first.pid}, since ")
        assert f"delete {run / LOCK_FILE}" in lines[0]
        assert json.loads((run / LOCK_FILE).read_text())["job_id"] == "1001"  # untouched
    finally:
        assert _release(first)[0] == 0
    assert not (run / LOCK_FILE).exists()


def test_lock_of_a_killed_job_is_taken_over(tmp_path):
    run = tmp_path / "run"
    first = _start_holder(run, _env(tmp_path))
    first.kill()  # SIGKILL: no release
    first.communicate()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == first.pid
    second = _start_holder(run, _env(tmp_path))
    try:
        lock = json.loads((run / LOCK_FILE).read_text())
        assert lock["pid"] == second.pid and lock["job_id"] == f"{socket.gethostname()}-{second.pid}"
    finally:
        code, err = _release(second)
    assert code == 0
    assert f"taking over from job {socket.gethostname()}-{first.pid}" in err
    assert f"pid {first.pid} is not running on {socket.gethostname()}" in err


def test_two_jobs_taking_over_one_stale_lock_at_once_one_wins(tmp_path):
    """A double submit after a crash: both find the dead job's lock; whatever the interleaving, exactly
    one job holds the folder and the other refuses naming it."""
    run = tmp_path / "run"
    _write_lock(run, job_id="9", host=socket.gethostname(), pid=_dead_pid(), pid_start="1", slurm=False)
    jobs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(run), "0"], cwd=REPO, env=_env(tmp_path),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    firsts = [job.stdout.readline() for job in jobs]  # "locked ..." from the winner, "" (exit) from the other
    results = [_release(job) for job in jobs]
    winner = [i for i, line in enumerate(firsts) if line.startswith("locked")]
    assert len(winner) == 1, (firsts, results)
    loser = 1 - winner[0]
    assert results[winner[0]][0] == 0 and results[loser][0] == 1
    assert f"is in use by job {socket.gethostname()}-{jobs[winner[0]].pid} " in results[loser][1]


def test_a_lock_replaced_after_we_judged_it_stale_is_put_back(tmp_path):
    """The interleaving the rename guards against: between our read of a stale lock and our removal,
    another job took it over; we must put that job's lock back, not delete it."""
    from engine.run_dir import LockHolder, _read, _remove_if_unchanged

    run = tmp_path / "run"
    _write_lock(run, job_id="stale-one")
    judged_stale = _read(run / LOCK_FILE)
    _write_lock(run, job_id="new-holder")  # the other job's lock, written meanwhile
    assert not _remove_if_unchanged(run / LOCK_FILE, judged_stale, LockHolder.this_process())
    assert json.loads((run / LOCK_FILE).read_text())["job_id"] == "new-holder"
    assert [p.name for p in run.iterdir()] == [LOCK_FILE]  # no leftover aside file


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped (were it reused meanwhile, the recorded
    start time "1" still tells the new process from the holder)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_requeued_job_takes_its_own_lock_back(tmp_path):
    """Slurm keeps the job id across a requeue: the id decides, even while the recorded pid still runs."""
    run = tmp_path / "run"
    first = _start_holder(run, _env(tmp_path, SLURM_JOB_ID="2024"))
    try:
        again = _try_lock(run, _env(tmp_path, SLURM_JOB_ID="2024"))
        assert again.returncode == 0, again.stderr
        assert "taken back from an earlier run of this job (job 2024" in again.stderr
        assert not (run / LOCK_FILE).exists()  # the requeued run released it when it ended
    finally:
        _release(first)


def test_lock_released_when_the_job_exits_for_requeue(tmp_path):
    run = tmp_path / "run"
    holder = _start_holder(run, _env(tmp_path), exit_code=REQUEUE_EXIT_CODE)
    assert (run / LOCK_FILE).exists()
    assert _release(holder)[0] == REQUEUE_EXIT_CODE
    assert not (run / LOCK_FILE).exists()


def test_reused_pid_on_this_host_is_not_the_holder(tmp_path):
    """The recorded pid runs (it is this test process) but started at another time: a reused pid."""
    run = tmp_path / "run"
    _write_lock(run, job_id="7", host=socket.gethostname(), pid=os.getpid(), pid_start="1", slurm=False)
    result = _try_lock(run, _env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"pid {os.getpid()} on {socket.gethostname()} is another process now" in result.stderr


@pytest.mark.parametrize("scontrol, taken", [
    ('echo "JobId=555 JobName=x"; echo "   JobState=RUNNING Reason=None"', False),
    ('echo "JobId=555 JobName=x"; echo "   JobState=COMPLETING Reason=None"', False),
    ('echo "JobId=555 JobName=x"; echo "   JobState=TIMEOUT Reason=TimeLimit"', True),
    ('echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1', True),
    ('echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1', False),
    (None, False),  # no scontrol at all
])
def test_holder_on_another_host_is_judged_by_slurm(tmp_path, scontrol, taken):
    run = tmp_path / "run"
    _write_lock(run)
    if scontrol is not None:
        _fake_scontrol(tmp_path, scontrol + "\n")
    result = _try_lock(run, _env(tmp_path, SLURM_JOB_ID="600"))
    if taken:
        assert result.returncode == 0, result.stderr
        assert "taking over from job 555 (host gpu-other-node, pid 4321" in result.stderr
        assert not (run / LOCK_FILE).exists()  # taken, then released by the exiting job
    else:
        assert result.returncode == 1
        assert "in use by job 555 (host gpu-other-node, pid 4321" in result.stderr
        assert json.loads((run / LOCK_FILE).read_text())["job_id"] == "555"


def test_holder_on_another_host_outside_slurm_needs_a_person(tmp_path):
    run = tmp_path / "run"
    _write_lock(run, job_id="gpu-other-node-4321", slurm=False)
    _fake_scontrol(tmp_path, 'echo "   JobState=COMPLETED"\n')  # not asked: the holder is no Slurm job
    result = _try_lock(run, _env(tmp_path))
    assert result.returncode == 1
    assert "outside Slurm, so its state is unknown here" in result.stderr
    (run / LOCK_FILE).unlink()  # what the message tells a person to do once that job is gone
    assert _try_lock(run, _env(tmp_path)).returncode == 0


def test_unreadable_lock_names_the_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text("not json")
    result = _try_lock(run, _env(tmp_path))
    assert result.returncode == 1
    assert f"{run / LOCK_FILE} is not a lock written by engine/train.py" in result.stderr


def _lock_on_ranks(run: str) -> tuple[str, str]:
    """Every rank enters run_dir_lock; returns (outcome, detail) instead of raising."""
    import torch.distributed as dist

    try:
        with run_dir_lock(Path(run), dist.get_rank() == 0) as job:
            return "locked", job
    except RunLockError as e:
        return "refused", str(e)
    except SystemExit as e:
        return "exit", str(e.code)


@pytest.mark.slow
def test_ranks_learn_rank_0s_outcome(tmp_path):
    run = tmp_path / "run"
    with DistributedPool(2) as pool:
        (first, job0), (second, job1) = pool.run(_lock_on_ranks, str(run))
        assert first == second == "locked"
        assert job0 == job1 and job0.startswith(f"{socket.gethostname()}-")  # rank 0's `host-pid` on both ranks
        assert not (run / LOCK_FILE).exists()
        holder = _start_holder(run, _env(tmp_path, SLURM_JOB_ID="31337"))
        try:
            rank0, rank1 = pool.run(_lock_on_ranks, str(run))
        finally:
            _release(holder)
    assert rank0[0] == "refused" and "in use by job 31337" in rank0[1]
    assert rank1 == ("exit", "1")  # silently: rank 0 reports


@pytest.mark.slow
def test_trainer_ranks_refuse_a_run_dir_in_use_together(tmp_path):
    """Two ranks of engine/train.py (started like srun starts them) against a live holder: both exit 1,
    one `error:` line in all, nothing written to the run directory."""
    run = tmp_path / "run"
    holder = _start_holder(run, _env(tmp_path, SLURM_JOB_ID="4711"))
    port = str(free_port())
    try:
        ranks = [subprocess.Popen([sys.executable, TRAIN, "--config", QUICKSTART, *TINY, f"train.output_dir={run}"],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=_env(tmp_path, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                           LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                 for r in range(2)]
        outputs = [p.communicate(timeout=600) for p in ranks]
    finally:
        _release(holder)
    assert [p.returncode for p in ranks] == [1, 1], outputs
    errors = [line for _, err in outputs for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: train.output_dir: {run} is in use by job 4711 (host ")
    assert "Traceback" not in outputs[0][1] + outputs[1][1]
    assert sorted(p.name for p in run.iterdir()) == []  # holder gone, nothing of the refused job


def test_folder_that_cannot_hold_a_lock_names_the_key(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = _try_lock(tmp_path / "a_file" / "run", _env(tmp_path))
    assert result.returncode == 1
    assert f"error: train.output_dir: cannot lock {tmp_path / 'a_file' / 'run' / LOCK_FILE}: " in result.stderr
