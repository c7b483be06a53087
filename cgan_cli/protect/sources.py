"""Sources: turn the user's SRC arguments into a lazy, deterministically ordered stream of `Sample`s.

A `Sample` is everything the pipeline needs to know about one input *before* reading it: where its
bytes come from (a file `path` read inside a decode worker, or `data` already in memory, as a
WebDataset member is), where its output goes (`rel_out`, relative to the sink's root) and whether it
is an image at all (`passthrough` members are copied byte-identical; `ignored` files of a folder get
only a manifest record, with the reason). Folders, files, stdin path
lists and tar shards all become `Sample`s here; the engine and sinks never look at where one came from.

Shards: image members (by their last suffix, as webdataset's decoders choose) are protected, every
other member is passthrough. A `ShardLedger` hands each shard's boundaries and read errors from the
source to the (ordered) tar sink.
"""

from __future__ import annotations

import io
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TextIO

from cgan_cli.core.choices import STDIN
from cgan_cli.core.errors import UsageError
from cgan_cli.core.formats import is_image_file, is_image_name
from cgan_cli.protect.tars import ShardError, hostile_reason, iter_members, open_shard


@dataclass(frozen=True)
class Sample:
    """One input of a protect run.

    id: what the manifest calls the source: a file path, or "shard.tar/key.ext" for a tar member.
    rel_out: POSIX path of the output relative to the sink root (a folder, or a tar's key space).
    path / data: exactly one is set; `path` is read in the decode worker, `data` is the bytes.
    passthrough: not an image (e.g. a tar's .json/.cls member): copied byte-identical, never decoded.
    ignored: why a file found in a folder is not an input (hidden, not an image by its content): it
      is never read or written, only recorded, so nothing under a folder goes unmentioned.
    label: the code the image must carry (from --labels); None = the generator guesses it.
    label_error: --labels was given but this image's label is missing or unknown: it fails, unprotected.
    """

    id: str
    rel_out: str
    path: Path | None = None
    data: bytes | None = None
    passthrough: bool = False
    ignored: str | None = None
    label: int | None = None
    label_error: str | None = None

    def read(self) -> bytes:
        """The input's bytes (called in a decode worker, so file reads overlap with compute)."""
        if self.data is not None:
            return self.data
        assert self.path is not None, "a Sample needs a path or data"
        return Path(self.path).read_bytes()


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_out_not_inside(inputs: Iterable[str], out: Path) -> None:
    """Refuse an --out that is, contains, or lies inside an input (folder or file).

    Writing protected copies into the tree being read would make later runs protect their own
    output and could replace originals; the check runs before anything is read or written.
    Paths read from stdin that lie inside --out are recorded as ignored as they arrive (run.inside_out).
    """
    out_r = Path(out).resolve()
    for src in inputs:
        if src == STDIN:
            continue
        src_r = Path(src).resolve()
        if src_r.is_dir() and _is_within(out_r, src_r):
            raise UsageError(f"--out {out} is inside input folder {src}; choose an output folder outside the inputs")
        if src_r.is_dir() and _is_within(src_r, out_r):
            raise UsageError(f"input folder {src} lies inside --out {out}; its outputs could replace files there")
        if src_r.is_file() and (out_r == src_r or _is_within(src_r, out_r)):
            raise UsageError(f"input file {src} lies inside --out {out}; its output could replace it")


def _walk_sorted(root: Path) -> Iterator[tuple[Path, str | None]]:
    """Every entry under `root`, recursively, in sorted order, one directory listing at a time:
    (path, None) for a regular file to consider, (path, reason) for an entry that is no input."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            yield Path(entry.path), "hidden folder (not searched)" if entry.is_dir() else "hidden file"
        elif entry.is_dir(follow_symlinks=False):
            yield from _walk_sorted(Path(entry.path))
        elif entry.is_file():
            yield Path(entry.path), None
        else:
            yield Path(entry.path), "not a regular file (a link to a folder, a device, a pipe)"


def _read_head(path: Path, size: int) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(size)


def _is_input(path: Path) -> bool:
    try:
        return is_image_file(path.name, partial(_read_head, path))
    except OSError:
        return True  # unreadable: attempt it, so that its record says why it cannot be read


def folder_samples(root: Path) -> Iterator[Sample]:
    """Every file under a folder, images to protect and the rest as `ignored` samples with the
    reason; outputs mirror the tree relative to that folder. A file whose suffix names no image
    format is an input only when its first bytes are an image's."""
    root = Path(root)
    for path, reason in _walk_sorted(root):
        if reason is None and not _is_input(path):
            reason = "not an image (neither its suffix nor its first bytes name an image format)"
        yield Sample(id=str(path), rel_out=path.relative_to(root).as_posix(), path=path, ignored=reason)


def file_sample(path: Path) -> Sample:
    """A file named on the command line is always attempted (a non-image fails with a clear error)."""
    return Sample(id=str(path), rel_out=Path(path).name, path=Path(path))


def _stdin_rel(path: Path) -> str:
    """A listed path keeps its tree: relative to the cwd when below it, else its path minus the root."""
    absolute = path if path.is_absolute() else Path.cwd() / path
    absolute = Path(os.path.normpath(absolute))
    try:
        return absolute.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return PurePosixPath(*absolute.parts[1:]).as_posix()


