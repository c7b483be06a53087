"""The run's record: manifest.jsonl (one JSON line per input, flushed as it happens) and summary.json.

manifest.jsonl is append-only across runs, so a killed run loses at most the line being written and
a rerun can see what is done. The last record for an output wins. `ResumeIndex` reads it back: an
output recorded as protected (or skipped) whose source still hashes the same and whose file still
exists is not redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cgan_cli.core.atomic import write_atomic

MANIFEST_NAME = "manifest.jsonl"
SUMMARY_NAME = "summary.json"
STATUSES = ("protected", "skipped", "failed", "ignored")  # ignored: not an input of this run (the reason in `error`)


@dataclass
class ManifestRecord:
    """One input's outcome.

    linf (/255 units) and psnr (dB) measure the change cgan made: protected pixels vs the decoded
    source, exactly what a lossless output holds. A lossy re-encode (JPEG, lossy WebP) adds its own
    error on top; written_linf / written_psnr measure the re-decoded output (--measure-written).
    """

    source: str
    output: str | None
    status: str  # protected | skipped | failed | ignored (a file in a folder that is no input: hidden, not an image)
    error: str | None = None  # why it failed, or why it was ignored
    width: int | None = None
    height: int | None = None
    mode: str | None = None  # the source's PIL mode, e.g. RGB, L, RGBA, I;16
    format: str | None = None  # the source's format, e.g. JPEG, PNG
    bytes_in: int | None = None
    bytes_out: int | None = None
    sha256_in: str | None = None
    sha256_out: str | None = None
    linf: float | None = None  # max |protected - original| over colour channels, /255 units
    psnr: float | None = None  # dB over colour channels; null when nothing changed
    ssim: float | None = None  # mean SSIM (11x11 Gaussian window) over colour channels; with --measure-ssim
    written_linf: float | None = None  # the same, measured on the re-decoded output (--measure-written)
    written_psnr: float | None = None
    seconds: float | None = None
    settings: str | None = None  # settings_key() of the run: resume only reuses outputs made the same way
    code: int | None = None  # the generator code (pattern) the image got
    code_source: str | None = None  # "label" (from --labels) | "guess" (the generator's encoder)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False, allow_nan=False)

    def mark_failed(self, error: str) -> None:
        """No output after all (its write failed): the record keeps nothing that describes one."""
        self.status, self.error = "failed", error
        self.linf = self.psnr = self.ssim = self.written_linf = self.written_psnr = self.bytes_out = self.sha256_out = None

    def round_measurements(self) -> None:
        """4 decimals of L-inf and 3 of PSNR: enough to read, stable across platforms."""
        for name, digits in (("linf", 4), ("written_linf", 4), ("psnr", 3), ("written_psnr", 3), ("ssim", 5)):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, round(value, digits))


def settings_key(weights_sha256: str, epsilon: float, full_res: bool, fmt: str | None, quality: int | None,
                 labels: str | None = None, mask_floor: float = 1.0) -> str:
    """A short fingerprint of everything that changes an output's bytes, so resume never reuses an
    output made with other weights, epsilon, mode, format, code source (guessed vs labeled) or mask.
    Without labels and mask it is the key of runs made before those existed."""
    parts: list = [weights_sha256, float(epsilon), bool(full_res), fmt, quality]
    if labels:
        parts.append(labels)
    if mask_floor < 1.0:
        parts.append(float(mask_floor))
    text = json.dumps(parts)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class RunSummary:
    """summary.json: what ran, with which weights, and how it went."""

    cgan_version: str
    weights: dict[str, Any]  # path, sha256, metadata
    epsilon: float
    device: str
    precision: str
    working_size: int
    full_res: bool
    out: str
    seed: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STATUSES})
    total: int = 0
    wall_seconds: float = 0.0
    images_per_second: float = 0.0  # protected images per wall-clock second of the run (the progress bar ends on it)
    dry_run: bool = False
    interrupted: bool = False  # stopped by Ctrl-C (SIGINT); a rerun of the same command resumes
    labels: str | None = None  # --labels: folders | cls | the CSV path; None = codes guessed by the generator
    label_map: dict[str, dict[str, int]] = field(default_factory=dict)  # --labels folders: input folder -> {class folder: code}

    def add(self, status: str) -> None:
        self.counts[status] += 1
        self.total += 1

    @property
    def exit_code(self) -> int:
        return 1 if self.counts["failed"] else 0

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(asdict(self), indent=indent, sort_keys=False)


class ManifestWriter:
    """Appends one line per record and flushes it, so an outside reader (or a rerun) sees it at once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: TextIO = open(self.path, "a+", encoding="utf-8")
        self._terminate_partial_line()

    def _terminate_partial_line(self) -> None:
        """A SIGKILL mid-write can leave a last line without newline; never glue a record onto it."""
        size = self._fh.seek(0, os.SEEK_END)
        if size:
            with open(self.path, "rb") as raw:
                raw.seek(size - 1)
                if raw.read(1) != b"\n":
                    self._fh.write("\n")

    def write(self, record: ManifestRecord) -> None:
        self._fh.write(record.to_json() + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


@dataclass
class DoneEntry:
    sha256_in: str
    sha256_out: str | None
    bytes_out: int | None
    code: int | None = None
    code_source: str | None = None


class ResumeIndex:
    """Which outputs an earlier run finished, keyed by output id (only the hashes are kept in memory)."""

    def __init__(self, done: dict[str, DoneEntry] | None = None) -> None:
        self.done = done or {}

    @classmethod
    def load(cls, manifest: Path, settings: str | None = None) -> "ResumeIndex":
        """Index an earlier manifest; with `settings`, only records made with the same settings count."""
        done: dict[str, DoneEntry] = {}
        if not Path(manifest).is_file():
            return cls(done)
        with open(manifest, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    output = rec["output"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
                same = settings is None or rec.get("settings") == settings
                if rec.get("status") in ("protected", "skipped") and rec.get("sha256_in") and same:
                    done[output] = DoneEntry(rec["sha256_in"], rec.get("sha256_out"), rec.get("bytes_out"), rec.get("code"), rec.get("code_source"))
                elif output is not None:
                    done.pop(output, None)  # a later failure supersedes an earlier success
        return cls(done)

    def lookup(self, output: str, exists: Callable[[str], bool]) -> DoneEntry | None:
        """What an earlier run recorded for `output`, if it finished it and the file is still there.

        The caller still compares the source's current sha256 with `sha256_in` before skipping.
        """
        entry = self.done.get(output)
        if entry is None or not exists(output):
            return None
        return entry


def write_summary(path: Path, summary: RunSummary) -> None:
    """summary.json, written atomically like every other file cgan writes."""
    write_atomic(path, summary.to_json(indent=2) + "\n")


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


def rank_manifest_name(rank: int) -> str:
    """Under torchrun each rank appends to its own manifest part; rank 0 merges them at the end."""
    return f"manifest.rank{rank}.jsonl"


def merge_rank_manifests(out: Path, world_size: int) -> None:
    """Rank 0 appends every rank's manifest to manifest.jsonl (streamed), then removes the rank files."""
    with open(out / MANIFEST_NAME, "ab") as dst:
        for rank in range(world_size):
            part = out / f"{rank_manifest_name(rank)}"
            if part.is_file():
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst)
                part.unlink()
