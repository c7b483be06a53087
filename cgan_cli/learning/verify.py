"""`cgan verify`: does protection actually make the data unlearnable? Train fresh victims and see.

source -> engine -> sink:
- source: a clean training set, a clean test set, and one or more *methods*, each a protected copy
  of the same training set with identical labels and order (a protected folder matched to the clean
  one by relative path, the generator applied in memory, or a baseline noise); with a generator,
  which of these images it was trained on (its weights' record), since a generator protects the
  images it memorised far better than new ones (`--unseen` measures only new ones);
- engine: for every victim arch and countermeasure, train the same recipe (same seed, same order)
  on the clean set and on each protected set, and test all of them on the clean test set;
- sink: a rich table, a JSON report (seeds, versions, weights sha256, config, per-epoch curves,
  seconds) and a PNG of the per-epoch curves drawn with PIL.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from rich.table import Table

from cgan_cli import __version__
from cgan_cli.core.atomic import atomic_open, write_atomic
from cgan_cli.core.classes import ClassIndex
from cgan_cli.core.device import resolve_device, resolve_precision
from cgan_cli.core.engine import EngineConfig, ProtectEngine
from cgan_cli.core.errors import UsageError
from cgan_cli.core.formats import ImageError, decode_image, written_fidelity
from cgan_cli.core.weights import DIGESTS_KEY, WeightsMeta, file_sha256, read_meta
from cgan_cli.learning.baselines import BASELINES, build_baseline
from cgan_cli.learning.config import EMConfig, VerifyConfig, VerifyRequest, VictimConfig
from cgan_cli.learning.countermeasures import Countermeasure, parse_countermeasure
from cgan_cli.learning.data import (
    BUILTIN_DATASETS,
    LabeledImages,
    load_labeled,
    recorded_digests,
    split_holdout,
)
from cgan_cli.learning.nets import VICTIM_ARCHS
from cgan_cli.learning.victims import VictimResult, train_victim


class VerifyError(UsageError):
    """Inputs `verify` cannot compare honestly; the message says what does not match."""


# ----------------------------------------------------------------------------- records


@dataclass
class Method:
    """One protected copy of the training set: same images, same labels, same order as the clean set."""

    name: str  # "generator", "protected" (a given folder), or a baseline name
    pixels: torch.Tensor  # uint8 (N, C, H, W)
    seconds: float | None = None  # to protect the whole training set; None when it was given on disk
    details: dict[str, Any] = field(default_factory=dict)
    linf: float | None = None  # measured on the files at their own size (a given tree); None: on `pixels`


@dataclass
class Row:
    method: str
    arch: str
    countermeasure: str
    clean: VictimResult
    protected: VictimResult
    chance: float

    @property
    def drop(self) -> float:
        return self.clean.test_accuracy - self.protected.test_accuracy


# ----------------------------------------------------------------------------- source


def sample_index(n: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """Indices of a deterministic random `limit` of n items (order kept); None means keep everything."""
    if limit is None or limit >= n:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:limit].sort().values


def subsample(data: LabeledImages, limit: int | None, seed: int) -> LabeledImages:
    index = sample_index(len(data), limit, seed)
    return data if index is None else data.subset(index)


def _keys(data: LabeledImages, root: Path) -> list[str]:
    """Relative path (or shard sample key) without suffix: protect may re-encode a .jpg as .png."""
    if len(data.paths) != len(data):
        raise VerifyError(f"{root}: images carry no file paths, so they cannot be matched to the clean set")
    if all("#" in p for p in data.paths):  # WebDataset samples, "<shard url>#<key>.<ext>"
        return [str(Path(p.split("#", 1)[1]).with_suffix("")) for p in data.paths]
    return [str(Path(p).resolve().relative_to(root.resolve()).with_suffix("")) for p in data.paths]


def match_protected(clean: LabeledImages, protected: LabeledImages, clean_root: Path, protected_root: Path) -> torch.Tensor:
    """Protected pixels reordered to the clean set's order; fails on any missing, extra or relabeled image."""
    return protected.pixels[match_order(clean, protected, clean_root, protected_root)]


