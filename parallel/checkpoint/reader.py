"""Reading any element range of any saved tensor, whatever layout wrote it.

    with CheckpointReader(path, manifest) as reader:
        reader.verify(reader.file_names())
        w = reader.tensor("model/final_layer.linear.weight")          # whole (global) tensor
        e = reader.read("exp_avg/blocks.1.ffn.experts.w1", lo, hi)    # elements [lo, hi) of the flattened one

Files are memory-mapped (safetensors); only the requested slices of the pieces that overlap the
range are read, so a rank loading its share touches only its share.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import safetensors
import torch

from parallel.checkpoint.files import CheckpointError, verify_file
from parallel.checkpoint.layout import read_manifest


class CheckpointReader:
    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path, self.manifest = Path(path), manifest
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        # key -> [(lo, hi, file)] sorted by lo: where each range of each global flattened tensor lives
        self._pieces: dict[str, list[tuple[int, int, str]]] = {}
        for name, rec in manifest["files"].items():
            for key, (lo, hi) in rec["pieces"].items():
                self._pieces.setdefault(key, []).append((lo, hi, name))
        for pieces in self._pieces.values():
            pieces.sort()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def file_names(self) -> list[str]:
        return sorted(self.manifest["files"])

    def verify(self, names: list[str]) -> None:
        for name in names:
            verify_file(self.path / name, self.manifest["files"][name]["sha256"])

    def tensor(self, key: str) -> torch.Tensor:
        """The whole global tensor `key` ("section/name"), in its saved shape."""
        shape = self.manifest["tensors"][key.split("/", 1)[1]]["shape"]
        return self.read(key, 0, math.prod(shape)).view(shape)

    def read(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the flattened global tensor `key`, 1-D."""
        if lo == hi:
            return torch.empty(0)  # a tensor with no elements has no piece
        parts = []
        at = lo
        for first, last, name in self._pieces.get(key, []):
            if last <= at or first >= hi:
                continue
            if first > at:
                break  # a hole: reported below
            end = min(last, hi)
            parts.append(self.raw(name, key, at - first, end - first))
            at = end
            if at == hi:
                break
        if at != hi:
            raise CheckpointError(f"checkpoint {self.path} does not hold elements {at}..{hi} of '{key}'")
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def raw(self, name: str, key: str, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
        """Tensor `key` of file `name` as stored (a slice [lo, hi) of it when given)."""
        file = self.path / name
        try:
            if name not in self._handles:
                self._handles[name] = self._stack.enter_context(safetensors.safe_open(str(file), framework="pt"))
            handle = self._handles[name]
            return handle.get_tensor(key) if lo is None else handle.get_slice(key)[lo:hi]
        except Exception as e:  # safetensors raises its own error types (missing key, malformed file)
            raise CheckpointError(f"cannot read '{key}' from checkpoint file {file}: {e}") from None


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file of checkpoint folder `path` against the manifest; returns the manifest."""
    manifest = read_manifest(path)
    with CheckpointReader(path, manifest) as reader:
        reader.verify(reader.file_names())
    return manifest
