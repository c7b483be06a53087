"""Sinks: where protected payloads go. One writer class per output kind.

- `FolderSink`: mirrors the input tree under a folder (folders, files, stdin path lists).
- `FileSink`: one image file in, the one file --out names out.
- `ShardFilesSink`: one output tar per input shard, same name, with a done marker for resume.
- `TarStreamSink`: one tar stream (stdout) holding every shard's members.
- `ReshardSink`: ShardWriter-style shards of at most N samples, named `pattern % index`.

The pipeline calls `write(sample, payload)` once per finished sample and `close()` at the end. A
sink that must receive samples in input order (every tar sink) sets `ordered = True`; the pipeline
then calls `write` from one thread of the main process, in input order. An unordered sink (a folder)
is written where each payload is made, concurrently: by the worker processes (CPU) or the encode
threads (GPU). So it must be picklable and keep no state but the file system.
`exists(rel_out)` lets a rerun skip outputs that are already there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from webdataset.tariterators import (
    base_plus_ext as member_key,  # (key, field) of a member name
)

from cgan_cli.core.atomic import (
    AtomicFile,
    remove_stale_temps,
    temp_prefix,
    write_atomic,
)
from cgan_cli.protect.sources import Sample, ShardLedger, ShardState
from cgan_cli.protect.tars import TarStreamWriter

DONE_DIR = ".done"  # <out>/.done/<shard name>.json: written last, after the shard's rename


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
    """Mirrors the relative tree under `root`; every file appears under its final name complete or not at all."""

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
        write_atomic(self.target(sample.rel_out), payload)
        return sample.rel_out

    def exists(self, rel_out: str) -> bool:
        return self.target(rel_out).is_file()

    def close(self) -> None:
        """Nothing is buffered: every write is already durable under its final name."""


class FileSink:
    """One image in, one named file out (`cgan protect photo.jpg --out photo-protected.jpg`)."""

    ordered = False

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, sample: Sample, payload: bytes) -> str:
        write_atomic(self.path, payload)
        return str(self.path)

    def exists(self, rel_out: str) -> bool:
        return False  # no manifest, no resume: the CLI refuses an --out file that already exists

    def close(self) -> None:
        """Nothing is buffered."""


# ---------------------------------------------------------------- tar sinks


def done_marker(out: Path, name: str) -> Path:
    return Path(out) / DONE_DIR / f"{name}.json"


def is_done(out: Path, name: str) -> bool:
    return done_marker(out, name).is_file() and (Path(out) / name).is_file()


def remove_own_temps(out: Path, names: list[str]) -> None:
    """Temp files a killed run left for these shards (only ours: other ranks own the other names)."""
    if names and Path(out).is_dir():
        remove_stale_temps(out, tuple(temp_prefix(Path(out) / name) for name in names))


class _ShardFile:
    """An output shard being written: a tar stream into an `AtomicFile`."""

    def __init__(self, final: Path) -> None:
        self.file = AtomicFile(final)
        self.writer = TarStreamWriter(self.file.fh, final.name)

    @property
    def name(self) -> str:
        return self.file.path.name

    def commit(self) -> None:
        self.writer.close()
        self.file.commit()

    def abort(self) -> None:
        self.writer.close()  # finish the tar stream first, so nothing flushes into a closed file later
        self.file.abort()


class _TarSink:
    """What every tar sink shares: members arrive in input order, and each input shard is finished
    (reported to `on_shard`) once the source has moved past it, including shards none of whose
    samples reached the sink (empty, all failed, unreadable)."""

    ordered = True

    def __init__(self, ledger: ShardLedger, on_shard: Callable[[ShardState], None]) -> None:
        self._ledger, self._on_shard = ledger, on_shard

    def exists(self, rel_out: str) -> bool:
        return False  # resume is per shard (done markers), decided before a shard is read

    def write(self, sample: Sample, payload: bytes) -> str:
        name, member = sample.rel_out.split("/", 1)
        self._finish_before(name)
        state = self._ledger.oldest()
        assert state is not None and state.name == name, "samples must arrive in input order"
        out_name = self._add(state, member, payload)
        state.written += 1
        return f"{out_name}/{member}"

    def close(self) -> None:
        self._finish_before(None)

    def _finish_before(self, name: str | None) -> None:
        """Finish every shard the source started before `name` (all of them for None)."""
        while (state := self._ledger.oldest()) is not None and state.name != name:
            self._ledger.pop()
            self._finish(state)
            self._on_shard(state)

    def _add(self, state: ShardState, member: str, payload: bytes) -> str:
        """Write one member; returns the name of the output it went to."""
        raise NotImplementedError

    def _finish(self, state: ShardState) -> None:
        """An input shard is complete (or broke off: `state.error`)."""


class ShardFilesSink(_TarSink):
    """One output shard per input shard, under the same name; a done marker proves each finished one."""

    def __init__(self, out: Path, ledger: ShardLedger, on_shard: Callable[[ShardState], None], rank: int = 0) -> None:
        super().__init__(ledger, on_shard)
        self._out, self._rank = Path(out), rank
        self._file: _ShardFile | None = None
        self._file_state: ShardState | None = None

    def _add(self, state: ShardState, member: str, payload: bytes) -> str:
        if self._file_state is not state:
            self._file, self._file_state = _ShardFile(self._out / state.name), state
        self._file.writer.add(member, payload)
        return state.name

    def _finish(self, state: ShardState) -> None:
        shard = self._file if self._file_state is state else None
        self._file = self._file_state = None
        if state.error is not None:
            if shard is not None:
                shard.abort()  # never a truncated shard under its final name
            return
        shard = shard or _ShardFile(self._out / state.name)  # a shard with nothing to write: empty tar
        shard.commit()
        marker = {"shard": state.name, "source": state.url, "members_read": state.members,
                  "members_written": state.written, "rank": self._rank,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_atomic(done_marker(self._out, state.name), json.dumps(marker) + "\n")


class TarStreamSink(_TarSink):
    """Every shard's members into one tar stream, in order; never seeks, so stdout works."""

    def __init__(self, stream: BinaryIO, ledger: ShardLedger, on_shard: Callable[[ShardState], None]) -> None:
        super().__init__(ledger, on_shard)
        self._writer = TarStreamWriter(stream)

    def _add(self, state: ShardState, member: str, payload: bytes) -> str:
        self._writer.add(member, payload)
        return "-"

    def close(self) -> None:
        super().close()
        self._writer.close()


