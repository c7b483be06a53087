"""WebDataset tar shards: shard source (tar members -> Samples) and shard sink (Samples -> tar).

Tars are read and written as streams (tarfile 'r|*' / 'w|'), one member in memory at a time, so
memory stays flat in the number and size of shards. Inputs are local paths, brace patterns
(`train-{000000..000127}.tar`), `pipe:` URLs, or `-` (stdin); webdataset's own URL expansion and
`gopen` open them, so every URL that works with `webdataset.WebDataset` works here.

Keys follow webdataset: the key of member `dir/name.ext1.ext2` is `dir/name` (everything up to the
first dot of the basename) and its extension is `ext1.ext2`. A member is an image when its *last*
suffix is an image suffix (`a.left.jpg` is an image of key `a`, field `left.jpg`), which is also how
webdataset's decoders choose a decoder. Members are never regrouped or reordered: the output shard
holds the same member names in the same order, so keys and grouping survive whatever they were.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import shutil
import sys
import tarfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from cgan_cli import __version__
from cgan_cli.distributed import DistContext, gather_objects, init_distributed, launched_by_torchrun, rank_share, shutdown
from cgan_cli.engine import ProtectEngine
from cgan_cli.manifest import MANIFEST_NAME, SUMMARY_NAME, ManifestRecord, ManifestWriter, RunSummary, write_summary
from cgan_cli.protect import ProtectConfig, protect_stream
from cgan_cli.sinks import TMP_SUFFIX
from cgan_cli.sources import Sample, UsageError, is_image_name

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
DONE_DIR = ".done"  # <out>/.done/<shard name>.json: written last, after the shard's rename


class ShardError(RuntimeError):
    """A shard that cannot be read to its end (truncated, corrupt header, not a tar)."""


# ---------------------------------------------------------------- URLs and names


def expand_shard_spec(spec: str) -> list[str]:
    """`a-{000..009}.tar::b.tar` -> list of URLs, exactly as webdataset expands them."""
    if spec == "-" or spec.startswith("pipe:"):
        return [spec]  # a shell command may hold braces of its own; never expand them
    return expand_urls(spec)


def looks_like_shards(spec: str) -> bool:
    """True for inputs that `protect` should read as tar shards rather than a folder or an image."""
    if spec.startswith("pipe:"):
        return True
    return any(url.lower().endswith(SHARD_SUFFIXES) for url in expand_shard_spec(spec))


def shard_name(url: str, index: int) -> str:
    """The output file name for an input shard: its basename (never a path, so never outside --out)."""
    if url == "-":
        return "stdin.tar"
    if url.startswith("pipe:"):
        tars = [t for t in re.split(r"[\s'\"<>|;]+", url[5:]) if t.lower().endswith(SHARD_SUFFIXES)]
        return posixpath.basename(tars[-1]) if tars else f"pipe-{index:06d}.tar"
    name = posixpath.basename(url.replace("\\", "/").rstrip("/"))
    return name if name not in ("", ".", "..") else f"shard-{index:06d}.tar"


def member_key(name: str) -> tuple[str | None, str | None]:
    """webdataset's key rule: (`dir/base`, `ext.ext`) split at the first dot of the basename."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else (None, None)


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


# ---------------------------------------------------------------- reading


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
    return gopen(url, "rb")


# ---------------------------------------------------------------- writing


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


