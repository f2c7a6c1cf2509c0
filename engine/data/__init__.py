"""Data: indexed webdataset shards, the world-size-invariant training loader, converters.

- `build_train_loader(cfg, rank, world_size, micro_batch_size, grad_accum, start_step)` -> `TrainLoader`
- `prepare_dataset(cfg)` -> shard folder (the embedded digits are converted on first use)
- `load_digits_split("train" | "heldout")` -> (uint8 images [N, 8, 8], int64 labels [N])
- `python -m engine.data.make_shards {imagenet,captions,index} ...` writes shards (docs/data.md)
"""
from engine.data.digits import caption as digits_caption
from engine.data.digits import load_digits_split
from engine.data.loader import TrainLoader, build_train_loader
from engine.data.shards import DataError
from engine.data.source import prepare_dataset

__all__ = ["build_train_loader", "TrainLoader", "prepare_dataset", "load_digits_split", "digits_caption", "DataError"]
