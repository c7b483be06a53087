"""`cgan train`: fit a confounder generator on labeled images, readable top to bottom.

The objective (docs/method.md has the measurements that chose it) runs in two stages:

1. *codes*: the generator's encoder learns to tell the classes apart (cross-entropy on the labels).
   At protect time the label is never an input, so the noise can only predict the label if the
   generator infers it from the image; it is trained on the very images it will protect.
   `--codes-from` takes a trained encoder instead and skips this stage.
   Before it, `assign_tiles` picks which class gets which tile (`--assign-candidates`): the
   order whose class-wise noise a quick victim learns least from.
2. *confounder*: with the encoder frozen, the per-class tiles (initialised as a structured bank, or
   far apart under the victim's shift and flip: learning/tiles.py) and the local head learn noise that is as *learnable*
   as possible after the trip to the victim (clamp to [0, 1], 8-bit rounding, then the distortion
   layer: resize, JPEG, blur, grayscale, sub-pixel shift, the victim's crop + flip;
   learning/distortions.py), scaled by the local-activity mask the protect engine applies:
   - N->Y: a noise-only classifier must read the label from the noise that survives clamping;
   - min-min: a surrogate trained on the protected images must fit them fast; it is re-initialised
     every `reset_every` steps, since a victim also starts from scratch;
   - a hinge GAN term with a small weight (discriminator: clean vs protected) for imperceptibility.
   The L-inf budget needs no penalty: noise = epsilon * tanh(...) holds it by construction.

Data flows source (data.load_labeled) -> this engine -> sink (weights.save_generator, checkpoints,
sample PNGs, metrics JSON). Checkpoints are safetensors: optimizer state is flattened into tensors
and step counters go into the JSON metadata, so no pickle is ever read or written.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from cgan_cli import __version__
from cgan_cli.core.atomic import atomic_open, write_atomic
from cgan_cli.core.device import (
    autocast_context,
    resolve_device,
    resolve_precision,
    set_cpu_threads,
)
from cgan_cli.core.errors import UsageError
from cgan_cli.core.generators import (
    CenteredLocalGenerator,
    DeepCodeGenerator,
    HardCodeGenerator,
    quantize_8bit,
)
from cgan_cli.core.noise import activity_mask
from cgan_cli.core.weights import DIGESTS_KEY, WeightsMeta, file_sha256, load_generator, save_generator, save_tensors_atomic
from cgan_cli.learning.config import TrainConfig, VictimConfig
from cgan_cli.learning.data import LabeledImages, load_labeled, record_digests
from cgan_cli.learning.distortions import check as check_distortions
from cgan_cli.learning.distortions import distort_pair
from cgan_cli.learning.nets import Discriminator, SmallCNN
from cgan_cli.learning.tiles import INITIAL_TILES
from cgan_cli.learning.victims import accuracy, train_victim

OBJECTIVE = "staged: codes CE -> class tiles (recipe: tiles, assign_candidates) by N->Y + min-min (surrogate reset) + hinge GAN, distortions in loop"
CKPT_FORMAT = 1
ASSIGN_FIT, ASSIGN_HELD_OUT = 10_000, 5_000  # most training images the tile-order victims train / are tested on
TRAINABLE_ARCHS = {cls.arch: cls for cls in (HardCodeGenerator, DeepCodeGenerator, CenteredLocalGenerator)}


@dataclass
class TrainResult:
    out: Path
    steps: int
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- small pure helpers


def quantize_ste(x: torch.Tensor) -> torch.Tensor:
    """clamp + 8-bit rounding, with a straight-through gradient: what the victim's files hold."""
    x = x.clamp(0.0, 1.0)
    return x + (torch.round(x * 255.0) / 255.0 - x).detach()


def sibling(out: Path, suffix: str) -> Path:
    """weights/NAME.safetensors -> weights/NAME<suffix> (metrics, checkpoint, samples)."""
    return out.with_name(out.name.removesuffix(".safetensors") + suffix)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of an epoch depends only on (seed, epoch): a resumed run sees the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def fresh_surrogate(channels: int, num_classes: int, seed: int, device: torch.device) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallCNN(channels, num_classes).to(device)


