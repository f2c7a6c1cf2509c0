"""Which shards a config trains on, and what to extract from each of their samples.

`prepare_dataset(cfg)` returns the shard folder (building the embedded digits on first use);
`open_source(cfg)` checks the shards against the config (errors name the key to change) and
returns the `DataSource` both loader orders read.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import PIL.Image
import webdataset as wds

from engine.data.decode import IMAGE_SUFFIXES, LATENT, TEXT_EMB, TEXT_POOLED, DecodeSpec, load_npy
from engine.data.digits import build_digits_shards, default_digits_dir
from engine.data.shards import INDEX_FILE, CorruptSample, DataError, ShardIndex, ShardReader

if TYPE_CHECKING:
    from engine.config import Config


@dataclass
class DataSource:
    root: Path
    index: ShardIndex | None  # None only for data.order=stream over shards without index.json
    shard_paths: list[Path]
    counts: list[int] | None  # samples per shard when known
    spec: DecodeSpec
    meta: dict  # index.json without the shard list ({} when absent)

    @property
    def num_samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


def prepare_dataset(cfg: Config) -> Path:
    """The shard folder of `cfg.data`; the embedded digits are converted on first use (atomically)."""
    data = cfg.data
    if data.source == "digits":
        root = Path(data.shards) if data.shards else default_digits_dir()
        build_digits_shards(root)
        return root
    if not data.shards:
        raise DataError(f"data.shards: empty; data.source={data.source} needs the folder written by "
                        f"`python -m engine.data.make_shards {data.source} --src ... --out DIR`")
    root = Path(data.shards)
    if not root.is_dir():
        raise DataError(f"data.shards: {root} is not a folder")
    if data.order == "global" and not (root / INDEX_FILE).exists():
        raise DataError(f"data.shards: {root} has no {INDEX_FILE} (needed by data.order=global); run "
                        f"`python -m engine.data.make_shards index --shards {root}`, or set data.order=stream")
    return root


def open_source(cfg: Config) -> DataSource:
    root = prepare_dataset(cfg)
    if (root / INDEX_FILE).exists():
        index = ShardIndex(root)
        meta = {k: v for k, v in index.meta.items() if k != "shards"}
        paths, counts = [root / n for n in index.names], [int(c) for c in index.counts]
        first, members = _first_indexed_sample(index), index.members
    else:  # data.order=stream over shards nobody indexed
        index, meta, counts = None, {}, None
        paths = sorted(root.glob("*.tar"))
        if not paths:
            raise DataError(f"data.shards: no *.tar file in {root}")
        first = next(iter(wds.WebDataset([str(paths[0])], shardshuffle=False, nodesplitter=None,
                                         workersplitter=None, empty_check=False)), None)
        if first is None:
            raise DataError(f"{paths[0]}: no sample")
        members = sorted(k for k in first if not k.startswith("__"))
    return DataSource(root, index, paths, counts, _decode_spec(cfg, meta, members, first), meta)


def _first_indexed_sample(index: ShardIndex) -> dict[str, Any]:
    reader, errors = ShardReader(index), []
    try:
        for sample_id in range(min(16, index.num_samples)):
            try:
                return reader.read(sample_id)
            except CorruptSample as e:
                errors.append(str(e))
    finally:
        reader.close()
    raise DataError(f"{index.root}: the first samples are unreadable: {'; '.join(errors)}")


def _decode_spec(cfg: Config, meta: dict, members: list[str], first: dict[str, Any]) -> DecodeSpec:
    data, model = cfg.data, cfg.model
    where = f"the shards in {data.shards or 'the digits cache'}"
    if data.source == "imagenet" and "cls" not in members:
        raise DataError(f"data.source=imagenet needs a class label (`cls`) in every sample; {where} have {members}")
    if data.source == "captions" and "txt" not in members and TEXT_EMB not in members:
        raise DataError(f"data.source=captions needs captions (`txt`) or `{TEXT_EMB}`; {where} have {members}")
    if data.source == "digits" and meta.get("kind") != "digits":
        raise DataError(f"data.source=digits but {data.shards} was not built by the digits converter")

    if data.latent:
        if LATENT not in members:
            raise DataError(f"data.latent=true but {where} hold no `{LATENT}` (members: {members})")
        latent = load_npy(first[LATENT])
        flip_pairs = latent.ndim == 4 and latent.shape[0] == 2
        channels, size = int(latent.shape[-3]), int(latent.shape[-1])
        if data.random_flip and not flip_pairs:
            raise DataError("data.random_flip=true needs the latent of each flipped image; these shards "
                            "store one latent per sample: set data.random_flip=false")
        if size != model.input_size:
            raise DataError(f"model.input_size={model.input_size} but the latents are {size}x{size}")
        member = LATENT
    else:
        images = [s for s in IMAGE_SUFFIXES if s in members]
        if not images:
            hint = ": set data.latent=true" if LATENT in members else ""
            raise DataError(f"{where} hold no image member (members: {members}){hint}")
        member, flip_pairs = images[0], False
        channels = int((meta.get("image") or {}).get("channels", 0)) or _image_channels(first[member])
        size = model.input_size
    if channels != model.in_channels:
        raise DataError(f"model.in_channels={model.in_channels} but the samples have {channels} channels")

    label = "cls" in members
    if label and meta.get("num_classes", 0) > model.num_classes:
        raise DataError(f"model.num_classes={model.num_classes} but the shards have {meta['num_classes']} classes")
    text_length = 0
    if model.text.precomputed:
        if TEXT_EMB not in members or TEXT_POOLED not in members:
            raise DataError(f"model.text.precomputed=true but {where} hold no `{TEXT_EMB}`/`{TEXT_POOLED}`; "
                            "convert with `make_shards captions --text-encoder DIR`")
        stored = (meta.get("text") or {}).get("max_length", 0)
        if stored > model.text.max_length:
            raise DataError(f"model.text.max_length={model.text.max_length} but the shards hold up to {stored} tokens")
        dim = int(load_npy(first[TEXT_EMB]).shape[-1])
        if model.text.dim and model.text.dim != dim:
            raise DataError(f"model.text.dim={model.text.dim} but the stored text embeddings have width {dim}")
        text_length = model.text.max_length
    return DecodeSpec(member, channels, size, flip_pairs, label, "txt" in members, text_length)


def _image_channels(data: bytes) -> int:
    with PIL.Image.open(io.BytesIO(data)) as image:
        return 1 if image.mode in ("L", "1", "I;16", "I", "F") else 3

