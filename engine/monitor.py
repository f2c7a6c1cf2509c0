"""What a run reports: TensorBoard (`tb/`), `metrics.jsonl` and the console, from rank 0 only.

    monitor = Monitor(run_dir, enabled=dist.is_main, max_steps=..., start_step=..., global_batch=...)
    monitor.log(step, {"loss": 0.12, "moe/block1/tokens_per_expert": tensor([...])})
    monitor.image("samples", grid_uint8_hwc, step)
    monitor.text("eval/activated_params", markdown_table, step)

A value is a number or a tensor: 0-d -> a scalar; 1-d -> one scalar per index (`key/i` in
TensorBoard, a list in metrics.jsonl); 2-d -> a heatmap image in TensorBoard (rows x columns, e.g.
expert x timestep bucket) and a nested list in metrics.jsonl. Each `log` call is one JSON line.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from tqdm.auto import tqdm

Value = Union[float, int, torch.Tensor]

# Viridis anchors (0, .25, .5, .75, 1) for heatmaps: perceptually even, readable in grey.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def heatmap_image(values: torch.Tensor, cell: int = 12) -> np.ndarray:
    """[R, C] -> uint8 [R*cell, C*cell, 3], min..max of the matrix mapped through viridis."""
    v = values.detach().float().cpu().numpy()
    lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    x = np.nan_to_num((v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)) * (len(_VIRIDIS) - 1)
    i = np.clip(np.floor(x).astype(int), 0, len(_VIRIDIS) - 2)
    rgb = _VIRIDIS[i] + (x - i)[..., None] * (_VIRIDIS[i + 1] - _VIRIDIS[i])
    return np.repeat(np.repeat(rgb.round().astype(np.uint8), cell, 0), cell, 1)


def show_progress(enabled: bool) -> bool:
    """Progress bars only on an interactive console (log files get the record lines only)."""
    return enabled and sys.stderr.isatty()


def setup_logging(rank: int) -> None:
    """Python logging: the project's INFO messages on rank 0; warnings and errors from every rank."""
    logging.basicConfig(format="%(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s %(message)s",
                        level=logging.WARNING, force=True)
    for package in ("engine", "parallel", "models"):
        logging.getLogger(package).setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # DeepSpeed's ZeRO calls a torch.distributed API that torch deprecates, once per process
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def _json_value(v: Value) -> float | list | None:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().cpu()
        return _json_value(v.item()) if v.ndim == 0 else [_json_value(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else v  # NaN is not JSON; inf is written as Infinity
    return v


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Monitor:
    """TensorBoard + metrics.jsonl + console for rank 0; a disabled monitor ignores every call."""

    def __init__(self, run_dir: Path, enabled: bool, max_steps: int, start_step: int, global_batch: int,
                 progress: bool = True):
        self.enabled = enabled
        self.max_steps, self.global_batch = max_steps, global_batch
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.metrics_path = run_dir / "metrics.jsonl"
        _drop_records_after(self.metrics_path, start_step)
        # purge_step hides events an earlier attempt wrote after the step this run starts from
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)
        self.start_time = time.time()
        if show_progress(progress):
            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def step_done(self, step: int) -> None:
        """Advance the progress bar to `step` (completed steps)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, step: int, values: dict[str, Value]) -> None:
        if not self.enabled:
            return
        for key, v in values.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            if t.ndim == 0:
                self.writer.add_scalar(key, t.item(), step)
            elif t.ndim == 1:
                for i, x in enumerate(t.tolist()):
                    self.writer.add_scalar(f"{key}/{i}", x, step)
            elif t.ndim == 2:
                self.writer.add_image(key, heatmap_image(t), step, dataformats="HWC")
            else:
                raise ValueError(f"monitor: '{key}' has {t.ndim} dimensions; log at most 2-d tensors")
        record = {"step": step, **{k: _json_value(v) for k, v in values.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.writer.flush()
        self._console(step, values)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A uint8 [H, W, 3] image (e.g. a sample grid) to TensorBoard."""
        if self.enabled:
            self.writer.add_image(tag, image, step, dataformats="HWC")
            self.writer.flush()

    def text(self, tag: str, markdown: str, step: int) -> None:
        """Markdown (e.g. a table) to TensorBoard's Text tab."""
        if self.enabled:
            self.writer.add_text(tag, markdown, step)
            self.writer.flush()

    def print(self, message: str) -> None:
        """One line on the console from rank 0 (kept clear of the progress bar)."""
        if self.enabled:
            tqdm.write(message, file=sys.stdout)

    def _console(self, step: int, values: dict[str, Value]) -> None:
        def num(key: str) -> float | None:
            v = values.get(key)
            return None if v is None else float(v)

        parts = [f"step {step}/{self.max_steps}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "grad_norm {:.3f}"),
                         ("samples_per_sec", "{:.1f} samples/s"), ("eval/class_acc", "class_acc {:.3f}")):
            v = num(key)
            if v is not None:
                parts.append(fmt.format(v))
        rate = num("samples_per_sec")
        if rate:
            parts.append(f"ETA {_format_eta((self.max_steps - step) * self.global_batch / rate)}")
        skipped = num("nonfinite_steps")
        if skipped:
            parts.append(f"skipped {int(skipped)} non-finite")
        if self.bar is not None and num("loss") is not None:
            self.bar.set_postfix(loss=f"{num('loss'):.4f}", refresh=False)
        self.print("  ".join(parts))

    def last_value(self, key: str) -> float | None:
        """The newest value of `key` in metrics.jsonl (rank 0; None elsewhere or if never logged)."""
        if not self.enabled or not self.metrics_path.exists():
            return None
        values = [r[key] for r in map(json.loads, self.metrics_path.read_text().splitlines()) if key in r]
        return values[-1] if values else None

    def close(self) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            self.writer.close()


def _drop_records_after(path: Path, step: int) -> None:
    """Forget lines an earlier attempt wrote past the step this run starts from: one curve per file."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))
