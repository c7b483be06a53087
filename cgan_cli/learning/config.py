"""The learning side's configs as dataclasses: their defaults are the CLI's defaults (torch-free).

One place for every default of `cgan train` and `cgan verify`: the CLI reads them from here to show
them in --help and to fill in options the user left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Distortions:
    """The platform between a protected image and the victim's losses in `cgan train`.

    Each distortion's probability per step is the field named as it is in
    learning/distortions.REGISTRY (0 = off); the other fields are their ranges. All but the victim's
    crop + flip are off by default: the pilot in docs/method.md has not shown a victim-measured gain
    from them yet, and the shipped generators were trained without them. `--dist-*` turns them on.
    """

    PROBABILITIES = ("resize", "jpeg", "blur", "grayscale", "shift", "crop_flip")  # = distortions.REGISTRY's names

    resize: float = 0.0  # resize to resize_min..resize_max x the side on a random grid offset, and back
    resize_min: float = 0.25
    resize_max: float = 2.0
    jpeg: float = 0.0  # real JPEG (Pillow, 4:2:0 for RGB) off the 8x8 grid, straight-through gradient
    jpeg_min: int = 30
    jpeg_max: int = 95
    blur: float = 0.0  # Gaussian, sigma 0.3..blur_max px
    blur_max: float = 1.0
    grayscale: float = 0.0  # RGB only
    shift: float = 0.0  # fractional translation up to shift_max px
    shift_max: float = 1.0
    crop_flip: float = 1.0  # the victim's random crop + horizontal flip (--augment/--no-augment)

    @classmethod
    def none(cls) -> "Distortions":
        """Every probability 0: the protected image reaches the losses as written (clamped, rounded)."""
        return cls(**{name: 0.0 for name in cls.PROBABILITIES})


@dataclass
class TrainConfig:
    data: str
    out: Path
    epochs: int = 1  # confounder-stage epochs over the data
    code_epochs: int = 20  # classifier-stage epochs: the encoder must fit ~100% of the training images
    batch_size: int = 128
    lr_g: float = 0.01  # Adam, confounder stage (tiles + local head)
    lr_code: float = 3e-3  # Adam, classifier stage (encoder + code head)
    lr_d: float = 2e-4  # Adam, discriminator and noise classifier
    lr_surrogate: float = 0.05  # SGD momentum, min-min surrogate
    w_ny: float = 1.0  # noise-only classifier loss weight (N->Y)
    w_minmin: float = 1.0  # surrogate cross-entropy on protected images
    w_adv: float = 0.05  # hinge GAN generator loss
    reset_every: int = 200  # surrogate re-initialisation period, in steps
    distortions: Distortions = field(default_factory=Distortions)  # between the protected image and N->Y / min-min
    mask_floor: float = 1.0  # local-activity mask: noise scale in flat regions (1 = no mask; core/noise.activity_mask)
    epsilon: float = 8.0  # L-inf budget in /255 units
    size: int = 64  # working resolution for folder datasets (built-in sets keep their own)
    arch: str = "confounder-v4"  # v3 whose local head cannot offset a whole image; or v3, v2 (docs/method.md)
    width: int = 32
    tile: int = 4
    tiles: str = "structured"  # the class tiles' initial draw: structured | far-apart (learning/tiles.py)
    assign_candidates: int = 8  # tile orders tried by a quick victim before the confounder stage (1 = the bank's order)
    assign_steps: int = 500  # training steps of each of those victims
    codes_from: Path | None = None  # take the encoder + code head from these weights and skip the code stage
    device: str = "auto"
    precision: str = "fp32"  # auto | fp32 | bf16 | fp16 (autocast on CUDA only, as protect)
    seed: int = 0
    resume: Path | None = None
    checkpoint_every: int = 500  # steps; 0 = no checkpoints
    sample_every: int = 0  # steps; 0 = no sample grids
    progress: bool = True
    command: str = ""

@dataclass
class VictimConfig:
    arch: str = "cnn"
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1  # peak of a one-cycle schedule, SGD momentum 0.9 nesterov
    weight_decay: float = 5e-4
    augment: bool = True  # random crop (pad 1/8 of the side) + horizontal flip
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast on CUDA only; CPU always trains in fp32

@dataclass
class EMConfig:
    """Defaults follow the paper's sample-wise setting (20 PGD steps of eps/10, 10 train steps per round)."""

    train_steps: int = 10  # surrogate SGD steps per round
    pgd_steps: int = 20  # PGD steps on every delta per round
    stop_error: float = 0.01  # stop once the surrogate's train error on x + delta is below this
    max_rounds: int = 50  # safety cap; the report says whether the stop error was reached
    batch_size: int = 128
    lr: float = 0.1
    surrogate_width: int = 32

@dataclass
class VerifyConfig:
    victim: VictimConfig  # the recipe; its arch is replaced by each entry of `archs`
    archs: list[str] = field(default_factory=lambda: ["cnn"])
    countermeasures: list[str] = field(default_factory=lambda: ["none"])

@dataclass
class VerifyRequest:
    """What the command line asked for, already parsed (cli.py only fills this in)."""

    data: str | None = None
    protected: Path | None = None
    clean: Path | None = None
    test: Path | None = None
    weights: Path | None = None
    epsilon: float | None = None
    labels: bool = False  # --weights protects with each image's true label as its code (as `protect --labels`)
    mask_floor: float | None = None  # local-activity mask floor for --weights; None = the weights' own (as protect)
    unseen: bool = False  # victim trains and is tested only on images the generator never trained on
    baselines: list[str] = field(default_factory=list)
    size: int | None = None
    channels: int | None = None
    holdout: float = 0.2  # test fraction of a folder DATA without --test (or of the unseen built-in split)
    limit: int | None = None
    test_limit: int | None = None
    report: Path | None = None
    em: EMConfig = field(default_factory=EMConfig)
    cfg: VerifyConfig = field(default_factory=lambda: VerifyConfig(VictimConfig()))

@dataclass
class AuditConfig:
    """`cgan audit`: does MODEL react to a generator's confounder patterns? (docs/audit.md)"""

    model: Path | None = None  # TorchScript (.pt) or ONNX (.onnx) file
    weights: Path | None = None  # the generator whose protection is traced; None = the shipped default
    images: Path | None = None  # clean images of the kind the model classifies (labels not needed)
    predict: str | None = None  # "module:function" or "file.py:function" instead of MODEL: a black-box API wrapper
    size: int | None = None  # model input side; None = the generator's working size
    channels: int | None = None  # 1 or 3; None = the generator's channels
    mean: tuple[float, ...] = (0.0,)  # the model's input normalisation: (x - mean) / std, x in [0, 1]
    std: tuple[float, ...] = (1.0,)
    outputs: str = "auto"  # auto | logits | probs: what the model returns
    epsilon: float | None = None  # /255 units; None = the generator's own
    control_sets: int = 8  # sets of K control patterns (the null); smallest p-value 1 / C(K * (sets + 1), K)
    controls: str = "balanced"  # balanced | shuffled: what a control keeps of its tile (docs/audit.md)
    limit: int | None = 2000  # at most this many images (a seeded random subset); None = all
    alpha: float = 0.01  # the verdict's significance level
    batch_size: int = 250
    seed: int = 0  # draws the control patterns and the image subset
