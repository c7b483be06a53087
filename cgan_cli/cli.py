"""Command line: parses options and wires source -> engine -> sink. No logic lives here."""

from __future__ import annotations

from pathlib import Path

import typer

from cgan_cli import __version__

app = typer.Typer(
    name="cgan",
    help="Make image data unlearnable: add bounded, imperceptible ConfounderGAN noise to every image.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cgan {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """cgan: protect images, train generators, verify unlearnability."""


# --- protect (issue 2) ---
_IO, _PROT, _PERF = "Input/Output", "Protection", "Performance"
_SHARDS = "WebDataset shards"


@app.command("protect")
def protect_command(
    src: list[str] = typer.Argument(..., help="Folders (recursive), image files, or - to read newline-separated paths from stdin.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: mirrors the input tree; holds manifest.jsonl and summary.json. Must not be inside an input.", rich_help_panel=_IO),
    fmt: str | None = typer.Option(None, "--format", help="Force the output format: png | jpeg | webp (changes the file suffix). Default: keep each file's format.", rich_help_panel=_IO),
    quality: int | None = typer.Option(None, "--quality", min=1, max=100, help="JPEG / lossy-WebP quality. Default: reuse the source JPEG's quantisation tables; 95 otherwise.", rich_help_panel=_IO),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be protected or skipped; decode and write nothing.", rich_help_panel=_IO),
    measure_written: bool = typer.Option(False, "--measure-written", help="Re-decode every output and record its written_linf / written_psnr (what a lossy re-encode really delivered); costs one more decode per image.", rich_help_panel=_IO),
    json_out: bool = typer.Option(False, "--json", help="Print a one-line JSON summary on stdout.", rich_help_panel=_IO),
    weights: Path | None = typer.Option(None, "--weights", "-w", help="Generator weights (.safetensors). Default: weights/cgan-rgb-default.safetensors.", rich_help_panel=_PROT),
    epsilon: float | None = typer.Option(None, "--epsilon", help="L-inf budget in /255 units. Default: the epsilon stored with the weights.", rich_help_panel=_PROT),
    full_res: bool = typer.Option(False, "--full-res", help="Run the generator at native resolution (tiled) instead of the weights' working resolution.", rich_help_panel=_PROT),
    seed: int = typer.Option(0, "--seed", help="Seeds torch before protecting (reproducibility for stochastic generators; recorded).", rich_help_panel=_PROT),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.", rich_help_panel=_PERF),
    precision: str = typer.Option("auto", "--precision", help="auto | fp32 | bf16 | fp16. Reduced precision uses autocast on CUDA; CPU runs fp32.", rich_help_panel=_PERF),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per generator call (images of one working shape share a batch).", rich_help_panel=_PERF),
    workers: int | None = typer.Option(None, "--workers", min=0, help="Worker processes: each decodes, protects (on the CPU) and encodes its share; on a GPU they decode and the main process runs the generator (0 = all in the main process). Default: min(4, CPUs).", rich_help_panel=_PERF),
    shards: bool = typer.Option(False, "--shards", help="SRC - is a tar stream on stdin. Shard paths, brace patterns ('a-{000..127}.tar') and pipe:CMD are detected without it; --out - writes one tar stream to stdout.", rich_help_panel=_SHARDS),
    shard_size: int | None = typer.Option(None, "--shard-size", min=1, help="Re-shard: at most this many samples (keys) per output shard, named by --shard-pattern.", rich_help_panel=_SHARDS),
    shard_pattern: str = typer.Option("shard-%06d.tar", "--shard-pattern", help="Output shard names when re-sharding (ShardWriter style).", rich_help_panel=_SHARDS),
) -> None:
    """Protect images: write a protected copy of every input under --out, with a manifest.

    Exit code 0 when every input was protected or skipped (resume), 1 when any failed, 2 for usage errors.
    """
    from cgan_cli.workers import default_workers, start_fork_server

    workers = default_workers() if workers is None else workers
    if workers > 0 and not dry_run:
        start_fork_server()  # the workers' torch import runs beside this process's own, just below
    from cgan_cli.protect import ProtectConfig, run_cli  # lazy: keeps `cgan --help` fast

    cfg = ProtectConfig(
        tuple(src), out, weights, epsilon=epsilon, device=device, precision=precision, batch_size=batch_size,
        workers=workers, seed=seed, format=fmt, quality=quality,
        full_res=full_res, dry_run=dry_run, measure_written=measure_written,
    )
    from cgan_cli.shards import ShardOptions, looks_like_shards, run_shards_cli  # issue 5: tar shards / streams

    if shards or shard_size is not None or str(out) == "-" or any(s != "-" and looks_like_shards(s) for s in src):
        raise typer.Exit(run_shards_cli(cfg, ShardOptions(shards, shard_size, shard_pattern), json_out=json_out))
    raise typer.Exit(run_cli(cfg, json_out=json_out))


# --- train (issue 3) ---
WELL_FIT = 0.99  # code train accuracy below which `cgan train` warns (docs/method.md: protection needs ~100%)


@app.command("train")
def train_cmd(
    data: str = typer.Argument(..., help="'fashion-mnist' or a class-per-subfolder image folder (DATA/<class>/<image>)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output generator, e.g. weights/NAME.safetensors.", rich_help_panel="Data / output"),
    arch: str = typer.Option("confounder-v3", help="Generator: confounder-v3 (deep code encoder; the shipped weights) | confounder-v2 (shallow encoder, kept for comparison).", rich_help_panel="Data / output"),
    epochs: int = typer.Option(1, help="Confounder-stage epochs (tiles + local head).", rich_help_panel="Optimisation"),
    code_epochs: int = typer.Option(20, help="Classifier-stage epochs: the encoder must fit ~100% of the training images (small sets need hundreds; see the printed code train accuracy).", rich_help_panel="Optimisation"),
    batch_size: int = typer.Option(128, help="Images per step.", rich_help_panel="Optimisation"),
    lr_g: float = typer.Option(0.01, help="Generator learning rate, confounder stage (Adam).", rich_help_panel="Optimisation"),
    lr_code: float = typer.Option(3e-3, help="Encoder learning rate, classifier stage (Adam).", rich_help_panel="Optimisation"),
    lr_d: float = typer.Option(2e-4, help="Discriminator learning rate (Adam); the noise classifier uses 5x.", rich_help_panel="Optimisation"),
    w_ny: float = typer.Option(1.0, help="Weight of the noise-only classifier loss (N->Y).", rich_help_panel="Objective"),
    w_minmin: float = typer.Option(1.0, help="Weight of the surrogate loss on protected images (min-min).", rich_help_panel="Objective"),
    w_adv: float = typer.Option(0.05, help="Weight of the discriminator (imperceptibility) loss.", rich_help_panel="Objective"),
    reset_every: int = typer.Option(200, help="Re-initialise the min-min surrogate every N steps.", rich_help_panel="Objective"),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Crop + flip inside the loop.", rich_help_panel="Objective"),
    epsilon: float = typer.Option(8.0, help="L-inf budget in /255 units.", rich_help_panel="Objective"),
    size: int = typer.Option(64, help="Working resolution for folder datasets (fashion-mnist stays 28).", rich_help_panel="Data / output"),
    width: int = typer.Option(32, min=4, help="Generator channels (first layer; the encoder doubles them three times). Protect time per image grows ~ width^2.", rich_help_panel="Data / output"),
    device: str = typer.Option("auto", help="auto | cpu | cuda", rich_help_panel="Runtime"),
    precision: str = typer.Option("fp32", help="auto | fp32 | bf16 | fp16 (autocast on CUDA only; the CPU trains fp32).", rich_help_panel="Runtime"),
    seed: int = typer.Option(0, help="Random seed (init, data order, augmentation).", rich_help_panel="Optimisation"),
    resume: Path | None = typer.Option(None, help="Continue from a checkpoint (NAME.ckpt.safetensors).", rich_help_panel="Runtime"),
    checkpoint_every: int = typer.Option(500, help="Write NAME.ckpt.safetensors every N steps (0 = never).", rich_help_panel="Runtime"),
    sample_every: int = typer.Option(0, help="Write a PNG grid (clean | noise | protected) every N steps.", rich_help_panel="Runtime"),
    threads: int = typer.Option(0, help="CPU threads for torch (0 = torch default).", rich_help_panel="Runtime"),
) -> None:
    """Train a confounder generator on labeled images; writes weights + NAME.metrics.json."""
    import shlex
    import sys

    import torch

    from cgan_cli.data import DatasetError
    from cgan_cli.train import TrainConfig, train

    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(
        data=data, out=out, arch=arch, epochs=epochs, code_epochs=code_epochs, batch_size=batch_size, lr_g=lr_g, lr_code=lr_code,
        lr_d=lr_d, w_ny=w_ny, w_minmin=w_minmin, w_adv=w_adv, reset_every=reset_every, augment=augment, epsilon=epsilon,
        size=size, width=width, device=device, precision=precision, seed=seed, resume=resume, checkpoint_every=checkpoint_every,
        sample_every=sample_every, command=shlex.join(["cgan", *sys.argv[1:]]),
    )
    try:
        result = train(cfg)
    except (DatasetError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    m = result.metrics
    typer.echo(
        f"wrote {result.out} ({result.steps} steps, {result.seconds:.0f} s); "
        f"code train accuracy {m['code_train_accuracy']:.3f}, noise L-inf {m['noise_linf_255']:.2f}/255"
    )
    if m["code_train_accuracy"] < WELL_FIT:
        typer.echo(
            f"warning: the encoder reads the label of only {m['code_train_accuracy']:.1%} of its training images; "
            "on Fashion-MNIST a 94%-fit encoder left a victim at 62% clean accuracy and a 100%-fit one at 14% "
            "(docs/method.md). Train longer: raise --code-epochs.", err=True,
        )


# --- verify (issue 4) ---


@app.command("verify")
def verify_command(
    data: str | None = typer.Argument(None, help="Built-in dataset name (fashion-mnist), class-per-subfolder tree, or shards; protected in memory with --weights / --baseline."),
    protected: Path | None = typer.Option(None, "--protected", help="Protected class-per-subfolder tree (as `cgan protect` writes it).", rich_help_panel="Data"),
    clean: Path | None = typer.Option(None, "--clean", help="The clean originals of --protected; matched by relative path.", rich_help_panel="Data"),
    test: Path | None = typer.Option(None, "--test", help="Clean test set (class-per-subfolder tree). Default for a folder DATA: a stratified hold-out.", rich_help_panel="Data"),
    weights: Path | None = typer.Option(None, "--weights", help="Generator weights (.safetensors) to protect DATA with.", rich_help_panel="Protection"),
    epsilon: float | None = typer.Option(None, "--epsilon", help="L-inf budget in /255 units. Default: the weights' own, or what --protected measurably spent.", rich_help_panel="Protection"),
    baseline: list[str] = typer.Option([], "--baseline", help="Comparison noise on the same data and epsilon: random | classwise | em (repeatable).", rich_help_panel="Protection"),
    arch: list[str] = typer.Option(["cnn"], "--arch", help="Victim: cnn | resnet18 (repeatable).", rich_help_panel="Victim"),
    countermeasure: list[str] = typer.Option(["none"], "--countermeasure", help="none | jpeg:Q | grayscale | blur:SIGMA | rescale:F | strong-aug | adv:EPS (repeatable; one row each).", rich_help_panel="Victim"),
    epochs: int = typer.Option(5, "--epochs", min=1, rich_help_panel="Victim"),
    batch_size: int = typer.Option(128, "--batch-size", min=1, rich_help_panel="Victim"),
    lr: float = typer.Option(0.1, "--lr", help="Peak learning rate (one-cycle, SGD nesterov).", rich_help_panel="Victim"),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Standard random crop + horizontal flip.", rich_help_panel="Victim"),
    seed: int = typer.Option(0, "--seed", rich_help_panel="Victim"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.", rich_help_panel="Runtime / report"),
    precision: str = typer.Option("auto", "--precision", help="auto | fp32 | bf16 | fp16 (as protect): autocast on CUDA; CPU trains in fp32.", rich_help_panel="Runtime / report"),
    size: int | None = typer.Option(None, "--size", help="Side in pixels images are fitted to. Default: the weights' working size, else 32.", rich_help_panel="Data"),
    channels: int | None = typer.Option(None, "--channels", help="1 or 3. Default: the weights' channels, else 3.", rich_help_panel="Data"),
    holdout: float = typer.Option(0.2, "--holdout", help="Test fraction split off a folder DATA given without --test.", rich_help_panel="Data"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Use a seeded random N training images (quick runs; EM baseline on CPU).", rich_help_panel="Data"),
    test_limit: int | None = typer.Option(None, "--test-limit", min=1, help="Use a seeded random N test images.", rich_help_panel="Data"),
    em_max_rounds: int = typer.Option(50, "--em-max-rounds", min=1, help="Cap on EM rounds (10 surrogate steps + 20 PGD steps each).", rich_help_panel="Protection"),
    report: Path | None = typer.Option(None, "--report", help="JSON report path (the PNG plot goes beside it). Default: next to --protected, else runs/verify/.", rich_help_panel="Runtime / report"),
) -> None:
    """Train fresh victims on clean and on protected data, test both on clean data: did protection work?"""
    from rich.console import Console

    from cgan_cli.baselines import EMConfig
    from cgan_cli.engine import resolve_device, resolve_precision
    from cgan_cli.verify import VerifyConfig, VerifyRequest, results_table, verify
    from cgan_cli.victims import VictimConfig

    try:  # VerifyError, DatasetError, WeightsError, EngineError are ValueErrors with clear messages
        dev = resolve_device(device)
        victim = VictimConfig(epochs=epochs, batch_size=batch_size, lr=lr, augment=augment, seed=seed, device=str(dev),
                              precision=resolve_precision(precision, dev))
        request = VerifyRequest(
            data=data, protected=protected, clean=clean, test=test, weights=weights, epsilon=epsilon, baselines=list(baseline),
            size=size, channels=channels, holdout=holdout, limit=limit, test_limit=test_limit, report=report,
            em=EMConfig(max_rounds=em_max_rounds), cfg=VerifyConfig(victim, list(arch), list(countermeasure)),
        )
        rows, _, report_path, plot_path = verify(request, Console(stderr=True))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    console = Console()
    console.print(results_table(rows))
    console.print(f"report: {report_path}\ncurves: {plot_path}")