def stdin_samples(stream: TextIO) -> Iterator[Sample]:
    """Newline-separated paths (as `find` prints them), in the order given; blank lines ignored."""
    for line in stream:
        name = line.rstrip("\r\n")
        if name:
            path = Path(name)
            yield Sample(id=name, rel_out=_stdin_rel(path), path=path)


class _Replay(io.RawIOBase):
    """A byte stream that first replays `head`, then reads on from `rest` (stdin after a peek)."""

    def __init__(self, head: bytes, rest: io.BufferedIOBase) -> None:
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self.head[: len(buffer)] if self.head else self.rest.read1(len(buffer))
        self.head = self.head[len(data):]
        buffer[: len(data)] = data
        return len(data)


TAR_MAGIC_OFFSET = 257  # a POSIX tar header holds b"ustar" here


def peek_stdin(size: int = 512) -> bytes:
    """The first `size` bytes of stdin, leaving sys.stdin to read them again (text or binary)."""
    raw = sys.stdin.buffer
    head = b""
    while len(head) < size:
        chunk = raw.read1(size - len(head))
        if not chunk:
            break
        head += chunk
    replay = io.BufferedReader(_Replay(head, raw))
    sys.stdin = io.TextIOWrapper(replay, encoding=sys.stdin.encoding, errors=sys.stdin.errors)
    return head


def looks_like_tar(head: bytes) -> bool:
    return head[TAR_MAGIC_OFFSET:TAR_MAGIC_OFFSET + 5] == b"ustar"


def count_until_image(inputs: list[str]) -> tuple[bool, int]:
    """(whether the non-stdin inputs name a file to protect, how many files were ignored before the
    first one); stops at the first image, so it is cheap for a run that has work to do."""
    ignored = 0
    for sample in iter_samples([s for s in inputs if s != STDIN]):
        if sample.ignored is None:
            return True, ignored
        ignored += 1
    return False, ignored


def iter_samples(inputs: list[str], stdin: TextIO | None = None) -> Iterator[Sample]:
    """Expand SRC arguments (folders, files, `-`) lazily, in argument order."""
    for src in inputs:
        if src == STDIN:
            yield from stdin_samples(stdin or sys.stdin)
        elif Path(src).is_dir():
            yield from folder_samples(Path(src))
        else:
            yield file_sample(Path(src))


def validate_inputs(inputs: list[str], out: Path) -> None:
    """Usage errors found before any work: missing inputs, `-` twice, --out inside an input."""
    if not inputs:
        raise UsageError("give at least one SRC: a folder, an image file, or - to read paths from stdin")
    if inputs.count(STDIN) > 1:
        raise UsageError("- (paths on stdin) can be given only once")
    missing = [s for s in inputs if s != STDIN and not Path(s).exists()]
    if missing:
        raise UsageError(f"input not found: {', '.join(missing)}")
    check_out_not_inside(inputs, out)


def count_samples(inputs: list[str]) -> int | None:
    """How many samples `iter_samples` will yield (for the progress ETA); None when stdin is read."""
    if STDIN in inputs:
        return None
    return sum(sum(1 for _ in _walk_sorted(Path(s))) if Path(s).is_dir() else 1 for s in inputs)


@dataclass
class ShardState:
    """One input shard's progress, shared by the source (which reads it) and the sink (which writes it)."""

    url: str
    name: str
    members: int = 0  # regular members read from the input
    written: int = 0  # members written to the output (failed and refused samples are not)
    error: str | None = None  # the input could not be read to its end: truncated, corrupt, pipe failed


class ShardLedger:
    """Shard boundaries and read errors, handed from the source to the sink in input order.

    The source opens a shard's entry before it yields any of that shard's samples and notes a read
    error before it yields anything that follows. The sink is `ordered`: it sees a sample only after
    the source produced it. So when the sink finishes a shard, the ledger holds that shard's final
    state, including shards none of whose samples reached the sink (empty, all failed, unreadable).
    """

    def __init__(self) -> None:
        self._open: deque[ShardState] = deque()

    def start(self, url: str, name: str) -> ShardState:
        state = ShardState(url, name)
        self._open.append(state)
        return state

    def oldest(self) -> ShardState | None:
        return self._open[0] if self._open else None

    def pop(self) -> ShardState:
        return self._open.popleft()


def shard_samples(shards: Iterable[tuple[str, str]], ledger: ShardLedger) -> Iterator[Sample]:
    """(url, output name) pairs -> one Sample per tar member, in archive order.

    Image members (by their last suffix) are protected; every other member is passthrough and
    reaches the output byte-identical. A shard that breaks off records its error in the ledger
    after its complete members; the run goes on with the next shard.
    """
    for url, name in shards:
        state = ledger.start(url, name)
        try:
            with closing(open_shard(url)) as stream:
                for member in iter_members(stream, url):
                    state.members += 1
                    rel = f"{name}/{member.name}"
                    yield Sample(id=rel, rel_out=rel, data=member.data, passthrough=not is_image_name(member.name))
        except (ShardError, OSError, ValueError) as exc:
            state.error = str(exc)


def refuse_hostile(sample: Sample) -> str | None:
    """Pipeline guard: a member name that could escape an extraction folder never reaches an output tar."""
    return hostile_reason(sample.rel_out.split("/", 1)[1])
