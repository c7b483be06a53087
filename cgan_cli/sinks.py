"""Sinks: where protected payloads go. A folder today; tar shards plug in with the same protocol.

The pipeline calls `write(sample, payload)` once per finished sample and `close()` at the end. A
sink that must receive samples in input order (a tar shard) sets `ordered = True`; the pipeline then
calls `write` from one thread of the main process, in input order. An unordered sink (a folder) is
written where each payload is made, concurrently: by the worker processes (CPU) or the encode
threads (GPU). So it must be picklable and keep no state but the file system.
`exists(rel_out)` lets a rerun skip outputs that are already there.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol

from cgan_cli.sources import Sample

TMP_SUFFIX = ".cgan.tmp"


class Sink(Protocol):
    ordered: bool

    def write(self, sample: Sample, payload: bytes) -> str:
        """Store `payload` as `sample.rel_out`; returns the output id the manifest records."""
        ...

    def exists(self, rel_out: str) -> bool:
        """Whether a complete output for `rel_out` is already stored (for resume)."""
        ...

    def close(self) -> None:
        ...


class FolderSink:
    """Mirrors the relative tree under `root`; every file appears under its final name complete or not at all.

    Each payload goes to a hidden temp file in the destination folder, is fsync'ed, then renamed
    over the final name with os.replace (atomic on POSIX), so a SIGKILL or power cut leaves at worst
    a stale `.name.*.cgan.tmp`, which the next run over the same folder removes.
    """

    ordered = False

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.root)

    def target(self, rel_out: str) -> Path:
        path = (self.root / rel_out).resolve()
        if not (path == self.root.resolve() or self.root.resolve() in path.parents):
            raise ValueError(f"output path {rel_out!r} escapes the output folder")
        return path

    def write(self, sample: Sample, payload: bytes) -> str:
        path = self.target(sample.rel_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sample.rel_out

    def exists(self, rel_out: str) -> bool:
        return self.target(rel_out).is_file()

    def close(self) -> None:
        """Nothing is buffered: every write is already durable under its final name."""


def remove_stale_temps(root: Path) -> int:
    """Delete temp files a killed run left behind (they never carry a final name)."""
    removed = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                Path(dirpath, name).unlink(missing_ok=True)
                removed += 1
    return removed
