"""What happens between training steps: log records, EMA sample grids, evaluation, checkpoints.

All of it is collective (every rank calls `after_step` with the same step); only rank 0 writes.
Time spent here is excluded from the throughput of the next log record.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.activated_params import activated_params_profile, supports_dynamic_inference
from engine.digits_eval import ReferenceClassifier, class_accuracy
from engine.monitor import Monitor
from engine.run_dir import checkpoint_root, samples_dir
from engine.sampling import GRID_PER_CLASS, generate, grid_labels_and_seeds, save_grid
from engine.train_metrics import t_bucket_names
from models import moe
from parallel.checkpoint import Checkpointer
from parallel.expert_parallel import all_reduce_sum, comm_stats

if TYPE_CHECKING:
    from engine.config import Config
    from engine.ema import EMA
    from engine.text_conditioning import TextConditioner
    from engine.train_metrics import IntervalMeter
    from models.diffusion import Objective
    from parallel.zero import DistContext


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def mean_over_ranks(stats: dict[str, torch.Tensor], world_size: int) -> dict[str, torch.Tensor]:
    """Average a dict of same-shaped tensors over all ranks with one all-reduce."""
    if not stats:
        return {}
    keys = sorted(stats)
    flat = torch.cat([stats[k].detach().double().reshape(-1) for k in keys])
    flat = (all_reduce_sum(flat) / world_size).cpu()
    out, offset = {}, 0
    for k in keys:
        n = stats[k].numel()
        out[k] = flat[offset:offset + n].reshape(stats[k].shape).float()
        offset += n
    return out


class GridPixels:
    """Model samples -> grid pixels in [-1, 1]: pixels as they are, latents decoded by the VAE of
    `data.vae` (engine/sample.py's Decoder, loaded at the first grid)."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        self.decoder: Any = None

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        if not self.cfg.data.latent:
            return samples
        if self.decoder is None:
            from engine.sample import Decoder  # diffusers is imported only for latent models

            self.decoder = Decoder(self.cfg, self.device)
        pixels = torch.from_numpy(self.decoder(samples.to(self.device))).permute(0, 3, 1, 2)
        return pixels.float() / 127.5 - 1.0  # exact: the grid maps these back to the same uint8


class TrainEvents:
    def __init__(self, cfg: Config, run: Path, dist: DistContext, engine: Any, ema: EMA, objective: Objective,
                 loader: Any, start_step: int, last_checkpoint: Path | None, text: TextConditioner | None = None):
        self.cfg, self.dist, self.engine, self.ema = cfg, dist, engine, ema
        self.objective, self.loader = objective, loader
        self.text = text  # text-conditioned models: grids and evaluation prompt with the digits captions
        self.model = engine.module
        self.last_checkpoint = last_checkpoint
        # train.async_checkpoint: written in the background. Exclusive: engine/train.py holds run.lock, so
        # temporary folders of other jobs in checkpoints/ are debris of dead ones.
        self.checkpoints = Checkpointer(checkpoint_root(cfg), cfg, exclusive=True)
        self.monitor = Monitor(run, dist.is_main, cfg.train.max_steps, start_step, cfg.train.global_batch_size,
                               cfg.train.progress)
        self._classifier = None
        self.grid_pixels = GridPixels(cfg, dist.device)
        self._comm_bytes: dict[str, float] = {}  # training traffic since the last log record
        self.has_moe = next(moe.moe_layers(self.model), None) is not None
        if start_step:
            self.monitor.print(f"resumed from {last_checkpoint} at step {start_step}")

    def after_step(self, step: int, meter: IntervalMeter, final: bool, preempted: bool = False,
                   update_skipped: bool = False) -> None:
        """`update_skipped`: this step's update was not applied (non-finite); no periodic checkpoint
        then, so the checkpoints kept are ones from before the trouble."""
        t = self.cfg.train
        if self.checkpoints.pending:  # an async save publishes once every rank's file is written
            self.last_checkpoint = self.checkpoints.poll() or self.last_checkpoint
        self.monitor.step_done(step)
        if due(step, t.log_every) or final:
            self.log(step, meter)
        sample = due(step, t.sample_every) or (final and not preempted)
        save = (due(step, t.save_every) and not update_skipped) or final
        evaluate = self.cfg.data.source == "digits" and self.cfg.eval.num_samples > 0 and (
            due(step, self.cfg.eval.every) or (final and not preempted))
        if not (sample or save or evaluate):
            return
        self._drain_training_comm()
        with meter.paused():
            if sample:
                self.sample_grid(step)
            if save:
                self.save(step)
            if evaluate:
                self.evaluate(step, final=final)
        comm_stats(self.model)  # sampling traffic is not training traffic: drop it

    def _drain_training_comm(self) -> None:
        for k, v in comm_stats(self.model).items():
            self._comm_bytes[k] = self._comm_bytes.get(k, 0.0) + v

    def log(self, step: int, meter: IntervalMeter) -> None:
        steps = max(meter.steps, 1)
        values: dict[str, Any] = {"lr": float(self.engine.get_lr()[0]), **meter.reduce(all_reduce_sum)}
        values.update(mean_over_ranks(moe.collect_stats(self.model), self.dist.world_size))
        skipped = all_reduce_sum(torch.tensor([float(self.loader.skipped_samples)], device=self.dist.device))
        values["data/skipped_samples"] = float(skipped[0])
        if self.loader.epoch(step) is not None:
            values["data/epoch"] = self.loader.epoch(step)
        if self.has_moe:  # bytes each rank sent per training step (mean over ranks)
            self._drain_training_comm()
            comm = {k: torch.tensor(v / steps) for k, v in self._comm_bytes.items()}
            self._comm_bytes = {}
            values.update({k: float(v) for k, v in mean_over_ranks(comm, self.dist.world_size).items()})
        self.monitor.log(step, values)

    def sample_grid(self, step: int) -> None:
        if self.cfg.data.latent and not self.cfg.data.vae:
            return  # pre-encoded latents without the VAE: nothing to decode them with
        if self.text is not None and self.cfg.data.source != "digits":
            return  # caption models: grids come from engine/sample.py --prompts
        labels, seeds, nrow = grid_labels_and_seeds(self.cfg.model.num_classes)
        condition = self.text.label_kwargs(labels) if self.text is not None else {}
        with self.ema.applied_to(self.model):
            images = generate(self.model, self.objective, labels, seeds, self.cfg.eval.cfg_scale,
                              self.cfg.eval.sample_steps, self.cfg.diffusion.sampler, **condition)
        if self.dist.is_main:
            grid = save_grid(self.grid_pixels(images), samples_dir(self.cfg) / f"step_{step:07d}.png", nrow)
            self.monitor.image("samples/ema", grid, step)

    def evaluate(self, step: int, final: bool = False) -> None:
        if self._classifier is None:
            self._classifier = ReferenceClassifier.fit(self.cfg)
        with self.ema.applied_to(self.model):
            acc = class_accuracy(self.model, self.objective, self._classifier, self.cfg, self.dist, all_reduce_sum,
                                 self.text)
            profile = self.activated_params(step) if final and supports_dynamic_inference(self.model) else {}
        self.monitor.log(step, {"eval/class_acc": acc, **profile})

    def activated_params(self, step: int) -> dict[str, Any]:
        """DiffMoE at the end of training: dynamic inference's average activated parameters per
        timestep bucket and per class (`eval/activated_params*`, plus a table in the Text tab)."""
        e = self.cfg.eval
        profile = activated_params_profile(self.model, self.objective, self.cfg.model.num_classes, GRID_PER_CLASS,
                                           e.cfg_scale, e.sample_steps, self.cfg.diffusion.sampler,
                                           self.cfg.model.moe.threshold_shift, self.text)
        profile = mean_over_ranks(profile, self.dist.world_size)
        values: dict[str, Any] = {"eval/activated_params": float(profile["mean"]),
                                  "eval/activated_params_by_class": profile["by_class"]}
        rows = []
        for name, v in zip(t_bucket_names(), profile["by_t"].tolist()):
            if v == v:  # buckets no sampler step fell in are NaN: left out
                values[f"eval/activated_params_by_t/{name}"] = v
                rows.append(f"| t {name} | {v / 1e6:.4f} |")
        rows += [f"| class {c} | {v / 1e6:.4f} |" for c, v in enumerate(profile["by_class"].tolist())]
        shift = self.cfg.model.moe.threshold_shift
        self.monitor.text("eval/activated_params", f"Dynamic inference (threshold_shift {shift}), average activated "
                          f"params per token: {float(profile['mean']) / 1e6:.4f} M\n\n| | M params |\n| --- | --- |\n"
                          + "\n".join(rows), step)
        return values

    def save(self, step: int) -> None:
        state = {"step": step, "data": self.loader.state_dict(all_reduce_sum, self.dist.device)}  # collective
        self.last_checkpoint = self.checkpoints.save(step, self.engine, self.ema, state) or self.last_checkpoint

    def report_finished(self, step: int) -> None:
        """A resumed run with nothing left to do says so (and what its last evaluation gave)."""
        last = self.monitor.last_value("eval/class_acc")
        result = f"; last eval/class_acc {last:.3f}" if last is not None else ""
        self.monitor.print(f"{self.cfg.run_dir} is already trained to step {step} (train.max_steps="
                           f"{self.cfg.train.max_steps}){result}; raise train.max_steps to continue")

    def close(self, finished: bool = False) -> None:
        self.last_checkpoint = self.checkpoints.wait() or self.last_checkpoint  # collective: the last save is published
        if finished:
            self.monitor.print(f"done: {self.cfg.run_dir} (metrics.jsonl, samples/, checkpoints/; "
                               f"tensorboard --logdir {self.cfg.run_dir / 'tb'})")
        self.monitor.close()
