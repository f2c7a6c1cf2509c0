"""Training metrics accumulated between two log records, reduced over all ranks when logged.

Losses stay on the device until `reduce` (one all-reduce per record, no per-step host sync).
The logged `loss` is the mean of the micro-batch losses of every applied step in the interval
over every rank and accumulation step; with equal micro-batches that is the mean over the global
batch, identical to a single process running the whole batch. Skipped (non-finite) steps are
counted, not averaged in.
"""
from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

import torch

# Loss by timestep uses the MoE monitors' buckets (width 0.1 over t in [0, 1], 0 noise, 1 data), so
# loss_by_t, the expert load heatmaps and eval/activated_params_by_t line up.
from models.moe.layer import TIME_BUCKETS


def t_bucket_names() -> list[str]:
    """`0.0-0.1` ... `0.9-1.0`: the suffixes of every per-timestep-bucket metric."""
    return [f"{i / TIME_BUCKETS:.1f}-{(i + 1) / TIME_BUCKETS:.1f}" for i in range(TIME_BUCKETS)]


class IntervalMeter:
    def __init__(self, device: torch.device, global_batch: int, tokens_per_sample: int, flops_per_sample: float,
                 world_size: int):
        self.device = device
        self.global_batch, self.tokens_per_sample = global_batch, tokens_per_sample
        self.flops_per_sample, self.world_size = flops_per_sample, world_size
        self.total_skipped = 0
        self.reset()

    def reset(self) -> None:
        """Start a new interval (also after a pause such as sampling or checkpointing)."""
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=self.device)  # noqa: E731
        # [diffusion loss sum, aux loss sum, micro-batches] over applied steps
        self.sums = z(3)
        self.bucket_loss, self.bucket_count = z(TIME_BUCKETS), z(TIME_BUCKETS)
        self.steps = self.skipped = 0
        self.grad_norms: list[float] = []
        self.start = time.perf_counter()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside the block (sampling, checkpoints, evaluation) does not count for throughput."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - begin

    def begin_step(self) -> None:
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=self.device)  # noqa: E731
        self.step_sums, self.step_bucket_loss, self.step_bucket_count = z(3), z(TIME_BUCKETS), z(TIME_BUCKETS)

    def add_micro_batch(self, per_sample_loss: torch.Tensor, t: torch.Tensor, aux_loss: torch.Tensor) -> None:
        loss = per_sample_loss.double()
        self.step_sums += torch.stack([loss.mean(), aux_loss.double().reshape(()), loss.new_ones(())])
        bucket = (t.double() * TIME_BUCKETS).long().clamp(0, TIME_BUCKETS - 1)
        self.step_bucket_loss.index_add_(0, bucket, loss)
        self.step_bucket_count.index_add_(0, bucket, torch.ones_like(loss))

    def end_step(self, applied: bool, grad_norm: float | torch.Tensor | None) -> None:
        self.steps += 1
        if not applied:
            self.skipped += 1
            self.total_skipped += 1
            return
        self.sums += self.step_sums
        self.bucket_loss += self.step_bucket_loss
        self.bucket_count += self.step_bucket_count
        if grad_norm is not None:
            self.grad_norms.append(float(grad_norm))

    def reduce(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float | torch.Tensor]:
        """Global metrics of the interval (collective: every rank calls it), then a new interval."""
        packed = all_reduce_sum(torch.cat([self.sums, self.bucket_loss, self.bucket_count]))
        diffusion_sum, aux_sum, micro = packed[:3].tolist()
        bucket_loss, bucket_count = packed[3:3 + TIME_BUCKETS], packed[3 + TIME_BUCKETS:]
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        samples_per_sec = self.steps * self.global_batch / elapsed
        out: dict[str, float | torch.Tensor] = {}
        if micro:
            out["loss"] = (diffusion_sum + aux_sum) / micro
            out["diffusion_loss"] = diffusion_sum / micro
            out["aux_loss"] = aux_sum / micro
        if self.grad_norms:
            out["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        out.update({
            "samples_per_sec": samples_per_sec,
            "tokens_per_sec": samples_per_sec * self.tokens_per_sample,
            # training FLOPs ~ 3x forward (the backward pass costs two forwards)
            "tflops_per_device": 3 * self.flops_per_sample * samples_per_sec / self.world_size / 1e12,
            "nonfinite_steps": float(self.skipped),
            "nonfinite_steps_total": float(self.total_skipped),
        })
        for i, name in enumerate(t_bucket_names()):
            if bucket_count[i] > 0:
                out[f"loss_by_t/{name}"] = float(bucket_loss[i] / bucket_count[i])
        out.update(memory_stats(self.device))
        self.reset()
        return out


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory of this rank (rank 0's is what gets logged): CUDA allocator or process RSS."""
    if device.type == "cuda":
        stats = {"memory/max_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                 "memory/max_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
        torch.cuda.reset_peak_memory_stats(device)
        return stats
    return {"memory/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