def match_order(clean: LabeledImages, protected: LabeledImages, clean_root: Path, protected_root: Path) -> torch.Tensor:
    """The index that puts the protected set into the clean set's order (see match_protected)."""
    if clean.class_names != protected.class_names:
        raise VerifyError(f"class folders differ: clean {clean.class_names} vs protected {protected.class_names}")
    if clean.pixels.shape[1:] != protected.pixels.shape[1:]:
        raise VerifyError(f"image shapes differ: clean {tuple(clean.pixels.shape[1:])} vs protected {tuple(protected.pixels.shape[1:])}")
    clean_keys, prot_keys = _keys(clean, clean_root), _keys(protected, protected_root)
    index = {k: i for i, k in enumerate(prot_keys)}
    if len(index) != len(prot_keys):
        raise VerifyError(f"{protected_root}: two files share a name up to the suffix; cannot match them unambiguously")
    missing = [k for k in clean_keys if k not in index]
    extra = sorted(set(prot_keys) - set(clean_keys))
    if missing or extra:
        raise VerifyError(
            f"protected and clean trees do not hold the same images: {len(missing)} missing from {protected_root} "
            f"(e.g. {missing[:3]}), {len(extra)} only in {protected_root} (e.g. {extra[:3]})"
        )
    order = torch.tensor([index[k] for k in clean_keys])
    if not torch.equal(protected.labels[order], clean.labels):
        raise VerifyError("matched images carry different labels")
    return order


def check_test_set(train: LabeledImages, test: LabeledImages) -> None:
    if train.class_names != test.class_names:
        raise VerifyError(f"test classes {test.class_names} differ from training classes {train.class_names}")
    if train.pixels.shape[1:] != test.pixels.shape[1:]:
        raise VerifyError(f"test images are {tuple(test.pixels.shape[1:])}, training images {tuple(train.pixels.shape[1:])}")


@dataclass
class VictimData:
    """The victim's clean training and test sets, each with the set it was drawn from, as loaded."""

    train: LabeledImages
    test: LabeledImages
    train_source: LabeledImages
    test_source: LabeledImages

    @property
    def held_out(self) -> bool:
        """The test set is a --holdout split of the training set's source."""
        return self.train_source is self.test_source


def load_train_test(data: str, test: str | None, size: int, channels: int, holdout: float, seed: int, avoid: str = "") -> VictimData:
    """DATA (built-in name, folder tree, or whatever `data.load_labeled` reads) and its clean test set.

    avoid: a built-in split the generator trained on (e.g. "fashion-mnist/train"); the victim then
    trains on the other split less a --holdout part, and is tested on that part.
    """
    if test is not None:
        train, test_set = load_labeled(data, "train", size, channels), load_labeled(test, "test", size, channels)
        victim = VictimData(train, test_set, train, test_set)
    elif data in BUILTIN_DATASETS and avoid in (f"{data}/train", f"{data}/test"):
        source = load_labeled(data, "test" if avoid.endswith("/train") else "train")
        victim = VictimData(*split_holdout(source, holdout, seed), source, source)
    elif data in BUILTIN_DATASETS:
        train, test_set = load_labeled(data, "train"), load_labeled(data, "test")
        victim = VictimData(train, test_set, train, test_set)
    else:
        source = load_labeled(data, "train", size, channels)
        victim = VictimData(*split_holdout(source, holdout, seed), source, source)
    check_test_set(victim.train, victim.test)
    return victim


# ----------------------------------------------------------------------------- which images the generator saw


@dataclass
class Seen:
    """How many images of a victim set the generator was trained on (None: cannot be told), and how that was found."""

    images: int | None
    how: str

    @property
    def verdict(self) -> bool | str:
        return "unknown" if self.images is None else self.images > 0


def is_builtin_split(name: str) -> bool:
    return name.split("/")[0] in BUILTIN_DATASETS and "/" in name


def images_seen(meta: WeightsMeta, part: LabeledImages, source: LabeledImages) -> Seen:
    """How many of `part` (drawn from `source`, as loaded) were among the generator's training images.

    From the weights' record (learning/train.training_set_record): per-image digests where recorded;
    else the whole-set fingerprint (all of `source` or unknown) and the built-in split names.
    """
    trained = meta.dataset
    if DIGESTS_KEY in trained:
        if (part.size, part.channels) != (meta.working_size, meta.channels):
            return Seen(None, f"the weights record their training images' digests at {meta.working_size} px, "
                              f"{meta.channels} channel(s); these were loaded at {part.size} px, {part.channels}")
        recorded = recorded_digests(trained[DIGESTS_KEY])
        return Seen(sum(d in recorded for d in part.image_digests()), "per-image digests in the weights' metadata")
    name = trained.get("name") or "an unrecorded set"
    if trained.get("fingerprint") == source.fingerprint():
        return Seen(len(part), f"the weights' training-set fingerprint is that of {source.name} as loaded here")
    if is_builtin_split(name) and is_builtin_split(part.name) and name != part.name:
        return Seen(0, f"the generator was trained on the built-in {name}; these images are {part.name}")
    return Seen(None, f"the weights (trained on {name}) record no per-image digests, only a fingerprint of their "
                      f"whole training set, which is not {source.name} as loaded here; a partial overlap cannot be ruled out")


