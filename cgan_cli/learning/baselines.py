"""Comparison noises for `cgan verify --baseline`: what ConfounderGAN has to beat, on the same data and budget.

Every function takes clean uint8 pixels (N, C, H, W) and an L-inf budget `epsilon` in /255 units and
returns protected uint8 pixels, rounded to 8 bits like a written file (as `generators.protect_tensor`).

- random:    uniform noise in [-eps, eps], fresh per image. The control: should change nothing.
- classwise: one fixed uniform pattern per class, added to every image of that class. Needs the
             labels; a strong shortcut, but one pattern per class is easy to estimate and remove.
- em:        sample-wise error-minimizing noise (Huang et al., ICLR 2021, "Unlearnable Examples"):
             min-min bilevel optimisation. Alternate (a) a few SGD steps training a surrogate on
             x + delta, and (b) PGD on every delta that *minimises* the surrogate's loss, until the
             surrogate's error on x + delta drops below a stop error.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F

from cgan_cli.core.choices import Baseline
from cgan_cli.core.generators import quantize_8bit
from cgan_cli.learning.config import EMConfig
from cgan_cli.learning.nets import SmallCNN
from cgan_cli.learning.victims import accuracy

BASELINES = tuple(b.value for b in Baseline)


def add_noise(pixels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """uint8 pixels + float noise (in [0, 1] units) -> uint8, clamped and rounded."""
    return torch.round(quantize_8bit(pixels.float() / 255.0 + noise) * 255.0).to(torch.uint8)


def random_noise(pixels: torch.Tensor, epsilon: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    noise = (torch.rand(pixels.shape, generator=gen) * 2 - 1) * (epsilon / 255.0)
    return add_noise(pixels, noise)


def classwise_noise(pixels: torch.Tensor, labels: torch.Tensor, num_classes: int, epsilon: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    patterns = (torch.rand((num_classes, *pixels.shape[1:]), generator=gen) * 2 - 1) * (epsilon / 255.0)
    return add_noise(pixels, patterns[labels])


def error_minimizing_noise(
    pixels: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epsilon: float,
    seed: int,
    cfg: EMConfig | None = None,
    device: str = "cpu",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Sample-wise error-minimizing noise; returns (protected uint8 pixels, run details for the report)."""
    cfg = cfg or EMConfig()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    eps, alpha = epsilon / 255.0, epsilon / 255.0 / 10
    x = pixels.float() / 255.0
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
    model = SmallCNN(x.shape[1], num_classes, cfg.surrogate_width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    order, cursor = torch.randperm(len(labels), generator=gen), 0
    error, rounds = 1.0, 0
    for rounds in range(1, cfg.max_rounds + 1):
        # (a) outer min: a few steps of the surrogate on the currently protected data
        model.train()
        for _ in range(cfg.train_steps):
            if cursor >= len(order):
                order, cursor = torch.randperm(len(labels), generator=gen), 0
            idx = order[cursor : cursor + cfg.batch_size]
            cursor += cfg.batch_size
            xb = (x[idx] + delta[idx]).clamp(0, 1).to(device)
            loss = F.cross_entropy(model(xb), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        # (b) inner min: PGD *descending* the loss on every sample's own noise
        model.eval()
        for i in range(0, len(labels), cfg.batch_size):
            xb, yb = x[i : i + cfg.batch_size].to(device), labels[i : i + cfg.batch_size].to(device)
            d = delta[i : i + cfg.batch_size].to(device)
            for _ in range(cfg.pgd_steps):
                d.requires_grad_(True)
                loss = F.cross_entropy(model((xb + d).clamp(0, 1)), yb)
                (grad,) = torch.autograd.grad(loss, d)
                d = ((d.detach() - alpha * grad.sign()).clamp(-eps, eps) + xb).clamp(0, 1) - xb
            delta[i : i + cfg.batch_size] = d.detach().cpu()
        model.eval()
        error = 1.0 - accuracy(model, (x + delta).clamp(0, 1), labels, device=device)
        if error < cfg.stop_error:
            break
    details = {"em": asdict(cfg), "rounds": rounds, "surrogate_error": error, "stopped": error < cfg.stop_error}
    return add_noise(pixels, delta), details


def build_baseline(
    name: str,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epsilon: float,
    seed: int,
    em: EMConfig | None = None,
    device: str = "cpu",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Dispatch by `--baseline` name: (protected uint8 pixels, details)."""
    if name == "random":
        return random_noise(pixels, epsilon, seed), {}
    if name == "classwise":
        return classwise_noise(pixels, labels, num_classes, epsilon, seed), {}
    if name == "em":
        return error_minimizing_noise(pixels, labels, num_classes, epsilon, seed, em, device)
    raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
