"""Class-conditional generation with per-sample noise, and PNG grids.

    images = generate(model, objective, y, seeds, cfg_scale=4.0, steps=50, sampler="euler")
    save_grid(images, "samples/step_0001000.png", nrow=8)

Sample i's starting noise (and the per-step noise of stochastic samplers) comes from the generator
of `seeds[i]` alone (`engine.rng`, stream "sample"), so an image does not depend on the batch it
was generated in, nor on how many ranks shared the work.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from engine.rng import sample_generator
from models.diffusion import Objective, guided_model_fn
from models.text import TextEmbeddings

GRID_CLASSES = 10  # training-time grids: up to this many classes, one row each
GRID_PER_CLASS = 8  # samples per class (columns)
GRID_SEED_BASE = 0  # grid sample i uses seed GRID_SEED_BASE + i (fixed across runs and steps)


def sample_generators(seeds: torch.Tensor | list[int]) -> list[torch.Generator]:
    return [sample_generator(int(s), 0, 0, "sample") for s in seeds]


@torch.no_grad()
def generate(model: nn.Module, objective: Objective, y: torch.Tensor | None, seeds: torch.Tensor | list[int],
             cfg_scale: float, steps: int, sampler: str, progress: bool = False,
             text: TextEmbeddings | None = None, null_text: TextEmbeddings | None = None) -> torch.Tensor:
    """[B, C, H, W] float32 samples in the model's data space (pixels in [-1, 1] or latents).

    The model runs in eval mode in its own dtype (bf16 under DeepSpeed bf16); the objective
    integrates in float32. Under expert parallelism this is collective: every rank of the
    expert-parallel group must call it with the same number of samples. Text-conditioned models
    take the prompts' `text` and the empty prompt's `null_text` (engine.text_conditioning) and ignore y.
    """
    if len(seeds) != (len(text) if text is not None else len(y)):
        raise ValueError(f"generate: {len(text) if text is not None else len(y)} conditions but {len(seeds)} seeds")
    param = next(model.parameters())
    shape = (model.in_channels, model.input_size, model.input_size)
    generators = sample_generators(seeds)
    z = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(param.device)
    if text is not None:
        guided = guided_model_fn(model, None, cfg_scale, text.to(param.device),
                                 null_text.to(param.device) if null_text is not None else None,
                                 guided_channels=objective.guided_channels)
    else:
        guided = guided_model_fn(model, y.to(param.device), cfg_scale, guided_channels=objective.guided_channels)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided(x.to(param.dtype), t).float()

    was_training = model.training
    model.eval()
    try:
        return objective.sample(model_fn, z, steps, sampler, progress=progress, generators=generators)
    finally:
        model.train(was_training)


def grid_labels_and_seeds(num_classes: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fixed (labels, seeds, nrow) of the training-time grid: one row per class, evenly spread."""
    k = min(num_classes, GRID_CLASSES)
    classes = torch.tensor([i * num_classes // k for i in range(k)])
    labels = classes.repeat_interleave(GRID_PER_CLASS)
    return labels, GRID_SEED_BASE + torch.arange(len(labels)), GRID_PER_CLASS


def grid_array(images: torch.Tensor, nrow: int | None = None, min_tile: int = 32, pad: int = 2) -> np.ndarray:
    """[N, C, H, W] images in [-1, 1] (C = 1 or 3) -> uint8 [H', W', 3] grid, `nrow` per row;
    small images are enlarged (nearest) to at least `min_tile` pixels."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"grid images must be [N, 1 or 3, H, W] pixels, got {tuple(images.shape)} "
                         "(decode latents with the VAE first)")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    scale = max(1, math.ceil(min_tile / max(h, w)))
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3).expand(n, 3, h * scale, w * scale)
    th, tw = h * scale + pad, w * scale + pad
    rows = math.ceil(n / nrow)
    grid = torch.zeros(3, rows * th + pad, nrow * tw + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * th: pad + r * th + h * scale, pad + col * tw: pad + col * tw + w * scale] = pixels[i]
    return grid.permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> np.ndarray:
    """Write the grid of `images` ([-1, 1] pixels) as a PNG; returns the uint8 [H, W, 3] array."""
    grid = grid_array(images, nrow)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid
