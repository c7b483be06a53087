"""`cgan protect`: the streaming pipeline source -> workers (decode, engine, encode) -> sink.

On the CPU every worker process runs the whole pipeline on its share: decode, its own copy of the
generator, encode, and (for a folder) the atomic write; only file names go in and manifest records
come back, so no pixels cross a process boundary. On a GPU the workers only decode, the main
process batches the pixels onto its one device (grouped by working shape), and encode threads
write the results while the next chunk computes (Pillow releases the GIL).

Memory is flat in the number of inputs: samples are pulled lazily and only a bounded window of them
is in flight (two groups per worker, and about HELD_BYTES of in-memory tar members; on a GPU at most
one chunk of `CHUNK_BATCHES x batch_size` decoded images, fewer above CHUNK_PIXELS, waits to be
encoded). Records come out in input order, so an `ordered` sink (a tar shard) gets samples in order.

`protect_stream` is the reusable core: any iterable of `Sample`s, any `Sink`. `run_protect` wires
it to folders/files/stdin and a `FolderSink`, and writes manifest.jsonl + summary.json under --out.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from cgan_cli import __version__
from cgan_cli.codec import (
    FORCED_FORMATS, EncodeOptions, Prepared, decode_image, encode_image, fidelity, output_name, prepare, prepare_group,
    written_fidelity,
)
from cgan_cli.distributed import launched_by_torchrun
from cgan_cli.engine import EngineConfig, EngineError, ProtectEngine, cpu_threads_per_worker
from cgan_cli.manifest import MANIFEST_NAME, SUMMARY_NAME, ManifestRecord, ManifestWriter, ResumeIndex, RunSummary, settings_key, write_summary
from cgan_cli.sinks import FolderSink, Sink
from cgan_cli.sources import Sample, UsageError, count_samples, iter_samples, validate_inputs
from cgan_cli.weights import DEFAULT_RGB_WEIGHTS, WeightsError, file_sha256, read_meta
from cgan_cli.workers import WorkerPool, default_workers

CHUNK_BATCHES = 2  # engine chunk = this many batches: enough to group shapes, small enough to stay flat
CHUNK_PIXELS = 48_000_000  # ...and at most about this many decoded samples (~48 MB of uint8) per chunk


@dataclass(frozen=True)
class ProtectConfig:
    inputs: tuple[str, ...]
    out: Path
    weights: Path | None = None  # None = the shipped default, which must exist (never random weights)
    epsilon: float | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 16
    workers: int = default_workers()  # worker processes (0 = all in the main process); GPU: also encode threads
    seed: int = 0
    format: str | None = None
    quality: int | None = None
    full_res: bool = False
    dry_run: bool = False
    measure_written: bool = False

    def checked(self) -> "ProtectConfig":
        """Usage errors in the options themselves; returns the config with the weights path resolved."""
        if self.format is not None and self.format not in FORCED_FORMATS:
            raise UsageError(f"--format {self.format}: expected one of {', '.join(FORCED_FORMATS)}")
        if self.weights is None and not DEFAULT_RGB_WEIGHTS.is_file():
            raise UsageError(
                f"no trained weights at {DEFAULT_RGB_WEIGHTS} yet; pass --weights FILE.safetensors, "
                "or train a generator first with `cgan train` (cgan never protects with random weights)"
            )
        return replace(self, weights=self.weights or DEFAULT_RGB_WEIGHTS)

    def engine_config(self) -> EngineConfig:
        assert self.weights is not None, "call checked() first"
        return EngineConfig(self.weights, self.device, self.precision, self.epsilon, self.batch_size, self.full_res, self.seed,
                            cpu_threads=cpu_threads_per_worker(self.workers))

    def encode_options(self) -> EncodeOptions:
        return EncodeOptions(self.format, self.quality, self.measure_written)


def _base_record(item: Prepared, status: str) -> ManifestRecord:
    rec = ManifestRecord(item.sample.id, item.sample.rel_out, status, item.error, bytes_in=item.bytes_in, sha256_in=item.sha256_in)
    if item.decoded is not None:
        rec.width, rec.height = item.decoded.width, item.decoded.height
        rec.mode, rec.format = item.decoded.mode, item.decoded.format
    return rec


Finished = tuple[ManifestRecord, "bytes | None"]  # a record, and the payload when the caller must write it


def finish(item: Prepared, protected: np.ndarray | None, options: EncodeOptions, sink: Sink | None, t_engine: float) -> Finished:
    """Encode stage: encode, measure the change, write to `sink` if given (else hand the payload back)."""
    t0 = time.perf_counter()
    if item.error is not None or item.skip is not None:
        rec = _base_record(item, "failed" if item.error is not None else "skipped")
        if item.skip is not None:
            rec.sha256_out, rec.bytes_out = item.skip.sha256_out, item.skip.bytes_out
        rec.seconds = round(item.seconds, 4)
        return rec, None
    rec = _base_record(item, "skipped" if item.passthrough is not None else "protected")
    try:
        if item.passthrough is not None:
            payload = item.passthrough
        else:
            assert item.decoded is not None and protected is not None
            payload = encode_image(item.decoded, protected, options)
            rec.linf, rec.psnr = fidelity(item.decoded.pixels, protected, item.decoded.max_value)
            if options.measure_written:
                rec.written_linf, rec.written_psnr = written_fidelity(item.decoded, decode_image(payload, item.sample.rel_out))
        rec.bytes_out, rec.sha256_out = len(payload), hashlib.sha256(payload).hexdigest()
        if sink is not None:
            rec.output = sink.write(item.sample, payload)
            payload = None
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop the batch
        rec.status, rec.error, payload = "failed", f"cannot write output: {exc}", None
        rec.linf = rec.psnr = rec.written_linf = rec.written_psnr = rec.bytes_out = rec.sha256_out = None
    rec.seconds = round(item.seconds + t_engine + time.perf_counter() - t0, 4)
    rec.round_measurements()
    return rec, payload


def protect_items(engine: ProtectEngine, items: list[Prepared]) -> list[tuple[np.ndarray | None, float]]:
    """The generator over every decoded item: (protected pixels or None, engine seconds per item)."""
    todo = [item for item in items if item.decoded is not None and item.skip is None and item.error is None]
    t0 = time.perf_counter()
    protected = engine.protect_batch([item.decoded.pixels for item in todo]) if todo else []  # type: ignore[union-attr]
    share = (time.perf_counter() - t0) / max(1, len(todo))
    by_item = {id(item): arr for item, arr in zip(todo, protected)}
    return [(arr, share) if (arr := by_item.get(id(item))) is not None else (None, 0.0) for item in items]


@lru_cache(maxsize=1)
def _worker_engine(cfg: EngineConfig) -> ProtectEngine:
    """This worker process's engine: built by its first group, kept for the rest of the run."""
    return ProtectEngine(cfg)


