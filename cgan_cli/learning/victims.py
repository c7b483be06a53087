"""Fresh victim classifiers: train on (possibly protected) images, test on clean images.

This is the honest test of unlearnability, shared by `cgan verify` and the training benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cgan_cli.core.device import autocast_context
from cgan_cli.learning.config import VictimConfig
from cgan_cli.learning.nets import build_victim


@dataclass
class VictimResult:
    test_accuracy: float
    epoch_accuracy: list[float] = field(default_factory=list)  # clean-test accuracy after each epoch
    train_accuracy: float = 0.0  # on the data it was trained on, last epoch
    seconds: float = 0.0


def crop_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Standard augmentation, batched: reflect-pad by 1/8 of the side, random crop back, random h-flip."""
    b, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]  # (b, h, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]  # (b, 1, w)
    out = padded.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out).contiguous()


@torch.no_grad()
def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int = 512,
             device: str | torch.device = "cpu") -> float:
    """Share of `x` whose top logit under `predict` is `y`; uint8 pixels become [0, 1] floats batch by batch.

    The one evaluation loop of the learning side (victims, surrogates, the generator's code head);
    the caller puts its model in eval mode.
    """
    correct = 0
    for i in range(0, len(y), batch_size):
        xb = x[i : i + batch_size].to(device)
        if xb.dtype == torch.uint8:
            xb = xb.float().div_(255.0)
        correct += (predict(xb).argmax(1).cpu() == y[i : i + batch_size]).sum().item()
    return correct / max(1, len(y))


# A hook returns the new batch, or (batch, target) where target is a (B, K) class-probability
# tensor (mixup): the loss then uses the soft target, train accuracy still the hard labels.
BatchHook = Callable[[torch.Tensor, torch.Tensor, nn.Module], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


def _autocast(cfg: VictimConfig):
    """CPU victims always train in fp32 (exact, deterministic); autocast only on CUDA."""
    return autocast_context(torch.device(cfg.device), cfg.precision)


def train_victim(*args, **kwargs) -> VictimResult:
    """`fit_victim`'s result without the network: what verify and the benchmarks record."""
    return fit_victim(*args, **kwargs)[1]


def fit_victim(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    cfg: VictimConfig,
    batch_hook: BatchHook | None = None,
    model: nn.Module | None = None,
) -> tuple[nn.Module, VictimResult]:
    """Train a fresh victim on float images in [0, 1]; report clean-test accuracy per epoch; return it too.

    `batch_hook(x, y, model) -> x` lets a countermeasure change each training batch (mixup, cutout,
    adversarial training) without a second training loop. `model` (fine-tuning a trained victim, or
    an architecture not in nets.py) replaces the fresh `cfg.arch` network.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = (model if model is not None else build_victim(cfg.arch, train_x.shape[1], num_classes)).to(cfg.device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    steps_per_epoch = -(-len(train_y) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15)
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {cfg.precision!r}; choose fp32, bf16 or fp16")
    scaler = torch.amp.GradScaler("cuda", enabled=torch.device(cfg.device).type == "cuda" and cfg.precision == "fp16")
    start, curve, train_acc = time.perf_counter(), [], 0.0
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=gen)
        correct = 0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x, y = train_x[idx], train_y[idx]
            if cfg.augment:
                x = crop_flip(x, gen)
            x, y = x.to(cfg.device), y.to(cfg.device)
            target = y
            if batch_hook is not None:
                hooked = batch_hook(x, y, model)
                x, target = hooked if isinstance(hooked, tuple) else (hooked, y)
            with _autocast(cfg):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), target)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            correct += (logits.argmax(1) == y).sum().item()
        train_acc = correct / len(order)
        model.eval()
        with _autocast(cfg):
            curve.append(accuracy(model, test_x, test_y, device=cfg.device))
    return model, VictimResult(curve[-1], curve, train_acc, time.perf_counter() - start)
