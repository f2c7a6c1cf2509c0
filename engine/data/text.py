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
    """Token states of the last layer (real tokens only) and a pooled vector per caption:
    CLIP's pooler output (the end-of-text token), for T5 the mean over the real tokens."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", max_length: int = 77):
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        self.meta = text_meta(path, max_length)
        self.device, self.max_length = torch.device(device), max_length
        self.is_clip = self.meta["type"] == "clip"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model_class = CLIPTextModel if self.is_clip else T5EncoderModel
        self.model = model_class.from_pretrained(path).to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def embed(self, captions: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per caption: (token states float16 [n_tokens, D], pooled float16 [D])."""
        tokens = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        states, mask = out.last_hidden_state.float(), tokens["attention_mask"].bool()
        if self.is_clip:
            pooled = out.pooler_output.float()
        else:
            pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return [(states[i, mask[i]].cpu().numpy().astype(np.float16), pooled[i].cpu().numpy().astype(np.float16))
                for i in range(len(captions))]