def protect_group(engine: ProtectEngine | EngineConfig, options: EncodeOptions, sink: Sink | None, jobs: list[tuple]) -> list[Finished]:
    """The whole pipeline for a group of samples inside one process: decode, generator, encode, write.

    In a worker process `engine` is the run's EngineConfig: the worker builds its engine on its first
    group and keeps it; with --workers 0 it is the caller's engine itself.
    """
    if isinstance(engine, EngineConfig):
        engine = _worker_engine(engine)
    items = prepare_group(jobs)
    return [finish(item, arr, options, sink, seconds) for item, (arr, seconds) in zip(items, protect_items(engine, items))]


def _done(value) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


Guard = Callable[[Sample], "str | None"]  # a reason to refuse a sample before it is read, or None
GROUP_BYTES = 1 << 20  # a group closes at this many input bytes: a photo travels alone, small files together
HELD_BYTES = 64 << 20  # at most about this many bytes of in-memory inputs (tar members) in flight


def _input_size(sample: Sample) -> int:
    if sample.data is not None:
        return len(sample.data)
    try:
        return os.stat(sample.path).st_size if sample.path is not None else 0
    except OSError:
        return 0  # unreadable: prepare() reports it


def _in_order(
    samples: Iterable[Sample],
    pool: WorkerPool,
    window: int,
    resume: ResumeIndex,
    sink: Sink,
    options: EncodeOptions,
    guard: Guard | None,
    group_files: int,
    settle: Callable[[Prepared], Any],
) -> Iterator[tuple[Sample, Any]]:
    """Submit groups of samples to the pool lazily, at most `window` samples (and about HELD_BYTES of
    in-memory tar members) in flight; yield (sample, the pool task's result for it) in input order.

    Consecutive samples share one worker round trip, up to `group_files` files and GROUP_BYTES (so a
    big photo travels alone and small files in groups). Samples settled here without the pool
    (refused, colliding, in-memory passthrough) get `settle(Prepared)` as their result.
    """
    inflight: deque[tuple[list[Sample], list[tuple], Future]] = deque()  # (samples, jobs, future of results); no jobs: settled
    seen: dict[str, str] = {}
    group: list[tuple] = []
    group_bytes = queued = held = 0

    def flush() -> None:
        nonlocal group, group_bytes
        if group:
            inflight.append(([job[0] for job in group], group, pool.submit(group)))
            group, group_bytes = [], 0

    def known(item: Prepared) -> None:
        flush()  # keep input order
        inflight.append(([item.sample], [], _done([settle(item)])))

    def pop() -> list[tuple[Sample, Any]]:
        nonlocal queued, held
        batch, jobs, fut = inflight.popleft()
        generation = pool.pool
        results = pool.results(fut, jobs) if jobs else fut.result()
        if pool.pool is not generation:  # the pool was replaced: everything still in flight was lost
            for i, (s, j, f) in enumerate(inflight):
                inflight[i] = (s, j, pool.submit(j) if j else f)  # settled results were never in the pool
        queued -= len(results)
        held -= sum(len(s.data) for s in batch if s.data is not None)
        return list(zip(batch, results))

    for sample in samples:
        if not sample.passthrough:  # --format renames images only; a tar's .cls/.json keep their names
            sample = replace(sample, rel_out=output_name(sample.rel_out, options))
        refusal = guard(sample) if guard else None
        if refusal is None and sample.rel_out in seen:
            refusal = f"output {sample.rel_out} collides with the output of {seen[sample.rel_out]}"
        if refusal is not None:
            known(Prepared(sample, error=refusal))
        else:
            seen[sample.rel_out] = sample.id
            args = (sample, resume.lookup(sample.rel_out, sink.exists), options)
            if sample.passthrough and sample.data is not None:  # in-memory tar member, nothing to decode: no IPC
                known(prepare(*args))
            else:
                group.append(args)
                group_bytes += _input_size(sample)
                if len(group) >= group_files or group_bytes >= GROUP_BYTES:
                    flush()
        queued += 1
        held += len(sample.data) if sample.data is not None else 0
        while queued >= window or held >= HELD_BYTES:
            flush()
            yield from pop()
    flush()
    while inflight:
        yield from pop()


