"""From a raw webdataset sample (suffix -> bytes) to training tensors, and micro-batch collation.

Member conventions (webdataset's decoders for these suffixes): `latent.npy` float16 [2, C, h, w]
(latent of the image and of its horizontal flip, already multiplied by the VAE scaling factor),
an image (`png`/`jpg`/...), `cls` class index as text, `txt` caption, `text_emb.npy` [n_tokens, D]
and `text_pooled.npy` [D] precomputed text-encoder outputs, `json` provenance.
"""
from __future__ import annotations

import ast
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from engine.data.images import center_crop
from engine.data.shards import CorruptSample

IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp", "ppm", "bmp")
LATENT = "latent.npy"
TEXT_EMB = "text_emb.npy"
TEXT_POOLED = "text_pooled.npy"


@dataclass(frozen=True)
class DecodeSpec:
    """What the loader extracts from every sample (fixed once per dataset and config)."""

    member: str  # LATENT or the image suffix
    channels: int
    size: int  # output side length (images are resized to it; latents must have it)
    flip_pairs: bool  # latents hold [image, flipped image]; images are flipped in the loader
    label: bool  # samples carry `cls`
    caption: bool  # samples carry `txt`
    text_length: int  # > 0: return precomputed text embeddings padded to this many tokens

    @property
    def latent(self) -> bool:
        return self.member == LATENT


_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """A read-only array from .npy bytes (np.load's format; the header parse is cached because
    every sample of a member shares it, and parsing it dominated the loader's time)."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy member")
    start = 10 if data[6] == 1 else 12
    end = start + int.from_bytes(data[8:start], "little")
    header = data[start:end]
    parsed = _npy_headers.get(header)
    if parsed is None:
        fields = ast.literal_eval(header.decode("latin1"))
        parsed = (np.dtype(fields["descr"]), tuple(fields["shape"]), bool(fields["fortran_order"]))
        if parsed[0].hasobject:
            raise ValueError("object arrays are not allowed")
        if len(_npy_headers) >= 1024:
            _npy_headers.clear()
        _npy_headers[header] = parsed
    dtype, shape, fortran = parsed
    count = math.prod(shape)
    if len(data) - end < count * dtype.itemsize:
        raise ValueError(f"truncated .npy: {len(data) - end} bytes for {count} x {dtype}")
    return np.frombuffer(data, dtype, count, end).reshape(shape, order="F" if fortran else "C")


def decode_image(data: bytes, channels: int, size: int) -> torch.Tensor:
    """uint8-valued image bytes -> float [C, size, size] in [0, 255] (ADM centre crop if not square)."""
    with PIL.Image.open(io.BytesIO(data)) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        if image.width != image.height:
            image = PIL.Image.fromarray(center_crop(image, size))
    array = np.asarray(image)
    x = torch.from_numpy(array.copy()).float()
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    if x.shape[-1] != size:  # bilinear, antialiased when shrinking
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > size)[0]
    return x


def decode_sample(raw: dict[str, Any], spec: DecodeSpec, flip: bool) -> dict[str, Any]:
    """One sample's tensors; raises CorruptSample naming the shard and key on any problem."""
    where = f"shard {raw.get('__shard__', raw.get('__url__', '?'))}, key {raw.get('__key__', '?')}"
    try:
        if spec.latent:
            latent = load_npy(raw[LATENT])
            if spec.flip_pairs:
                latent = latent[1 if flip else 0]
            x = torch.from_numpy(latent.astype(np.float32))
            if tuple(x.shape) != (spec.channels, spec.size, spec.size):
                raise ValueError(f"latent shape {tuple(x.shape)}, expected {(spec.channels, spec.size, spec.size)}")
        else:
            x = decode_image(raw[spec.member], spec.channels, spec.size)
            if flip:
                x = x.flip(-1)
            x = x / 127.5 - 1.0
        out: dict[str, Any] = {"x": x, "y": int(raw["cls"]) if spec.label else 0, "key": raw["__key__"]}
        if spec.caption:
            out["caption"] = raw["txt"].decode("utf-8")
        if spec.text_length:
            emb = torch.from_numpy(load_npy(raw[TEXT_EMB]).astype(np.float32))
            if emb.ndim != 2 or emb.shape[0] > spec.text_length:
                raise ValueError(f"text embedding shape {tuple(emb.shape)} (at most {spec.text_length} tokens)")
            out["text_emb"] = emb
            out["text_pooled"] = torch.from_numpy(load_npy(raw[TEXT_POOLED]).astype(np.float32))
    except KeyError as e:
        raise CorruptSample(f"{where}: incomplete sample, no member {e.args[0]!r}") from None
    except Exception as e:  # anything a damaged member can raise while decoding
        raise CorruptSample(f"{where}: {type(e).__name__}: {e}") from None
    return out


def collate(samples: list[dict[str, Any]], step: int, indices: torch.Tensor, text_length: int) -> dict[str, Any]:
    """A micro-batch dict: x [mb, C, H, W], y [mb], index [mb], step, key, (caption, text_*)."""
    batch: dict[str, Any] = {
        "x": torch.stack([s["x"] for s in samples]),
        "y": torch.tensor([s["y"] for s in samples], dtype=torch.long),
        "index": indices.clone(),
        "step": step,
        "key": [s["key"] for s in samples],
    }
    if "caption" in samples[0]:
        batch["caption"] = [s["caption"] for s in samples]
    if text_length:
        dim = samples[0]["text_emb"].shape[1]
        emb = torch.zeros(len(samples), text_length, dim)
        mask = torch.zeros(len(samples), text_length, dtype=torch.bool)
        for i, s in enumerate(samples):
            n = s["text_emb"].shape[0]
            emb[i, :n] = s["text_emb"]
            mask[i, :n] = True
        batch["text_emb"], batch["text_mask"] = emb, mask
        batch["text_pooled"] = torch.stack([s["text_pooled"] for s in samples])
    return batch
