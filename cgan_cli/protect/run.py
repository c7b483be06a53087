"""`cgan protect`, one entry point for every kind of input: plan a source and a sink, run the pipeline.

Folders, files and stdin path lists go to a `FolderSink` with per-file resume; tar shards (paths,
brace patterns, `pipe:` URLs, a tar on stdin) go to one of the tar sinks with per-shard resume, split
across ranks under torchrun. Either way the same pipeline protects the samples, the same manifest
records every input, and the same summary (summary.json) says how it went.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

from cgan_cli import __version__
from cgan_cli.core.choices import STDIN
from cgan_cli.core.classes import ClassIndex
from cgan_cli.core.device import cpu_threads_per_worker
from cgan_cli.core.engine import EngineConfig, ProtectEngine
from cgan_cli.core.errors import UsageError
from cgan_cli.core.formats import output_name
from cgan_cli.core.noise import mask_floor_for
from cgan_cli.core.urls import expand_shard_spec
from cgan_cli.core.weights import WeightsMeta, file_sha256, read_meta
from cgan_cli.protect.config import ProtectConfig
from cgan_cli.protect.distributed import (
    DistContext,
    gather_objects,
    launched_by_torchrun,
    rank_share,
)
from cgan_cli.protect.labels import (
    cls_labeled,
    csv_labeler,
    folder_class_map,
    folder_labeled_samples,
    read_label_csv,
)
from cgan_cli.protect.manifest import (
    MANIFEST_NAME,
    SUMMARY_NAME,
    ManifestRecord,
    ManifestWriter,
    ResumeIndex,
    RunSummary,
    ShardRunSummary,
    merge_rank_manifests,
    merge_summaries,
    rank_manifest_name,
    settings_key,
    write_summary,
)
from cgan_cli.protect.pipeline import (
    EngineSpec,
    Guard,
    process_engine,
    protect_stream,
    run_settings,
)
from cgan_cli.protect.sinks import (
    FileSink,
    FolderSink,
    Reshard,
    ReshardSink,
    ShardFilesSink,
    Sink,
    TarStreamSink,
    is_done,
    remove_own_temps,
)
from cgan_cli.protect.sources import (
    Sample,
    ShardLedger,
    ShardState,
    iter_samples,
    refuse_hostile,
    shard_samples,
    validate_inputs,
)
from cgan_cli.protect.tars import hostile_reason, shard_name
from cgan_cli.protect.workers import interrupt_once


def engine_config(cfg: ProtectConfig, device: str) -> EngineConfig:
    assert cfg.weights is not None, "call checked() first"
    return EngineConfig(cfg.weights, device, cfg.precision, cfg.epsilon, cfg.batch_size, cfg.full_res, cfg.mask_floor)


def new_summary(cfg: ProtectConfig, engine: ProtectEngine, cls: type[RunSummary] = RunSummary, **extra) -> RunSummary:
    return cls(
        cgan_version=__version__, weights=engine.describe(), epsilon=engine.epsilon, device=str(engine.device),
        precision=engine.precision, working_size=engine.meta.working_size, full_res=cfg.full_res, out=str(cfg.out),
        seed=cfg.seed, labels=cfg.labels, **extra,
    )


def check_labels(cfg: ProtectConfig, meta: WeightsMeta) -> dict[str, dict[str, int]]:
    """Usage errors of --labels against the inputs and the generator; the folder -> code maps of
    --labels folders (empty otherwise)."""
    kind = cfg.labels_kind
    if kind == "cls" and not cfg.shard_mode:
        raise UsageError("--labels cls reads each WebDataset sample's cls member; the inputs are not shards "
                         "(use --labels folders for class folders, or --labels FILE.csv)")
    if kind == "csv":
        read_label_csv(Path(str(cfg.labels)))  # a malformed file is a usage error before anything is written
    if kind != "folders":
        return {}
    if cfg.shard_mode:
        raise UsageError("--labels folders needs class-per-subfolder input folders; for shards use --labels cls or --labels FILE.csv")
    not_folders = [s for s in cfg.inputs if not Path(s).is_dir()]
    if not_folders:
        raise UsageError(f"--labels folders: {not_folders[0]} is not a folder; give class-per-subfolder folders, "
                         f"or label files with --labels FILE.csv")
    classes = ClassIndex.from_meta(meta)
    return {src: folder_class_map(Path(src), classes) for src in dict.fromkeys(cfg.inputs)}


@dataclass
class Plan:
    """What one run reads, where it writes, and how it records it."""

    samples: Iterable[Sample]
    sink: Sink
    summary: RunSummary
    manifest: Path | None  # None: the output is a stream or one file, there is no folder to hold a manifest
    resume: ResumeIndex
    guard: Guard | None
    ignore: Guard | None = None


# ---------------------------------------------------------------- folders, files, stdin path lists


def inside_out(out: Path) -> Guard:
    """Paths listed on stdin that lie inside --out (`find .` lists an earlier run's outputs): ignored."""
    out_r = out.resolve()

    def reason(sample: Sample) -> str | None:
        if sample.path is not None:
            src = Path(sample.path).resolve()
            if src == out_r or out_r in src.parents:
                return f"inside --out {out}: an output, not an input"
        return None

    return reason


def file_samples(cfg: ProtectConfig, meta: WeightsMeta) -> tuple[Iterable[Sample], dict[str, dict[str, int]]]:
    """The samples of a folder / file / stdin run, labeled as --labels says, and the --labels folders map."""
    if cfg.labels_kind == "folders":
        label_map = check_labels(cfg, meta)
        return chain.from_iterable(folder_labeled_samples(Path(src), m) for src, m in label_map.items()), label_map
    samples: Iterable[Sample] = iter_samples(list(cfg.inputs), sys.stdin)
    if cfg.labels_kind == "csv":
        samples = map(csv_labeler(Path(str(cfg.labels)), ClassIndex.from_meta(meta)), samples)
    return samples, {}


def plan_files(cfg: ProtectConfig, engine: ProtectEngine) -> Plan:
    summary = new_summary(cfg, engine)
    samples, summary.label_map = file_samples(cfg, engine.meta)
    if cfg.single_file:  # one image in, the file --out names out: no folder, so no manifest or summary.json
        return Plan(samples, FileSink(cfg.out), summary, None, ResumeIndex(), None)
    settings = run_settings(engine, cfg.encode_options(), cfg.labels_kind)
    return Plan(samples, FolderSink(cfg.out), summary, cfg.out / MANIFEST_NAME,
                ResumeIndex.load(cfg.out / MANIFEST_NAME, settings), None, inside_out(cfg.out))


# ---------------------------------------------------------------- shards


def _check_pattern(pattern: str) -> None:
    try:
        name = pattern % 0
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--shard-pattern {pattern!r} needs one integer field such as %06d ({exc})") from None
    if hostile_reason(name) or "/" in name.replace("\\", "/"):
        raise UsageError(f"--shard-pattern {pattern!r} must be a plain file name inside --out")


def plan_shard_names(cfg: ProtectConfig, world_size: int) -> list[tuple[str, str]]:
    """Every input shard as (url, output name), in argument order; usage errors before any work."""
    if not cfg.inputs:
        raise UsageError("give at least one shard: a path, a brace pattern, pipe:CMD, or - with --shards")
    if STDIN in cfg.inputs and not cfg.stdin_tar:
        raise UsageError("- reads a list of paths; add --shards to read a tar stream from stdin")
    if list(cfg.inputs).count(STDIN) > 1:
        raise UsageError("- (a tar stream on stdin) can be given only once")
    if world_size > 1 and (cfg.to_stdout or STDIN in cfg.inputs):
        raise UsageError("under torchrun every rank needs its own shards: stdin / stdout tar streams cannot be shared")
    if cfg.shard_size is not None and cfg.to_stdout:
        raise UsageError("--shard-size writes shard files; it cannot be combined with --out -")
    if cfg.shard_size is not None:
        _check_pattern(cfg.shard_pattern)
    urls = [url for spec in cfg.inputs for url in expand_shard_spec(spec)]
    missing = [u for u in urls if u != STDIN and not u.startswith("pipe:") and "://" not in u and not Path(u).is_file()]
    if missing:
        raise UsageError(f"shard not found: {', '.join(missing[:5])}" + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    plan = [(url, shard_name(url, i)) for i, url in enumerate(urls)]
    names: dict[str, str] = {}
    for url, name in plan:
        if name in names:
            raise UsageError(f"{url} and {names[name]} would both be written as {name}; protect them into different --out folders")
        names[name] = url
    if not cfg.to_stdout:
        out = Path(cfg.out).resolve()
        inside = [u for u in urls if Path(u).is_file() and Path(u).resolve().parent == out]
        if inside:
            raise UsageError(f"--out {cfg.out} holds the input shard {inside[0]}; its output would replace it")
    return plan


def shard_resumes(cfg: ProtectConfig) -> bool:
    """Per-shard resume needs an output folder of one shard per input shard (re-sharding rewrites all)."""
    return not cfg.to_stdout and cfg.shard_size is None


def plan_shards(cfg: ProtectConfig, engine: ProtectEngine, ctx: DistContext, on_shard: Callable[[ShardState], None]) -> Plan:
    mine = rank_share(plan_shard_names(cfg, ctx.world_size), ctx)
    out = None if cfg.to_stdout else Path(cfg.out)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        remove_own_temps(out, [name for _, name in mine])
    todo = [(u, n) for u, n in mine if not (shard_resumes(cfg) and u != STDIN and is_done(out, n))]  # stdin may differ each run
    summary = new_summary(cfg, engine, ShardRunSummary, world_size=ctx.world_size)
    summary.shards["skipped"] = len(mine) - len(todo)
    ledger = ShardLedger()
    sink: Sink
    if out is None:
        sink = TarStreamSink(sys.stdout.buffer, ledger, on_shard)
    elif cfg.shard_size is not None:
        sink = ReshardSink(out, ledger, on_shard, Reshard(cfg.shard_size, cfg.shard_pattern, first=ctx.rank, step=ctx.world_size))
    else:
        sink = ShardFilesSink(out, ledger, on_shard, rank=ctx.rank)
    manifest = None if out is None else out / (rank_manifest_name(ctx.rank) if ctx.active else MANIFEST_NAME)
    samples: Iterable[Sample] = shard_samples(todo, ledger)
    if cfg.labels_kind == "cls":
        samples = cls_labeled(samples, ClassIndex.from_meta(engine.meta))
    elif cfg.labels_kind == "csv":
        samples = map(csv_labeler(Path(str(cfg.labels)), ClassIndex.from_meta(engine.meta)), samples)
    return Plan(samples, sink, summary, manifest, ResumeIndex(), refuse_hostile)


# ---------------------------------------------------------------- the run


def check_inputs(cfg: ProtectConfig, world_size: int = 1) -> None:
    """Every usage error the inputs can cause, found before any engine or worker starts."""
    if cfg.shard_mode:
        plan_shard_names(cfg, world_size)
    else:
        if launched_by_torchrun():
            # Every rank would protect every file; only shards are split across ranks.
            raise UsageError("torchrun splits WebDataset shards across ranks; protect folders and files with one process")
        validate_inputs(list(cfg.inputs), cfg.out)
    if cfg.labels is not None:
        assert cfg.weights is not None, "call checked() first"
        check_labels(cfg, read_meta(cfg.weights))


def run_protect(
    cfg: ProtectConfig,
    ctx: DistContext | None = None,
    on_record: Callable[[ManifestRecord], None] | None = None,
    on_shard: Callable[[ShardState], None] | None = None,
) -> RunSummary:
    """Protect every input; returns the summary, also written to summary.json (by rank 0).

    Raises UsageError before anything is written when the command line cannot run. Per-file
    problems never raise: they become failed records. Ctrl-C (KeyboardInterrupt) stops the run:
    what finished is recorded, summary.json says `interrupted`, and the summary is returned.
    """
    t0 = time.perf_counter()  # the run's wall time: engine start-up included, as the user waits for it
    ctx = ctx or DistContext(device=cfg.device)
    cfg = cfg.checked()
    check_inputs(cfg, ctx.world_size)
    engine = process_engine(EngineSpec(engine_config(cfg, ctx.device), cpu_threads_per_worker(cfg.workers), cfg.seed))
    writer: ManifestWriter | None = None

    def shard_done(state: ShardState) -> None:
        plan.summary.shards["failed" if state.error else "done"] += 1
        if state.error:
            plan.summary.failed_shards.append({"shard": state.name, "source": state.url, "error": state.error})
            if writer is not None:  # after its members' records: none of them reached a final shard
                writer.write(ManifestRecord(state.url, None, "failed", f"shard not written: {state.error}"))
        if on_shard:
            on_shard(state)

    plan = plan_shards(cfg, engine, ctx, shard_done) if cfg.shard_mode else plan_files(cfg, engine)
    writer = None if plan.manifest is None else ManifestWriter(plan.manifest)

    def record(rec: ManifestRecord) -> None:
        if writer is not None:
            writer.write(rec)
        plan.summary.add(rec.status)
        if on_record:
            on_record(rec)

    with interrupt_once():
        try:
            protect_stream(plan.samples, plan.sink, engine, cfg.encode_options(), record, cfg.workers, plan.resume, plan.guard,
                           seed=cfg.seed, ignore=plan.ignore, labels=cfg.labels_kind)
        except KeyboardInterrupt:
            plan.summary.interrupted = True
        finally:
            if writer is not None:
                writer.close()
        return finish_run(plan, cfg, ctx, t0)


def finish_run(plan: Plan, cfg: ProtectConfig, ctx: DistContext, t0: float) -> RunSummary:
    """Timing, rank merge and summary.json for a run whose stream has ended (done or interrupted)."""
    summary = plan.summary
    summary.wall_seconds = round(time.perf_counter() - t0, 3)
    summary.images_per_second = round(summary.counts["protected"] / max(summary.wall_seconds, 1e-9), 3)
    if isinstance(summary, ShardRunSummary):
        summary.stale_removed = list(getattr(plan.sink, "stale_removed", []))
        summary = merge_summaries([ShardRunSummary.from_json(s) for s in gather_objects(summary.to_json(), ctx)])
        if ctx.active and ctx.is_main and plan.manifest is not None:
            merge_rank_manifests(Path(cfg.out), ctx.world_size)
    if plan.manifest is not None and ctx.is_main:
        write_summary(Path(cfg.out) / SUMMARY_NAME, summary)
    return summary


# ---------------------------------------------------------------- --dry-run


def dry_run(cfg: ProtectConfig, emit: Callable[[str], None]) -> dict:
    """List what a run would do (protect / skip / ignore, tab-separated with source and target or reason) without decoding
    or writing anything; returns the --json payload. Shards: one line per input shard (done markers);
    what a shard holds is only known by reading it."""
    cfg = cfg.checked()
    if launched_by_torchrun():
        raise UsageError("--dry-run runs in one process; drop torchrun")
    check_inputs(cfg)
    if cfg.shard_mode:
        counts = {"protect": 0, "skip": 0}
        for url, name in plan_shard_names(cfg, world_size=1):
            action = "skip" if shard_resumes(cfg) and url != STDIN and is_done(Path(cfg.out), name) else "protect"
            counts[action] += 1
            target = STDIN if cfg.to_stdout else str(Path(cfg.out) / (cfg.shard_pattern + " (re-sharded)" if cfg.shard_size else name))
            emit(f"{action}\t{url}\t{target}")
        return {"dry_run": True, "shards": counts}
    assert cfg.weights is not None
    meta = read_meta(cfg.weights)
    epsilon = float(cfg.epsilon if cfg.epsilon is not None else meta.epsilon)
    sha = file_sha256(cfg.weights)
    summary = RunSummary(
        cgan_version=__version__, weights={"path": str(cfg.weights), "sha256": sha, "metadata": meta.described()}, epsilon=epsilon,
        device=cfg.device, precision=cfg.precision, working_size=meta.working_size, full_res=cfg.full_res, out=str(cfg.out),
        seed=cfg.seed, dry_run=True, labels=cfg.labels,
    )
    options = cfg.encode_options()
    resume = ResumeIndex.load(cfg.out / MANIFEST_NAME, settings_key(sha, epsilon, cfg.full_res, cfg.format, cfg.quality,
                                                                     cfg.labels_kind, mask_floor_for(cfg.mask_floor, meta)))
    samples, summary.label_map = file_samples(cfg, meta)
    inside = None if cfg.single_file else inside_out(cfg.out)
    for sample in samples:
        ignored = sample.ignored or (inside(sample) if inside else None)
        if ignored is not None:
            summary.add("ignored")
            emit(f"ignore\t{sample.id}\t{ignored}")
            continue
        if sample.label_error is not None:
            summary.add("failed")
            emit(f"fail\t{sample.id}\t{sample.label_error}")
            continue
        rel = output_name(sample.rel_out, options)
        done = resume.lookup(rel, lambda r: (cfg.out / r).is_file())
        try:
            skip = done is not None and hashlib.sha256(sample.read()).hexdigest() == done.sha256_in
        except OSError as exc:
            summary.add("failed")
            emit(f"fail\t{sample.id}\tcannot read: {exc.strerror or exc}")
            continue
        summary.add("skipped" if skip else "protected")
        emit(f"{'skip' if skip else 'protect'}\t{sample.id}\t{cfg.out if cfg.single_file else cfg.out / rel}")
    return asdict(summary)
