"""Stream large arrays into and out of `.npz` files without holding them in memory.

ADM-evaluator sample batches are `.npz` files with `arr_0` = uint8 [N, H, W, 3] (50K images at 256²
are ~10 GB), so the sampler writes them chunk by chunk and the evaluator reads them batch by batch.
The files are ordinary `np.savez` archives: `np.load(path)["arr_0"]` reads them too.
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np


def _member(key: str) -> str:
    return f"{key}.npy"


def _read_header(f: IO[bytes], where: str) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"{where}: unsupported .npy format version {version}")
    if fortran or dtype.hasobject:
        raise ValueError(f"{where}: expected a C-ordered numeric array")
    return shape, dtype


def npz_keys(path: str | Path) -> list[str]:
    """Array names stored in an `.npz` file."""
    with zipfile.ZipFile(path) as zf:
        return [name[:-4] for name in zf.namelist() if name.endswith(".npy")]


def npz_array_info(path: str | Path, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of array `key` of an `.npz` file, read from its header only."""
    with zipfile.ZipFile(path) as zf, zf.open(_member(key)) as f:
        return _read_header(f, f"{path}:{key}")


def iter_npz_rows(path: str | Path, key: str = "arr_0", batch_size: int = 256) -> Iterator[np.ndarray]:
    """Yield consecutive row blocks (first axis) of array `key`, at most `batch_size` rows each."""
    with zipfile.ZipFile(path) as zf, zf.open(_member(key)) as f:
        shape, dtype = _read_header(f, f"{path}:{key}")
        row_shape = shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            rows = min(batch_size, shape[0] - start)
            data = f.read(rows * row_bytes)
            if len(data) != rows * row_bytes:
                raise ValueError(f"{path}:{key}: truncated at row {start} of {shape[0]}")
            yield np.frombuffer(data, dtype=dtype).reshape(rows, *row_shape)


class NpzWriter:
    """Write an `.npz` whose arrays arrive in row chunks; the file appears (atomically) on close.

        with NpzWriter("samples.npz") as npz:
            images = npz.begin("arr_0", (n, 256, 256, 3), np.uint8)
            for chunk in chunks:
                images.write(chunk)
            npz.add("arr_1", labels)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._open: _ArrayStream | None = None

    def begin(self, key: str, shape: tuple[int, ...], dtype: np.dtype | type) -> _ArrayStream:
        self._finish_open()
        self._open = _ArrayStream(self._zip.open(_member(key), "w", force_zip64=True), key, shape, np.dtype(dtype))
        return self._open

    def add(self, key: str, array: np.ndarray) -> None:
        """Write a whole (small) array at once."""
        self._finish_open()
        with self._zip.open(_member(key), "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)

    def _finish_open(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None

    def close(self) -> None:
        self._finish_open()
        self._zip.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._open is not None:
            self._open.f.close()
            self._open = None
        self._zip.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _ArrayStream:
    """One array being written: header first, then rows in order until `shape[0]` rows arrived."""

    def __init__(self, f: IO[bytes], key: str, shape: tuple[int, ...], dtype: np.dtype):
        self.f, self.key, self.shape, self.dtype = f, key, tuple(shape), dtype
        self.rows = 0
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(f, header)

    def write(self, chunk: np.ndarray) -> None:
        if chunk.shape[1:] != self.shape[1:] or chunk.dtype != self.dtype:
            raise ValueError(f"{self.key}: chunk {chunk.shape} {chunk.dtype} does not match {self.shape} {self.dtype}")
        if self.rows + len(chunk) > self.shape[0]:
            raise ValueError(f"{self.key}: more than the announced {self.shape[0]} rows")
        self.f.write(np.ascontiguousarray(chunk).tobytes())
        self.rows += len(chunk)

    def close(self) -> None:
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.key}: {self.rows} rows written, {self.shape[0]} announced")
        self.f.close()
