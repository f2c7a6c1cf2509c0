"""Indexed webdataset shards: write them, index them, and read any sample by seeking.

A shard folder holds plain webdataset tars plus, per tar, a sidecar `NAME.idx.json` (byte span of
every sample), one `index.json` (shards in order with their sample counts, the member suffixes
every sample has, and what the converter recorded: VAE, classes, skipped inputs) and `spans.bin`
(every sample's byte span as two little-endian int64, in sample-id order). Sample id `i` is the
i-th sample of the concatenated shards; `ShardReader.read(i)` returns webdataset's raw sample dict
(`__key__`, and one bytes value per member suffix such as `latent.npy`, `cls`, `png`).

Reading costs O(shards) memory, not O(samples): a sample's span is one 16-byte pread of
`spans.bin`. Folders indexed before `spans.bin` existed fall back to the sidecars, parsed on
demand into a cache bounded by `SIDECAR_CACHE_SPANS` spans (least recently used shards dropped).
"""
from __future__ import annotations

import json
import os
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import webdataset as wds

from engine.data.tarscan import TarFormatError, parse_sample, scan_samples

INDEX_FILE = "index.json"
FORMAT = "webdataset-indexed/1"
SIDECAR = ".idx.json"
SPANS_FILE = "spans.bin"
_SPAN = struct.Struct("<qq")  # (byte offset, byte length) of one sample in SPANS_FILE
_OPEN_FILES = 64  # file descriptors a reader keeps open (LRU)
SIDECAR_CACHE_SPANS = 1 << 20  # sidecar fallback: spans kept parsed (16 MiB), least recently used shards dropped


class DataError(ValueError):
    """A dataset problem the user must fix; the message names the file or config key."""


class CorruptSample(Exception):
    """A sample that cannot be read or decoded; the message names its shard and key."""


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def sidecar_path(tar_path: Path) -> Path:
    return tar_path.with_name(tar_path.name.removesuffix(".tar") + SIDECAR)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file, fsync and rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def index_shard(tar_path: Path, final_path: Path | None = None, extra: dict | None = None) -> dict:
    """Scan one tar and write the sidecar of `final_path` (default: the tar itself); returns it.

    The sidecar holds each sample's byte span and the member suffixes every sample has.
    """
    final_path = final_path or tar_path
    try:
        spans = scan_samples(tar_path)
    except (TarFormatError, OSError) as e:
        raise DataError(f"{final_path}: not a readable tar shard ({e})") from None
    members = set(spans[0].suffixes) if spans else set()
    for span in spans:
        members &= set(span.suffixes)
    sidecar = {"shard": final_path.name, "count": len(spans), "members": sorted(members),
               "spans": [[s.start, s.end - s.start] for s in spans], **(extra or {})}
    atomic_write_text(sidecar_path(final_path), json.dumps(sidecar))
    return sidecar


