"""Tar headers read by hand, so a webdataset sample can be located by byte offset and read by seeking.

A webdataset shard is a plain tar whose members `KEY.SUFFIX` are grouped into samples by KEY
(the path up to the first dot of the file name; the suffix lower-cased), as webdataset's
`group_by_keys` does. `scan_samples` walks the headers of a shard (no data is read) and returns each
sample's byte span; `parse_sample` turns the bytes of one span back into {suffix: bytes}.
Handles ustar names (with prefix), GNU long names and pax `path`/`size` records.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset skips these members


class TarFormatError(ValueError):
    """A header that is not a valid tar header (bad checksum, truncated, bad number)."""


@dataclass
class Member:
    name: str
    header_offset: int  # first header of this member (its pax / long-name header if any)
    data_offset: int
    size: int

    @property
    def end(self) -> int:
        return self.data_offset + _padded(self.size)


@dataclass
class SampleSpan:
    key: str
    start: int  # byte offset of the first header of the sample's first member
    end: int  # byte offset just past the padded data of its last member
    suffixes: list[str] = field(default_factory=list)


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _number(field_bytes: bytes) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.rstrip(b"\0 ").lstrip(b" \0")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad number field {field_bytes!r}") from None


def _parse_header(block: bytes) -> tuple[str, int, bytes]:
    """(name, size, typeflag) of one 512-byte header; raises TarFormatError on a bad checksum."""
    if len(block) < BLOCK:
        raise TarFormatError("truncated header")
    stored = _number(block[148:156])
    actual = sum(block[:148]) + sum(block[156:]) + 8 * 32  # checksum field counted as spaces
    if stored != actual:
        raise TarFormatError("header checksum mismatch")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape"), _number(block[124:136]), block[156:157]


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def iter_members(read_at: Callable[[int, int], bytes], start: int, end: int | None) -> Iterator[Member]:
    """Regular-file members between byte offsets [start, end) (end None: until the end-of-archive block).

    `read_at(offset, n)` returns up to n bytes at offset (a file's pread or a buffer slice).
    """
    pos, pending_name, pending_size, member_start = start, None, None, None
    while end is None or pos < end:
        block = read_at(pos, BLOCK)
        if len(block) == 0 and end is None:
            return  # archive without the end-of-archive blocks
        if block == b"\0" * BLOCK:
            return
        name, size, kind = _parse_header(block)
        if member_start is None:
            member_start = pos
        data_offset = pos + BLOCK
        if kind in (b"x", b"L"):  # extended header: applies to the next member
            payload = read_at(data_offset, size)
            if len(payload) < size:
                raise TarFormatError("truncated extended header")
            if kind == b"L":
                pending_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                records = _pax_records(payload)
                pending_name = records.get("path", pending_name)
                if "size" in records:
                    pending_size = int(records["size"])
            pos = data_offset + _padded(size)
            continue
        size = pending_size if pending_size is not None else size
        if kind in _REGULAR:
            yield Member(pending_name or name, member_start, data_offset, size)
        pos = data_offset + _padded(size)  # links, folders, global pax headers: skipped
        pending_name, pending_size, member_start = None, None, None


def split_name(name: str) -> tuple[str, str] | None:
    """(key, lower-case suffix) as webdataset groups members, or None for members it ignores."""
    if _META_NAME.match(name):
        return None
    match = _KEY_SUFFIX.match(name)
    if not match:
        return None
    return match.group(1), match.group(2).lower()


def file_reader(fd: int) -> Callable[[int, int], bytes]:
    return lambda offset, n: os.pread(fd, n, offset)


def scan_samples(path: str | os.PathLike) -> list[SampleSpan]:
    """Byte spans of the samples of one tar shard, in file order (reads headers only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        spans: list[SampleSpan] = []
        for member in iter_members(file_reader(fd), 0, None):
            parts = split_name(member.name)
            if parts is None:
                continue
            key, suffix = parts
            if spans and spans[-1].key == key and spans[-1].end == member.header_offset:
                spans[-1].end = member.end
                spans[-1].suffixes.append(suffix)
            else:
                spans.append(SampleSpan(key, member.header_offset, member.end, [suffix]))
        size = os.fstat(fd).st_size
        if spans and spans[-1].end > size:
            raise TarFormatError(f"truncated: last member ends at byte {spans[-1].end}, file has {size}")
        return spans
    finally:
        os.close(fd)


def parse_sample(buf: bytes) -> tuple[str, dict[str, bytes]]:
    """(key, {suffix: bytes}) of the bytes of one sample span."""
    read_at = lambda offset, n: buf[offset : offset + n]  # noqa: E731
    key, fields = None, {}
    for member in iter_members(read_at, 0, len(buf)):
        parts = split_name(member.name)
        if parts is None:
            continue
        if key is None:
            key = parts[0]
        elif parts[0] != key:
            raise TarFormatError(f"member {member.name!r} does not belong to sample {key!r}")
        data = buf[member.data_offset : member.data_offset + member.size]
        if len(data) < member.size:
            raise TarFormatError(f"member {member.name!r} truncated")
        fields[parts[1]] = data
    if key is None:
        raise TarFormatError("no member")
    return key, fields
