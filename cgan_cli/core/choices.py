"""Every closed list of names the command line offers, as typer `Enum` choices, plus cheap option checks.

Torch-free on purpose: the CLI imports this to build its help and to reject a bad option within
milliseconds, before any torch import or worker start.
"""

from __future__ import annotations

from enum import Enum

from cgan_cli.core.errors import UsageError

STDIN = "-"  # as SRC: paths (or with --shards a tar) on stdin; as --out: a tar stream on stdout
EPSILON_RANGE = (1.0, 255.0)  # /255 units; below 1 no 8-bit pixel changes


class OutputFormat(str, Enum):
    png = "png"
    jpeg = "jpeg"
    webp = "webp"
    jpg = "jpg"  # alias of jpeg (typer matches case-insensitively: JPG works too)

    @property
    def canonical(self) -> str:
        return "jpeg" if self is OutputFormat.jpg else self.value


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class ModelOutputs(str, Enum):
    """What an audited model returns per image: `auto` tells probabilities (rows >= 0 summing to 1) from logits."""

    auto = "auto"
    logits = "logits"
    probs = "probs"


class AuditControls(str, Enum):
    """The null patterns of `cgan audit` (learning/audit.py `control_tiles`; docs/audit.md says when to use which)."""

    shuffled = "shuffled"  # each tile's pixel positions shuffled: same values, mean, norm
    balanced = "balanced"  # shuffled, with signs flipped so each channel averages ~0: same norm, no mean


class GeneratorArch(str, Enum):
    """Trainable generators (core/generators.py); v3 is what the shipped weights use."""

    v3 = "confounder-v3"
    v4 = "confounder-v4"
    v2 = "confounder-v2"


class TileBank(str, Enum):
    """The class tiles' initial draw in `cgan train` (learning/tiles.py `INITIAL_TILES`)."""

    far_apart = "far-apart"  # random +-1 tiles, greedily far apart under the victim's shift + flip
    structured = "structured"  # +-DC, stripes and checkerboards: a different shift-invariant pattern per class


class VictimArch(str, Enum):
    cnn = "cnn"
    resnet18 = "resnet18"


class Baseline(str, Enum):
    random = "random"
    classwise = "classwise"
    em = "em"


COUNTERMEASURES = {  # spec form -> what it does; learning/countermeasures.py REGISTRY builds exactly these
    "none": "the plain victim recipe",
    "jpeg:Q": "re-encode training images as JPEG at quality Q (e.g. jpeg:75)",
    "grayscale": "replace every channel by the luma (no-op on 1-channel data)",
    "blur:SIGMA": "Gaussian blur with standard deviation SIGMA pixels (e.g. blur:1)",
    "rescale:F": "downscale by factor F, then upscale back (e.g. rescale:2)",
    "strong-aug": "cutout (half-side square) + mixup on every training batch",
    "adv:EPS": "PGD adversarial training at L-inf radius EPS/255, 3 steps (e.g. adv:4)",
}


def check_epsilon(epsilon: float | None) -> None:
    low, high = EPSILON_RANGE
    if epsilon is not None and not low <= epsilon <= high:
        raise UsageError(f"--epsilon {epsilon:g}: must be in [{low:g}, {high:g}] (/255 units; below 1 no 8-bit pixel changes)")


def check_device_name(name: str) -> None:
    """The spelling of --device, checked without touching CUDA."""
    _, _, idx = name.partition(":")
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and idx.isdigit()):
        raise UsageError(f"--device {name}: expected auto, cpu, cuda or cuda:N")


def parse_floats(option: str, text: str) -> tuple[float, ...]:
    """'0.5' or '0.485,0.456,0.406' (one value, or one per channel) -> floats; for --mean / --std."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected a number or comma-separated numbers, e.g. 0.5 or 0.485,0.456,0.406") from None
    if len(values) not in (1, 3):
        raise UsageError(f"{option} {text!r}: give 1 value or 3 (one per channel)")
    return values
