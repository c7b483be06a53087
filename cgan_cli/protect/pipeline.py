"""The streaming pipeline: samples -> workers (decode, engine, encode) -> sink, records in input order.

On the CPU every worker process runs the whole pipeline on its share: decode, its own copy of the
generator, encode, and (for a folder) the atomic write; only file names go in and manifest records
come back, so no pixels cross a process boundary. On a GPU the workers only decode, the main
process batches the pixels onto its one device (grouped by working shape), and encode threads
write the results while the next chunk computes (Pillow releases the GIL).

Stages, each a small generator: `admit` (settle ignored files, rename for --format, refuse, spot
collisions, look up resume) -> `in_order` (group, submit, bound what is in flight, hand results
back in input order) -> `finish` (encode, measure, write). Memory is flat in the number of inputs: samples are pulled
lazily and only a bounded window is in flight (two groups per worker, and about HELD_BYTES of
in-memory tar members; on a GPU at most one chunk of `CHUNK_BATCHES x batch_size` decoded images,
fewer above CHUNK_PIXELS, waits to be encoded). An `ordered` sink (a tar) gets samples in order.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from typing import Any

import numpy as np
import torch

from cgan_cli.core.device import cpu_threads_per_worker, set_cpu_threads
from cgan_cli.core.engine import EngineConfig, ProtectEngine
from cgan_cli.core.formats import (
    DecodedImage,
    EncodeOptions,
    ImageError,
    decode_image,
    encode_image,
    fidelity,
    output_format,
    output_name,
    ssim,
    written_fidelity,
)
from cgan_cli.protect.manifest import (
    DoneEntry,
    ManifestRecord,
    ResumeIndex,
    settings_key,
)
from cgan_cli.protect.sinks import Sink
from cgan_cli.protect.sources import Sample
from cgan_cli.protect.workers import Task, WorkerPool

CHUNK_BATCHES = 2  # engine chunk = this many batches: enough to group shapes, small enough to stay flat
CHUNK_PIXELS = 48_000_000  # ...and at most about this many decoded samples (~48 MB of uint8) per chunk
GROUP_BYTES = 1 << 20  # a group closes at this many input bytes: a photo travels alone, small files together
HELD_BYTES = 64 << 20  # at most about this many bytes of in-memory inputs (tar members) in flight


# ---------------------------------------------------------------- decode stage


@dataclass
class Prepared:
    """A sample after the decode stage: decoded, or known to be skipped / passed through / failed / ignored."""

    sample: Sample
    sha256_in: str | None = None
    bytes_in: int | None = None
    decoded: DecodedImage | None = None
    passthrough: bytes | None = None
    skip: DoneEntry | None = None
    error: str | None = None
    ignored: str | None = None  # not an input of this run (e.g. a file inside --out): the reason
    seconds: float = 0.0


def prepare(sample: Sample, done: DoneEntry | None, options: EncodeOptions) -> Prepared:
    """The decode stage, run in worker processes: read, hash, resume check, decode, check writability."""
    t0 = time.perf_counter()
    result = Prepared(sample)
    try:
        data = sample.read()
    except OSError as exc:
        result.error = f"cannot read: {exc.strerror or exc}"
        return result
    result.sha256_in, result.bytes_in = hashlib.sha256(data).hexdigest(), len(data)
    if done is not None and done.sha256_in == result.sha256_in and (sample.label is None or sample.label == done.code):
        result.skip = done
    elif sample.passthrough:
        result.passthrough = data
    else:
        try:
            result.decoded = decode_image(data, sample.id)
            output_format(result.decoded, options)  # unwritable: fails here, before any compute
        except ImageError as exc:
            result.error = str(exc)  # `decoded` stays set when decoding worked: the record keeps size/mode
        except Exception as exc:  # noqa: BLE001 - one bad file must never stop the batch
            result.error = f"unexpected {type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - t0
    return result


def prepare_group(jobs: list[tuple[Sample, DoneEntry | None, EncodeOptions]]) -> list[Prepared]:
    """`prepare` for several samples in one worker round trip.

    Why: for small files the per-task cost of the process pool (queue hand-offs and thread wake-ups,
    milliseconds on a loaded machine) dwarfs decoding a 32 px PNG (~0.1 ms); see docs/performance.md.
    """
    return [prepare(*job) for job in jobs]


# ---------------------------------------------------------------- generator and encode stages


def _base_record(item: Prepared, status: str) -> ManifestRecord:
    rec = ManifestRecord(item.sample.id, item.sample.rel_out, status, item.error, bytes_in=item.bytes_in, sha256_in=item.sha256_in)
    if item.decoded is not None:
        rec.width, rec.height = item.decoded.width, item.decoded.height
        rec.mode, rec.format = item.decoded.mode, item.decoded.format
    return rec


Finished = tuple[ManifestRecord, "bytes | None"]  # a record, and the payload when the caller must write it
Protected = "np.ndarray | list[np.ndarray]"  # one image's protected pixels: an array, or one per frame


def finish(item: Prepared, protected: Protected | None, options: EncodeOptions, sink: Sink | None, t_engine: float,
           code: int | None = None) -> Finished:
    """Encode stage: encode, measure the change, write to `sink` if given (else hand the payload back)."""
    t0 = time.perf_counter()
    if item.ignored is not None:
        return ManifestRecord(item.sample.id, None, "ignored", item.ignored), None
    if item.error is not None or item.skip is not None:
        rec = _base_record(item, "failed" if item.error is not None else "skipped")
        if item.skip is not None:
            rec.sha256_out, rec.bytes_out = item.skip.sha256_out, item.skip.bytes_out
            rec.code, rec.code_source = item.skip.code, item.skip.code_source
        rec.seconds = round(item.seconds, 4)
        return rec, None
    rec = _base_record(item, "skipped" if item.passthrough is not None else "protected")
    try:
        if item.passthrough is not None:
            payload = item.passthrough
        else:
            assert item.decoded is not None and protected is not None
            payload = encode_image(item.decoded, protected, options)
            rec.code, rec.code_source = code, "guess" if item.sample.label is None else "label"
            original = item.decoded.pixels if isinstance(protected, np.ndarray) else item.decoded.frames_pixels
            rec.linf, rec.psnr = fidelity(original, protected, item.decoded.max_value)
            if options.measure_ssim:  # a multi-frame image records its worst frame
                pairs = zip(original, protected) if isinstance(protected, list) else [(original, protected)]
                rec.ssim = min(ssim(a, b, item.decoded.max_value) for a, b in pairs)
            if options.measure_written:
                rec.written_linf, rec.written_psnr = written_fidelity(item.decoded, decode_image(payload, item.sample.rel_out))
        rec.bytes_out, rec.sha256_out = len(payload), hashlib.sha256(payload).hexdigest()
        if sink is not None:
            rec.output = sink.write(item.sample, payload)
            payload = None
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop the batch
        rec.mark_failed(f"cannot write output: {exc}")
        payload = None
    rec.seconds = round(item.seconds + t_engine + time.perf_counter() - t0, 4)
    rec.round_measurements()
    return rec, payload


def protect_items(engine: ProtectEngine, items: list[Prepared]) -> list[tuple[Protected | None, float, int | None]]:
    """The generator over every decoded item: (protected pixels or None, engine seconds per item, code used).

    Every frame of a multi-frame item is one more engine input (the same budget and label per frame);
    its result is the list of protected frames, and its code the one its first frame got.
    """
    todo = [item for item in items if item.decoded is not None and item.skip is None and item.error is None]
    inputs = [frame for item in todo for frame in item.decoded.frames_pixels]  # type: ignore[union-attr]
    t0 = time.perf_counter()
    labels = [item.sample.label for item in todo for _ in range(item.decoded.frame_count)]  # type: ignore[union-attr]
    forced = labels if any(c is not None for c in labels) else None
    protected, codes = engine.protect_batch_coded(inputs, forced) if inputs else ([], [])
    share = (time.perf_counter() - t0) / max(1, len(todo))
    by_item: dict[int, tuple[Protected, float, int]] = {}
    start = 0
    for item in todo:
        count = item.decoded.frame_count  # type: ignore[union-attr]
        arr = protected[start] if count == 1 else protected[start : start + count]
        by_item[id(item)] = (arr, share, codes[start])
        start += count
    return [by_item.get(id(item), (None, 0.0, None)) for item in items]


@dataclass(frozen=True)
class EngineSpec:
    """What a process needs to build the run's engine: the config, its torch threads and seed."""

    cfg: EngineConfig
    cpu_threads: int | None = None
    seed: int = 0


