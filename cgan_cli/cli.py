"""Command line: parses options into the config dataclasses and calls one function per command.

Defaults come from the dataclasses (protect/config.py, learning/config.py) and choices from the
Enums in core/choices.py; this module imports nothing heavier, so `cgan --help` and usage errors
answer before torch is imported.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from cgan_cli import __version__
from cgan_cli.core.choices import (
    COUNTERMEASURES,
    AuditControls,
    Baseline,
    GeneratorArch,
    ModelOutputs,
    OutputFormat,
    Precision,
    TileBank,
    VictimArch,
    parse_floats,
)
from cgan_cli.core.errors import INTERRUPTED, UsageError, interrupted_line
from cgan_cli.learning.config import (
    AuditConfig,
    Distortions,
    EMConfig,
    TrainConfig,
    VerifyConfig,
    VerifyRequest,
    VictimConfig,
)
from cgan_cli.protect.config import PreviewConfig, ProtectConfig

app = typer.Typer(
    name="cgan",
    help="Make image data unlearnable: add bounded, imperceptible ConfounderGAN noise to every image.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

PROTECT = ProtectConfig(inputs=(), out=Path())  # the defaults, read by the options below
TRAIN = TrainConfig(data="", out=Path())
DIST = TRAIN.distortions
VICTIM = VictimConfig()
VERIFY = VerifyRequest()
AUDIT = AuditConfig()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cgan {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """cgan: protect images, train generators, verify unlearnability."""


_IO, _PROT, _PERF, _SHARDS = "Input/Output", "Protection", "Performance", "WebDataset shards"


@app.command("protect")
def protect_command(
    src: list[str] = typer.Argument(..., metavar="SRC", help="Folders (recursive), image files, or - to read newline-separated paths from stdin.", show_default=False),
    out: Path | None = typer.Option(None, "--out", "-o", metavar="DIR|FILE", help="Output folder: mirrors the input tree; holds manifest.jsonl and summary.json. Must not be inside an input. Default for one folder or file SRC: SRC-protected next to it. One image SRC and an image file name here: writes just that file.", show_default=False, rich_help_panel=_IO),
    fmt: OutputFormat | None = typer.Option(None, "--format", case_sensitive=False, help="Force the output format (changes the file suffix; jpg = jpeg). Default: keep each file's format.", rich_help_panel=_IO),
    quality: int | None = typer.Option(None, "--quality", min=1, max=100, help="JPEG / lossy-WebP quality. Default: reuse the source JPEG's quantisation tables; 95 otherwise.", rich_help_panel=_IO),
    dry_run: bool = typer.Option(PROTECT.dry_run, "--dry-run", help="List what would be protected or skipped; decode and write nothing.", rich_help_panel=_IO),
    measure_written: bool = typer.Option(PROTECT.measure_written, "--measure-written", help="Re-decode every output and record its written_linf / written_psnr (what a lossy re-encode really delivered); costs one more decode per image.", rich_help_panel=_IO),
    measure_ssim: bool = typer.Option(PROTECT.measure_ssim, "--measure-ssim", help="Record each image's SSIM (protected vs source) in the manifest; exact 11x11 Gaussian SSIM, ~20 s per 12 MP image on a loaded CPU core.", rich_help_panel=_IO),
    json_out: bool = typer.Option(False, "--json", help="Print a one-line JSON summary on stdout.", rich_help_panel=_IO),
    weights: Path | None = typer.Option(None, "--weights", "-w", metavar="FILE", help="Generator weights (.safetensors). Default: the shipped cgan-rgb-default.safetensors.", rich_help_panel=_PROT),
    epsilon: float | None = typer.Option(None, "--epsilon", metavar="N", help="L-inf budget in /255 units. Default: the epsilon stored with the weights (a larger one warns).", rich_help_panel=_PROT),
    mask_floor: float | None = typer.Option(PROTECT.mask_floor, "--mask-floor", min=0, max=1, help="Local-activity mask: noise scale in flat regions, rising to 1 in texture (1 = no mask). Default: the weights' own (none for the shipped generators: at 0.25 the RGB default protects nothing, docs/method.md, Measurement 8).", rich_help_panel=_PROT),
    full_res: bool = typer.Option(PROTECT.full_res, "--full-res", help="Run the generator at native resolution (tiled) instead of the weights' working resolution.", rich_help_panel=_PROT),
    labels: str | None = typer.Option(None, "--labels", help="Give each image the code of its true label instead of the generator's guess: folders (class-per-subfolder trees), cls (a WebDataset sample's cls member), or FILE.csv (path,label; label = class name or index). An image without a known label fails.", rich_help_panel=_PROT),
    seed: int = typer.Option(PROTECT.seed, "--seed", help="Seeds torch before protecting (reproducibility for stochastic generators; recorded).", rich_help_panel=_PROT),
    device: str = typer.Option(PROTECT.device, "--device", metavar="DEVICE", help="auto | cpu | cuda | cuda:N.", rich_help_panel=_PERF),
    precision: Precision = typer.Option(PROTECT.precision, "--precision", help="Reduced precision uses autocast on CUDA; CPU runs fp32.", rich_help_panel=_PERF),
    batch_size: int = typer.Option(PROTECT.batch_size, "--batch-size", min=1, help="Images per generator call (images of one working shape share a batch).", rich_help_panel=_PERF),
    workers: int | None = typer.Option(None, "--workers", min=0, help="Worker processes: each decodes, protects (on the CPU) and encodes its share; on a GPU they decode and the main process runs the generator (0 = all in the main process). Default: min(4, CPUs).", rich_help_panel=_PERF),
    shards: bool = typer.Option(PROTECT.stdin_tar, "--shards", help="SRC - is a tar stream on stdin (detected without it too). Shard paths, brace patterns ('a-{000..127}.tar') and pipe:CMD are detected without it; --out - writes one tar stream to stdout.", rich_help_panel=_SHARDS),
    shard_size: int | None = typer.Option(None, "--shard-size", min=1, help="Re-shard: at most this many samples (keys) per output shard, named by --shard-pattern.", rich_help_panel=_SHARDS),
    shard_pattern: str = typer.Option(PROTECT.shard_pattern, "--shard-pattern", metavar="PATTERN", help="Output shard names when re-sharding (ShardWriter style).", rich_help_panel=_SHARDS),
) -> None:
    """Protect images: write a protected copy of every input under --out, with a manifest.

    [bold]Examples[/bold]

      cgan protect ./photos                      [dim]# -> ./photos-protected[/dim]

      cgan protect photo.jpg --out photo-protected.jpg

      find . -name '*.jpg' | cgan protect - --out ./protected --json

    Exit code 0 when every input was protected, skipped (resume) or ignored, 1 when any failed, 2 for usage
    errors, 130 when interrupted (rerun the same command to resume).
    """
    cfg = ProtectConfig(
        tuple(src), out, weights, epsilon=epsilon, device=device, precision=Precision(precision).value, batch_size=batch_size,
        workers=PROTECT.workers if workers is None else workers, seed=seed, format=fmt.canonical if fmt else None, quality=quality,
        full_res=full_res, mask_floor=mask_floor, dry_run=dry_run, measure_written=measure_written, measure_ssim=measure_ssim,
        stdin_tar=shards, shard_size=shard_size, shard_pattern=shard_pattern, labels=labels,
    )
    try:  # a Ctrl-C anywhere before the run starts: nothing written yet, one line
        from cgan_cli.protect.preflight import preflight

        checked = preflight(cfg)  # every usage error before torch or any worker starts
        for note in checked.notes:
            typer.echo(note, err=True)
        if checked.nothing_to_do:
            typer.echo(checked.nothing_to_do, err=True)
            raise typer.Exit(0)
        cfg = checked.cfg
        if sys.stderr.isatty() and not dry_run:  # something within a second; torch and the workers take a few
            typer.echo(f"cgan protect -> {cfg.out}: starting (loading torch and the generator)...", err=True)
        if cfg.workers > 0 and not dry_run:
            from cgan_cli.protect.workers import start_fork_server

            start_fork_server()  # the workers' torch import runs beside this process's own, just below
        from cgan_cli.protect.console import (
            protect_cli,  # lazy: keeps `cgan --help` fast
        )
    except UsageError as exc:
        typer.echo(f"cgan protect: error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo(interrupted_line(0), err=True)
        raise typer.Exit(INTERRUPTED) from None
    raise typer.Exit(protect_cli(cfg, json_out=json_out))


PREVIEW = PreviewConfig(inputs=())


@app.command("preview")
def preview_command(
    src: list[str] = typer.Argument(..., metavar="SRC", help="Folders, image files, or - (paths on stdin); the first --count readable images are shown.", show_default=False),
    out: Path = typer.Option(PREVIEW.out, "--out", "-o", metavar="FILE.png", help="The side-by-side PNG to write."),
    weights: Path | None = typer.Option(None, "--weights", "-w", metavar="FILE", help="Generator weights (.safetensors). Default: the shipped cgan-rgb-default.safetensors."),
    epsilon: float | None = typer.Option(None, "--epsilon", metavar="N", help="L-inf budget in /255 units. Default: the epsilon stored with the weights."),
    full_res: bool = typer.Option(PREVIEW.full_res, "--full-res", help="As protect: the generator at native resolution."),
    count: int = typer.Option(PREVIEW.count, "--count", min=1, max=32, help="How many images (rows)."),
    amplify: float = typer.Option(PREVIEW.amplify, "--amplify", min=1.0, help="The noise column shows the change this many times larger, around mid-gray."),
    height: int = typer.Option(PREVIEW.height, "--height", min=32, max=2048, help="Pixels per row."),
    device: str = typer.Option(PREVIEW.device, "--device", metavar="DEVICE", help="auto | cpu | cuda | cuda:N."),
) -> None:
    """Look before publishing: one PNG with a row per image, original | protected | noise amplified.

    [bold]Example[/bold]

      cgan preview ./photos --out preview.png --count 3

    The protected column is what `cgan protect` writes with the same settings. Nothing else is written.
    """

    cfg = PreviewConfig(tuple(src), out, weights, epsilon, device, full_res, count, amplify, height)
    try:
        cfg = cfg.checked()
        from cgan_cli.protect.preview import preview  # lazy: torch

        written = preview(cfg, emit=lambda line: typer.echo(line, err=True))
    except UsageError as exc:
        typer.echo(f"cgan preview: error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"preview: {written}", err=True)


_DATA, _OPT, _OBJ, _RUN = "Data / output", "Optimisation", "Objective", "Runtime"
_DIST = "Distortions (the platform and scraper between the protected image and the victim's losses; probability per step, 0 = off)"


@app.command("train")
def train_cmd(
    data: str = typer.Argument(..., help="'fashion-mnist' or a class-per-subfolder image folder (DATA/<class>/<image>)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output generator, e.g. weights/NAME.safetensors.", rich_help_panel=_DATA),
    arch: GeneratorArch = typer.Option(TRAIN.arch, help="Generator: confounder-v4 (deep code encoder; its local head cannot offset a whole image) | confounder-v3 (the same without that; the shipped RGB weights) | confounder-v2 (shallow encoder, kept for comparison).", rich_help_panel=_DATA),
    epochs: int = typer.Option(TRAIN.epochs, help="Confounder-stage epochs (tiles + local head).", rich_help_panel=_OPT),
    code_epochs: int = typer.Option(TRAIN.code_epochs, help="Classifier-stage epochs: the encoder must fit ~100% of the training images (small sets need hundreds; see the printed code train accuracy).", rich_help_panel=_OPT),
    codes_from: Path | None = typer.Option(TRAIN.codes_from, "--codes-from", help="Take the encoder + code head from these weights (same arch, width, classes, size) and skip the classifier stage: retrain only the patterns.", rich_help_panel=_OPT),
    batch_size: int = typer.Option(TRAIN.batch_size, help="Images per step.", rich_help_panel=_OPT),
    lr_g: float = typer.Option(TRAIN.lr_g, help="Generator learning rate, confounder stage (Adam).", rich_help_panel=_OPT),
    lr_code: float = typer.Option(TRAIN.lr_code, help="Encoder learning rate, classifier stage (Adam).", rich_help_panel=_OPT),
    lr_d: float = typer.Option(TRAIN.lr_d, help="Discriminator learning rate (Adam); the noise classifier uses 5x.", rich_help_panel=_OPT),
    w_ny: float = typer.Option(TRAIN.w_ny, help="Weight of the noise-only classifier loss (N->Y).", rich_help_panel=_OBJ),
    w_minmin: float = typer.Option(TRAIN.w_minmin, help="Weight of the surrogate loss on protected images (min-min).", rich_help_panel=_OBJ),
    w_adv: float = typer.Option(TRAIN.w_adv, help="Weight of the discriminator (imperceptibility) loss.", rich_help_panel=_OBJ),
    reset_every: int = typer.Option(TRAIN.reset_every, help="Re-initialise the min-min surrogate every N steps.", rich_help_panel=_OBJ),
    assign_candidates: int = typer.Option(TRAIN.assign_candidates, "--assign-candidates", min=1, help="Tile orders (which class gets which tile) tried before the confounder stage, each by a quick victim on held-out training images; the one it learns least from wins (1 = the bank's order).", rich_help_panel=_OBJ),
    assign_steps: int = typer.Option(TRAIN.assign_steps, "--assign-steps", min=1, help="Training steps of each of those victims.", rich_help_panel=_OBJ),
    tiles: TileBank = typer.Option(TRAIN.tiles, "--tiles", help="The class tiles' initial draw: structured (+-DC, stripes, checkerboards; protects best, but `cgan audit` cannot test it; docs/method.md, Measurements 9-10) | far-apart (random, far apart under shift + flip; auditable).", rich_help_panel=_OBJ),
    augment: bool = typer.Option(DIST.crop_flip > 0, "--augment/--no-augment", help="The victim's crop + flip inside the loop.", rich_help_panel=_DIST),
    dist_resize: float = typer.Option(DIST.resize, min=0, max=1, help="Resize to another size and grid offset (bilinear/bicubic/area/antialiased), and back.", rich_help_panel=_DIST),
    dist_resize_min: float = typer.Option(DIST.resize_min, min=0.05, help="Smallest resize factor.", rich_help_panel=_DIST),
    dist_resize_max: float = typer.Option(DIST.resize_max, min=0.05, help="Largest resize factor.", rich_help_panel=_DIST),
    dist_jpeg: float = typer.Option(DIST.jpeg, min=0, max=1, help="Real JPEG (Pillow, 4:2:0 for RGB) off the 8x8 grid, straight-through gradient.", rich_help_panel=_DIST),
    dist_jpeg_min: int = typer.Option(DIST.jpeg_min, min=1, max=100, help="Lowest JPEG quality.", rich_help_panel=_DIST),
    dist_jpeg_max: int = typer.Option(DIST.jpeg_max, min=1, max=100, help="Highest JPEG quality.", rich_help_panel=_DIST),
    dist_blur: float = typer.Option(DIST.blur, min=0, max=1, help="Gaussian blur.", rich_help_panel=_DIST),
    dist_blur_max: float = typer.Option(DIST.blur_max, min=0.3, help="Largest blur sigma (px); the smallest is 0.3.", rich_help_panel=_DIST),
    dist_grayscale: float = typer.Option(DIST.grayscale, min=0, max=1, help="Grayscale (RGB data only).", rich_help_panel=_DIST),
    dist_shift: float = typer.Option(DIST.shift, min=0, max=1, help="Fractional (sub-pixel) translation.", rich_help_panel=_DIST),
    dist_shift_max: float = typer.Option(DIST.shift_max, min=0, help="Largest shift (px).", rich_help_panel=_DIST),
    mask_floor: float = typer.Option(TRAIN.mask_floor, min=0, max=1, help="Local-activity mask: the noise scale in flat regions, rising to 1 in texture (1 = no mask). Recorded in the weights; `cgan protect` applies the same mask.", rich_help_panel=_OBJ),
    epsilon: float = typer.Option(TRAIN.epsilon, help="L-inf budget in /255 units.", rich_help_panel=_OBJ),
    size: int = typer.Option(TRAIN.size, help="Working resolution for folder datasets (fashion-mnist stays 28).", rich_help_panel=_DATA),
    width: int = typer.Option(TRAIN.width, min=4, help="Generator channels (first layer; the encoder doubles them three times). Protect time per image grows ~ width^2.", rich_help_panel=_DATA),
    device: str = typer.Option(TRAIN.device, help="auto | cpu | cuda", rich_help_panel=_RUN),
    precision: Precision = typer.Option(TRAIN.precision, help="Autocast on CUDA only; the CPU trains fp32.", rich_help_panel=_RUN),
    seed: int = typer.Option(TRAIN.seed, help="Random seed (init, data order, augmentation).", rich_help_panel=_OPT),
    resume: Path | None = typer.Option(None, help="Continue from a checkpoint (NAME.ckpt.safetensors).", rich_help_panel=_RUN),
    checkpoint_every: int = typer.Option(TRAIN.checkpoint_every, help="Write NAME.ckpt.safetensors every N steps (0 = never).", rich_help_panel=_RUN),
    sample_every: int = typer.Option(TRAIN.sample_every, help="Write a PNG grid (clean | noise | protected) every N steps.", rich_help_panel=_RUN),
    threads: int = typer.Option(0, help="CPU threads for torch (0 = torch default).", rich_help_panel=_RUN),
) -> None:
    """Train a confounder generator on labeled images; writes weights + NAME.metrics.json.

    [bold]Examples[/bold]

      cgan train fashion-mnist --out weights/my-fmnist.safetensors --epsilon 8

      cgan train ./data/train --size 64 --out weights/mine.safetensors
    """
    from cgan_cli.learning.train import train_cli

    cfg = TrainConfig(
        data=data, out=out, arch=GeneratorArch(arch).value, epochs=epochs, code_epochs=code_epochs, batch_size=batch_size,
        lr_g=lr_g, lr_code=lr_code, lr_d=lr_d, w_ny=w_ny, w_minmin=w_minmin, w_adv=w_adv, reset_every=reset_every,
        tiles=TileBank(tiles).value, assign_candidates=assign_candidates, assign_steps=assign_steps, codes_from=codes_from, distortions=Distortions(
            resize=dist_resize, resize_min=dist_resize_min, resize_max=dist_resize_max, jpeg=dist_jpeg,
            jpeg_min=dist_jpeg_min, jpeg_max=dist_jpeg_max, blur=dist_blur, blur_max=dist_blur_max,
            grayscale=dist_grayscale, shift=dist_shift, shift_max=dist_shift_max, crop_flip=1.0 if augment else 0.0,
        ),
        mask_floor=mask_floor, epsilon=epsilon, size=size, width=width, device=device, precision=Precision(precision).value, seed=seed,
        resume=resume, checkpoint_every=checkpoint_every, sample_every=sample_every, command=shlex.join(["cgan", *sys.argv[1:]]),
    )
    raise typer.Exit(train_cli(cfg, threads))


_VDATA, _VPROT, _VICTIM, _VRUN = "Data", "Protection", "Victim", "Runtime / report"


@app.command("verify")
def verify_command(
    data: str | None = typer.Argument(None, help="Built-in dataset name (fashion-mnist), class-per-subfolder tree, or shards; protected in memory with --weights / --baseline."),
    protected: Path | None = typer.Option(None, "--protected", help="Protected class-per-subfolder tree (as `cgan protect` writes it).", rich_help_panel=_VDATA),
    clean: Path | None = typer.Option(None, "--clean", help="The clean originals of --protected; matched by relative path.", rich_help_panel=_VDATA),
    test: Path | None = typer.Option(None, "--test", help="Clean test set (class-per-subfolder tree). Default for a folder DATA: a stratified hold-out.", rich_help_panel=_VDATA),
    weights: Path | None = typer.Option(None, "--weights", help="Generator weights (.safetensors) to protect DATA with (through the same engine as `cgan protect`).", rich_help_panel=_VPROT),
    epsilon: float | None = typer.Option(None, "--epsilon", help="L-inf budget in /255 units. Default: the weights' own, or what --protected measurably spent.", rich_help_panel=_VPROT),
    labels: bool = typer.Option(False, "--labels", help="With --weights: protect each image with its true label's code, as `cgan protect --labels` does, instead of the generator's guess.", rich_help_panel=_VPROT),
    mask_floor: float | None = typer.Option(None, "--mask-floor", min=0, max=1, help="With --weights: the local-activity mask floor, as `cgan protect --mask-floor` (1 = no mask). Default: the weights' own.", rich_help_panel=_VPROT),
    baseline: list[Baseline] = typer.Option([], "--baseline", help="Comparison noise on the same data and epsilon (repeatable).", rich_help_panel=_VPROT),
    arch: list[VictimArch] = typer.Option([VictimArch(VICTIM.arch)], "--arch", help="Victim (repeatable).", rich_help_panel=_VICTIM),
    countermeasure: list[str] = typer.Option(["none"], "--countermeasure", metavar="SPEC", help=" | ".join(COUNTERMEASURES) + " (repeatable; one row each).", rich_help_panel=_VICTIM),
    epochs: int = typer.Option(VICTIM.epochs, "--epochs", min=1, rich_help_panel=_VICTIM),
    batch_size: int = typer.Option(VICTIM.batch_size, "--batch-size", min=1, rich_help_panel=_VICTIM),
    lr: float = typer.Option(VICTIM.lr, "--lr", help="Peak learning rate (one-cycle, SGD nesterov).", rich_help_panel=_VICTIM),
    augment: bool = typer.Option(VICTIM.augment, "--augment/--no-augment", help="Standard random crop + horizontal flip.", rich_help_panel=_VICTIM),
    seed: int = typer.Option(VICTIM.seed, "--seed", rich_help_panel=_VICTIM),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.", rich_help_panel=_VRUN),
    precision: Precision = typer.Option(Precision.auto, "--precision", help="As protect: autocast on CUDA; CPU trains in fp32.", rich_help_panel=_VRUN),
    size: int | None = typer.Option(None, "--size", help="Side in pixels images are fitted to. Default: the weights' working size, else 32.", rich_help_panel=_VDATA),
    channels: int | None = typer.Option(None, "--channels", help="1 or 3. Default: the weights' channels, else 3.", rich_help_panel=_VDATA),
    holdout: float = typer.Option(VERIFY.holdout, "--holdout", help="Test fraction split off a folder DATA given without --test (with --unseen: off the built-in split the generator did not train on).", rich_help_panel=_VDATA),
    unseen: bool = typer.Option(False, "--unseen", help="With --weights: the victim trains on images the generator never trained on and is tested on images neither saw (fashion-mnist: the other split, less a --holdout test part); refused when the weights record an overlap with DATA.", rich_help_panel=_VDATA),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Use a seeded random N training images (quick runs; EM baseline on CPU).", rich_help_panel=_VDATA),
    test_limit: int | None = typer.Option(None, "--test-limit", min=1, help="Use a seeded random N test images.", rich_help_panel=_VDATA),
    em_max_rounds: int = typer.Option(EMConfig.max_rounds, "--em-max-rounds", min=1, help="Cap on EM rounds (10 surrogate steps + 20 PGD steps each).", rich_help_panel=_VPROT),
    report: Path | None = typer.Option(None, "--report", help="JSON report path (the PNG plot goes beside it). Default: next to --protected, else runs/verify/.", rich_help_panel=_VRUN),
) -> None:
    """Train fresh victims on clean and on protected data, test both on clean data: did protection work?

    [bold]Examples[/bold]

      cgan verify --protected ./out/train --clean ./data/train --test ./data/test --size 32

      cgan verify fashion-mnist --weights weights/cgan-fashion-mnist.safetensors --baseline random

      cgan verify fashion-mnist --weights weights/cgan-fashion-mnist.safetensors --unseen --labels

    Warns when the test split is small or the clean-trained victim is near chance; accuracies carry 95% intervals.
    """
    from cgan_cli.learning.verify import verify_cli

    victim = VictimConfig(epochs=epochs, batch_size=batch_size, lr=lr, augment=augment, seed=seed)
    request = VerifyRequest(
        data=data, protected=protected, clean=clean, test=test, weights=weights, epsilon=epsilon, labels=labels, mask_floor=mask_floor, unseen=unseen,
        baselines=[Baseline(b).value for b in baseline], size=size, channels=channels, holdout=holdout, limit=limit,
        test_limit=test_limit, report=report, em=EMConfig(max_rounds=em_max_rounds),
        cfg=VerifyConfig(victim, [VictimArch(a).value for a in arch], list(countermeasure)),
    )
    raise typer.Exit(verify_cli(request, device, Precision(precision).value))


_AMODEL, _APROT, _ATEST, _AOUT = "Model", "Protection", "Test", "Output"


def _floats(option: str):
    def parse(text: str | None) -> tuple[float, ...] | None:
        try:
            return None if text is None else parse_floats(option, text)
        except UsageError as exc:
            raise typer.BadParameter(str(exc)) from None

    return parse


@app.command("audit")
def audit_command(
    model: Path | None = typer.Argument(None, help="The suspect model: a TorchScript file (torch.jit.save) or, with onnxruntime installed, an .onnx file. Loaded on the CPU; see docs/audit.md for what loading a foreign file can do.", show_default=False),
    images: Path | None = typer.Option(None, "--images", help="Folder of clean images of the kind the model classifies (recursive; labels not needed).", rich_help_panel=_AMODEL, show_default=False),
    predict: str | None = typer.Option(None, "--predict", help="Instead of MODEL: module:function or file.py:function taking a normalised (B, C, S, S) float tensor, returning (B, classes) scores (e.g. a wrapper around an API). It runs as your own Python code.", rich_help_panel=_AMODEL),
    size: int | None = typer.Option(None, "--size", min=8, help="Model input side in pixels (images are fitted to it). Default: the generator's working size.", rich_help_panel=_AMODEL),
    channels: int | None = typer.Option(None, "--channels", min=1, max=3, help="Model input channels, 1 or 3. Default: the generator's.", rich_help_panel=_AMODEL),
    mean: str = typer.Option(",".join(map(str, AUDIT.mean)), "--mean", callback=_floats("--mean"), help="The model's input normalisation (x - mean) / std with x in [0, 1]: one value or one per channel (0.485,0.456,0.406).", rich_help_panel=_AMODEL),
    std: str = typer.Option(",".join(map(str, AUDIT.std)), "--std", callback=_floats("--std"), help="See --mean.", rich_help_panel=_AMODEL),
    outputs: ModelOutputs = typer.Option(AUDIT.outputs, "--outputs", help="What the model returns: logits, probs (e.g. an API's scores; one-hot for label-only APIs), or auto-detect.", rich_help_panel=_AMODEL),
    weights: Path | None = typer.Option(None, "--weights", "-w", help="The generator whose protection you look for (.safetensors). Default: the shipped cgan-rgb-default.safetensors.", rich_help_panel=_APROT),
    epsilon: float | None = typer.Option(None, "--epsilon", help="L-inf budget in /255 units the images were protected at. Default: the weights' own.", rich_help_panel=_APROT),
    control_sets: int = typer.Option(AUDIT.control_sets, "--control-sets", min=1, help="Sets of control patterns (as many as the generator has codes each; the null). More sets: a more powerful test; each pattern costs one model pass over the images (lower it for a paid API).", rich_help_panel=_ATEST),
    controls: AuditControls = typer.Option(AUDIT.controls, "--controls", help="Control patterns: balanced (each tile's values re-signed to a zero mean, then shuffled: no clean model of the bench flagged) or shuffled (the same values in other positions, mean kept: flags some clean models with the shipped Fashion-MNIST generator; docs/audit.md).", rich_help_panel=_ATEST),
    limit: int | None = typer.Option(AUDIT.limit, "--limit", min=1, help="Use at most this many images (a seeded random subset).", rich_help_panel=_ATEST),
    alpha: float = typer.Option(AUDIT.alpha, "--alpha", help="Significance level of the verdict.", rich_help_panel=_ATEST),
    seed: int = typer.Option(AUDIT.seed, "--seed", help="Draws the control patterns and the image subset.", rich_help_panel=_ATEST),
    batch_size: int = typer.Option(AUDIT.batch_size, "--batch-size", min=1, help="Images per model call.", rich_help_panel=_AOUT),
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON object on stdout (p_value, verdict, effect, codes, ...).", rich_help_panel=_AOUT),
) -> None:
    """Was this model trained on images protected by this generator? A black-box test on its predictions.

    Exit code 0 when the test ran (whatever the verdict), 2 for usage errors.
    """
    from cgan_cli.learning.audit import audit_cli

    cfg = AuditConfig(
        model=model, weights=weights, images=images, predict=predict, size=size, channels=channels, mean=mean, std=std,
        outputs=ModelOutputs(outputs).value, epsilon=epsilon, control_sets=control_sets,
        controls=AuditControls(controls).value, limit=limit, alpha=alpha,
        batch_size=batch_size, seed=seed,
    )
    raise typer.Exit(audit_cli(cfg, json_out=json_out))
