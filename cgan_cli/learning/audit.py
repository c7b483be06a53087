"""`cgan audit`: was this model trained on images protected by this generator? (docs/audit.md)

A model that learned a confounder shortcut reacts to the pattern: add the pattern of code k to clean
images and its predictions move toward the class it associated with k. A model that never saw the
protected data reacts to the generator's patterns no more than to other patterns of the same kind.

source -> engine -> sink:
- source: the model as a black box (TorchScript, ONNX, or a Python `module:function`: predictions
  only) and clean unlabeled images fitted to its input convention;
- engine: for each generator code k, the images plus the noise G would add had its encoder chosen k
  (`noise_for_code`); for each control, the same with one of the tiles' pixels shuffled (same values,
  norm and period; through G's tanh the same L-inf bound; `--controls balanced`: some signs flipped
  so the mean is gone). Each pattern's statistic is the largest rise, over the model's classes, of
  the mean log-probability, beyond what the other patterns of its set do; taking the best class per
  pattern makes the model's class numbering irrelevant. A one-sided exact Wilcoxon rank-sum test
  asks whether the codes' statistics rank above the controls';
- sink: a rich table, or JSON with p_value, verdict, effect and the per-code rows.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from cgan_cli import __version__
from cgan_cli.core.choices import TileBank
from cgan_cli.core.engine import working_shape
from cgan_cli.core.errors import UsageError
from cgan_cli.core.noise import (
    NO_MASK,
    activity_mask,
    budget_levels,
    luma,
    mask_floor_for,
)
from cgan_cli.core.shipped import default_weights
from cgan_cli.core.weights import file_sha256, load_generator
from cgan_cli.learning.config import AuditConfig
from cgan_cli.learning.data import load_unlabeled

Predict = Callable[[torch.Tensor], Any]  # normalised (B, C, S, S) float batch -> (B, classes) scores
LOG_FLOOR = 1e-6  # probabilities are floored here before the log (label-only APIs return exact zeros)
# Tile banks (`cgan train --tiles`) that no shuffle of their own values controls for: +-DC, stripes and
# checkerboards move a model that never saw protected images more than any shuffle of them does (a clean
# SmallCNN came out at p = 8.6e-8 against the structured Fashion-MNIST generator; docs/audit.md).
UNCONTROLLED_TILES = {TileBank.structured.value}


class AuditError(UsageError):
    """An audit that cannot run as asked (model, images or options); the message says what to change."""


# ----------------------------------------------------------------------------- source: the model


def load_torchscript(path: Path) -> Predict:
    """A `torch.jit.save` file: TorchScript code and tensors, no Python pickle of arbitrary objects."""
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise AuditError(f"{path}: not a TorchScript file ({str(exc).splitlines()[0]}). Export the model with "
                         "torch.jit.save(torch.jit.script(model) or torch.jit.trace(model, example), path); "
                         "cgan never loads pickled models (torch.save)") from exc
    module.eval()
    return module


def load_onnx(path: Path) -> Predict:
    """An ONNX graph run by onnxruntime on the CPU (optional extra: pip install 'cgan[onnx]')."""
    try:
        import onnxruntime
    except ImportError:
        raise AuditError(f"{path}: ONNX models need onnxruntime (pip install 'cgan[onnx]'); "
                         "or export the model to TorchScript") from None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise AuditError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from exc
    inp = session.get_inputs()[0]
    fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def predict(x: torch.Tensor) -> np.ndarray:
        chunk = fixed_batch or len(x)
        arrays = x.numpy().astype(np.float32)
        return np.concatenate([session.run(None, {inp.name: arrays[i : i + chunk]})[0] for i in range(0, len(arrays), chunk)])

    return predict


def load_predict_hook(spec: str) -> Predict:
    """`package.module:function` or `path/to/file.py:function`: a Python callable (it runs as your own code)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise AuditError(f"--predict {spec!r}: expected module:function or file.py:function")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise AuditError(f"--predict {spec!r}: {path} not found")
            loaded = importlib.util.spec_from_file_location(f"cgan_audit_predict_{path.stem}", path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(target)
    except Exception as exc:  # noqa: BLE001 - the user's own code: any error it raises is theirs to fix
        raise AuditError(f"--predict {spec!r}: cannot import {target} ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise AuditError(f"--predict {spec!r}: {target} has no callable {name!r}")
    return fn


def load_model(cfg: AuditConfig) -> tuple[Predict, dict[str, Any]]:
    if (cfg.model is None) == (cfg.predict is None):
        raise AuditError("give exactly one of MODEL (a TorchScript .pt or ONNX .onnx file) or --predict module:function")
    if cfg.predict is not None:
        return load_predict_hook(cfg.predict), {"predict": cfg.predict}
    path = Path(cfg.model)
    if not path.is_file():
        raise AuditError(f"model file not found: {path}")
    record = {"path": str(path), "sha256": file_sha256(path)}
    if path.suffix.lower() == ".onnx":
        return load_onnx(path), {**record, "format": "onnx"}
    return load_torchscript(path), {**record, "format": "torchscript"}


# ----------------------------------------------------------------------------- engine: patterns


def control_tiles(tiles: torch.Tensor, sets: int, seed: int, kind: str) -> torch.Tensor:
    """`sets` x K control tiles: tile j % K with its pixel positions shuffled (the same shuffle for every channel).

    `shuffled` keeps the tile's exact values (so its mean, L2 norm, value histogram and period) and,
    through the same local head and tanh, the same L-inf bound; only the spatial arrangement that a
    victim could have learned is gone. `balanced` also flips the signs of some values so that each
    channel's mean after tanh is as close to 0 as the values allow: same magnitudes, norm and bound,
    but no mean, for a victim that learned a tile by how bright or dark it is on average, which a
    shuffle keeps (tanh is odd, so a flipped value is exactly the negated noise). (Phase-randomised
    tiles, which keep the power spectrum, are no control: a victim trained with random crops keys on
    the spectrum and reacts to them as to the code itself; see docs/audit.md.)
    """
    gen = torch.Generator().manual_seed(seed)
    k, c, h, w = tiles.shape
    flat = tiles.reshape(k, c, h * w)
    if kind == "balanced":
        flat = torch.stack([zero_mean_signs(tile) for tile in flat])
    out = [flat[j % k][:, torch.randperm(h * w, generator=gen)] for j in range(sets * k)]
    return torch.stack(out).reshape(sets * k, c, h, w)


def zero_mean_signs(tile: torch.Tensor) -> torch.Tensor:
    """(C, N) pre-tanh values with signs chosen greedily, largest magnitude first, to keep each row's tanh sum near 0."""
    out = torch.empty_like(tile)
    for ch, values in enumerate(tile):
        magnitude = values.abs()
        total = 0.0
        for i in magnitude.argsort(descending=True).tolist():
            sign = -1.0 if total > 0 else 1.0
            out[ch, i] = sign * magnitude[i]
            total += sign * float(torch.tanh(magnitude[i]))
    return out


def _to_channels(x: torch.Tensor, channels: int, average: bool) -> torch.Tensor:
    """1 <-> 3 channels: gray replicated; RGB to luma (images) or to the channel mean (noise), as the engine does."""
    if x.shape[1] == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1)
    if average:
        return x.mean(1, keepdim=True)
    return luma(x)


class Patterns:
    """Adds pattern p (codes first, then controls) to a uint8 batch, in whole levels within epsilon, as protect does."""

    def __init__(self, generator: torch.nn.Module, meta, epsilon: float, size: int, control_sets: int, seed: int,
                 controls: str) -> None:
        self.generator, self.meta = generator, meta
        self.codes = int(generator.num_codes)
        if self.codes < 2:
            raise AuditError(f"the generator has {self.codes} code; the test compares at least 2")
        code_tiles = generator.tiles.detach()
        self.tiles = torch.cat([code_tiles, control_tiles(code_tiles, control_sets, seed, controls)])
        self.epsilon, self.levels = epsilon, budget_levels(epsilon, 255)
        self.mask_floor = mask_floor_for(None, meta)  # as the engine: the weights' default mask
        self.gen_shape = working_shape(size, size, meta.working_size)

    def __len__(self) -> int:
        return len(self.tiles)

    @torch.inference_mode()
    def on(self, pixels: torch.Tensor) -> Callable[[int], torch.Tensor]:
        """For a uint8 (B, C, S, S) batch: p -> float [0, 1] images with pattern p added.

        What depends only on the images (the working-size copy, the local head, the mask) is computed
        once per batch; each pattern then costs one tanh (for code k the same noise as `noise_for_code`).
        """
        base = pixels.float()
        x = base / 255.0
        if tuple(x.shape[-2:]) != self.gen_shape:
            x = F.interpolate(x, size=self.gen_shape, mode="bilinear", antialias=True, align_corners=False)
        local = self.generator.local(_to_channels(x, self.meta.channels, average=False))
        mask = activity_mask(x, self.mask_floor) if self.mask_floor < NO_MASK else None

        @torch.inference_mode()
        def add(p: int) -> torch.Tensor:
            tile = self.tiles[p]
            direction = self.generator.noise_over(local, tile.expand(len(local), *tile.shape))
            direction = _to_channels(direction.float().clamp(-1, 1), pixels.shape[1], average=True)
            if mask is not None:
                direction = direction * mask
            if tuple(direction.shape[-2:]) != tuple(pixels.shape[-2:]):
                direction = F.interpolate(direction, size=tuple(pixels.shape[-2:]), mode="bilinear", align_corners=False)
            levels = torch.round(direction * self.epsilon).clamp(-self.levels, self.levels)
            return (base + levels).clamp(0, 255) / 255.0

        return add


# ----------------------------------------------------------------------------- engine: statistics


def rank_sum_p_value(codes: list[float], controls: list[float]) -> float:
    """One-sided exact Wilcoxon rank-sum p-value: P(codes' rank sum >= observed) if all K + M were exchangeable.

    Ties get mid-ranks; the exact permutation distribution of the (doubled, integer) mid-ranks is
    counted by dynamic programming, so the p-value is exact for any tie pattern.
    """
    values = np.asarray(list(codes) + list(controls), dtype=np.float64)
    k, n = len(codes), len(values)
    order = values.argsort(kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(1, n + 1)
    for v in np.unique(values):  # mid-ranks for ties
        tie = values == v
        ranks[tie] = ranks[tie].mean()
    doubled = np.rint(2 * ranks).astype(int)
    observed = int(doubled[:k].sum())
    total = int(doubled.sum())
    ways = np.zeros((k + 1, total + 1))
    ways[0, 0] = 1.0
    for r in doubled:
        ways[1:, r:] = ways[1:, r:] + ways[:-1, : total + 1 - r]
    return float(ways[k, observed:].sum() / ways[k].sum())


def to_probabilities(scores: Any, outputs: str) -> tuple[torch.Tensor, str]:
    """The model's answer as (B, classes) probabilities; `auto` decides once, on the first batch."""
    out = scores[0] if isinstance(scores, (tuple, list)) else scores
    out = torch.as_tensor(np.asarray(out) if not isinstance(out, torch.Tensor) else out).detach().float().cpu()
    if out.ndim != 2 or out.shape[1] < 2:
        raise AuditError(f"the model returned shape {tuple(out.shape)}; expected (batch, classes) with at least 2 classes")
    if not torch.isfinite(out).all():
        raise AuditError("the model returned NaN or Inf")
    if outputs == "auto":
        rows = out.sum(1)
        outputs = "probs" if out.min() >= 0 and torch.allclose(rows, torch.ones_like(rows), atol=1e-3) else "logits"
    return (out.softmax(1) if outputs == "logits" else out), outputs


def _normaliser(values: tuple[float, ...], channels: int, option: str) -> torch.Tensor:
    if len(values) not in (1, channels):
        raise AuditError(f"{option}: {len(values)} values for a {channels}-channel input (give 1 or {channels})")
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def measure(predict: Predict, pixels: torch.Tensor, patterns: Patterns, cfg: AuditConfig, channels: int) -> dict[str, Any]:
    """Per pattern and model class, averaged over the images: the log-probability shift, the probability shift
    and the change in top-1 share, each against the same clean image. Batch by batch, so memory stays flat."""
    mean, std = _normaliser(cfg.mean, channels, "--mean"), _normaliser(cfg.std, channels, "--std")
    if (std <= 0).any():
        raise AuditError("--std: every value must be > 0")
    outputs, sums = cfg.outputs, None
    for i in range(0, len(pixels), cfg.batch_size):
        batch = pixels[i : i + cfg.batch_size]
        add_pattern, clean = patterns.on(batch), None
        for p in range(-1, len(patterns)):  # -1 = the clean images
            x = batch.float() / 255.0 if p < 0 else add_pattern(p)
            try:
                with torch.inference_mode():
                    scores = predict((x - mean) / std)
                probs, outputs = to_probabilities(scores, outputs)
            except AuditError:
                raise
            except Exception as exc:  # noqa: BLE001 - a foreign model or API: whatever it raises, say so plainly
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise AuditError(f"the model failed on a {tuple(x.shape)} float batch ({first}); "
                                 "check --size, --channels, --mean/--std") from exc
            if len(probs) != len(x):
                raise AuditError(f"the model returned {len(probs)} rows for a batch of {len(x)} images")
            probs = probs.double()
            if sums is None:
                sums = {key: torch.zeros(len(patterns), probs.shape[1], dtype=torch.float64) for key in ("log", "prob", "top1")}
            if probs.shape[1] != sums["log"].shape[1]:
                raise AuditError(f"the model returned {probs.shape[1]} classes, earlier {sums['log'].shape[1]}")
            top1 = F.one_hot(probs.argmax(1), probs.shape[1]).double()
            if clean is None:
                clean = (probs.clamp_min(LOG_FLOOR).log(), probs, top1)
                continue
            sums["log"][p] += (probs.clamp_min(LOG_FLOOR).log() - clean[0]).sum(0)
            sums["prob"][p] += (probs - clean[1]).sum(0)
            sums["top1"][p] += (top1 - clean[2]).sum(0)
    return {**{key: value / len(pixels) for key, value in sums.items()}, "outputs": outputs}


def contrasts(log_shift: torch.Tensor, codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pattern's log-probability shift minus the mean of the other patterns of its set, best class per pattern.

    Sets are the K codes, then each run of K controls. Subtracting the set's common response removes
    what any pattern of this kind does (a victim of texture shortcuts reacts to every periodic
    pattern; a clean model drifts toward "noisy-looking" classes), leaving what is specific to one
    pattern; codes and controls are treated identically, so under the null they stay exchangeable.
    """
    values, classes = [], []
    for start in range(0, len(log_shift), codes):
        group = log_shift[start : start + codes]
        others = (group.sum(0, keepdim=True) - group) / (len(group) - 1)
        best, matched = (group - others).max(1)
        values.append(best)
        classes.append(matched)
    return torch.cat(values), torch.cat(classes)


def statistics(measured: dict[str, Any], codes: int, alpha: float) -> dict[str, Any]:
    """The rank test of codes vs controls on the specific log-probability shifts, and the per-code rows."""
    specific, matched = contrasts(measured["log"], codes)
    code_stats, control_stats = specific[:codes].tolist(), specific[codes:].tolist()
    ctrl = np.asarray(control_stats)
    mu, sigma = float(ctrl.mean()), float(ctrl.std(ddof=1))
    p_value = rank_sum_p_value(code_stats, control_stats)
    rows = []
    for k in range(codes):
        c = int(matched[k])
        above = int((ctrl < code_stats[k]).sum())
        rows.append({
            "code": k,
            "matched_class": c,
            "specific_log_shift": code_stats[k],
            "log_shift": float(measured["log"][k, c]),
            "prob_shift": float(measured["prob"][k, c]),
            "top1_shift": float(measured["top1"][k, c]),
            "z": (code_stats[k] - mu) / sigma if sigma > 0 else None,
            "controls_below": above,
            "rank_p": (1 + len(ctrl) - above) / (1 + len(ctrl)),
        })
    return {
        "p_value": p_value,
        "flagged": p_value < alpha,
        "effect": float(np.mean(code_stats) - np.median(ctrl)),
        "effect_z": float((np.mean(code_stats) - mu) / sigma) if sigma > 0 else None,
        "codes": rows,
        "distinct_matched_classes": len({r["matched_class"] for r in rows}),
        "controls": {"count": len(ctrl), "mean": mu, "std": sigma, "specific_log_shifts": control_stats},
    }


def verdict(stats: dict[str, Any], alpha: float) -> str:
    p = stats["p_value"]
    if stats["flagged"]:
        return (f"FLAGGED (p = {p:.2g} < {alpha:g}): the model reacts to this generator's patterns far more than to "
                f"control patterns of the same strength; it was most likely trained on images protected with it.")
    return (f"not flagged (p = {p:.2g} >= {alpha:g}): no evidence that the model learned this generator's patterns. "
            f"This does not prove it never saw protected images: a model trained on few of them, or after a "
            f"countermeasure, may not react (docs/audit.md).")


# ----------------------------------------------------------------------------- the whole command


def audit(cfg: AuditConfig) -> dict[str, Any]:
    """Run the audit; returns the report (what --json prints)."""
    start = time.perf_counter()
    if cfg.control_sets < 1:
        raise AuditError(f"--control-sets {cfg.control_sets}: need at least 1")
    if not 0 < cfg.alpha < 1:
        raise AuditError(f"--alpha {cfg.alpha:g}: must be between 0 and 1")
    weights = cfg.weights or default_weights()
    if weights is None:
        raise AuditError("no --weights given and no shipped default generator in this installation")
    if cfg.images is None:
        raise AuditError("--images DIR is required: clean images of the kind the model classifies")
    generator, meta = load_generator(Path(weights), "cpu")
    if meta.recipe.get("tiles") in UNCONTROLLED_TILES:
        raise AuditError(f"{weights} was trained with --tiles {meta.recipe['tiles']}: the audit has no valid controls for those "
                         "patterns (a model that never saw protected images reacts to them too, so it would be flagged). "
                         "Audit only data protected by a generator trained with --tiles far-apart, e.g. the shipped "
                         "cgan-fashion-mnist-v3.safetensors or the RGB generators")
    predict, model_record = load_model(cfg)
    size = cfg.size or meta.working_size
    channels = cfg.channels or meta.channels
    if channels not in (1, 3):
        raise AuditError(f"--channels {channels}: must be 1 or 3")
    epsilon = float(cfg.epsilon if cfg.epsilon is not None else meta.epsilon)
    pixels, used, skipped = load_unlabeled(Path(cfg.images), size, channels, cfg.limit, cfg.seed)
    patterns = Patterns(generator, meta, epsilon, size, cfg.control_sets, cfg.seed, cfg.controls)
    measured = measure(predict, pixels, patterns, cfg, channels)
    stats = statistics(measured, patterns.codes, cfg.alpha)
    names = meta.class_names if len(meta.class_names) == patterns.codes else [str(k) for k in range(patterns.codes)]
    for row in stats["codes"]:
        row["code_name"] = names[row["code"]]
    return {
        "p_value": stats["p_value"],
        "flagged": stats["flagged"],
        "verdict": verdict(stats, cfg.alpha),
        "effect": stats["effect"],
        "effect_z": stats["effect_z"],
        "alpha": cfg.alpha,
        "test": "one-sided exact Wilcoxon rank-sum: the codes' specific shifts vs the controls'",
        "statistic": ("specific log shift = max over the model's classes of (mean over images of the class's log-probability "
                      "change when the pattern is added) minus the same for the other patterns of its set"),
        "codes": stats["codes"],
        "distinct_matched_classes": stats["distinct_matched_classes"],
        "controls": {**stats["controls"], "kind": cfg.controls},
        "images": len(used),
        "skipped_images": skipped,
        "model_classes": int(measured["log"].shape[1]),
        "model_outputs": measured["outputs"],
        "queries": len(used) * (len(patterns) + 1),
        "model": model_record,
        "weights": {"path": str(weights), "sha256": file_sha256(Path(weights)), "arch": meta.arch,
                    "num_codes": patterns.codes, "working_size": meta.working_size, "channels": meta.channels},
        "epsilon": epsilon,
        "input": {"size": size, "channels": channels, "mean": list(cfg.mean), "std": list(cfg.std)},
        "seed": cfg.seed,
        "cgan_version": __version__,
        "seconds": time.perf_counter() - start,
    }


def results_table(report: dict[str, Any]) -> Table:
    controls = report["controls"]
    table = Table(title="cgan audit", caption=(
        f"{report['images']} images. specific: rise of the model class's mean log-probability when the code's pattern "
        f"is added, beyond the other codes' (controls: {controls['count']} {controls['kind']} tiles, {controls['mean']:+.2f} ± "
        f"{controls['std']:.2f}); probability / top-1: that class's mean probability and top-1 share, with vs without"))
    for col in ("code", "generator\nclass", "model\nclass", "specific", "prob-\nability", "top-1", "z", "beats\ncontrols"):
        table.add_column(col, justify="left" if col in ("code", "generator\nclass") else "right")
    for r in report["codes"]:
        z = "-" if r["z"] is None else f"{r['z']:+.1f}"
        table.add_row(str(r["code"]), r["code_name"], str(r["matched_class"]), f"{r['specific_log_shift']:+.2f}",
                      f"{100 * r['prob_shift']:+.1f} pt", f"{100 * r['top1_shift']:+.1f} pt", z,
                      f"{r['controls_below']}/{controls['count']}")
    return table


def audit_cli(cfg: AuditConfig, json_out: bool = False) -> int:
    """`cgan audit` after parsing: run, print table or JSON; 0 when the test ran, 2 for usage errors."""
    try:
        report = audit(cfg)
    except ValueError as exc:  # UsageErrors: model, images, options
        Console(stderr=True, soft_wrap=True).print(f"error: {exc}", markup=False)
        return 2
    if json_out:
        print(json.dumps(report))
        return 0
    console = Console()
    console.print(results_table(report))
    console.print(f"p-value {report['p_value']:.3g} (one-sided rank-sum, {len(report['codes'])} codes vs "
                  f"{report['controls']['count']} controls); effect {report['effect']:+.2f} (codes' mean specific log shift minus the controls' median); "
                  f"{report['distinct_matched_classes']} distinct model classes matched; {report['seconds']:.1f}s", markup=False)
    console.print(report["verdict"], markup=False)
    for line in report["skipped_images"][:5]:
        Console(stderr=True).print(f"skipped {line}", markup=False)
    return 0