def process_engine(spec: EngineSpec) -> ProtectEngine:
    """Build an engine and set this process's torch state for it (threads on the CPU, the seed)."""
    engine = ProtectEngine(spec.cfg)
    if engine.device.type == "cpu":
        set_cpu_threads(spec.cpu_threads)
    torch.manual_seed(spec.seed)
    return engine


@lru_cache(maxsize=1)
def _worker_engine(spec: EngineSpec) -> ProtectEngine:
    """This worker process's engine: built by its first group, kept for the rest of the run."""
    return process_engine(spec)


def protect_group(engine: ProtectEngine | EngineSpec, options: EncodeOptions, sink: Sink | None, jobs: list[tuple]) -> list[Finished]:
    """The whole pipeline for a group of samples inside one process: decode, generator, encode, write.

    In a worker process `engine` is the run's EngineSpec: the worker builds its engine on its first
    group and keeps it; with --workers 0 it is the caller's engine itself.
    """
    if isinstance(engine, EngineSpec):
        engine = _worker_engine(engine)
    items = prepare_group(jobs)
    return [finish(item, arr, options, sink, seconds, code) for item, (arr, seconds, code) in zip(items, protect_items(engine, items))]


# ---------------------------------------------------------------- scheduling


Guard = Callable[[Sample], "str | None"]  # a reason to refuse a sample before it is read, or None
Job = tuple  # (sample, resume entry or None, EncodeOptions): the arguments of `prepare`


@dataclass
class Admitted:
    """A sample cleared for work (`job`), or already settled without the pool (`settled`)."""

    sample: Sample
    job: Job | None = None
    settled: Prepared | None = None


def admit(samples: Iterable[Sample], options: EncodeOptions, resume: ResumeIndex, sink: Sink, guard: Guard | None,
          ignore: Guard | None = None) -> Iterator[Admitted]:
    """Settle what is no input (the source's `ignored` reason, or what `ignore` names), rename for
    --format, refuse what the guard refuses and what collides, look up resume.

    In-memory passthrough members (a tar's .cls/.json) have nothing to decode: they settle here.
    """
    seen: dict[str, str] = {}
    for sample in samples:
        reason = sample.ignored or (ignore(sample) if ignore else None)
        if reason is not None:
            yield Admitted(sample, settled=Prepared(sample, ignored=reason))
            continue
        if not sample.passthrough:  # --format renames images only; a tar's .cls/.json keep their names
            sample = replace(sample, rel_out=output_name(sample.rel_out, options))
        refusal = sample.label_error if not sample.passthrough else None  # --labels: never a guessed code instead
        refusal = refusal or (guard(sample) if guard else None)
        if refusal is None and sample.rel_out in seen:
            refusal = f"output {sample.rel_out} collides with the output of {seen[sample.rel_out]}"
        if refusal is not None:
            yield Admitted(sample, settled=Prepared(sample, error=refusal))
            continue
        seen[sample.rel_out] = sample.id
        job = (sample, resume.lookup(sample.rel_out, sink.exists), options)
        if sample.passthrough and sample.data is not None:
            yield Admitted(sample, settled=prepare(*job))
        else:
            yield Admitted(sample, job=job)


def _input_size(sample: Sample) -> int:
    if sample.data is not None:
        return len(sample.data)
    try:
        return os.stat(sample.path).st_size if sample.path is not None else 0
    except OSError:
        return 0  # unreadable: prepare() reports it


@dataclass
class InFlight:
    """Work in flight, in input order: groups of jobs on the pool, and results known without it.

    Consecutive jobs share one worker round trip, up to `group_files` files and GROUP_BYTES (so a
    big photo travels alone and small files in groups).
    """

    pool: WorkerPool
    group_files: int
    queue: deque[tuple[list[Sample], Task | list]] = field(default_factory=deque)  # (samples, task or results)
    group: list[Job] = field(default_factory=list)
    group_bytes: int = 0
    samples: int = 0  # in flight, the open group included
    held: int = 0  # bytes of in-memory inputs in flight

    def add(self, item: Admitted, settle: Callable[[Prepared], Any]) -> None:
        self.samples += 1
        self.held += len(item.sample.data) if item.sample.data is not None else 0
        if item.job is None:
            self.flush()  # keep input order
            self.queue.append(([item.sample], [settle(item.settled)]))
            return
        self.group.append(item.job)
        self.group_bytes += _input_size(item.sample)
        if len(self.group) >= self.group_files or self.group_bytes >= GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.group:
            self.queue.append(([job[0] for job in self.group], self.pool.submit(self.group)))
            self.group, self.group_bytes = [], 0

    def pop(self) -> list[tuple[Sample, Any]]:
        """The oldest group's (sample, result) pairs; waits for it."""
        self.flush()
        samples, work = self.queue.popleft()
        results = self.pool.result(work) if isinstance(work, Task) else work
        self.samples -= len(samples)
        self.held -= sum(len(s.data) for s in samples if s.data is not None)
        return list(zip(samples, results))


def in_order(admitted: Iterable[Admitted], pool: WorkerPool, window: int, group_files: int,
             settle: Callable[[Prepared], Any]) -> Iterator[tuple[Sample, Any]]:
    """Submit work lazily, at most `window` samples (and about HELD_BYTES of in-memory inputs) in
    flight; yield (sample, the pool task's result or `settle(settled)`) in input order."""
    flight = InFlight(pool, group_files)
    for item in admitted:
        flight.add(item, settle)
        while flight.samples >= window or flight.held >= HELD_BYTES:
            yield from flight.pop()
    while flight.samples:
        yield from flight.pop()


def _chunks(items: Iterator[Prepared], size: int, max_pixels: int = CHUNK_PIXELS) -> Iterator[list[Prepared]]:
    """Groups of at most `size` items and about `max_pixels` decoded pixels (big photos: small chunks)."""
    chunk: list[Prepared] = []
    pixels = 0
    for item in items:
        chunk.append(item)
        pixels += item.decoded.pixels.size * item.decoded.frame_count if item.decoded is not None else 0
        if len(chunk) >= size or pixels >= max_pixels:
            yield chunk
            chunk, pixels = [], 0
    if chunk:
        yield chunk


def _finished_in_workers(admitted: Iterable[Admitted], engine: ProtectEngine, spec: EngineSpec, options: EncodeOptions,
                         out_sink: Sink | None, workers: int) -> Iterator[tuple[Sample, Finished]]:
    """CPU: every worker process runs the whole pipeline on its groups; no pixels cross processes."""
    settle = lambda item: finish(item, None, options, out_sink, 0.0)  # noqa: E731
    task = partial(protect_group, engine if workers <= 0 else spec, options, out_sink)
    pool = WorkerPool(workers, task, lambda job, why: settle(Prepared(job[0], error=why)))
    group = engine.cfg.batch_size  # small files: one generator batch per round trip
    try:
        yield from in_order(admitted, pool, 2 * max(1, workers) * group, group, settle)
    finally:
        pool.shutdown()


def _finished_on_device(admitted: Iterable[Admitted], engine: ProtectEngine, spec: EngineSpec, options: EncodeOptions,
                        out_sink: Sink | None, workers: int) -> Iterator[tuple[Sample, Finished]]:
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
        decoded = (item for _, item in in_order(admitted, pool, window, group_files, lambda item: item))
        for chunk in _chunks(decoded, batch * CHUNK_BATCHES):
            for item, (arr, seconds, code) in zip(chunk, protect_items(engine, chunk)):
                pending.append((item.sample, encoders.submit(finish, item, arr, options, out_sink, seconds, code)))
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
    seed: int = 0,
    ignore: Guard | None = None,
    labels: str | None = None,
) -> None:
    """Run every sample through decode -> engine -> encode -> sink; `on_record` gets records in input order.

    Where the generator runs: in every worker process on the CPU (`engine_in_workers`, default: the
    engine's device is the CPU), in the main process on a GPU. An unordered sink (a folder) is
    written where the payload is made; an ordered one (a tar shard) here, in input order.
    `labels` names the run's label source (--labels), which is part of the resume fingerprint.
    """
    resume = resume or ResumeIndex()
    settings = run_settings(engine, options, labels)
    out_sink = None if sink.ordered else sink
    in_workers = engine.device.type == "cpu" if engine_in_workers is None else engine_in_workers
    spec = EngineSpec(engine.cfg, cpu_threads_per_worker(workers), seed)
    run = _finished_in_workers if in_workers else _finished_on_device
    finished = run(admit(samples, options, resume, sink, guard, ignore), engine, spec, options, out_sink, workers)
    try:
        for sample, (rec, payload) in finished:
            if payload is not None:  # ordered sink: written here, in input order
                try:
                    rec.output = sink.write(sample, payload)
                except OSError as exc:
                    rec.mark_failed(f"cannot write output: {exc}")
            rec.settings = settings
            on_record(rec)
    finally:
        finished.close()
    sink.close()


def run_settings(engine: ProtectEngine, options: EncodeOptions, labels: str | None = None) -> str:
    """The manifest `settings` fingerprint of a run (see manifest.settings_key)."""
    return settings_key(engine.weights_sha256, engine.epsilon, engine.cfg.full_res, options.format, options.quality, labels,
                        engine.mask_floor)