def generator_data(meta: WeightsMeta, victim: VictimData, unseen: bool) -> dict[str, Any]:
    """The report's record of whether the generator saw the victim's training and test images.

    With `unseen`, any image it saw is a usage error: that run would measure the memorised case.
    """
    train, test = images_seen(meta, victim.train, victim.train_source), images_seen(meta, victim.test, victim.test_source)
    if unseen and (train.images or test.images):
        def count(s: Seen) -> str:
            return "an unknown number" if s.images is None else str(s.images)
        raise VerifyError(
            f"--unseen: the generator was trained on {count(train)} of the victim's {len(victim.train)} training images "
            f"and {count(test)} of its {len(victim.test)} test images ({train.how if train.images else test.how}); "
            "give DATA it never saw (or --test DIR), or drop --unseen to measure the memorised case")
    return {
        "protocol": "unseen" if unseen else "as given",
        "generator_saw_training_images": train.verdict, "training_images_seen": train.images, "training_checked_by": train.how,
        "generator_saw_test_images": test.verdict, "test_images_seen": test.images, "test_checked_by": test.how,
    }


def unknown_because(record: dict[str, Any]) -> str | None:
    """Why it cannot be told whether the generator saw the training (else test) images; None if it can."""
    if record["generator_saw_training_images"] == "unknown":
        return record["training_checked_by"]
    return record["test_checked_by"] if record["generator_saw_test_images"] == "unknown" else None


def seen_caption(record: dict[str, Any] | None) -> str:
    """One line under the table: which case this run measured."""
    if record is None:
        return ""
    train, test = record["generator_saw_training_images"], record["generator_saw_test_images"]
    if train is True:
        return (f"\nthe generator was trained on {record['training_images_seen']} of these training images: "
                "the memorised case (--unseen: images it never saw)")
    if unknown_because(record):
        return f"\nwhether the generator saw these images is unknown: {unknown_because(record)}"
    if test is True:
        return f"\nthe generator never saw these training images, but was trained on {record['test_images_seen']} of the test images"
    return "\nthe generator never saw these training or test images"


def measured_linf(clean: torch.Tensor, protected: torch.Tensor) -> int:
    """Largest per-pixel change in /255 units: what the protection actually spent."""
    return int((clean.int() - protected.int()).abs().max().item()) if len(clean) else 0


def native_linf(clean_paths: list[str], protected_paths: list[str]) -> float | None:
    """L-inf in /255 units between matched files decoded at their own size, as protect measures it.

    Why: the loaders resize (bicubic) to the victim's size, and bicubic overshoots at edges, so a
    tree written at 8/255 reads as 10/255 after resizing. None when a pair cannot be compared
    (different sizes, undecodable): the caller falls back to the resized pixels.
    """
    worst = 0.0
    for a, b in zip(clean_paths, protected_paths):
        try:
            clean, protected = decode_image(Path(a).read_bytes(), a), decode_image(Path(b).read_bytes(), b)
        except (ImageError, OSError):
            return None
        if clean.pixels.shape[:2] != protected.pixels.shape[:2]:
            return None
        worst = max(worst, written_fidelity(clean, protected)[0])
    return round(worst, 4)


def method_linf(method: Method, clean: LabeledImages) -> float:
    """What the method spent: on the files' own size for a given tree, else on the compared pixels."""
    return method.linf if method.linf is not None else measured_linf(clean.pixels, method.pixels)


# ----------------------------------------------------------------------------- methods (engine, part 1)


def protect_with_engine(engine: ProtectEngine, pixels: torch.Tensor, batch_size: int = 256, codes: torch.Tensor | None = None) -> torch.Tensor:
    """The training set through `cgan protect`'s own engine: working-size resize, whole-level noise, exact budget.

    `codes` (N,): the code each image must carry (its true label, as `cgan protect --labels` does);
    None = the generator's own guess.
    """
    out = torch.empty_like(pixels)
    for i in range(0, len(pixels), batch_size):
        images = [np.ascontiguousarray(p.permute(1, 2, 0).numpy()) for p in pixels[i : i + batch_size]]
        chunk_codes = None if codes is None else [int(c) for c in codes[i : i + batch_size]]
        for j, protected in enumerate(engine.protect_batch(images, chunk_codes)):
            out[i + j] = torch.from_numpy(protected).permute(2, 0, 1)
    return out


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def label_codes(meta: WeightsMeta, train: LabeledImages) -> torch.Tensor:
    """The generator code of every training image's true label (what `cgan protect --labels` uses)."""
    mapping = ClassIndex.from_meta(meta).map_classes(train.class_names, "--labels: the data")
    return torch.tensor(mapping, dtype=torch.long)[train.labels]


