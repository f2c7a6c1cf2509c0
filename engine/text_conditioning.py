"""Captions -> the `text=` input of a text-conditioned DiT, for training and for sampling.

    text = build_text_conditioner(cfg, device)           # None for class-conditional models
    emb = text.training_text(batch)                      # a loader micro-batch, caption dropout applied
    model(x_t, t, batch["y"], text=emb)
    generate(..., **text.sampling_kwargs(prompts))       # text= and the empty prompt null_text= for CFG
    generate(..., **text.label_kwargs(labels))           # digits: prompts "a handwritten digit seven", ...

Caption dropout (classifier-free guidance) replaces a caption by the empty prompt "" with
probability `model.text.caption_dropout`, drawn from the sample's global index (stream
"label_drop" of `engine.rng`), so a step's global batch is the same whatever the world size.
With `model.text.precomputed` the token states come from the shards (`text_emb`, `text_mask`,
`text_pooled` of the loader); the encoder is loaded once to embed the empty prompt, then released.
`engine/sample.py --prompts FILE` uses `prompts_for` (read and check the file), `prompts_of`
(sample i gets prompt i mod P) and `log_prompt_grid` (the grid into the run's TensorBoard).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.config import ConfigError
from engine.rng import per_sample_uniform
from models.text import FrozenTextEncoder, TextEmbeddings, TextEncoderError, build_text_encoder

if TYPE_CHECKING:
    from engine.config import Config

SAMPLES_PER_PROMPT = 8  # engine/sample.py --prompts without --num-samples: a grid of 8 rows


class TextConditioner:
    """The frozen encoder (or the shards' embeddings), caption dropout and the empty prompt on `device`."""

    def __init__(self, cfg: Config, encoder: FrozenTextEncoder, device: torch.device | str, keep_encoder: bool):
        self.cfg, self.device = cfg, torch.device(device)
        self.empty = encoder([""]).to(self.device)  # [1, L, D]: the unconditional input of CFG
        self.encoder: FrozenTextEncoder | None = encoder if keep_encoder else None

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        if self.encoder is None:
            raise RuntimeError("model.text.precomputed=true: the training conditioner released the text encoder; "
                               "encode new prompts with build_text_conditioner(cfg, device, for_sampling=True)")
        return self.encoder(prompts).to(self.device)

    def null(self, batch: int) -> TextEmbeddings:
        """The empty prompt's embedding repeated `batch` times."""
        return self.empty.expand_to(batch)

    def training_text(self, batch: dict[str, Any]) -> TextEmbeddings:
        """The micro-batch's caption embeddings, each dropped to the empty prompt with probability
        `model.text.caption_dropout`, decided by (train.seed, step, global sample index)."""
        text = self.cfg.model.text
        if text.precomputed:
            if "text_emb" not in batch:
                raise ValueError("model.text.precomputed=true but the loader gave no text_emb "
                                 "(convert the captions with `make_shards captions --text-encoder DIR`)")
            emb = TextEmbeddings(batch["text_emb"], batch["text_mask"], batch["text_pooled"]).to(self.device)
            empty_rows = ~emb.mask.any(1)
            if bool(empty_rows.any()):
                keys = [batch["key"][i] for i in torch.nonzero(empty_rows).flatten().tolist()]
                raise ValueError(f"samples {keys} store text embeddings with no token; re-encode their captions")
        else:
            if "caption" not in batch:
                raise ValueError(f"model.text.encoder={text.encoder} needs captions, but the samples of "
                                 f"data.source={self.cfg.data.source} carry no `txt`")
            emb = self.encode(batch["caption"])
        dropped = per_sample_uniform(self.cfg.train.seed, int(batch["step"]), batch["index"], "label_drop") < text.caption_dropout
        return emb.where(~dropped, self.empty)

    def sampling_kwargs(self, prompts: list[str]) -> dict[str, TextEmbeddings]:
        """`text` and `null_text` (the empty prompt, for guidance) of `engine.sampling.generate`."""
        return {"text": self.encode(prompts), "null_text": self.null(len(prompts))}

    def label_kwargs(self, labels: torch.Tensor) -> dict[str, TextEmbeddings]:
        """`sampling_kwargs` of the digits captions of class labels (training grids, eval/class_acc)."""
        if self.cfg.data.source != "digits":
            raise ValueError(f"class labels have captions only for data.source=digits, not {self.cfg.data.source}")
        return self.sampling_kwargs(digits_prompts(labels))


def build_text_conditioner(cfg: Config, device: torch.device | str, for_sampling: bool = False) -> TextConditioner | None:
    """The conditioner of `cfg.model.text`, or None for a class-conditional model; a missing or
    mismatched encoder folder is a ConfigError naming the key. Training with
    `model.text.precomputed` releases the (possibly huge) encoder once the empty prompt is embedded;
    `for_sampling` keeps it, since new prompts need it."""
    if cfg.model.text.encoder == "none":
        return None
    try:
        encoder = build_text_encoder(cfg.model.text, device)
    except TextEncoderError as e:
        raise ConfigError(str(e)) from None
    return TextConditioner(cfg, encoder, device, keep_encoder=for_sampling or not cfg.model.text.precomputed)


def digits_prompts(labels: torch.Tensor) -> list[str]:
    """The captions the digits shards carry for these class labels ("a handwritten digit seven")."""
    from engine.data import digits_caption

    return [digits_caption(int(label)) for label in labels]


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (surrounding spaces stripped, blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts: {path} is not a file")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts: {path} holds no prompt (one per line)")
    return prompts


def prompts_for(cfg: Config, path: str | Path | None) -> list[str] | None:
    """The prompts of `engine/sample.py --prompts FILE`: required by text-conditioned models,
    refused by class-conditional ones (ValueError naming the option)."""
    if cfg.model.text.encoder == "none":
        if path is not None:
            raise ValueError(f"--prompts: {cfg.name} is class-conditional (model.text.encoder=none); use --classes")
        return None
    if path is None:
        raise ValueError(f"--prompts FILE: {cfg.name} is text-conditioned (model.text.encoder={cfg.model.text.encoder})")
    return read_prompts(path)


def prompts_of(prompts: list[str], indices: range) -> list[str]:
    """Sample i gets prompt i mod P (so a grid with P columns has one prompt per column)."""
    return [prompts[i % len(prompts)] for i in indices]


def log_prompt_grid(run_dir: Path, step: int | None, grid_png: Path, prompts: list[str]) -> int:
    """Add a prompt grid PNG and its prompts to the run's TensorBoard (`tb/`) as `samples/prompts`,
    at the step of the sampled checkpoint (the newest when `step` is None); returns that step."""
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    from parallel.checkpoint import checkpoint_dir, read_manifest

    step = int(read_manifest(checkpoint_dir(run_dir, step))["step"])
    grid = np.asarray(Image.open(grid_png).convert("RGB"))
    writer = SummaryWriter(str(Path(run_dir) / "tb"))
    try:
        writer.add_image("samples/prompts", grid, step, dataformats="HWC")
        writer.add_text("samples/prompts", "\n\n".join(f"column {i}: {p}" for i, p in enumerate(prompts)), step)
    finally:
        writer.close()
    return step