def write_shard(path: Path, samples: Iterable[dict[str, Any]], extra: dict | None = None) -> int:
    """Write samples ({"__key__": str, suffix: bytes | str}) as the webdataset tar `path`, atomically.

    The tar is written under a temporary name, its sidecar is written, then the tar is renamed:
    a shard whose final name exists is complete. Returns the number of samples written.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        # a fixed integer mtime: no pax header per member, and the same inputs give the same bytes
        with wds.TarWriter(f, encoder=False, mtime=0) as writer:
            for sample in samples:
                writer.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()})
        f.flush()
        os.fsync(f.fileno())
    sidecar = index_shard(tmp, path, extra)
    os.replace(tmp, path)
    return sidecar["count"]


def shard_done(path: Path) -> bool:
    return path.exists() and sidecar_path(path).exists()


def write_index(root: Path, names: list[str], meta: dict) -> dict:
    """Assemble `index.json` and `spans.bin` from the sidecars of `names` (in this order) plus converter
    metadata; `skipped` lists the inputs left out (the converter's own plus those recorded per shard).
    `spans.bin` is complete before `index.json` names it, so a reader never sees half of it."""
    meta = dict(meta)
    shards, members, skipped = [], None, list(meta.pop("skipped", []))
    spans_tmp = root / f".{SPANS_FILE}.{os.getpid()}.tmp"
    with open(spans_tmp, "wb") as spans_out:
        for name in names:
            sidecar = read_json(sidecar_path(root / name))
            spans = np.asarray(sidecar["spans"], dtype="<i8").reshape(-1, 2)
            if len(spans) != sidecar["count"]:
                raise DataError(f"{sidecar_path(root / name)}: {len(spans)} spans for {sidecar['count']} samples")
            spans_out.write(spans.tobytes())
            shards.append({"name": name, "count": sidecar["count"]})
            if sidecar["count"]:
                members = set(sidecar["members"]) if members is None else members & set(sidecar["members"])
            skipped += sidecar.get("skipped", [])
        spans_out.flush()
        os.fsync(spans_out.fileno())
    os.replace(spans_tmp, root / SPANS_FILE)
    index = {"format": FORMAT, **meta, "num_samples": sum(s["count"] for s in shards),
             "members": sorted(members or ()), "spans": SPANS_FILE, "shards": shards, "skipped": skipped}
    atomic_write_text(root / INDEX_FILE, json.dumps(index, indent=1))
    return index


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None


class ShardIndex:
    """`index.json` of a shard folder: shard names and counts (the per-shard lists of index.json are
    not kept: `meta` holds the rest); maps sample ids to (shard, sample in shard)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / INDEX_FILE
        if not path.exists():
            raise DataError(
                f"{path}: missing. Build shards with `python -m engine.data.make_shards imagenet|captions ...`, "
                f"or index existing webdataset shards with `python -m engine.data.make_shards index --shards {self.root}`")
        meta: dict = read_json(path)
        if meta.get("format") != FORMAT:
            raise DataError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        shards = meta.pop("shards")
        meta.pop("skipped", None)  # can be long; make_shards prints it, training does not need it
        self.meta = meta
        self.names = [s["name"] for s in shards]
        self.counts = np.array([s["count"] for s in shards], dtype=np.int64)
        del shards
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.num_samples = int(self.starts[-1])
        if self.num_samples == 0:
            raise DataError(f"{path}: the shards hold no sample")
        self.members: list[str] = meta.get("members", [])
        self.spans_file = self.root / meta["spans"] if "spans" in meta else None
        if self.spans_file is not None:
            try:
                size = self.spans_file.stat().st_size
            except OSError as e:
                raise DataError(f"{self.spans_file}: unreadable ({e}); re-run "
                                f"`python -m engine.data.make_shards index --shards {self.root}`") from None
            if size != _SPAN.size * self.num_samples:
                raise DataError(f"{self.spans_file}: {size} bytes, expected {_SPAN.size} per sample for the "
                                f"{self.num_samples} samples of {path}; re-run "
                                f"`python -m engine.data.make_shards index --shards {self.root}`")
        self._sidecars: OrderedDict[int, np.ndarray] = OrderedDict()  # fallback without spans_file (LRU)
        self._sidecar_spans = 0

    def locate(self, sample_id: int) -> tuple[int, int]:
        """(shard number, sample number inside the shard) of a global sample id."""
        if not 0 <= sample_id < self.num_samples:
            raise IndexError(f"sample id {sample_id} outside 0..{self.num_samples - 1}")
        shard = int(np.searchsorted(self.starts, sample_id, side="right")) - 1
        return shard, sample_id - int(self.starts[shard])

    def sidecar_spans(self, shard: int) -> np.ndarray:
        """[count, 2] int64 (byte offset, byte length) of each sample of one shard, from its sidecar
        (kept in an LRU cache of at most SIDECAR_CACHE_SPANS spans, besides the one returned)."""
        spans = self._sidecars.pop(shard, None)
        if spans is None:
            path = sidecar_path(self.root / self.names[shard])
            spans = np.asarray(read_json(path)["spans"], dtype=np.int64).reshape(-1, 2)
            if len(spans) != self.counts[shard]:
                raise DataError(f"{path}: {len(spans)} samples but index.json says {self.counts[shard]}; "
                                f"re-run `python -m engine.data.make_shards index --shards {self.root}`")
            self._sidecar_spans += len(spans)
            while self._sidecars and self._sidecar_spans > SIDECAR_CACHE_SPANS:
                self._sidecar_spans -= len(self._sidecars.popitem(last=False)[1])
        self._sidecars[shard] = spans
        return spans


class ShardReader:
    """Random access to the samples of an indexed shard folder (a pread for the span, one for the sample)."""

    def __init__(self, index: ShardIndex):
        self.index = index
        self._files: OrderedDict[int, int] = OrderedDict()
        self._spans_fd: int | None = None

    def __getstate__(self) -> dict:  # file descriptors stay in the process that opened them
        return {"index": self.index, "_files": OrderedDict(), "_spans_fd": None}

    def span(self, sample_id: int) -> tuple[int, int, int, int]:
        """(shard, sample number in the shard, byte offset, byte length) of a global sample id."""
        shard, local = self.index.locate(sample_id)
        if self.index.spans_file is None:
            start, length = (int(v) for v in self.index.sidecar_spans(shard)[local])
            return shard, local, start, length
        if self._spans_fd is None:
            self._spans_fd = os.open(self.index.spans_file, os.O_RDONLY)
        start, length = _SPAN.unpack(os.pread(self._spans_fd, _SPAN.size, sample_id * _SPAN.size))
        return shard, local, start, length

    def _fd(self, shard: int) -> int:
        fd = self._files.pop(shard, None)
        if fd is None:
            if len(self._files) >= _OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
            fd = os.open(self.index.root / self.index.names[shard], os.O_RDONLY)
        self._files[shard] = fd
        return fd

    def read(self, sample_id: int) -> dict[str, Any]:
        """webdataset's raw sample: `__key__`, `__shard__` and {suffix: bytes}; CorruptSample if unreadable."""
        shard, local, start, length = self.span(sample_id)
        name = self.index.names[shard]
        try:
            buf = os.pread(self._fd(shard), length, start)
            if len(buf) < length:
                raise TarFormatError(f"shard truncated at byte {start + len(buf)}")
            key, fields = parse_sample(buf)
        except (TarFormatError, OSError) as e:
            raise CorruptSample(f"shard {name}, sample #{local} at byte {start}: {e}") from None
        fields["__key__"] = key
        fields["__shard__"] = name
        return fields

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])
        if self._spans_fd is not None:
            os.close(self._spans_fd)
            self._spans_fd = None