def _chunks(items: Iterator[Prepared], size: int, max_pixels: int = CHUNK_PIXELS) -> Iterator[list[Prepared]]:
    """Groups of at most `size` items and about `max_pixels` decoded pixels (big photos: small chunks)."""
    chunk: list[Prepared] = []
    pixels = 0
    for item in items:
        chunk.append(item)
        pixels += item.decoded.pixels.size if item.decoded is not None else 0
        if len(chunk) >= size or pixels >= max_pixels:
            yield chunk
            chunk, pixels = [], 0
    if chunk:
        yield chunk


def _finished_in_workers(samples: Iterable[Sample], engine: ProtectEngine, options: EncodeOptions, out_sink: Sink | None,
                         workers: int, resume: ResumeIndex, sink: Sink, guard: Guard | None) -> Iterator[tuple[Sample, Finished]]:
    """CPU: every worker process runs the whole pipeline on its groups; no pixels cross processes."""
    settle = lambda item: finish(item, None, options, out_sink, 0.0)  # noqa: E731
    task = partial(protect_group, engine if workers <= 0 else engine.cfg, options, out_sink)
    pool = WorkerPool(workers, task, lambda job, why: settle(Prepared(job[0], error=why)))
    group = engine.cfg.batch_size  # small files: one generator batch per round trip
    try:
        yield from _in_order(samples, pool, 2 * max(1, workers) * group, resume, sink, options, guard, group, settle)
    finally:
        pool.shutdown()


