"""What `cgan protect` was asked to do: one dataclass whose defaults are the CLI's defaults (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from cgan_cli.core.choices import STDIN, check_device_name, check_epsilon
from cgan_cli.core.errors import UsageError
from cgan_cli.core.formats import FORCED_FORMATS, EncodeOptions, is_image_name
from cgan_cli.core.shipped import default_weights
from cgan_cli.protect.workers import default_workers


@dataclass(frozen=True)
class ProtectConfig:
    """Everything `cgan protect` was asked to do; the CLI's defaults are these."""

    inputs: tuple[str, ...]
    out: Path  # the CLI fills in a default (protect/preflight.py) before anything runs
    weights: Path | None = None  # None = the shipped default, which must exist (never random weights)
    epsilon: float | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 16
    workers: int = field(default_factory=default_workers)  # worker processes (0 = all in the main process)
    seed: int = 0
    format: str | None = None
    quality: int | None = None
    full_res: bool = False
    mask_floor: float | None = None  # local-activity mask floor (1 = none); None = the weights' own (core/noise.py)
    dry_run: bool = False
    measure_written: bool = False
    measure_ssim: bool = False
    stdin_tar: bool = False  # `-` is a tar stream on stdin (without it, `-` is a list of paths)
    shard_size: int | None = None  # re-shard: at most this many samples (keys) per output shard
    shard_pattern: str = "shard-%06d.tar"
    labels: str | None = None  # folders | cls | a CSV file of path,label; None = the generator guesses each code

    @property
    def labels_kind(self) -> str | None:
        """folders | cls | csv | None: what the resume fingerprint records about where codes came from."""
        if self.labels is None:
            return None
        return self.labels if self.labels in ("folders", "cls") else "csv"

    @property
    def to_stdout(self) -> bool:
        return str(self.out) == STDIN

    @property
    def shard_mode(self) -> bool:
        """Tar in or out: any shard-like SRC, a tar on stdin, re-sharding, or a tar stream to stdout."""
        from cgan_cli.core.urls import (
            looks_like_shards,  # webdataset imports torch: not at CLI start
        )

        return (self.stdin_tar or self.shard_size is not None or self.to_stdout
                or any(s != STDIN and looks_like_shards(s) for s in self.inputs))

    @property
    def single_file(self) -> bool:
        """One image file in, one image file out: SRC is one file and --out has an image suffix."""
        if len(self.inputs) != 1 or self.inputs[0] == STDIN or not is_image_name(str(self.out)) or Path(self.out).is_dir():
            return False
        return Path(self.inputs[0]).is_file() and not self.shard_mode

    def checked(self) -> "ProtectConfig":
        """Usage errors in the options themselves (cheap: no torch work); the weights path resolved."""
        if self.format is not None and self.format not in FORCED_FORMATS:
            raise UsageError(f"--format {self.format}: expected one of {', '.join(FORCED_FORMATS)}")
        check_epsilon(self.epsilon)
        check_device_name(self.device)
        if self.labels_kind == "csv" and not Path(str(self.labels)).is_file():
            raise UsageError(f"--labels {self.labels}: expected folders, cls, or a CSV file of path,label rows (file not found)")
        weights = self.weights or default_weights()
        if weights is None:
            raise UsageError(
                "no shipped default weights were found in this installation; pass --weights FILE.safetensors, "
                "or train a generator first with `cgan train` (cgan never protects with random weights)"
            )
        return replace(self, weights=weights)

    def encode_options(self) -> EncodeOptions:
        return EncodeOptions(self.format, self.quality, self.measure_written, self.measure_ssim)


@dataclass(frozen=True)
class PreviewConfig:
    """What `cgan preview` was asked to show; the CLI's defaults are these."""

    inputs: tuple[str, ...]
    out: Path = Path("preview.png")
    weights: Path | None = None  # None = the shipped default
    epsilon: float | None = None
    device: str = "auto"
    full_res: bool = False
    count: int = 4  # inputs shown (rows)
    amplify: float = 10.0  # the noise column: the change times this, around mid-gray
    height: int = 256  # pixels per row

    def checked(self) -> "PreviewConfig":
        """The same option checks and default weights as protect."""
        protect = ProtectConfig(self.inputs, self.out, self.weights, epsilon=self.epsilon, device=self.device, workers=0).checked()
        if not is_image_name(str(self.out)) or Path(self.out).suffix.lower() != ".png":
            raise UsageError(f"--out {self.out}: the preview is a PNG file; give a name ending in .png")
        return replace(self, weights=protect.weights)
