"""Precomputed caption embeddings from a local transformers CLIP text model or T5 encoder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.data.shards import DataError

CLIP_TYPES = ("clip", "clip_text_model")
T5_TYPES = ("t5", "mt5", "umt5")


def text_meta(path: str | Path, max_length: int) -> dict:
    """What index.json records about stored text embeddings (read from the model's config only)."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise DataError(f"text encoder folder {path}: no config.json (expected a transformers model folder)")
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in CLIP_TYPES + T5_TYPES:
        raise DataError(f"text encoder {path}: model type {config.model_type!r} is neither CLIP {CLIP_TYPES} nor T5 {T5_TYPES}")
    if config.model_type == "clip":  # a full CLIP folder: its text tower
        config = config.text_config
    return {"encoder": str(path), "type": "clip" if config.model_type in CLIP_TYPES else "t5",
            "max_length": max_length, "dim": int(config.hidden_size)}


class TextEmbedder:
    """Stored caption embeddings, computed by the trainer's own frozen encoder (`models.text`), so
    precomputed and live embeddings agree by construction: last-layer states of the real tokens and
    the pooled vector (CLIP's pooler output, the mean over real tokens for T5)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", max_length: int = 77):
        from engine.config import TextConfig
        from models.text import TextEncoderError, build_text_encoder

        self.meta = text_meta(path, max_length)
        try:
            self.encoder = build_text_encoder(TextConfig(encoder=self.meta["type"], path=str(path), max_length=max_length),
                                              device)
        except TextEncoderError as e:
            raise DataError(f"--text-encoder {path}: {e}") from None

    def embed(self, captions: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per caption: (token states float16 [n_tokens, D], pooled float16 [D])."""
        out = self.encoder(captions)
        return [(out.tokens[i, out.mask[i]].cpu().numpy().astype(np.float16),
                 out.pooled[i].cpu().numpy().astype(np.float16)) for i in range(len(captions))]
