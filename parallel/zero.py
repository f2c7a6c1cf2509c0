"""Process group start-up and the DeepSpeed ZeRO engine the trainer runs through.

    dist   = init_distributed(cfg)                 # deepspeed / torchrun / plain `python` alike
    engine = initialize_engine(model, optimizer_param_groups(model, cfg), cfg, mb, accum)

Every run goes through a DeepSpeed engine, world size 1 included, so one code path is tested.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from argparse import Namespace
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NoReturn

import torch

if TYPE_CHECKING:
    from engine.config import Config


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A free TCP port on the loopback interface (single-process runs, tests, benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_single_process_env() -> None:
    """A plain `python engine/train.py` is rank 0 of a world of 1 on a free loopback port."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def resolve_backend(requested: str) -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        from engine.config import ConfigError

        raise ConfigError("parallel.backend: 'nccl' needs CUDA devices; use 'gloo' or 'auto' on CPU")
    return requested


def init_distributed(cfg: Config) -> DistContext:
    """Join (or create) the default process group and pick this rank's device.

    Launchers set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; without them this is a single process.
    On CPU each rank gets its share of the cores left after its data-loader workers, unless
    OMP_NUM_THREADS says otherwise: oversubscribed OpenMP threads spin against the workers (measured
    on the 2-core quickstart: 2 threads + 1 worker ran 8x slower than 1 thread + 1 worker).
    """
    _default_single_process_env()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # torchrun exports LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    backend = resolve_backend(cfg.parallel.backend)
    if torch.cuda.is_available():
        # Modulo: with per-task GPU binding (srun --gpus-per-task, CUDA_VISIBLE_DEVICES per rank) a task
        # sees fewer GPUs than LOCAL_RANK counts, often just its own as device 0.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            spare_cores = (os.cpu_count() or 1) - local_world_size * cfg.data.num_workers
            torch.set_num_threads(max(1, spare_cores // local_world_size))

    import deepspeed

    _quiet_deepspeed(rank)
    if device.type == "cpu":
        _skip_cpu_inference_all_reduce()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return DistContext(rank, world_size, local_rank, local_world_size, device, backend)


def shutdown_distributed() -> None:
    """Leave the process group together: tearing gloo/NCCL down at interpreter exit instead can abort
    a finished rank ("terminate called without an active exception") and fail the launcher."""
    import torch.distributed as torch_dist

    if torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def run_then_exit(entry: Callable[[], object]) -> NoReturn:
    """Run a command-line entry point, then end the process without the interpreter's teardown.

    By then every file is closed and the process group destroyed; what is left are torch's gloo/NCCL
    objects that the DeepSpeed engine still references. Destroying those during interpreter
    finalization can abort a rank that has finished its work ("terminate called without an active
    exception", seen rarely on loaded machines), which fails the launcher and the Slurm job after a
    good run. Exit codes (0, SystemExit's, e.g. the requeue code) are kept; tracebacks propagate."""
    try:
        entry()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _skip_cpu_inference_all_reduce() -> None:
    """On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce when the process
    group starts; only `inference_all_reduce` (tensor-parallel inference) uses it. Loading it costs
    seconds to minutes per process (a compile check serialised across processes by a file lock),
    so training skips it: its collectives are torch.distributed's (gloo) either way."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def _quiet_deepspeed(rank: int) -> None:
    """DeepSpeed logs every engine detail at INFO; keep warnings (rank 0) and errors (others)."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING if rank == 0 else logging.ERROR)


def use_bf16(cfg: Config, device: torch.device) -> bool:
    """`auto`: bf16 on CUDA, fp32 on CPU."""
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")


def batch_layout(cfg: Config, data_parallel_size: int) -> tuple[int, int]:
    """(micro_batch_size per rank, gradient accumulation steps) for the configured global batch."""
    from engine.config import ConfigError

    t = cfg.train
    mb = t.micro_batch_size or t.global_batch_size // data_parallel_size
    per_step = mb * data_parallel_size
    if mb <= 0 or t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of micro_batch_size {mb} "
            f"x data-parallel world {data_parallel_size}")
    return mb, t.global_batch_size // per_step


def deepspeed_config(cfg: Config, micro_batch_size: int, grad_accum: int, world_size: int | None = None,
                     bf16: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON config derived from ours (the optimizer and schedule are built here too)."""
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    zero: dict[str, Any] = {"stage": cfg.parallel.zero_stage, "contiguous_gradients": True,
                            "overlap_comm": torch.cuda.is_available()}
    return {
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        # With bf16 ZeRO keeps fp32 master weights; a non-finite gradient norm skips the step
        # (fp32 ZeRO-1/2 skips on its own).
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "steps_per_print": 2**31 - 1,  # our monitor logs; silence DeepSpeed's own reports
        "wall_clock_breakdown": False,
    }


def build_optimizer(param_groups: list[dict], cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, **fused)


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR | None:
    """Linear warm-up to the configured lr over `warmup_steps` optimizer steps, then constant."""
    if warmup_steps <= 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps))


def initialize_engine(model: torch.nn.Module, param_groups: list[dict], cfg: Config, micro_batch_size: int,
                      grad_accum: int, dist: DistContext) -> Any:
    """A DeepSpeed engine over `model`: ZeRO stage from config, AdamW, bf16 when `use_bf16`."""
    import deepspeed

    model.to(dist.device)
    optimizer = build_optimizer(param_groups, cfg, dist.device)
    ds_config = deepspeed_config(cfg, micro_batch_size, grad_accum, dist.world_size, use_bf16(cfg, dist.device))
    # DeepSpeed would pick cuda:LOCAL_RANK itself; give it the device init_distributed chose.
    device_rank = Namespace(device_rank=dist.device.index) if dist.device.type == "cuda" else None
    engine, *_ = deepspeed.initialize(args=device_rank, model=model, optimizer=optimizer,
                                      lr_scheduler=warmup_schedule(optimizer, cfg.train.warmup_steps),
                                      config=ds_config, dist_init_required=False)
    return engine

