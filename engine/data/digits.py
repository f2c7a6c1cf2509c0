"""The embedded default dataset: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes).

Converted on first use into webdataset shards (`png` 8x8 grey, `cls`, `txt` caption such as
"a handwritten digit seven", `json` with the sklearn index) and read by the same loader as
ImageNet. A fixed, class-stratified split: every 4th image of each class is held out (445 images)
for the reference classifier of the evaluation; the generator trains on the other 1,352.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from engine.data.images import encode_image
from engine.data.shards import INDEX_FILE, DataError, shard_name, write_index, write_shard

SHARD_SIZE = 256
HELDOUT_EVERY = 4
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)


def default_digits_dir() -> Path:
    return REPO_ROOT / "data_cache" / "digits"


def caption(label: int) -> str:
    return f"a handwritten digit {WORDS[label]}"


def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # sklearn stores 0..16
    return images, digits.target.astype(np.int64)


def split_indices(split: str, labels: np.ndarray) -> np.ndarray:
    """sklearn indices of a split ("train" or "heldout"), in increasing order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    heldout = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        heldout[members[HELDOUT_EVERY - 1 :: HELDOUT_EVERY]] = True
    return np.flatnonzero(heldout if split == "heldout" else ~heldout)


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 8, 8] in 0..255, labels int64 [N]) of the "train" or "heldout" split."""
    images, labels = _all_digits()
    chosen = split_indices(split, labels)
    return images[chosen], labels[chosen]


def build_digits_shards(root: Path) -> None:
    """Write the train split as shards under `root` unless already there (atomic: built in a
    temporary sibling folder and renamed, so a killed or concurrent build never leaves half a dataset)."""
    root = Path(root)
    if (root / INDEX_FILE).exists():
        return
    images, labels = _all_digits()
    chosen = split_indices("train", labels)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    log.info("converting scikit-learn digits into shards at %s", root)
    try:
        names = []
        for number, start in enumerate(range(0, len(chosen), SHARD_SIZE)):
            names.append(shard_name(number))
            write_shard(tmp / names[-1], ({
                "__key__": f"{i:04d}",
                "png": encode_image(images[i], "png"),
                "cls": str(int(labels[i])),
                "txt": caption(int(labels[i])),
                "json": json.dumps({"sklearn_index": int(i), "split": "train"}),
            } for i in chosen[start : start + SHARD_SIZE]))
        write_index(tmp, names, {"kind": "digits", "num_classes": 10, "split": "train",
                                 "image": {"size": 8, "channels": 1, "format": "png"}})
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / INDEX_FILE).exists():  # not a concurrent build that finished first
                raise DataError(f"{root} exists but is not a digits shard folder (no {INDEX_FILE}); "
                                "remove it or point data.shards elsewhere") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
