"""Tar streams: reading members out of a shard and writing members into one, never seeking.

Tars are read and written as streams (tarfile 'r|*' / 'w|'), one member in memory at a time, so
memory stays flat in the number and size of shards; `open_shard` is webdataset's `gopen`, so paths,
`pipe:` URLs and `-` (stdin) all work. Keys follow webdataset (`base_plus_ext`): the key of member
`dir/name.ext1.ext2` is `dir/name` and its field is `ext1.ext2`.
"""

from __future__ import annotations

import io
import posixpath
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cgan_cli.core.choices import STDIN
from cgan_cli.core.urls import SHARD_SUFFIXES


class ShardError(RuntimeError):
    """A shard that cannot be read to its end (truncated, corrupt header, not a tar)."""

def shard_name(url: str, index: int) -> str:
    """The output file name for an input shard: its basename (never a path, so never outside --out)."""
    if url == STDIN:
        return "stdin.tar"
    if url.startswith("pipe:"):
        tars = [t for t in re.split(r"[\s'\"<>|;]+", url[5:]) if t.lower().endswith(SHARD_SUFFIXES)]
        return posixpath.basename(tars[-1]) if tars else f"pipe-{index:06d}.tar"
    name = posixpath.basename(url.replace("\\", "/").rstrip("/"))
    return name if name not in ("", ".", "..") else f"shard-{index:06d}.tar"

def hostile_reason(name: str) -> str | None:
    """Why a member name must not be written to an output tar (None if it is fine)."""
    if not name:
        return "empty member name"
    if "\x00" in name:
        return f"member name {name!r} holds a NUL byte"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return f"absolute member name {name!r}"
    if ".." in norm.split("/"):
        return f"member name {name!r} climbs out with '..'"
    return None

@dataclass
class TarMember:
    """One regular file of a shard."""

    name: str
    data: bytes


class _EndAwareTarInfo(tarfile.TarInfo):
    """Notes *why* a stream ended: tarfile's stream mode stops silently both at the end-of-archive
    block and at a tar cut off at a member boundary; only the first one is a complete shard."""

    @classmethod
    def fromtarfile(cls, tar):  # type: ignore[override]
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.cgan_clean_end = True
            raise


def iter_members(stream: BinaryIO, url: str) -> Iterator[TarMember]:
    """Stream the regular-file members of one tar (plain or compressed) in archive order.

    Raises ShardError when the archive is truncated or corrupt, after yielding every member that was
    complete. Directories are skipped (webdataset skips them too); links and devices are skipped
    because a link in an output tar could point anywhere.
    """
    count = 0
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo)
        tar.cgan_clean_end = False
        for info in tar:
            if info.isreg():
                data = tar.extractfile(info).read()
                count += 1
                yield TarMember(info.name, data)
            tar.members = []  # tarfile keeps every header otherwise: memory would grow with the shard
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardError(f"{url}: truncated or corrupt tar after {count} complete member(s): {exc}") from exc
    if not tar.cgan_clean_end:
        raise ShardError(f"{url}: truncated tar: ends after {count} complete member(s) without the end-of-archive block")


def open_shard(url: str) -> BinaryIO:
    """Open a shard URL for reading: path, file:, pipe:, or '-' for stdin (webdataset's gopen)."""
    from webdataset.gopen import (
        gopen,  # webdataset imports torch: not when the CLI only checks its inputs
    )

    return gopen(url, "rb")

def _member_info(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info


def _write_mode(name: str) -> str:
    """Compress an output shard the way its name says (stdout and plain names: uncompressed)."""
    lower = name.lower()
    for suffixes, mode in (((".tar.gz", ".tgz"), "w|gz"), ((".tar.bz2",), "w|bz2"), ((".tar.xz",), "w|xz")):
        if lower.endswith(suffixes):
            return mode
    return "w|"


class OutputClosed(Exception):
    """The reader of the output stream went away (`cgan protect ... --out - | head`): stop the run.

    Not an OSError on purpose: the pipeline turns OSErrors into per-file failures and goes on, but
    with nobody reading there is nothing left to protect for.
    """


class TarStreamWriter:
    """Append members to a tar stream ('w|'), in the order given; never seeks, so stdout works."""

    def __init__(self, stream: BinaryIO, name: str = "", mtime: int | None = None) -> None:
        self._stream = stream
        self._mtime = int(time.time()) if mtime is None else mtime
        self._tar = tarfile.open(fileobj=stream, mode=_write_mode(name), format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        try:
            self._tar.addfile(_member_info(name, len(data), self._mtime), io.BytesIO(data))
        except BrokenPipeError as exc:
            raise OutputClosed(f"the output stream was closed by its reader after {name!r} started") from exc

    def close(self) -> None:
        try:
            self._tar.close()  # writes the end-of-archive blocks; the underlying stream stays open
            self._stream.flush()
        except BrokenPipeError as exc:
            raise OutputClosed("the output stream was closed by its reader before the end of the archive") from exc