def _finished_on_device(samples: Iterable[Sample], engine: ProtectEngine, options: EncodeOptions, out_sink: Sink | None,
                        workers: int, resume: ResumeIndex, sink: Sink, guard: Guard | None) -> Iterator[tuple[Sample, Finished]]:
    """GPU: decode workers -> the main process batches pixels onto its one device -> encode threads.

    At most one chunk waits in the encode threads: encoding the previous chunk overlaps computing
    the next (Pillow releases the GIL).
    """
    threads = max(1, workers)
    batch = engine.cfg.batch_size
    pool = WorkerPool(workers, prepare_group, lambda job, why: Prepared(job[0], error=why))
    encoders = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cgan-encode")
    pending: deque[tuple[Sample, Future]] = deque()
    try:
        window = max(2 * threads, batch)
        group_files = max(1, window // (2 * threads))  # two groups per worker in flight
        decoded = (item for _, item in _in_order(samples, pool, window, resume, sink, options, guard, group_files, lambda item: item))
        for chunk in _chunks(decoded, batch * CHUNK_BATCHES):
            for item, (arr, seconds) in zip(chunk, protect_items(engine, chunk)):
                pending.append((item.sample, encoders.submit(finish, item, arr, options, out_sink, seconds)))
                while pending and (len(pending) > len(chunk) or pending[0][1].done()):
                    sample, fut = pending.popleft()
                    yield sample, fut.result()
        while pending:
            sample, fut = pending.popleft()
            yield sample, fut.result()
    finally:
        encoders.shutdown(wait=True, cancel_futures=True)
        pool.shutdown()


def protect_stream(
    samples: Iterable[Sample],
    sink: Sink,
    engine: ProtectEngine,
    options: EncodeOptions,
    on_record: Callable[[ManifestRecord], None],
    workers: int = 0,
    resume: ResumeIndex | None = None,
    guard: Guard | None = None,
    engine_in_workers: bool | None = None,
) -> None:
    """Run every sample through decode -> engine -> encode -> sink; `on_record` gets records in input order.

    Where the generator runs: in every worker process on the CPU (`engine_in_workers`, default: the
    engine's device is the CPU), in the main process on a GPU. An unordered sink (a folder) is
    written where the payload is made; an ordered one (a tar shard) here, in input order.
    """
    resume = resume or ResumeIndex()
    settings = run_settings(engine, options)
    out_sink = None if sink.ordered else sink
    in_workers = engine.device.type == "cpu" if engine_in_workers is None else engine_in_workers
    run = _finished_in_workers if in_workers else _finished_on_device
    finished = run(samples, engine, options, out_sink, workers, resume, sink, guard)
    try:
        for sample, (rec, payload) in finished:
            if payload is not None:  # ordered sink: written here, in input order
                try:
                    rec.output = sink.write(sample, payload)
                except OSError as exc:
                    rec.status, rec.error = "failed", f"cannot write output: {exc}"
            rec.settings = settings
            on_record(rec)
    finally:
        finished.close()
    sink.close()


def run_settings(engine: ProtectEngine, options: EncodeOptions) -> str:
    """The manifest `settings` fingerprint of a run (see manifest.settings_key)."""
    return settings_key(engine.weights_sha256, engine.epsilon, engine.cfg.full_res, options.format, options.quality)


def _folder_guard(out: Path) -> Callable[[Sample], str | None]:
    out_r = out.resolve()

    def guard(sample: Sample) -> str | None:
        if sample.path is not None:
            src = Path(sample.path).resolve()
            if src == out_r or out_r in src.parents:
                return f"source lies inside --out {out}; refusing to read outputs as inputs"
        return None

    return guard


def dry_run(cfg: ProtectConfig, emit: Callable[[str], None]) -> RunSummary:
    """List what a run would do (protect / skip) without decoding or writing anything."""
    cfg = cfg.checked()
    validate_inputs(list(cfg.inputs), cfg.out)
    assert cfg.weights is not None
    meta = read_meta(cfg.weights)
    epsilon = float(cfg.epsilon if cfg.epsilon is not None else meta.epsilon)
    weights = {"path": str(cfg.weights), "sha256": file_sha256(cfg.weights), "metadata": asdict(meta)}
    summary = _summary(cfg, weights, epsilon, cfg.device, cfg.precision, meta.working_size)
    summary.dry_run = True
    options = cfg.encode_options()
    settings = settings_key(weights["sha256"], epsilon, cfg.full_res, cfg.format, cfg.quality)
    resume = ResumeIndex.load(cfg.out / MANIFEST_NAME, settings)
    for sample in iter_samples(list(cfg.inputs), sys.stdin):
        rel = output_name(sample.rel_out, options)
        done = resume.lookup(rel, lambda r: (cfg.out / r).is_file())
        skip = done is not None and hashlib.sha256(sample.read()).hexdigest() == done.sha256_in
        status = "skipped" if skip else "protected"
        summary.add(status)
        emit(f"{'skip' if skip else 'protect'}\t{sample.id}\t{cfg.out / rel}")
    return summary


def _summary(cfg: ProtectConfig, weights: dict, epsilon: float, device: str, precision: str, working_size: int) -> RunSummary:
    return RunSummary(
        cgan_version=__version__, weights=weights, epsilon=float(epsilon), device=device, precision=precision,
        working_size=working_size, full_res=cfg.full_res, out=str(cfg.out), seed=cfg.seed,
    )


def run_protect(cfg: ProtectConfig, on_record: Callable[[ManifestRecord], None] | None = None) -> RunSummary:
    """Protect every input into cfg.out; returns the summary also written to summary.json.

    Raises UsageError / EngineError / WeightsError before anything is written when the command
    line cannot run. Per-file problems never raise: they become failed records.
    """
    cfg = cfg.checked()
    validate_inputs(list(cfg.inputs), cfg.out)
    engine = ProtectEngine(cfg.engine_config())
    summary = _summary(cfg, engine.describe(), engine.epsilon, str(engine.device), engine.precision, engine.meta.working_size)
    sink = FolderSink(cfg.out)
    resume = ResumeIndex.load(cfg.out / MANIFEST_NAME, run_settings(engine, cfg.encode_options()))
    writer = ManifestWriter(cfg.out / MANIFEST_NAME)
    t0 = time.perf_counter()

    def record(rec: ManifestRecord) -> None:
        writer.write(rec)
        summary.add(rec.status)
        if on_record:
            on_record(rec)

    try:
        protect_stream(iter_samples(list(cfg.inputs), sys.stdin), sink, engine, cfg.encode_options(), record,
                       cfg.workers, resume, _folder_guard(cfg.out))
    finally:
        writer.close()
    summary.wall_seconds = round(time.perf_counter() - t0, 3)
    summary.images_per_second = round(summary.counts["protected"] / max(summary.wall_seconds, 1e-9), 3)
    write_summary(cfg.out / SUMMARY_NAME, summary)
    return summary


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} img/s" if speed else "-- img/s")