@dataclass(frozen=True)
class Reshard:
    """ShardWriter-style output: `pattern % index`, at most `size` samples (keys) per shard.

    Indices run first, first + step, ...: under torchrun rank r of w uses r, r + w, ... so ranks
    never write the same name."""

    size: int
    pattern: str
    first: int = 0
    step: int = 1


class ReshardSink(_TarSink):
    """Re-shards the stream: a new output every `size` samples (keys), whatever shard they came from.

    Re-sharding never resumes: it rewrites from the first name. On close, shards of an earlier run
    numbered after this run's last one are deleted (listed in `stale_removed`): left beside the new
    ones, their samples would be in the dataset twice.
    """

    def __init__(self, out: Path, ledger: ShardLedger, on_shard: Callable[[ShardState], None], reshard: Reshard) -> None:
        super().__init__(ledger, on_shard)
        self._out, self._reshard = Path(out), reshard
        self._file: _ShardFile | None = None
        self._index, self._keys, self._last_key = reshard.first - reshard.step, 0, None
        self.stale_removed: list[str] = []

    def _add(self, state: ShardState, member: str, payload: bytes) -> str:
        key = member_key(member)[0] or member
        if key != self._last_key:
            self._keys, self._last_key = self._keys + 1, key
        if self._file is None or self._keys > self._reshard.size:
            if self._file is not None:
                self._file.commit()
            self._index += self._reshard.step
            self._file, self._keys = _ShardFile(self._out / (self._reshard.pattern % self._index)), 1
        self._file.writer.add(member, payload)
        return self._file.name

    def close(self) -> None:
        super().close()
        if self._file is not None:  # the last output
            self._file.commit()
            self._file = None
        index = self._index + self._reshard.step
        while (path := self._out / (self._reshard.pattern % index)).is_file():
            path.unlink()
            self.stale_removed.append(path.name)
            index += self._reshard.step