def iter_keyed_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of one shard, grouped the way webdataset groups them:
    consecutive members with the same key form a sample; extensions are lower-cased; members without
    a key (no dot in the basename) are ignored."""
    key, fields = None, {}
    with open_shard(url) as stream:
        for member in iter_members(stream, url):
            prefix, ext = member_key(member.name)
            if prefix is None:
                continue
            if prefix != key:
                if fields:
                    yield key, fields
                key, fields = prefix, {}
            fields[ext.lower()] = member.data
    if fields:
        yield key, fields


# ---------------------------------------------------------------- source


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


# ---------------------------------------------------------------- sink


@dataclass(frozen=True)
class Reshard:
    """ShardWriter-style output: `pattern % index`, at most `size` samples (keys) per shard.

    Indices run first, first + step, ...: under torchrun rank r of w uses r, r + w, ... so ranks
    never write the same name."""

    size: int
    pattern: str
    first: int = 0
    step: int = 1

    def stale_after(self, out: Path, last: int) -> list[Path]:
        """Shards of an earlier run numbered after this run's `last` one, in this rank's sequence.

        Why: re-sharding never resumes, it rewrites from the first name; an earlier run that wrote more
        shards would otherwise leave its tail beside the new ones, old samples doubled in the dataset.
        """
        stale, index = [], last + self.step
        while (path := Path(out) / (self.pattern % index)).is_file():
            stale.append(path)
            index += self.step
        return stale


class _ShardFile:
    """An output shard being written: under a temp name until `commit` renames it and writes the marker."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.name}.{os.getpid()}{TMP_SUFFIX}")
        self._fh = open(self.tmp, "wb")
        self.writer = TarStreamWriter(self._fh, final.name)

    def commit(self, marker: dict[str, object] | None) -> None:
        self.writer.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.final)
        if marker is not None:
            write_done_marker(self.final.parent, self.final.name, marker)

    def abort(self) -> None:
        self.writer.close()  # finish the tar stream first, so nothing flushes into a closed file later
        self._fh.close()
        self.tmp.unlink(missing_ok=True)


class ShardSink:
    """Writes the protected stream as tar: one output shard per input shard (same name), one tar
    stream (stdout), or re-sharded by `Reshard`. Members keep their names and their order."""

    ordered = True

    def __init__(
        self,
        ledger: ShardLedger,
        on_shard: Callable[[ShardState], None],
        out: Path | None = None,
        stream: BinaryIO | None = None,
        reshard: Reshard | None = None,
        rank: int = 0,
    ) -> None:
        assert (out is None) != (stream is None), "a ShardSink writes to a folder or to a stream"
        self._ledger, self._on_shard, self._out, self._reshard, self._rank = ledger, on_shard, out, reshard, rank
        self._stream_writer = TarStreamWriter(stream) if stream is not None else None
        self._file: _ShardFile | None = None
        self._file_state: ShardState | None = None
        self._index, self._keys, self._last_key = (reshard.first - reshard.step) if reshard else 0, 0, None

    def exists(self, rel_out: str) -> bool:
        return False  # resume is per shard (done markers), decided before a shard is read

    @property
    def last_index(self) -> int:
        """Re-sharding: the index of the last shard written (first - step when none was)."""
        return self._index

    def write(self, sample: Sample, payload: bytes) -> str:
        name, member = sample.rel_out.split("/", 1)
        self._finish_before(name)
        state = self._ledger.oldest()
        assert state is not None and state.name == name, "samples must arrive in input order"
        writer, out_name = self._writer_for(state, member)
        writer.add(member, payload)
        state.written += 1
        return f"{out_name}/{member}"

    def close(self) -> None:
        self._finish_before(None)
        if self._stream_writer is not None:
            self._stream_writer.close()
        if self._file is not None:  # the last re-sharded output
            self._file.commit(None)
            self._file = None

    # -- internals ---------------------------------------------------------------------------
    def _writer_for(self, state: ShardState, member: str) -> tuple[TarStreamWriter, str]:
        if self._stream_writer is not None:
            return self._stream_writer, "-"
        if self._reshard is None:
            if self._file_state is not state:
                self._file, self._file_state = _ShardFile(self._out / state.name), state
            return self._file.writer, state.name
        key = member_key(member)[0] or member
        if key != self._last_key:
            self._keys, self._last_key = self._keys + 1, key
        if self._file is None or self._keys > self._reshard.size:
            if self._file is not None:
                self._file.commit(None)
            self._index += self._reshard.step
            self._file, self._keys = _ShardFile(self._out / (self._reshard.pattern % self._index)), 1
        return self._file.writer, self._file.final.name

    def _finish_before(self, name: str | None) -> None:
        """Finish every shard the source started before `name` (all of them for None)."""
        while (state := self._ledger.oldest()) is not None and state.name != name:
            self._ledger.pop()
            if self._stream_writer is None and self._reshard is None:
                self._finish_file(state)
            self._on_shard(state)

    def _finish_file(self, state: ShardState) -> None:
        shard = self._file if self._file_state is state else None
        self._file = self._file_state = None
        if state.error is not None:
            if shard is not None:
                shard.abort()  # never a truncated shard under its final name
            return
        shard = shard or _ShardFile(self._out / state.name)  # a shard with nothing to write: empty tar
        shard.commit({"shard": state.name, "source": state.url, "members_read": state.members,
                      "members_written": state.written, "rank": self._rank})


