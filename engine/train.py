"""Train a (MoE) Diffusion Transformer through DeepSpeed.

    deepspeed --num_gpus N engine/train.py --config CONFIG [key.path=value ...]
    torchrun --nproc_per_node N engine/train.py --config CONFIG [...]
    python engine/train.py --config CONFIG [...]                 # one process, still a DeepSpeed engine

The run directory (`train.output_dir`) gets tb/, metrics.jsonl, checkpoints/, samples/, config.yaml,
and run.lock while the job runs (one job per run directory: engine/run_dir.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

if __package__ in (None, ""):  # `python engine/train.py`: import from the repository root, not engine/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from engine.preemption import PreemptionHandler, write_requeue_marker  # standard library only: milliseconds

# First thing in the process, before torch and DeepSpeed load (seconds) and the model, engine and
# checkpoint (minutes at scale): from here on SIGUSR1 / SIGTERM stop the job cleanly instead of killing it.
EARLY_PREEMPTION = PreemptionHandler() if __name__ == "__main__" else None

import torch  # noqa: E402

from engine.config import Config, ConfigError, config_or_exit
from engine.data import DataError, build_train_loader
from engine.ema import EMA
from engine.monitor import setup_logging
from engine.run_dir import RunLockError, prepare_run_dir, run_dir_lock
from engine.text_conditioning import build_text_conditioner
from engine.train_events import TrainEvents
from engine.train_metrics import IntervalMeter
from engine.train_step import after_step, train_step
from models import build_model, moe
from models.diffusion import build_diffusion
from parallel.checkpoint import CheckpointError, load_checkpoint, resolve_resume
from parallel.expert_parallel import all_reduce_sum, attach_expert_parallel, optimizer_param_groups
from parallel.groups import create_groups
from parallel.zero import (DistContext, batch_layout, init_distributed, initialize_engine, run_then_exit,
                           shutdown_distributed)


class NonFiniteStop(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (configs/...)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides of the config")
    return parser.parse_args(argv)


def stop_for_requeue(preemption: PreemptionHandler, dist: DistContext, saved: str) -> NoReturn:
    """Every rank, once the state is on disk (`saved` says where): rank 0 writes the launcher's requeue
    marker, all ranks leave the process group together and exit with the requeue code."""
    if dist.is_main:
        write_requeue_marker(saved)
    shutdown_distributed()
    raise SystemExit(preemption.exit_code)


def stop_if_preempted(preemption: PreemptionHandler, dist: DistContext, resume_from: Path | None) -> None:
    """Before the first step (collective): a signal during start-up stops without a checkpoint, as
    nothing has been trained since `resume_from` (None: the start), which the requeued job resumes."""
    if preemption.requested(all_reduce_sum):
        stop_for_requeue(preemption, dist, f"nothing trained yet; resumes from {resume_from or 'the start'}")


def train(cfg: Config, preemption: PreemptionHandler) -> None:
    dist = init_distributed(cfg)
    setup_logging(dist.rank)
    with run_dir_lock(cfg.run_dir, dist.is_main):  # refuses when another live job trains in this folder
        train_locked(cfg, dist, preemption)


def train_locked(cfg: Config, dist: DistContext, preemption: PreemptionHandler) -> None:
    mb, accum = batch_layout(cfg, dist.world_size)
    run = prepare_run_dir(cfg, dist.is_main)
    resume_from = resolve_resume(cfg)
    stop_if_preempted(preemption, dist, resume_from)
    text = build_text_conditioner(cfg, dist.device)  # frozen caption encoder; None when class-conditional
    torch.manual_seed(cfg.train.seed)  # identical on all ranks: dense weights start equal everywhere
    groups = create_groups(cfg.parallel.ep_size)
    model = build_model(cfg, groups.ep_rank, groups.ep_size)
    attach_expert_parallel(model, cfg, groups)
    engine = initialize_engine(model, optimizer_param_groups(model, cfg), cfg, mb, accum, dist)
    model, ema, objective = engine.module, EMA(engine.module), build_diffusion(cfg)
    state = load_checkpoint(resume_from, engine, ema, cfg) if resume_from else {"step": 0}
    start = state["step"]
    stop_if_preempted(preemption, dist, resume_from)
    loader = build_train_loader(cfg, dist.rank, dist.world_size, mb, accum, start)
    if "data" in state:
        loader.load_state_dict(state["data"])
    events = TrainEvents(cfg, run, dist, engine, ema, objective, loader, start, last_checkpoint=resume_from, text=text)
    meter = IntervalMeter(dist.device, cfg.train.global_batch_size, model.num_tokens, model.flops_per_sample(),
                          dist.world_size)
    moe.set_step(model, start)
    if start >= cfg.train.max_steps:
        events.report_finished(start)
    nonfinite_in_a_row = 0
    for step, micro_batches in zip(range(start + 1, cfg.train.max_steps + 1), loader):
        applied = train_step(engine, objective, micro_batches, cfg, meter, text)
        if applied:
            ema.update(model, cfg.train.ema_decay)
        after_step(model, step, applied, all_reduce_sum)
        nonfinite_in_a_row = 0 if applied else nonfinite_in_a_row + 1
        if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            events.log(step, meter)
            events.close()
            raise NonFiniteStop(f"stopping at step {step}: {nonfinite_in_a_row} steps in a row had a non-finite "
                                f"loss or gradient and were skipped; last good checkpoint: "
                                f"{events.last_checkpoint or 'none yet'}")
        preempted = preemption.requested(all_reduce_sum)
        events.after_step(step, meter, final=preempted or step == cfg.train.max_steps, preempted=preempted,
                          update_skipped=not applied)
        if preempted:
            events.close()
            stop_for_requeue(preemption, dist, f"checkpoint {events.last_checkpoint}")
    events.close(finished=True)
    shutdown_distributed()


def main(argv: list[str] | None = None, preemption: PreemptionHandler | None = None) -> None:
    sys.stdout.reconfigure(line_buffering=True)  # log lines reach Slurm / tee'd files as they happen
    preemption = preemption or PreemptionHandler()
    args = parse_args(argv)
    cfg = config_or_exit(args.config, args.overrides)
    try:
        train(cfg, preemption)
    except ConfigError as e:  # problems visible only once the world size or run folder is known
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (NonFiniteStop, CheckpointError, DataError, RunLockError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    run_then_exit(lambda: main(preemption=EARLY_PREEMPTION))