def generator_method(weights: Path, train: LabeledImages, epsilon: float, device: str, precision: str,
                     labels: bool = False, mask_floor: float | None = None) -> tuple[Method, dict[str, Any]]:
    """Protect the training set with a weights file; returns the method and the weights record for the report.

    labels: every image carries its true label's code instead of the generator's guess.
    mask_floor: the local-activity mask floor (None: the weights' own, as `cgan protect`).
    """
    engine = ProtectEngine(EngineConfig(weights, device, precision, epsilon, batch_size=256, mask_floor=mask_floor))
    meta = engine.meta
    codes = label_codes(meta, train) if labels else None
    pixels, seconds = timed(protect_with_engine, engine, train.pixels, codes=codes)
    record = {"path": str(weights), "sha256": file_sha256(weights), "arch": meta.arch, "trained_epsilon": meta.epsilon,
              "working_size": meta.working_size, "channels": meta.channels, "dataset": meta.described()["dataset"]}
    return Method("generator", pixels, seconds, {"epsilon": epsilon, "codes": "label" if labels else "guess",
                                                 "mask_floor": engine.mask_floor}), record


def baseline_method(name: str, train: LabeledImages, epsilon: float, seed: int, em: EMConfig, device: str) -> Method:
    (pixels, details), seconds = timed(
        build_baseline, name, train.pixels, train.labels, len(train.class_names), epsilon, seed, em, device
    )
    return Method(name, pixels, seconds, {"epsilon": epsilon, **details})


# ----------------------------------------------------------------------------- victims (engine, part 2)


def chance_level(test: LabeledImages) -> float:
    """Accuracy of always answering the most common test class (1/K on a balanced test set)."""
    counts = torch.bincount(test.labels, minlength=len(test.class_names))
    return counts.max().item() / max(1, len(test))


def run_victims(
    clean: LabeledImages,
    test: LabeledImages,
    methods: list[Method],
    cfg: VerifyConfig,
    on_row=None,
) -> list[Row]:
    """One row per (method, arch, countermeasure); the clean-trained run is shared by all methods.

    Every run of one (arch, countermeasure) starts from the same seed and sees the same batch order
    and augmentation, so the only difference between clean and protected runs is the noise. The
    test images are never protected; they only pass through a countermeasure's input preprocessing.
    """
    num_classes, chance = len(clean.class_names), chance_level(test)
    cms: list[Countermeasure] = [parse_countermeasure(s) for s in cfg.countermeasures]
    rows = []
    for arch in cfg.archs:
        victim = VictimConfig(**{**asdict(cfg.victim), "arch": arch})
        for cm in cms:
            # A data-transform countermeasure is the victim's input preprocessing, so its test images
            # (still unprotected) go through it too; else the row measures a blurred-train / sharp-test
            # mismatch instead of the protection. Batch hooks are training-only by nature.
            test_x = cm.apply(test.pixels).float().div_(255.0)

            def train(pixels: torch.Tensor) -> VictimResult:
                x = cm.apply(pixels).float().div_(255.0)
                return train_victim(x, clean.labels, test_x, test.labels, num_classes, victim, cm.hook(victim.seed, num_classes))

            clean_result = train(clean.pixels)
            for method in methods:
                row = Row(method.name, arch, cm.spec, clean_result, train(method.pixels), chance)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


# ----------------------------------------------------------------------------- trust


