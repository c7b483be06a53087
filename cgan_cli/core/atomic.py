"""Atomic file writes: every file cgan writes appears under its final name complete, or not at all.

The bytes go to a hidden temp file in the destination folder (`.NAME.XXXX.cgan.tmp`), are fsync'ed,
get the permissions a normal file gets under the user's umask (mkstemp would leave them 0600, which
a web server or a second user cannot read), and are renamed over the final name with os.replace,
atomic on POSIX. A SIGKILL or power cut leaves at worst a stale temp file, which `remove_stale_temps`
deletes on the next run over the same folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".cgan.tmp"


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()  # what open(path, "w") would give, read once at import


def temp_prefix(path: Path) -> str:
    """The hidden name prefix of `path`'s temp files: one rank or process can find its own."""
    return f".{Path(path).name}."


class AtomicFile:
    """A file being written under a temp name: `commit()` puts it under its final name, `abort()` drops it.

    For outputs written over time (a tar shard); `atomic_open` wraps it for a `with` block.
    """

    def __init__(self, path: Path, mode: int = FILE_MODE) -> None:
        self.path, self.mode = Path(path), mode
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=temp_prefix(self.path), suffix=TMP_SUFFIX, dir=self.path.parent)
        self.fh: BinaryIO = os.fdopen(fd, "wb")

    def commit(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.chmod(self.tmp, self.mode)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.fh.close()
        Path(self.tmp).unlink(missing_ok=True)


@contextmanager
def atomic_open(path: Path, mode: int = FILE_MODE) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces `path` when the block ends without an exception."""
    file = AtomicFile(path, mode)
    try:
        yield file.fh
        file.commit()
    except BaseException:
        file.abort()
        raise


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write bytes (or UTF-8 text) to `path` atomically."""
    with atomic_open(path) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)


def remove_stale_temps(root: Path, prefix: str | tuple[str, ...] = ".") -> int:
    """Delete temp files a killed run left behind under `root` (they never carry a final name)."""
    removed = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith(prefix) and name.endswith(TMP_SUFFIX):
                Path(dirpath, name).unlink(missing_ok=True)
                removed += 1
    return removed