def _progress() -> Progress:
    columns = [TextColumn("[bold]protect"), BarColumn(), MofNCompleteColumn(), _RateColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=Console(stderr=True), transient=False)


def _report_failure(console: Console, rec: ManifestRecord) -> None:
    if rec.status == "failed":
        console.print(Text.assemble(("failed ", "red"), f"{rec.source}: {rec.error}"))


def run_cli(cfg: ProtectConfig, json_out: bool = False) -> int:
    """What `cgan protect` does after parsing: run, report, and return the exit code (0 / 1 / 2).

    A progress bar (images/s, ETA) only on a terminal; with --json one JSON line on stdout; failed
    files are always listed on stderr; otherwise quiet when stdout is not a terminal.
    """
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    tty = sys.stdout.isatty() and not json_out
    try:
        if launched_by_torchrun():
            # Every rank would protect every file; only shards are split across ranks.
            raise UsageError("torchrun splits WebDataset shards across ranks; protect folders and files with one process")
        if cfg.dry_run:
            summary = dry_run(cfg, emit=(lambda line: None) if json_out else print)
        elif tty:
            with _progress() as bar:
                task = bar.add_task("protect", total=count_samples(list(cfg.inputs)))

                def show(rec: ManifestRecord) -> None:
                    bar.advance(task)
                    _report_failure(bar.console, rec)

                summary = run_protect(cfg, on_record=show)
        else:
            summary = run_protect(cfg, on_record=lambda rec: _report_failure(err, rec))
    except (UsageError, EngineError, WeightsError) as exc:
        err.print(f"cgan protect: error: {exc}", markup=False)
        return 2
    if json_out:
        print(json.dumps(asdict(summary), separators=(",", ":")))
    elif tty:
        c = summary.counts
        verb = "would protect" if summary.dry_run else "protected"
        print(f"{verb} {c['protected']}, skipped {c['skipped']}, failed {c['failed']} -> {cfg.out}"
              + ("" if summary.dry_run else f" ({summary.images_per_second:.1f} img/s)"))
    return summary.exit_code
