"""What `cgan protect` shows and returns: progress, per-file failures, the closing line, the exit code.

A progress bar (images/s, ETA) on stderr when stderr is a terminal (also when stdout is piped, as in
`--json | jq`); with --json one JSON line (on stderr when stdout carries a tar stream); failed files,
the closing line (counts, where the files went) and a count of ignored files (not images, hidden,
inside --out) with a pointer to the manifest always on stderr. Exit codes: 0 every input protected,
skipped or ignored, 1 any failure, 2 usage error, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from cgan_cli.core.errors import INTERRUPTED, UsageError, interrupted_line
from cgan_cli.protect.distributed import init_distributed, shutdown
from cgan_cli.protect.manifest import (
    MANIFEST_NAME,
    ManifestRecord,
    RunSummary,
    ShardRunSummary,
)
from cgan_cli.protect.run import ProtectConfig, dry_run, run_protect
from cgan_cli.protect.sources import ShardState, count_samples
from cgan_cli.protect.tars import OutputClosed


def rate_text(summary: RunSummary) -> str:
    """Protected images per wall-clock second, or why there is no such number."""
    c = summary.counts
    if not c["protected"] and c["skipped"] and c["skipped"] == summary.total - c.get("ignored", 0):
        return f"all {c['skipped']} skipped (already protected)"
    return f"{summary.images_per_second:.1f} img/s"


class _RateColumn(ProgressColumn):
    """Protected images per second of the bar's wall time; at the end exactly the summary's figure."""

    def render(self, task: Task) -> Text:
        if task.fields.get("final"):
            return Text(task.fields["final"])
        protected, elapsed = task.fields.get("protected", 0), task.elapsed or 0.0
        return Text(f"{protected / elapsed:.1f} img/s" if protected and elapsed else "-- img/s")


def _progress() -> Progress:
    columns = [TextColumn("[bold]protect"), BarColumn(), MofNCompleteColumn(), _RateColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=Console(stderr=True), transient=False)


def _closing_line(cfg: ProtectConfig, summary: RunSummary) -> str:
    c = summary.counts
    if isinstance(summary, ShardRunSummary):
        s = summary.shards
        return (f"shards: {s['done']} written, {s['skipped']} already done, {s['failed']} failed; members: "
                f"protected {c['protected']}, passed through {c['skipped']}, failed {c['failed']} -> {cfg.out}")
    ignored = f", ignored {c['ignored']}" if c.get("ignored") else ""
    rate = rate_text(summary)
    if rate.startswith("all "):
        return f"{rate}{ignored} -> {cfg.out}"
    return f"protected {c['protected']}, skipped {c['skipped']}, failed {c['failed']}{ignored} -> {cfg.out} ({rate})"


def _ignored_line(cfg: ProtectConfig, summary: RunSummary) -> str | None:
    """Files found in input folders that were not inputs: never silent, always on stderr."""
    ignored = summary.counts.get("ignored", 0)
    if not ignored:
        return None
    what = "file that is no input" if ignored == 1 else "files that are no inputs"
    return f"ignored {ignored} {what} (not images, hidden, or inside --out): see {cfg.out / MANIFEST_NAME}"


def _run(cfg: ProtectConfig, err: Console, tty: bool) -> tuple[RunSummary, bool]:
    """Run with the right feedback; returns the summary and whether this process reports it (rank 0)."""
    def failed(rec: ManifestRecord, console: Console = err) -> None:
        if rec.status == "failed":
            console.print(Text.assemble(("failed ", "red"), f"{rec.source}: {rec.error}"))

    def shard_failed(state: ShardState) -> None:
        if state.error:
            err.print(f"failed shard {state.name}: {state.error}", markup=False)

    if cfg.shard_mode:
        ctx = init_distributed(cfg.device)
        try:
            return run_protect(cfg, ctx, on_record=failed, on_shard=shard_failed), ctx.is_main
        finally:
            shutdown(ctx)
    if not tty:
        return run_protect(cfg, on_record=failed), True
    with _progress() as bar:
        task = bar.add_task("protect", total=count_samples(list(cfg.inputs)), protected=0)
        protected = 0

        def show(rec: ManifestRecord) -> None:
            nonlocal protected
            protected += rec.status == "protected"
            bar.update(task, advance=1, protected=protected)
            failed(rec, bar.console)

        summary = run_protect(cfg, on_record=show)
        bar.update(task, final=rate_text(summary))
        return summary, True


def protect_cli(cfg: ProtectConfig, json_out: bool = False) -> int:
    """Run `cgan protect` as parsed by the CLI; returns the exit code (0 / 1 / 2), the same on every rank."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    json_stream = sys.stderr if cfg.to_stdout else sys.stdout
    try:
        if cfg.dry_run:
            payload = dry_run(cfg, emit=(lambda line: None) if json_out else print)
            if json_out:
                print(json.dumps(payload, separators=(",", ":")))
            elif not cfg.shard_mode and sys.stdout.isatty():
                c = payload["counts"]
                print(f"would protect {c['protected']}, skipped {c['skipped']}, failed {c['failed']}, "
                      f"ignored {c.get('ignored', 0)} -> {cfg.out}")
            return 0
        summary, reports = _run(cfg, err, tty=sys.stderr.isatty() and not cfg.shard_mode)
    except UsageError as exc:
        err.print(f"cgan protect: error: {exc}", markup=False)
        return 2
    except KeyboardInterrupt:  # before the run started: nothing was written
        err.print(interrupted_line(0), markup=False)
        return INTERRUPTED
    except OutputClosed as exc:
        # Point stdout at /dev/null so the interpreter's final flush cannot raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        err.print(f"cgan protect: stopped: {exc}; the output is incomplete", markup=False)
        return 1
    if not reports:
        return INTERRUPTED if summary.interrupted else summary.exit_code
    if json_out:
        print(json.dumps(asdict(summary), separators=(",", ":")), file=json_stream)
    if summary.interrupted:
        err.print(interrupted_line(summary.counts["protected"]), markup=False)
        return INTERRUPTED
    err.print(_closing_line(cfg, summary), markup=False)
    if isinstance(summary, ShardRunSummary) and summary.stale_removed:
        err.print(f"removed {len(summary.stale_removed)} shard(s) an earlier run had written past the new last one: "
                  + ", ".join(sorted(summary.stale_removed)), markup=False)
    if not isinstance(summary, ShardRunSummary) and (line := _ignored_line(cfg, summary)) is not None:
        err.print(line, markup=False)
    return summary.exit_code
