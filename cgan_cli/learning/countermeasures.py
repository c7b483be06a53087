"""What a victim can do to data it suspects is protected, to learn from it anyway.

Two kinds; the test set is never protected, whatever the countermeasure:

- data transforms, uint8 (N, C, H, W) -> uint8 (N, C, H, W), applied once to the whole training set,
  the way someone would re-save the files (so every result is valid 8-bit data again):
  `jpeg:Q`, `grayscale`, `blur:SIGMA`, `rescale:F`. They are the victim's input preprocessing, so
  `verify` passes its clean test images through the same transform (a model trained on blurred
  images and tested on sharp ones measures the mismatch, not the protection);
- batch hooks for `victims.train_victim`, built fresh per training run from a seed (so the clean
  and protected runs see identical randomness): `strong-aug` (cutout + mixup), `adv:EPS` (PGD
  adversarial training).

`none` is the plain recipe. Parse a command-line spec with `parse_countermeasure`. To add one: its
builder in REGISTRY plus its help line in core/choices.py COUNTERMEASURES (a test checks that both
list the same forms).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cgan_cli.core.choices import COUNTERMEASURES
from cgan_cli.core.noise import luma
from cgan_cli.learning.distortions import gaussian_blur_float, jpeg_round_trip
from cgan_cli.learning.victims import BatchHook

DataTransform = Callable[[torch.Tensor], torch.Tensor]
HookFactory = Callable[[int, int], BatchHook]  # (seed, num_classes) -> hook


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def jpeg(pixels: torch.Tensor, quality: int) -> torch.Tensor:
    """Re-encode every image as JPEG at `quality` with PIL and decode it again."""
    if not 1 <= quality <= 100:
        raise ValueError(f"jpeg quality must be 1..100, got {quality}")
    arrays = pixels.permute(0, 2, 3, 1).numpy()
    out = np.stack([jpeg_round_trip(arr, quality, (0, 0)) for arr in arrays]) if len(arrays) else arrays.copy()
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """Replace every channel by the luma (channel count kept so the victim is unchanged; no-op on 1 channel)."""
    if pixels.shape[1] == 1:
        return pixels.clone()
    if pixels.shape[1] != 3:
        raise ValueError(f"grayscale needs 1 or 3 channels, got {pixels.shape[1]}")
    return _to_uint8(luma(pixels.float()) / 255.0).expand_as(pixels).contiguous()


def gaussian_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, kernel radius ceil(3 sigma), reflect padding at the borders."""
    if sigma <= 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    return _to_uint8(gaussian_blur_float(pixels.float() / 255.0, sigma))


def rescale(pixels: torch.Tensor, factor: float) -> torch.Tensor:
    """Downscale by `factor` (antialiased bilinear), then upscale back to the original size."""
    if factor <= 1:
        raise ValueError(f"rescale factor must be > 1, got {factor}")
    h, w = pixels.shape[-2:]
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    x = pixels.float() / 255.0
    x = F.interpolate(x, size=small, mode="bilinear", align_corners=False, antialias=True)
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return _to_uint8(x)


