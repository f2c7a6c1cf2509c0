"""Durable files for checkpoints: fsync'd writes, sha256 checksums, atomic folder and pointer swaps.

A checkpoint is complete exactly when its folder has its final name: files are written into a
temporary folder, fsync'd (files, then the folder), and the folder is renamed in one step. The
`latest` pointer is a one-line file replaced atomically after that rename. A crash at any moment
leaves either the old state or the new one, never a half-written folder under a final name.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

LATEST = "latest"
MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the folder or file."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
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
    return sha256_hex(data)


def fsync_file(path: Path) -> None:
    """Flush a file written by other code (e.g. safetensors.save_file) to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def verify_file(path: Path, sha256: str) -> None:
    """Check a checkpoint file against its manifest checksum; the error names the file."""
    try:
        actual = sha256_file(path)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {e.strerror or e}") from None
    if actual != sha256:
        raise CheckpointError(f"checkpoint file {path} is corrupted: sha256 {actual} does not match the "
                              f"manifest's {sha256}")


def temp_dir_for(final: Path) -> Path:
    return final.parent / f"{_TMP_PREFIX}{final.name}"


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename the fully written `tmp` folder to `final` (replacing an older `final` of the same name)."""
    fsync_dir(tmp)
    if final.exists():  # a re-save of the same step: move the old one aside, then swap in the new one
        trash = final.parent / f"{_TRASH_PREFIX}{final.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def remove_dir(path: Path) -> None:
    """Delete a checkpoint folder without ever leaving a partial folder under its real name."""
    trash = path.parent / f"{_TRASH_PREFIX}{path.name}"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(root: Path) -> None:
    """Temporary and trash folders of interrupted saves or prunes (never a complete checkpoint)."""
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            shutil.rmtree(entry, ignore_errors=True)


def write_pointer(root: Path, target_name: str) -> None:
    """Atomically point `root/latest` at the folder `target_name`."""
    tmp = root / f"{_TMP_PREFIX}{LATEST}"
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
