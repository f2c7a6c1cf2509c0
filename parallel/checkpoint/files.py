"""Durable files for checkpoints: streamed safetensors writes hashed on the way out, fsync'd files,
atomic folder and pointer swaps, and temporary folders named after the job that made them.

A checkpoint is complete exactly when its folder has its final name: files are written into a
temporary folder, fsync'd (files, then the folder), and the folder is renamed in one step. The
`latest` pointer is a one-line file replaced atomically after that rename. A crash at any moment
leaves either the old state or the new one, never a half-written folder under a final name.

Temporary and trash folders carry their owner, `.tmp-step_XXXXXXX.HOST.PID` (PID of the rank that
created them), so leftover cleanup removes only folders of this process or of a process that is
provably gone (same host, PID no longer running) — or, when the caller holds the run directory's
lock, every other owner's (the lock admits one live job per run directory).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

LATEST = "latest"
MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_CHUNK = 1 << 24  # bytes hashed and written (and copied off a GPU) at a time: bounds the extra host memory

# safetensors dtype names
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the folder or file."""


def sha256_file(path: Path, chunk: int = _CHUNK) -> str:
    """sha256 (hex) of a file, read in chunks (checkpoint files can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> str:
    """Write `data` to `path`, flushed to disk; returns its sha256 (hex)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _byte_chunks(t: torch.Tensor, staging: torch.Tensor | None) -> Iterable[memoryview]:
    """The bytes of contiguous tensor `t` in chunks, without copying CPU tensors; GPU tensors go
    through the `staging` host buffer one chunk at a time."""
    raw = t.reshape(-1).view(torch.uint8)
    for lo in range(0, raw.numel(), _CHUNK):
        piece = raw[lo:lo + _CHUNK]
        if piece.device.type != "cpu":
            assert staging is not None
            staging[:piece.numel()].copy_(piece)
            piece = staging[:piece.numel()]
        yield memoryview(piece.numpy())


def write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> dict[str, int | str]:
    """Stream `tensors` (contiguous, any device) into a safetensors file at `path`, fsync'd; the
    sha256 is computed on the bytes as they are written. Returns {"sha256", "bytes"}. Errors name the file."""
    header: dict[str, dict] = {}
    offset = 0
    for key, t in tensors:
        if not t.is_contiguous() or t.dtype not in _DTYPES:
            raise CheckpointError(f"cannot write '{key}' to {path}: needs a contiguous tensor of a safetensors dtype, "
                                  f"got {t.dtype} (contiguous: {t.is_contiguous()})")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    needs_staging = any(t.device.type != "cpu" for _, t in tensors)
    staging = torch.empty(_CHUNK, dtype=torch.uint8, pin_memory=torch.cuda.is_available()) if needs_staging else None
    digest = hashlib.sha256()
    try:
        with open(path, "wb") as f:
            for block in (struct.pack("<Q", len(head)), head):
                digest.update(block)
                f.write(block)
            for _, t in tensors:
                for chunk in _byte_chunks(t, staging):
                    digest.update(chunk)
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint file {path}: {e.strerror or e}") from None
    return {"sha256": digest.hexdigest(), "bytes": 8 + len(head) + offset}


def verify_file(path: Path, sha256: str) -> None:
    """Check a checkpoint file against its manifest checksum; the error names the file."""
    try:
        actual = sha256_file(path)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {e.strerror or e}") from None
    if actual != sha256:
        raise CheckpointError(f"checkpoint file {path} is corrupted: sha256 {actual} does not match the "
                              f"manifest's {sha256}")


def owner_token() -> str:
    """HOST.PID of this process: the owner part of its temporary and trash folder names."""
    return f"{socket.gethostname().replace('.', '_')}.{os.getpid()}"


def temp_dir_for(final: Path) -> Path:
    return final.parent / f"{_TMP_PREFIX}{final.name}.{owner_token()}"


def _trash_for(path: Path) -> Path:
    return path.parent / f"{_TRASH_PREFIX}{path.name}.{owner_token()}"


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename the fully written `tmp` folder to `final` (replacing an older `final` of the same name)."""
    fsync_dir(tmp)
    if final.exists():  # a re-save of the same step: move the old one aside, then swap in the new one
        trash = _trash_for(final)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def remove_dir(path: Path) -> None:
    """Delete a checkpoint folder without ever leaving a partial folder under its real name."""
    trash = _trash_for(path)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _owner_gone(host: str, pid: str) -> bool:
    """Whether the process that named a folder HOST.PID is provably not running (only knowable on its host)."""
    if host != socket.gethostname().replace(".", "_") or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_leftovers(root: Path, exclusive: bool = False) -> list[Path]:
    """Temporary and trash folders (and `latest` pointer files) of interrupted saves or prunes, of this
    process or of owners that are gone; with `exclusive` (the caller holds the run directory's lock) of
    every other owner too. Never a complete checkpoint, never a live job's save in progress. Returns
    what was removed."""
    mine = owner_token()
    removed = []
    for entry in root.iterdir():
        if not entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            continue
        parts = entry.name.rsplit(".", 2)  # .tmp-step_0000002 . HOST . PID
        owner = ".".join(parts[1:]) if len(parts) == 3 else ""
        if owner == mine or exclusive or (owner and _owner_gone(parts[1], parts[2])):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def write_pointer(root: Path, target_name: str) -> None:
    """Atomically point `root/latest` at the folder `target_name`."""
    tmp = root / f"{_TMP_PREFIX}{LATEST}.{owner_token()}"
    write_durable(tmp, (target_name + "\n").encode())
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def read_pointer(root: Path) -> str | None:
    """The folder name `root/latest` points to, or None when there is no pointer."""
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    if not name or "/" in name or name.startswith("."):
        raise CheckpointError(f"{root / LATEST} does not hold a checkpoint folder name (got {name!r})")
    return name