MIN_TEST_IMAGES = 200  # below this a 95% interval is wider than about +-7 points at 50%
NEAR_CHANCE_POINTS = 5.0  # a clean-trained victim within this of chance learned nothing to take away


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy measured on n test images (sound near 0 and 1 too)."""
    if n <= 0:
        return 0.0, 1.0
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def trust_warnings(rows: list[Row], test_images: int, seen: dict[str, Any] | None = None) -> list[str]:
    """Why the table may not mean what it seems to: a tiny test split, a clean victim at chance, an
    --unseen run that could not check which images the generator saw."""
    warnings = []
    if seen is not None and seen["protocol"] == "unseen" and unknown_because(seen):
        warnings.append(f"--unseen: whether the generator saw these images cannot be checked ({unknown_because(seen)}); "
                        "the rows may measure images it memorised")
    if test_images < MIN_TEST_IMAGES:
        lo, hi = wilson_interval(0.5, test_images)
        warnings.append(f"the test split has only {test_images} images (< {MIN_TEST_IMAGES}): an accuracy of 50% could be "
                        f"anywhere in {lo:.0%}-{hi:.0%} (95% CI); use more test images")
    seen = set()
    for r in rows:
        key = (r.arch, r.countermeasure)
        if key in seen:
            continue
        seen.add(key)
        if 100 * (r.clean.test_accuracy - r.chance) < NEAR_CHANCE_POINTS:
            warnings.append(f"the clean-trained {r.arch} ({r.countermeasure}) scores {r.clean.test_accuracy:.1%}, within "
                            f"{NEAR_CHANCE_POINTS:g} points of chance ({r.chance:.1%}): it learned nothing from clean data, so "
                            "no drop can show; use more data or epochs before reading this row")
    return warnings


def _with_ci(accuracy: float, n: int) -> str:
    lo, hi = wilson_interval(accuracy, n)
    return f"{accuracy:.1%}\n[{100 * lo:.1f}-{100 * hi:.1f}]"


# ----------------------------------------------------------------------------- sinks


def results_table(rows: list[Row], test_images: int, seen: dict[str, Any] | None = None) -> Table:
    table = Table(title="cgan verify", caption=f"accuracy of each victim on the clean test set ({test_images} images), "
                  "[95% Wilson interval]; drop = clean-trained - protected-trained" + seen_caption(seen))
    for col in ("method", "victim", "counter-\nmeasure", "clean-\ntrained", "protected-\ntrained", "drop", "chance"):
        table.add_column(col, justify="left" if col in ("method", "victim", "counter-\nmeasure") else "right", overflow="fold")
    for r in rows:
        table.add_row(r.method, r.arch, r.countermeasure, _with_ci(r.clean.test_accuracy, test_images),
                      _with_ci(r.protected.test_accuracy, test_images), f"{100 * r.drop:+.1f} pt", f"{r.chance:.1%}")
    return table


PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75), (227, 119, 194)]
DASHES = [None, (10, 4), (4, 4), (12, 4, 2, 4), (2, 3)]  # on/off pixel runs per method; None = solid
MARKERS = ["square", "triangle", "diamond", "cross", "circle"]


def _dashed(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], color, pattern: tuple[int, ...] | None, width: int = 2) -> None:
    """A polyline with a dash pattern that runs on across segments (PIL draws only solid lines)."""
    if pattern is None:
        draw.line(points, fill=color, width=width)
        return
    phase, on = 0.0, True
    runs = list(pattern)
    k = 0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        pos = 0.0
        while pos < length:
            step = min(runs[k] - phase, length - pos)
            if on:
                a, b = pos / length, (pos + step) / length
                draw.line((x0 + a * (x1 - x0), y0 + a * (y1 - y0), x0 + b * (x1 - x0), y0 + b * (y1 - y0)), fill=color, width=width)
            pos += step
            phase += step
            if phase >= runs[k]:
                phase, k, on = 0.0, (k + 1) % len(runs), not on


def _marker(draw: ImageDraw.ImageDraw, x: float, y: float, shape: str, color, r: int = 4) -> None:
    if shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=color)
    elif shape == "triangle":
        draw.polygon([(x, y - r - 1), (x - r, y + r), (x + r, y + r)], fill=color)
    elif shape == "diamond":
        draw.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], fill=color)
    elif shape == "cross":
        draw.line((x - r, y - r, x + r, y + r), fill=color, width=2)
        draw.line((x - r, y + r, x + r, y - r), fill=color, width=2)
    else:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color)


def _series_style(index: int) -> tuple[tuple[int, int, int], tuple[int, ...] | None, str]:
    """Colour, dash pattern and marker of method `index`: overlapping curves stay distinguishable."""
    return PALETTE[index % len(PALETTE)], DASHES[(index + 1) % len(DASHES)], MARKERS[index % len(MARKERS)]


def plot_curves(rows: list[Row], path: Path, panel: tuple[int, int] = (380, 280)) -> None:
    """Per-epoch clean-test accuracy: one panel per (victim, countermeasure), clean-trained solid black
    with round markers; each method its own colour, dash pattern and marker; axes labelled."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.arch, r.countermeasure), []).append(r)
    methods = list(dict.fromkeys(r.method for r in rows))
    cols = min(3, max(1, len(groups)))
    nrows = -(-max(1, len(groups)) // cols)
    pw, ph = panel
    legend_h = 18 * (len(methods) + 1) + 10
    img = Image.new("RGB", (cols * pw, nrows * ph + legend_h), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    ylabel = Image.new("L", (140, 12), 255)
    ImageDraw.Draw(ylabel).text((0, 0), "clean test accuracy", fill=0, font=font)
    ylabel = ylabel.rotate(90, expand=True)
    for g, ((arch, cm), group) in enumerate(groups.items()):
        ox, oy = (g % cols) * pw, (g // cols) * ph
        left, top, right, bottom = ox + 56, oy + 22, ox + pw - 12, oy + ph - 40
        draw.text((left, oy + 5), f"{arch} / {cm}", fill="black", font=font)
        draw.rectangle((left, top, right, bottom), outline="black")
        img.paste((0, 0, 0), (ox + 4, top + (bottom - top - ylabel.height) // 2), Image.eval(ylabel, lambda v: 255 - v))
        for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = bottom - tick * (bottom - top)
            draw.line((left - 4, y, left, y), fill="black")
            draw.text((left - 34, y - 6), f"{tick:.2f}", fill="black", font=font)
        epochs = max(len(group[0].clean.epoch_accuracy), 1)
        step = (right - left) / max(1, epochs - 1)
        every = max(1, -(-epochs // 10))
        for e in range(0, epochs, every):
            x = left + e * step
            draw.line((x, bottom, x, bottom + 4), fill="black")
            draw.text((x - 3, bottom + 6), str(e + 1), fill="black", font=font)
        draw.text(((left + right) // 2 - 12, bottom + 22), "epoch", fill="black", font=font)

        def xy(curve: list[float]) -> list[tuple[float, float]]:
            return [(left + i * step, bottom - a * (bottom - top)) for i, a in enumerate(curve)]

        chance_y = bottom - group[0].chance * (bottom - top)
        for x0 in range(left, right, 8):  # dashed chance line
            draw.line((x0, chance_y, min(x0 + 4, right), chance_y), fill=(150, 150, 150))
        series = [((0, 0, 0), None, "circle", group[0].clean.epoch_accuracy)]
        series += [(*_series_style(methods.index(r.method)), r.protected.epoch_accuracy) for r in group]
        for color, dashes, marker, curve in series:
            points = xy(curve)
            if len(points) > 1:
                _dashed(draw, points, color, dashes)
            for px, py in points:
                _marker(draw, px, py, marker, color)
    ly = nrows * ph + 6
    entries = [((0, 0, 0), None, "circle", "clean-trained"),
               *[(*_series_style(i), f"trained on {m}") for i, m in enumerate(methods)]]
    for i, (color, dashes, marker, label) in enumerate(entries):
        y = ly + 18 * i + 6
        _dashed(draw, [(12, y), (52, y)], color, dashes, width=3)
        _marker(draw, 32, y, marker, color)
        draw.text((60, ly + 18 * i), label, fill="black", font=font)
    draw.text((cols * pw - 150, ly), "gray dashes: chance", fill=(110, 110, 110), font=font)
    with atomic_open(path) as fh:
        img.save(fh, "PNG")


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def build_report(
    rows: list[Row],
    methods: list[Method],
    clean: LabeledImages,
    test: LabeledImages,
    cfg: VerifyConfig,
    inputs: dict[str, Any],
    weights: dict[str, Any] | None,
    seen: dict[str, Any] | None,
    seconds: float,
) -> dict[str, Any]:
    """Everything needed to reproduce and audit the run."""
    return {
        "cgan_version": __version__,
        "torch_version": torch.__version__,
        "command": " ".join(sys.argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "seed": cfg.victim.seed,
        "config": {"victim": asdict(cfg.victim), "archs": cfg.archs, "countermeasures": cfg.countermeasures, **inputs},
        "weights": weights,
        "generator_data": seen,  # did the generator train on these images? (None: no generator)
        "data": {  # indices: positions in the set `name` as loaded (null: all of it, in order)
            "train": {"name": clean.name, "images": len(clean), "fingerprint": clean.fingerprint(), "classes": clean.class_names,
                      "indices": None if clean.origin is None else clean.origin.tolist()},
            "test": {"name": test.name, "images": len(test), "fingerprint": test.fingerprint(),
                     "indices": None if test.origin is None else test.origin.tolist()},
        },
        "methods": [
            {"method": m.name, "seconds_to_protect": m.seconds, "images": len(m.pixels),
             "measured_linf": method_linf(m, clean), "linf_measured_at": "native size" if m.linf is not None else "victim size",
             **m.details}
            for m in methods
        ],
        "rows": [
            {"method": r.method, "arch": r.arch, "countermeasure": r.countermeasure, "chance": r.chance,
             "clean_trained_accuracy": r.clean.test_accuracy, "protected_trained_accuracy": r.protected.test_accuracy,
             "clean_trained_ci95": list(wilson_interval(r.clean.test_accuracy, len(test))),
             "protected_trained_ci95": list(wilson_interval(r.protected.test_accuracy, len(test))),
             "drop": r.drop, "clean_trained_curve": r.clean.epoch_accuracy, "protected_trained_curve": r.protected.epoch_accuracy,
             "clean_trained_train_accuracy": r.clean.train_accuracy, "protected_trained_train_accuracy": r.protected.train_accuracy,
             "clean_trained_seconds": r.clean.seconds, "protected_trained_seconds": r.protected.seconds}
            for r in rows
        ],
        "warnings": trust_warnings(rows, len(test), seen),
        "seconds": seconds,
    }


# ----------------------------------------------------------------------------- the whole command


def default_report_path(req: VerifyRequest) -> Path:
    """Next to the protected tree when there is one, else runs/verify/<data>-report.json; never an
    earlier run's report: a taken name gets -2, -3, ... (an explicit --report is overwritten)."""
    if req.protected is not None:
        first = Path(req.protected).resolve().parent / "verify-report.json"
    else:
        first = Path("runs") / "verify" / f"{Path(str(req.data)).name or 'data'}-report.json"
    path, n = first, 1
    while path.exists() or plot_path_for(path).exists():
        n += 1
        path = first.with_name(f"{first.stem.removesuffix('-report')}-{n}-report.json")
    return path


def plot_path_for(report_path: Path) -> Path:
    return report_path.with_name(report_path.stem.removesuffix("-report") + "-curves.png")


@dataclass
class Inputs:
    """What the victims compare, resolved from the request."""

    clean: LabeledImages
    test: LabeledImages
    methods: list[Method]
    weights: dict[str, Any] | None  # the report's weights record
    epsilon: float | None
    held_out: bool  # the test set is a --holdout split of the training set's source
    seen: dict[str, Any] | None  # generator_data: which of these images the generator trained on


def _resolve_inputs(req: VerifyRequest) -> Inputs:
    """Load data, validate the combination of options, and build every method's protected set."""
    seed, device = req.cfg.victim.seed, req.cfg.victim.device
    meta = read_meta(req.weights) if req.weights is not None else None  # early: sizes, channels, epsilon
    size = req.size or (meta.working_size if meta else 32)
    channels = req.channels or (meta.channels if meta else 3)
    methods: list[Method] = []
    if req.labels and req.weights is None:
        raise VerifyError("--labels chooses the codes --weights protects with; give --weights FILE too")
    if req.mask_floor is not None and req.weights is None:
        raise VerifyError("--mask-floor shapes the noise --weights protects with; give --weights FILE too")
    if req.unseen and (req.weights is None or req.data is None):
        raise VerifyError("--unseen picks images the generator never saw, from its weights' record: give DATA and --weights FILE")
    seen, held_out = None, False
    if req.protected is not None or req.clean is not None:
        if req.protected is None or req.clean is None or req.test is None or req.data is not None:
            raise VerifyError("folder mode needs all of --protected DIR --clean DIR --test DIR, and no DATA argument")
        if req.weights is not None:
            raise VerifyError("--weights protects DATA on the fly; in folder mode the protected tree is given")
        clean = load_labeled(str(req.clean), "train", size, channels)
        protected = load_labeled(str(req.protected), "train", size, channels)
        test = load_labeled(str(req.test), "test", size, channels)
        check_test_set(clean, test)
        test = subsample(test, req.test_limit, seed)
        order = match_order(clean, protected, Path(req.clean), Path(req.protected))
        protected_pixels, protected_paths = protected.pixels[order], [protected.paths[i] for i in order.tolist()]
        index = sample_index(len(clean), req.limit, seed)
        if index is not None:
            clean, protected_pixels = clean.subset(index), protected_pixels[index]
            protected_paths = [protected_paths[i] for i in index.tolist()]
        linf = native_linf(clean.paths, protected_paths)
        methods.append(Method("protected", protected_pixels, None, {"path": str(req.protected)}, linf))
    elif req.data is not None:
        if req.weights is None and not req.baselines:
            raise VerifyError("nothing to verify: give --weights FILE and/or --baseline random|classwise|em")
        avoid = meta.dataset.get("name", "") if req.unseen and meta is not None else ""
        victim = load_train_test(req.data, str(req.test) if req.test else None, size, channels, req.holdout, seed, avoid)
        victim.train, victim.test = subsample(victim.train, req.limit, seed), subsample(victim.test, req.test_limit, seed)
        if meta is not None:
            seen = generator_data(meta, victim, req.unseen)
        clean, test, held_out = victim.train, victim.test, victim.held_out
    else:
        raise VerifyError("give DATA (e.g. fashion-mnist) with --weights, or --protected DIR --clean DIR --test DIR")
    epsilon = req.epsilon
    if epsilon is None and meta is not None:
        epsilon = meta.epsilon
    if epsilon is None and methods:  # baselines spend what protect spent
        epsilon = float(math.floor(methods[0].linf) if methods[0].linf is not None else measured_linf(clean.pixels, methods[0].pixels))
    weights_record = None
    if req.weights is not None:
        method, weights_record = generator_method(req.weights, clean, epsilon, device, req.cfg.victim.precision, req.labels,
                                                   req.mask_floor)
        methods.append(method)
    if req.baselines and epsilon is None:
        raise VerifyError("--baseline needs --epsilon (in /255 units)")
    for name in dict.fromkeys(req.baselines):
        methods.append(baseline_method(name, clean, epsilon, seed, req.em, device))
    return Inputs(clean, test, methods, weights_record, epsilon, held_out, seen)


def verify(req: VerifyRequest, console: Console | None = None) -> tuple[list[Row], dict[str, Any], Path, Path]:
    """Run the whole check; returns rows, the report dict, and where report and plot were written."""
    console = console or Console(stderr=True)
    start = time.perf_counter()
    for cm in req.cfg.countermeasures:  # fail on a typo before minutes of EM or training
        parse_countermeasure(cm)
    for name, valid in [*((a, VICTIM_ARCHS) for a in req.cfg.archs), *((b, BASELINES) for b in req.baselines)]:
        if name not in valid:
            raise VerifyError(f"unknown choice {name!r}; valid: {', '.join(valid)}")
    got = _resolve_inputs(req)
    clean, test, methods = got.clean, got.test, got.methods
    for m in methods:
        took = "given on disk" if m.seconds is None else f"protected in {m.seconds:.1f}s"
        where = "at the files' own size" if m.linf is not None else f"at {clean.pixels.shape[-1]} px"
        console.print(f"[dim]{m.name}: {len(m.pixels)} training images, L-inf {method_linf(m, clean):g}/255 {where}, {took}[/dim]")

    def progress(row: Row) -> None:
        console.print(f"[dim]{row.method} / {row.arch} / {row.countermeasure}: clean-trained "
                      f"{row.clean.test_accuracy:.1%}, protected-trained {row.protected.test_accuracy:.1%}[/dim]")

    rows = run_victims(clean, test, methods, req.cfg, progress)
    inputs = {"data": req.data, "protected": str(req.protected) if req.protected else None,
              "clean": str(req.clean) if req.clean else None, "test": str(req.test) if req.test else None,
              "epsilon": got.epsilon, "baselines": req.baselines, "limit": req.limit, "test_limit": req.test_limit,
              "holdout": req.holdout if got.held_out else None, "unseen": req.unseen, "labels": req.labels,
              "em": asdict(req.em) if "em" in req.baselines else None}
    report = build_report(rows, methods, clean, test, req.cfg, inputs, got.weights, got.seen, time.perf_counter() - start)
    report_path = Path(req.report) if req.report else default_report_path(req)
    plot_path = plot_path_for(report_path)
    write_atomic(report_path, json.dumps(report, indent=2) + "\n")
    plot_curves(rows, plot_path)
    return rows, report, report_path, plot_path


def verify_cli(req: VerifyRequest, device: str, precision: str) -> int:
    """`cgan verify` after parsing: resolve the runtime, run, print the table; returns the exit code."""
    try:
        dev = resolve_device(device)
        req.cfg.victim.device, req.cfg.victim.precision = str(dev), resolve_precision(precision, dev)
        rows, report, report_path, plot_path = verify(req, Console(stderr=True))
    except ValueError as exc:  # UsageErrors, and countermeasure / dataset values that cannot be used
        Console(stderr=True).print(f"error: {exc}", markup=False)
        return 2
    console = Console()
    console.print(results_table(rows, report["data"]["test"]["images"], report["generator_data"]))
    for warning in report["warnings"]:
        Console(stderr=True).print(f"warning: {warning}", style="yellow", markup=False)
    console.print(f"report: {report_path}\ncurves: {plot_path}")
    return 0