def done_marker(out: Path, name: str) -> Path:
    return Path(out) / DONE_DIR / f"{name}.json"


def write_done_marker(out: Path, name: str, info: dict[str, object]) -> None:
    """The marker is written after the shard's rename, itself via temp + rename: it proves the shard."""
    path = done_marker(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    tmp.write_text(json.dumps({**info, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def is_done(out: Path, name: str) -> bool:
    return done_marker(out, name).is_file() and (Path(out) / name).is_file()


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class ShardOptions:
    stdin: bool = False  # `-` is a tar stream on stdin (without it, `-` means a list of paths)
    shard_size: int | None = None  # re-shard: at most this many samples (keys) per output shard
    shard_pattern: str = "shard-%06d.tar"


@dataclass
class ShardRunSummary(RunSummary):
    """summary.json of a shard run: the folder-mode summary plus per-shard outcomes and the world size."""

    shards: dict[str, int] = field(default_factory=lambda: {"done": 0, "skipped": 0, "failed": 0})
    failed_shards: list[dict[str, str]] = field(default_factory=list)
    world_size: int = 1
    stale_removed: list[str] = field(default_factory=list)  # re-sharding: an earlier run's extra shards, deleted

    @property
    def exit_code(self) -> int:
        return 1 if self.counts["failed"] or self.shards["failed"] else 0

    @classmethod
    def from_json(cls, text: str) -> "ShardRunSummary":
        return cls(**json.loads(text))


def plan_shards(cfg: ProtectConfig, opts: ShardOptions, world_size: int) -> list[tuple[str, str]]:
    """Every input shard as (url, output name), in argument order; usage errors before any work."""
    to_stdout = str(cfg.out) == "-"
    if not cfg.inputs:
        raise UsageError("give at least one shard: a path, a brace pattern, pipe:CMD, or - with --shards")
    if "-" in cfg.inputs and not opts.stdin:
        raise UsageError("- reads a list of paths; add --shards to read a tar stream from stdin")
    if list(cfg.inputs).count("-") > 1:
        raise UsageError("- (a tar stream on stdin) can be given only once")
    if world_size > 1 and (to_stdout or "-" in cfg.inputs):
        raise UsageError("under torchrun every rank needs its own shards: stdin / stdout tar streams cannot be shared")
    if opts.shard_size is not None and to_stdout:
        raise UsageError("--shard-size writes shard files; it cannot be combined with --out -")
    if opts.shard_size is not None:
        _check_pattern(opts.shard_pattern)
    urls = [url for spec in cfg.inputs for url in expand_shard_spec(spec)]
    missing = [u for u in urls if u != "-" and not u.startswith("pipe:") and "://" not in u and not Path(u).is_file()]
    if missing:
        raise UsageError(f"shard not found: {', '.join(missing[:5])}" + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    plan = [(url, shard_name(url, i)) for i, url in enumerate(urls)]
    names: dict[str, str] = {}
    for url, name in plan:
        if name in names:
            raise UsageError(f"{url} and {names[name]} would both be written as {name}; protect them into different --out folders")
        names[name] = url
    if not to_stdout:
        out = Path(cfg.out).resolve()
        inside = [u for u in urls if Path(u).is_file() and Path(u).resolve().parent == out]
        if inside:
            raise UsageError(f"--out {cfg.out} holds the input shard {inside[0]}; its output would replace it")
    return plan


def _check_pattern(pattern: str) -> None:
    try:
        name = pattern % 0
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--shard-pattern {pattern!r} needs one integer field such as %06d ({exc})") from None
    if hostile_reason(name) or "/" in name.replace("\\", "/"):
        raise UsageError(f"--shard-pattern {pattern!r} must be a plain file name inside --out")


def _remove_own_temps(out: Path, names: Iterable[str]) -> None:
    """Temp files a killed run left for these shards (only ours: other ranks own the other names)."""
    for name in names:
        for stale in out.glob(f".{name}.*{TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)


def run_protect_shards(
    cfg: ProtectConfig,
    opts: ShardOptions,
    ctx: DistContext,
    on_record: Callable[[ManifestRecord], None] | None = None,
    on_shard: Callable[[ShardState], None] | None = None,
) -> ShardRunSummary:
    """Protect this rank's share of the shards through the shared pipeline; rank 0 writes the merged summary."""
    cfg = cfg.checked()
    plan = plan_shards(cfg, opts, ctx.world_size)
    to_stdout = str(cfg.out) == "-"
    out = None if to_stdout else Path(cfg.out)
    mine = rank_share(plan, ctx)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _remove_own_temps(out, [name for _, name in mine])
    resume = out is not None and opts.shard_size is None
    todo = [(u, n) for u, n in mine if not (resume and u != "-" and is_done(out, n))]  # stdin may differ each run
    engine = ProtectEngine(replace(cfg.engine_config(), device=ctx.device))
    summary = ShardRunSummary(
        cgan_version=__version__, weights=engine.describe(), epsilon=engine.epsilon, device=str(engine.device),
        precision=engine.precision, working_size=engine.meta.working_size, full_res=cfg.full_res, out=str(cfg.out),
        world_size=ctx.world_size,
    )
    summary.shards["skipped"] = len(mine) - len(todo)

    def shard_done(state: ShardState) -> None:
        summary.shards["failed" if state.error else "done"] += 1
        if state.error:
            summary.failed_shards.append({"shard": state.name, "source": state.url, "error": state.error})
            if manifest is not None:  # after its members' records: none of them reached a final shard
                manifest.write(ManifestRecord(state.url, None, "failed", f"shard not written: {state.error}"))
        if on_shard:
            on_shard(state)

    manifest = None if out is None else ManifestWriter(out / (MANIFEST_NAME if not ctx.active else f"manifest.rank{ctx.rank}.jsonl"))

    def record(rec: ManifestRecord) -> None:
        if manifest is not None:
            manifest.write(rec)
        summary.add(rec.status)
        if on_record:
            on_record(rec)

    reshard = None
    if opts.shard_size is not None:
        reshard = Reshard(opts.shard_size, opts.shard_pattern, first=ctx.rank, step=ctx.world_size)
    ledger = ShardLedger()
    sink = ShardSink(ledger, shard_done, out=out, stream=sys.stdout.buffer if to_stdout else None, reshard=reshard, rank=ctx.rank)
    t0 = time.perf_counter()
    try:
        protect_stream(shard_samples(todo, ledger), sink, engine, cfg.encode_options(), record, cfg.workers, guard=refuse_hostile)
        if reshard is not None and out is not None:
            for stale in reshard.stale_after(out, sink.last_index):
                stale.unlink()
                summary.stale_removed.append(stale.name)
    finally:
        if manifest is not None:
            manifest.close()
    summary.wall_seconds = round(time.perf_counter() - t0, 3)
    summary.images_per_second = round(summary.counts["protected"] / max(summary.wall_seconds, 1e-9), 3)
    merged = merge_summaries([ShardRunSummary.from_json(s) for s in gather_objects(summary.to_json(), ctx)])
    if out is not None and ctx.is_main:
        if ctx.active:
            _merge_manifests(out, ctx.world_size)
        write_summary(out / SUMMARY_NAME, merged)
    return merged


def dry_run_shards(cfg: ProtectConfig, opts: ShardOptions, emit: Callable[[str], None]) -> dict[str, int]:
    """--dry-run with shards: per input shard, `protect` or `skip` (done marker), the source and where
    it would go. Reads no member: what a shard holds is only known by reading it."""
    if launched_by_torchrun():
        raise UsageError("--dry-run runs in one process; drop torchrun")
    cfg = cfg.checked()
    to_stdout = str(cfg.out) == "-"
    resume = not to_stdout and opts.shard_size is None
    counts = {"protect": 0, "skip": 0}
    for url, name in plan_shards(cfg, opts, world_size=1):
        action = "skip" if resume and url != "-" and is_done(Path(cfg.out), name) else "protect"
        counts[action] += 1
        target = "-" if to_stdout else str(Path(cfg.out) / (opts.shard_pattern + " (re-sharded)" if opts.shard_size else name))
        emit(f"{action}\t{url}\t{target}")
    return counts


def merge_summaries(parts: list[ShardRunSummary]) -> ShardRunSummary:
    """One summary for the whole run: counts add up, wall time is the slowest rank's."""
    merged = ShardRunSummary.from_json(parts[0].to_json())
    for part in parts[1:]:
        for key, value in part.counts.items():
            merged.counts[key] = merged.counts.get(key, 0) + value
        for key, value in part.shards.items():
            merged.shards[key] = merged.shards.get(key, 0) + value
        merged.total += part.total
        merged.failed_shards.extend(part.failed_shards)
        merged.stale_removed.extend(part.stale_removed)
        merged.wall_seconds = max(merged.wall_seconds, part.wall_seconds)
    merged.device = ",".join(dict.fromkeys(p.device for p in parts))
    merged.images_per_second = round(merged.counts["protected"] / max(merged.wall_seconds, 1e-9), 3)
    return merged


def _merge_manifests(out: Path, world_size: int) -> None:
    """Rank 0 appends every rank's manifest to manifest.jsonl (streamed), then removes the rank files."""
    with open(out / MANIFEST_NAME, "ab") as dst:
        for rank in range(world_size):
            part = out / f"manifest.rank{rank}.jsonl"
            if part.is_file():
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst)
                part.unlink()


def run_shards_cli(cfg: ProtectConfig, opts: ShardOptions, json_out: bool = False) -> int:
    """What `cgan protect` does with shard inputs: run (under torchrun: this rank's share), report on
    stderr (stdout may be the tar stream), return the exit code 0 / 1 / 2 (same on every rank)."""
    from rich.console import Console

    from cgan_cli.engine import EngineError
    from cgan_cli.weights import WeightsError

    err = Console(stderr=True, highlight=False)
    if cfg.dry_run:
        try:
            counts = dry_run_shards(cfg, opts, emit=(lambda line: None) if json_out else print)
        except (UsageError, WeightsError) as exc:
            err.print(f"cgan protect: error: {exc}", markup=False)
            return 2
        if json_out:
            print(json.dumps({"dry_run": True, "shards": counts}, separators=(",", ":")))
        return 0
    ctx = init_distributed(cfg.device)
    try:
        summary = run_protect_shards(
            cfg, opts, ctx,
            on_record=lambda rec: rec.status == "failed" and err.print(f"failed {rec.source}: {rec.error}", markup=False),
            on_shard=lambda st: st.error and err.print(f"failed shard {st.name}: {st.error}", markup=False),
        )
    except (UsageError, EngineError, WeightsError) as exc:
        err.print(f"cgan protect: error: {exc}", markup=False)
        return 2
    except OutputClosed as exc:
        # Point stdout at /dev/null so the interpreter's final flush cannot raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        err.print(f"cgan protect: stopped: {exc}; the output is incomplete", markup=False)
        return 1
    finally:
        shutdown(ctx)
    if ctx.is_main:
        if json_out:
            print(json.dumps(asdict(summary), separators=(",", ":")), file=sys.stderr if str(cfg.out) == "-" else sys.stdout)
        else:
            c, s = summary.counts, summary.shards
            err.print(f"shards: {s['done']} written, {s['skipped']} already done, {s['failed']} failed; members: "
                      f"protected {c['protected']}, passed through {c['skipped']}, failed {c['failed']} -> {cfg.out}", markup=False)
            if summary.stale_removed:
                err.print(f"removed {len(summary.stale_removed)} shard(s) an earlier run had written past the new last one: "
                          + ", ".join(sorted(summary.stale_removed)), markup=False)
    return summary.exit_code