def strong_aug_hook(seed: int, num_classes: int, cutout: float = 0.5) -> BatchHook:
    """Cutout (one gray square, side `cutout` x image side, per image) then mixup (Beta(1,1) = uniform lambda).

    Returns (images, soft targets): mixup mixes labels as well as pixels.
    """
    gen = torch.Generator().manual_seed(seed)

    def hook(x: torch.Tensor, y: torch.Tensor, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        side_h, side_w = max(1, int(h * cutout)), max(1, int(w * cutout))
        cy = torch.randint(0, h, (b,), generator=gen)
        cx = torch.randint(0, w, (b,), generator=gen)
        rows, cols = torch.arange(h), torch.arange(w)
        in_rows = (rows[None, :] >= (cy - side_h // 2)[:, None]) & (rows[None, :] < (cy - side_h // 2 + side_h)[:, None])
        in_cols = (cols[None, :] >= (cx - side_w // 2)[:, None]) & (cols[None, :] < (cx - side_w // 2 + side_w)[:, None])
        hole = (in_rows[:, :, None] & in_cols[:, None, :])[:, None].to(x.device)
        x = torch.where(hole, torch.full_like(x, 0.5), x)
        lam = torch.rand((), generator=gen).item()
        perm = torch.randperm(b, generator=gen).to(x.device)
        onehot = F.one_hot(y, num_classes).float()
        return lam * x + (1 - lam) * x[perm], lam * onehot + (1 - lam) * onehot[perm]

    return hook


def adversarial_hook(seed: int, num_classes: int, epsilon: float, steps: int = 3) -> BatchHook:
    """PGD adversarial training (Madry et al.): replace each batch by its L-inf `epsilon`/255 worst case.

    Random start, `steps` sign-gradient steps of 2.5 * epsilon / steps. The attack runs with the
    model in eval mode so the BatchNorm statistics only see the batches actually trained on.
    """
    gen = torch.Generator().manual_seed(seed)
    eps = epsilon / 255.0
    alpha = 2.5 * eps / steps

    def hook(x: torch.Tensor, y: torch.Tensor, model: nn.Module) -> torch.Tensor:
        was_training = model.training
        model.eval()
        delta = ((torch.rand(x.shape, generator=gen) * 2 - 1) * eps).to(x.device)
        with torch.enable_grad():
            for _ in range(steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        model.train(was_training)
        return (x + delta).clamp(0, 1).detach()

    return hook


@dataclass(frozen=True)
class Countermeasure:
    """A parsed `--countermeasure` spec: a data transform, a hook factory, or neither (`none`)."""

    spec: str
    transform: DataTransform | None = None
    make_hook: HookFactory | None = None

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.transform(pixels) if self.transform is not None else pixels

    def hook(self, seed: int, num_classes: int) -> BatchHook | None:
        return self.make_hook(seed, num_classes) if self.make_hook is not None else None


def _number(spec: str, arg: str, kind: type) -> float:
    try:
        return kind(arg)
    except ValueError:
        raise ValueError(f"countermeasure {spec!r}: {arg!r} is not a valid {kind.__name__}") from None


def _above(spec: str, arg: str, bound: float) -> float:
    value = float(_number(spec, arg, float))
    if value <= bound:
        raise ValueError(f"countermeasure {spec!r}: {spec.partition(':')[0].strip().lower()} needs a value > {bound:g}")
    return value


def _quality(spec: str, arg: str) -> int:
    quality = int(_number(spec, arg, int))
    jpeg(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), quality)  # validates the range now, not mid-run
    return quality


Builder = Callable[[str, str], Countermeasure]  # (whole spec, argument after the colon) -> Countermeasure

REGISTRY: dict[str, Builder] = {  # spec form (a key of core.choices.COUNTERMEASURES; `:X` takes an argument) -> builder
    "none": lambda spec, arg: Countermeasure(spec),
    "jpeg:Q": lambda spec, arg: Countermeasure(spec, transform=partial(jpeg, quality=_quality(spec, arg))),
    "grayscale": lambda spec, arg: Countermeasure(spec, transform=grayscale),
    "blur:SIGMA": lambda spec, arg: Countermeasure(spec, transform=partial(gaussian_blur, sigma=_above(spec, arg, 0))),
    "rescale:F": lambda spec, arg: Countermeasure(spec, transform=partial(rescale, factor=_above(spec, arg, 1))),
    "strong-aug": lambda spec, arg: Countermeasure(spec, make_hook=strong_aug_hook),
    "adv:EPS": lambda spec, arg: Countermeasure(spec, make_hook=partial(adversarial_hook, epsilon=_above(spec, arg, 0))),
}


def parse_countermeasure(spec: str) -> Countermeasure:
    """`jpeg:75` -> Countermeasure via REGISTRY; raises ValueError naming the valid forms on anything else."""
    name, _, arg = spec.strip().partition(":")
    for form, build in REGISTRY.items():
        form_name, _, form_arg = form.partition(":")
        if name.lower() == form_name and bool(arg) == bool(form_arg):
            return build(spec, arg)
    raise ValueError(f"unknown countermeasure {spec!r}; valid forms: {', '.join(COUNTERMEASURES)}")
