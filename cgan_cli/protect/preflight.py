"""What `cgan protect` checks before torch or any worker starts, so every usage error answers in
well under a second: options, the weights file and its metadata, the inputs, the default --out,
what stdin holds. Torch-free on purpose (the CLI calls it before starting the fork server).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from cgan_cli.core.choices import STDIN
from cgan_cli.core.errors import UsageError
from cgan_cli.core.formats import format_for_output_name
from cgan_cli.core.weights import read_meta
from cgan_cli.protect.config import ProtectConfig
from cgan_cli.protect.manifest import MANIFEST_NAME, SUMMARY_NAME
from cgan_cli.protect.sources import (
    count_until_image,
    looks_like_tar,
    peek_stdin,
    validate_inputs,
)

DEFAULT_OUT_SUFFIX = "-protected"  # ./photos -> ./photos-protected, photo.jpg -> photo-protected.jpg


@dataclass
class Preflight:
    """The config to run (defaults filled in), lines to show first, and why there is nothing to do."""

    cfg: ProtectConfig
    notes: list[str] = field(default_factory=list)
    nothing_to_do: str | None = None


def default_out(src: str) -> Path:
    """Next to the input: a folder `X` -> `X-protected`, a file `a.jpg` -> `a-protected.jpg`."""
    path = Path(src)
    if path.name in ("", ".", ".."):
        path = path.resolve()
    if path.is_dir():
        return path.with_name(path.name + DEFAULT_OUT_SUFFIX)
    return path.with_name(path.stem + DEFAULT_OUT_SUFFIX + path.suffix)


def written_by_cgan(folder: Path) -> bool:
    """An earlier protect run's output folder (it holds that run's manifest or summary)."""
    return (folder / MANIFEST_NAME).is_file() or (folder / SUMMARY_NAME).is_file()


def _resolve_out(cfg: ProtectConfig, notes: list[str]) -> ProtectConfig:
    if cfg.out is not None:
        return cfg
    if len(cfg.inputs) != 1 or cfg.inputs[0] == STDIN:
        raise UsageError("--out is required with several inputs or with - (stdin); e.g. --out ./protected")
    if cfg.shard_mode:
        raise UsageError("--out is required with shards: a folder for the protected shards, or - for a tar stream on stdout")
    out = default_out(cfg.inputs[0])
    if out.is_dir() and any(out.iterdir()) and not written_by_cgan(out):
        raise UsageError(f"the default output {out} exists and was not written by cgan (no {MANIFEST_NAME}); "
                         "pass --out to choose where the protected copies go")
    notes.append(f"--out not given: writing to {out}")
    return replace(cfg, out=out)


def _check_out(cfg: ProtectConfig) -> ProtectConfig:
    out = Path(cfg.out)
    if cfg.single_file:
        if out.exists():
            raise UsageError(f"--out {out} exists; cgan does not overwrite a file it did not write in this run "
                             "(delete it or choose another name)")
        if cfg.format is None:
            try:
                return replace(cfg, format=format_for_output_name(out.name, cfg.inputs[0]))
            except ValueError as exc:
                raise UsageError(f"--out {out}: {exc}") from None
        return cfg
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file; give a folder (or, for one image in, an image file name)")
    return cfg


def _sniff_stdin(cfg: ProtectConfig, notes: list[str]) -> ProtectConfig:
    """`-` without --shards: a tar on stdin is read as --shards; other binary data is refused."""
    import sys

    if STDIN not in cfg.inputs or cfg.stdin_tar or sys.stdin is None or sys.stdin.isatty():
        return cfg
    head = peek_stdin()
    if looks_like_tar(head):
        notes.append("stdin holds a tar stream: reading it as --shards")
        return replace(cfg, stdin_tar=True)
    if b"\0" in head:
        raise UsageError("stdin is binary data, not a list of paths; for a tar stream add --shards")
    return cfg


def preflight(cfg: ProtectConfig) -> Preflight:
    """Every check that needs no torch; raises UsageError (exit 2, nothing written)."""
    notes: list[str] = []
    cfg = _resolve_out(_sniff_stdin(cfg, notes), notes)
    checked = cfg.checked()
    assert checked.weights is not None
    if not Path(checked.weights).is_file():
        raise UsageError(f"weights file not found: {checked.weights}")
    meta = read_meta(checked.weights)
    if cfg.epsilon is not None and cfg.epsilon > meta.epsilon:
        notes.append(f"warning: --epsilon {cfg.epsilon:g} is above the {meta.epsilon:g}/255 these weights were trained for: "
                     "stronger, likelier visible noise whose protection was never measured")
    if cfg.to_stdout or cfg.shard_mode:
        return Preflight(cfg, notes)  # shard names are checked by run.plan_shard_names
    cfg = _check_out(cfg)
    validate_inputs(list(cfg.inputs), cfg.out)
    if STDIN not in cfg.inputs:
        any_image, ignored = count_until_image(list(cfg.inputs))
        if not any_image:
            where = ", ".join(cfg.inputs)
            also = f" ({ignored} file{'s' if ignored != 1 else ''} ignored: not images or hidden; nothing written)" if ignored else ""
            return Preflight(cfg, notes, f"nothing to protect: no images under {where}{also}")
    return Preflight(cfg, notes)