def flatten_optimizer(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimizer state as plain tensors + JSON-able param groups (safetensors holds no objects)."""
    state = opt.state_dict()
    tensors = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"{prefix}.{idx}.{key}"] = torch.as_tensor(value).clone()
    return tensors, state["param_groups"]


def unflatten_optimizer(prefix: str, tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": groups}


def module_tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def module_from(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def sample_grid(clean: torch.Tensor, protected: torch.Tensor, epsilon: float) -> Image.Image:
    """Rows of clean | noise amplified to full range | protected, for eyeballing a run."""
    noise = ((protected - clean) * 255.0 / (2 * max(epsilon, 1e-6)) + 0.5).clamp(0, 1)
    rows = torch.cat([clean, noise, protected], dim=3)  # (B, C, H, 3W)
    grid = torch.cat(list(rows), dim=1)  # (C, B*H, 3W)
    arr = (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


# ----------------------------------------------------------------------------- the run


@dataclass
class Nets:
    gen: HardCodeGenerator  # or its subclass DeepCodeGenerator
    disc: Discriminator
    noise_clf: SmallCNN  # N->Y: reads the label from the (surviving) noise alone
    surrogate: SmallCNN  # min-min: trained on protected images, reset periodically
    opt_code: torch.optim.Optimizer
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    opt_n: torch.optim.Optimizer
    opt_s: torch.optim.Optimizer

    def modules(self) -> dict[str, nn.Module]:
        return {"gen": self.gen, "disc": self.disc, "noise_clf": self.noise_clf, "surrogate": self.surrogate}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt_code": self.opt_code, "opt_g": self.opt_g, "opt_d": self.opt_d, "opt_n": self.opt_n, "opt_s": self.opt_s}


def build_nets(cfg: TrainConfig, channels: int, num_classes: int, device: torch.device) -> Nets:
    if cfg.arch not in TRAINABLE_ARCHS:
        raise ValueError(f"--arch {cfg.arch!r}: choose from {sorted(TRAINABLE_ARCHS)}")
    torch.manual_seed(cfg.seed)
    gen = TRAINABLE_ARCHS[cfg.arch](channels, num_classes, cfg.width, cfg.tile).to(device)
    if cfg.tiles not in INITIAL_TILES:
        raise ValueError(f"--tiles {cfg.tiles!r}: choose from {sorted(INITIAL_TILES)}")
    with torch.no_grad():  # saturated (+-1 after tanh), and distinct under the victim's shift + flip
        gen.tiles.copy_(3.0 * INITIAL_TILES[cfg.tiles](num_classes, tuple(gen.tiles.shape[1:]), cfg.seed))
    disc = Discriminator(channels).to(device)
    noise_clf = SmallCNN(channels, num_classes).to(device)
    surrogate = fresh_surrogate(channels, num_classes, cfg.seed, device)
    code_params = [*gen.encoder.parameters(), *gen.code_head.parameters()]
    confounder_params = [gen.tiles, *gen.local_head.parameters()]
    return Nets(
        gen, disc, noise_clf, surrogate,
        opt_code=torch.optim.Adam(code_params, lr=cfg.lr_code),
        opt_g=torch.optim.Adam(confounder_params, lr=cfg.lr_g),
        opt_d=torch.optim.Adam(disc.parameters(), lr=cfg.lr_d, betas=(0.5, 0.999)),
        opt_n=torch.optim.Adam(noise_clf.parameters(), lr=cfg.lr_d * 5),
        opt_s=torch.optim.SGD(surrogate.parameters(), lr=cfg.lr_surrogate, momentum=0.9),
    )


def save_checkpoint(path: Path, nets: Nets, step: int, cfg: TrainConfig, aug_gen: torch.Generator,
                    assignment: dict[str, Any] | None = None) -> None:
    tensors: dict[str, torch.Tensor] = {}
    groups = {}
    for name, module in nets.modules().items():
        tensors.update(module_tensors(name, module))
    for name, opt in nets.optimizers().items():
        flat, groups[name] = flatten_optimizer(name, opt)
        tensors.update(flat)
    tensors["rng.aug"] = aug_gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"format": CKPT_FORMAT, "step": step, "param_groups": groups, "config": _jsonable(asdict(cfg)),
            "tile_assignment": assignment or {}}
    save_tensors_atomic(path, tensors, {"cgan-checkpoint": json.dumps(meta)})


def load_checkpoint(path: Path, nets: Nets, aug_gen: torch.Generator, device: torch.device) -> tuple[int, dict[str, Any]]:
    """Restore every network, optimizer and RNG; returns the step to continue from and the tile assignment."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        raw = (fh.metadata() or {}).get("cgan-checkpoint")
    if raw is None:
        raise ValueError(f"{path}: not a cgan training checkpoint")
    meta = json.loads(raw)
    tensors = load_file(str(path), device=str(device))
    for name, module in nets.modules().items():
        module.load_state_dict(module_from(name, tensors))
    for name, opt in nets.optimizers().items():
        opt.load_state_dict(unflatten_optimizer(name, tensors, meta["param_groups"][name]))
    aug_gen.set_state(tensors["rng.aug"].cpu())
    torch.set_rng_state(tensors["rng.torch"].cpu())
    return int(meta["step"]), meta.get("tile_assignment", {})


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def masked_noise(gen: nn.Module, x: torch.Tensor, epsilon: float, mask_floor: float) -> torch.Tensor:
    """epsilon/255 * G(x) scaled by the local-activity mask: exactly what the protect engine adds."""
    return (epsilon / 255.0) * gen(x) * activity_mask(x, mask_floor)


def assignment_victim(gen: HardCodeGenerator, order: torch.Tensor, fit: tuple[torch.Tensor, torch.Tensor],
                      held: tuple[torch.Tensor, torch.Tensor], cfg: TrainConfig, victim: VictimConfig) -> float:
    """Clean held-out accuracy of a fresh victim trained on `fit` (images, labels) with class c carrying
    tile `order[c]` alone (no local head), through the mask, clamp and 8-bit rounding that protect applies."""
    x, y = fit
    with torch.no_grad():
        noise = gen.noise_over(torch.zeros_like(x), gen.tiles.detach().cpu()[order][y])
        protected = quantize_8bit(x + cfg.epsilon / 255.0 * noise * activity_mask(x, cfg.mask_floor))
    return train_victim(protected, y, *held, gen.num_codes, victim).test_accuracy


def assign_tiles(gen: HardCodeGenerator, data: LabeledImages, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Which class gets which tile: the order of the bank matters as much as the bank (on Fashion-MNIST
    one structured bank left 10,000-image victims at 20% or 36% by its order alone; docs/method.md,
    Measurement 9). Tries the bank's own order and `assign_candidates - 1` seeded permutations; for
    each, a fresh victim trains on training images carrying only their class's tile and is tested on
    clean held-out training images. The order whose victim learns least wins; the tiles are reordered."""
    if cfg.assign_candidates <= 1:
        return {}
    k = gen.num_codes
    shuffled = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))
    n_held = min(max(len(data) // 5, 1), ASSIGN_HELD_OUT)
    held, fit = data.subset(shuffled[:n_held]), data.subset(shuffled[n_held : n_held + ASSIGN_FIT])
    steps_per_epoch = math.ceil(len(fit) / cfg.batch_size)
    victim = VictimConfig(epochs=max(1, math.ceil(cfg.assign_steps / steps_per_epoch)), batch_size=cfg.batch_size,
                          seed=cfg.seed, device=device.type)
    draw = torch.Generator().manual_seed(cfg.seed + 1)
    orders = [torch.arange(k)] + [torch.randperm(k, generator=draw) for _ in range(cfg.assign_candidates - 1)]
    start = time.perf_counter()
    # Floats once for every order, on the CPU like any victim's data (train_victim moves each batch).
    fit_xy, held_xy = (fit.floats(), fit.labels), (held.floats(), held.labels)
    with torch.random.fork_rng(devices=[]):  # the victims reseed torch; the run's own stream stays as without them
        scores = [assignment_victim(gen, order, fit_xy, held_xy, cfg, victim) for order in orders]
    best = min(range(len(orders)), key=scores.__getitem__)
    with torch.no_grad():
        gen.tiles.copy_(gen.tiles[orders[best].to(gen.tiles.device)])
    return {"orders": [o.tolist() for o in orders], "victim_accuracy": [round(a, 4) for a in scores], "chosen": best,
            "fit_images": len(fit), "held_out_images": len(held), "victim_epochs": victim.epochs,
            "seconds": round(time.perf_counter() - start, 1)}


def code_shapes(gen: nn.Module) -> list[tuple[str, torch.Size]]:
    """The encoder's and code head's tensor names and shapes: what must match to copy them over."""
    return [(f"{part}.{k}", v.shape) for part in ("encoder", "code_head") for k, v in getattr(gen, part).state_dict().items()]


def take_codes(gen: HardCodeGenerator, path: Path, data: LabeledImages) -> dict[str, Any]:
    """Copy a trained generator's encoder + code head into `gen` (`--codes-from`), so a run can retrain
    the patterns (tiles, budget, mask, distortions) without refitting the classifier, ~80% of a run.
    Returns what the new weights record of where their codes came from."""
    if not path.is_file():
        raise UsageError(f"--codes-from {path}: no such file")
    source, meta = load_generator(path)
    if code_shapes(source) != code_shapes(gen):  # tiles and local head may differ (a v3 encoder into a v4)
        raise UsageError(f"--codes-from {path}: its generator is {meta.arch} {meta.arch_params}; "
                         f"this run builds {gen.arch} {gen.arch_params()}, whose encoder differs")
    if list(meta.class_names) != list(data.class_names) or meta.working_size != data.size:
        raise UsageError(
            f"--codes-from {path}: its classes {list(meta.class_names)} at {meta.working_size} px do not match "
            f"this data's {list(data.class_names)} at {data.size} px"
        )
    gen.encoder.load_state_dict(source.encoder.state_dict())
    gen.code_head.load_state_dict(source.code_head.state_dict())
    return {"file": path.name, "sha256": file_sha256(path), "seed": meta.seed, "dataset": meta.dataset.get("name"),
            "code_epochs": meta.recipe.get("code_epochs")}


def code_step(nets: Nets, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict[str, float]:
    """Stage 1: the encoder learns to infer the label (it is never given at protect time)."""
    for group in nets.opt_code.param_groups:
        group["lr"] = lr
    logits = nets.gen.code_logits(x)
    loss = F.cross_entropy(logits, y)
    nets.opt_code.zero_grad(set_to_none=True)
    loss.backward()
    nets.opt_code.step()
    return {"code_ce": loss.item(), "code_acc": (logits.argmax(1) == y).float().mean().item()}


def confounder_step(nets: Nets, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, aug_gen: torch.Generator) -> dict[str, float]:
    """Stage 2: one update of D, the noise classifier, the surrogate, then the tiles + local head."""
    eps = cfg.epsilon / 255.0
    protected = quantize_ste(x + masked_noise(nets.gen, x, cfg.epsilon, cfg.mask_floor))
    clean_v, prot_v = distort_pair(x, protected, aug_gen, cfg.distortions)
    noise_v = (prot_v - clean_v) / eps  # the noise as the victim gets it: clamped, rounded, distorted

    # Discriminator (hinge): clean -> -1, protected -> +1.
    d_loss = F.relu(1.0 + nets.disc(clean_v.detach())).mean() + F.relu(1.0 - nets.disc(prot_v.detach())).mean()
    nets.opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    nets.opt_d.step()
    # Noise classifier and surrogate follow the current noise.
    n_loss = F.cross_entropy(nets.noise_clf(noise_v.detach()), y)
    nets.opt_n.zero_grad(set_to_none=True)
    n_loss.backward()
    nets.opt_n.step()
    s_logits = nets.surrogate(prot_v.detach())
    s_loss = F.cross_entropy(s_logits, y)
    nets.opt_s.zero_grad(set_to_none=True)
    s_loss.backward()
    nets.opt_s.step()

    # Generator: noise must be readable alone (N->Y), fast to fit on x + n (min-min), and look clean.
    ny = F.cross_entropy(nets.noise_clf(noise_v), y)
    mm = F.cross_entropy(nets.surrogate(prot_v), y)
    adv = -nets.disc(prot_v).mean()
    g_loss = cfg.w_ny * ny + cfg.w_minmin * mm + cfg.w_adv * adv
    nets.opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    nets.opt_g.step()
    return {
        "d": d_loss.item(), "ny": ny.item(), "mm": mm.item(), "adv": adv.item(),
        "sur_acc": (s_logits.argmax(1) == y).float().mean().item(),
    }


@torch.no_grad()
def evaluate(nets: Nets, data: LabeledImages, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Final numbers on the training set (the images that will be protected)."""
    nets.gen.eval()
    code_accuracy = accuracy(nets.gen.code_logits, data.pixels, data.labels, device=device)
    linf = 0.0
    for i in range(0, len(data), 512):
        x = data.pixels[i : i + 512].to(device).float() / 255.0
        linf = max(linf, (255.0 * masked_noise(nets.gen, x, cfg.epsilon, cfg.mask_floor)).abs().max().item())
    nets.gen.train()
    return {"code_train_accuracy": code_accuracy, "noise_linf_255": linf}


def train(cfg: TrainConfig, data: LabeledImages | None = None) -> TrainResult:
    """The whole run: load data, build nets, (resume), two stages of steps, write weights + metrics.

    `data` overrides `cfg.data` (benchmarks pass a fixed subset); its name still goes into metadata.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    check_distortions(cfg.distortions)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    data = data if data is not None else load_labeled(cfg.data, split="train", size=cfg.size)
    channels, num_classes, side = data.channels, len(data.class_names), data.size
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    code_steps = 0 if cfg.codes_from else cfg.code_epochs * steps_per_epoch  # --codes-from: the encoder is fit already
    total_steps = code_steps + cfg.epochs * steps_per_epoch

    nets = build_nets(cfg, channels, num_classes, device)
    codes_source = take_codes(nets.gen, Path(cfg.codes_from), data) if cfg.codes_from else None
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    if cfg.resume:
        step, assignment = load_checkpoint(Path(cfg.resume), nets, aug_gen, device)
    else:  # a fresh run orders its tiles first (the checkpoint holds them ordered)
        step, assignment = 0, assign_tiles(nets.gen, data, cfg, device)
    ckpt_path = sibling(out, ".ckpt.safetensors")
    amp = autocast_context(device, resolve_precision(cfg.precision, device))
    sample_x = data.pixels[:8].float().div(255.0).to(device)

    start, logs = time.perf_counter(), {}
    with Progress(
        TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[losses]}"), disable=not cfg.progress, transient=False,
    ) as bar:
        task = bar.add_task("train", total=total_steps, completed=step, stage="", losses="")
        while step < total_steps:
            epoch, pos = divmod(step, steps_per_epoch)
            idx = epoch_order(len(data), cfg.seed, epoch)[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
            x = data.pixels[idx].to(device).float().div_(255.0)
            y = data.labels[idx].to(device)
            with amp:
                if step < code_steps:
                    # Cosine decay to 0: the last steps fit the training images the noise will be keyed to.
                    logs = code_step(nets, x, y, cfg.lr_code * 0.5 * (1 + math.cos(math.pi * step / code_steps)))
                else:
                    nets.gen.encoder.requires_grad_(False)  # codes are fixed in the confounder stage
                    nets.gen.code_head.requires_grad_(False)
                    if (step - code_steps) % cfg.reset_every == 0:
                        nets.surrogate.load_state_dict(fresh_surrogate(channels, num_classes, cfg.seed + step, device).state_dict())
                        nets.opt_s.state.clear()
                    logs = confounder_step(nets, cfg, x, y, aug_gen)
            step += 1
            stage = "codes" if step <= code_steps else "confounder"
            bar.update(task, completed=step, stage=stage, losses=" ".join(f"{k} {v:.3f}" for k, v in logs.items()))
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == total_steps):
                save_checkpoint(ckpt_path, nets, step, cfg, aug_gen, assignment)
            if cfg.sample_every and step % cfg.sample_every == 0:
                write_sample(nets.gen, sample_x, cfg.epsilon, cfg.mask_floor, sibling(out, ".samples") / f"step{step:07d}.png")

    seconds = time.perf_counter() - start
    metrics = {"steps": step, "seconds": round(seconds, 1), "last": logs, **evaluate(nets, data, cfg, device),
               **({"tile_assignment": assignment} if assignment else {})}
    meta = WeightsMeta(
        arch=nets.gen.arch, arch_params=nets.gen.arch_params(), epsilon=cfg.epsilon, working_size=side,
        channels=channels, num_classes=num_classes, class_names=list(data.class_names),
        recipe={
            "objective": OBJECTIVE,
            **_jsonable({k: v for k, v in asdict(cfg).items() if k not in ("out", "resume", "progress", "command", "data", "codes_from")}),
            **({"codes_from": codes_source} if codes_source else {}),
        },
        dataset=training_set_record(data, cfg.data),
        seed=cfg.seed, command=cfg.command or shlex.join(sys.argv), code_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    save_generator(out, nets.gen.cpu().eval(), meta)
    write_atomic(sibling(out, ".metrics.json"), json.dumps(metrics, indent=2) + "\n")
    return TrainResult(out, step, seconds, metrics)


def training_set_record(data: LabeledImages, name: str) -> dict[str, Any]:
    """What the weights say about their training images: name, count, fingerprint, per-image digests."""
    record = {"name": data.name or name, "size": len(data), "fingerprint": data.fingerprint()}
    digests = record_digests(data)
    if digests is not None:
        record[DIGESTS_KEY] = digests
    return record


@torch.no_grad()
def write_sample(gen: nn.Module, x: torch.Tensor, epsilon: float, mask_floor: float, path: Path) -> None:
    gen.eval()
    protected = quantize_8bit(x + masked_noise(gen, x, epsilon, mask_floor))
    gen.train()
    with atomic_open(path) as fh:
        sample_grid(x, protected, epsilon).save(fh, "PNG")


WELL_FIT = 0.99  # code train accuracy below which `cgan train` warns (docs/method.md: protection needs ~100%)


def train_cli(cfg: TrainConfig, threads: int = 0) -> int:
    """`cgan train` after parsing: train, say where the weights went, warn on a poorly fit encoder."""
    import typer

    set_cpu_threads(threads or None)
    try:
        result = train(cfg)
    except ValueError as exc:  # UsageErrors, and hyper-parameters that cannot be used
        typer.echo(f"error: {exc}", err=True)
        return 2
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
    return 0
