"""Victims trained on protected Fashion-MNIST after the path a photo takes: as written, upscaled +
protected + downsized, re-encoded, blurred. The issue's targets are per path; one JSON row per victim.

Every image is protected through `ProtectEngine` (`learning.verify.protect_with_engine`), the code
`cgan protect` runs: working-size resize, noise, upsample, whole-level rounding. The victim (SmallCNN
or ResNet-18, crop + flip) trains on the first N training images of `randperm(60000, seed 0)` (all
60,000 by default) with their true labels and is tested on the clean 10,000-image test split.

Paths (what the victim's loader gets for each training image):
- written: the 28 px image as protected;
- photoS: bicubic upscale to S px, protected at S px by the engine, downsized to 28 px (area);
- photoS-jpegQ: the same with a JPEG re-encode at quality Q at S px before the downsizing;
- photoS-down:FILTER: downsized with bilinear | bicubic (antialiased) instead of area;
- photoS-toT: the victim trains at T px instead of 28 (a scraper's own training size); its clean test
  images take the same path without protection (upscale to S, resize to T);
- jpeg:Q, blur:S, rescale:F, ...: `cgan verify`'s countermeasures on the written images, and on the
  clean test images too, as verify does; adv:EPS and strong-aug train on the written images with
  verify's batch hook inside the victim's loop.

    OMP_NUM_THREADS=1 python bench/photo_path_bench.py --weights weights/cgan-fashion-mnist.safetensors \
        --paths written photo112 photo56 photo84 photo112-jpeg75 --victim-seeds 0 --json runs/photo.jsonl
    python bench/photo_path_bench.py --survival --weights W.safetensors --paths photo56 photo112 ...
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cgan_cli.core.engine import EngineConfig, ProtectEngine
from cgan_cli.core.formats import ssim
from cgan_cli.learning.config import VictimConfig
from cgan_cli.learning.countermeasures import jpeg, parse_countermeasure
from cgan_cli.learning.data import load_fashion_mnist
from cgan_cli.learning.verify import protect_with_engine
from cgan_cli.learning.victims import train_victim

PHOTO = re.compile(r"photo(\d+)(?:-jpeg(\d+))?(?:-to(\d+))?(?:-down:(area|bilinear|bicubic))?$")


def downsize(pixels: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    x = pixels.float()
    x = F.interpolate(x, size=size, mode="area") if mode == "area" else F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def upscale(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """The photo as uploaded: a bicubic upscale to side x side, whole levels."""
    return F.interpolate(pixels.float(), size=(side, side), mode="bicubic", align_corners=False).round().clamp(0, 255).to(torch.uint8)


def photo_path(pixels: torch.Tensor, path: str, engine: ProtectEngine | None, codes: torch.Tensor | None = None) -> torch.Tensor:
    """Upscale (bicubic) to S px, protect there through the engine, maybe JPEG, resize to 28 px (or T)."""
    side, quality, target, down = PHOTO.match(path).groups()
    big = upscale(pixels, int(side))
    if engine is not None:
        big = protect_with_engine(engine, big, codes=codes)
    if quality:
        big = jpeg(big, int(quality))
    return downsize(big, (int(target), int(target)) if target else tuple(pixels.shape[-2:]), down or "area")


def after_path(pixels: torch.Tensor, written: torch.Tensor, path: str, engine: ProtectEngine | None) -> torch.Tensor:
    """What the victim's loader gets from these training images after `path`."""
    if path == "written":
        return written
    if PHOTO.match(path):
        return photo_path(pixels, path, engine)
    return parse_countermeasure(path).apply(written)


def training_hook(path: str, seed: int):
    """A batch-hook countermeasure (adv:EPS, strong-aug) trains inside the victim's loop, as in verify."""
    return None if path == "written" or PHOTO.match(path) else parse_countermeasure(path).hook(seed, 10)


def test_view(pixels: torch.Tensor, path: str) -> torch.Tensor:
    """The clean test images as the victim sees them: countermeasures apply to them too (verify's rule),
    and a victim that trains at another size sees them through the same (unprotected) photo path."""
    if path == "written":
        return pixels
    photo = PHOTO.match(path)
    if photo:
        return photo_path(pixels, path, None) if photo.group(3) else pixels
    return parse_countermeasure(path).apply(pixels)


SSIM_IMAGES = 300  # images whose SSIM is averaged into a row's ssim_written


def mean_ssim(clean: torch.Tensor, protected: torch.Tensor) -> float:
    return sum(ssim(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(), 255) for a, b in zip(clean, protected)) / len(clean)


def written_ssim(pixels: torch.Tensor, written: torch.Tensor, path: str, engine: ProtectEngine) -> float:
    """Mean SSIM of what `cgan protect` writes against the clean image, on the first SSIM_IMAGES: at
    S px for a photo path (the upload the owner sees; protected again at that size), else the 28 px files."""
    photo = PHOTO.match(path)
    if not photo:
        return mean_ssim(pixels[:SSIM_IMAGES], written[:SSIM_IMAGES])
    clean = upscale(pixels[:SSIM_IMAGES], int(photo.group(1)))
    return mean_ssim(clean, protect_with_engine(engine, clean))


def survival(weights: list[Path], pixels: torch.Tensor, paths: list[str]) -> None:
    """Correlation and RMS ratio of the noise after each path with the noise as written (no victims);
    for a victim at another size, with the written noise resized to that size."""
    print("| generator | path | correlation with the written noise | RMS after / RMS written |")
    print("|---|---|---:|---:|")
    for w in weights:
        engine = ProtectEngine(EngineConfig(w, device="cpu"))
        written = protect_with_engine(engine, pixels)
        n_written = written.float() - pixels.float()
        for path in paths:
            n_after = after_path(pixels, written, path, engine).float() - after_path(pixels, pixels, path, None).float()
            reference = n_written if n_after.shape == n_written.shape else F.interpolate(n_written, size=n_after.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
            a, b = reference.flatten(), n_after.flatten()
            corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
            print(f"| {w.name} | {path} | {corr:.3f} | {float(b.pow(2).mean().sqrt() / a.pow(2).mean().sqrt()):.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", nargs="*", type=Path, default=[], help="generators (seeds); none = clean victims")
    ap.add_argument("--paths", nargs="+", default=["written"])
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--epsilon", type=float, help="default: each generator's own")
    ap.add_argument("--mask-floor", type=float, help="protect with this local-activity mask floor (default: the weights' own)")
    ap.add_argument("--victim", choices=["cnn", "resnet18"], default="cnn")
    ap.add_argument("--victim-epochs", type=int, default=10)
    ap.add_argument("--victim-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--survival", action="store_true", help="noise survival only, on the first --n images")
    ap.add_argument("--json", type=Path, help="append one JSON row per victim")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for path in args.paths:
        if path != "written" and not PHOTO.match(path):
            parse_countermeasure(path)  # fail early on a typo
    train_set = load_fashion_mnist("train")
    data = train_set.subset(torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[: args.n])
    if args.survival:
        survival(args.weights, data.pixels, args.paths)
        return
    test = load_fashion_mnist("test")
    for w in args.weights or [None]:
        engine = ProtectEngine(EngineConfig(w, device="cpu", epsilon=args.epsilon, mask_floor=args.mask_floor)) if w is not None else None
        written = protect_with_engine(engine, data.pixels) if engine is not None else data.pixels
        for path in args.paths:
            train_px = after_path(data.pixels, written, path, engine)
            quality = round(written_ssim(data.pixels, written, path, engine), 4) if engine is not None else 1.0
            for seed in args.victim_seeds:
                start = time.perf_counter()
                res = train_victim(train_px.float() / 255, data.labels, test_view(test.pixels, path).float() / 255, test.labels, 10,
                                   VictimConfig(arch=args.victim, epochs=args.victim_epochs, seed=seed), training_hook(path, seed))
                row = {"weights": str(w) if w else "clean", "epsilon": engine.epsilon if engine else 0,
                       "mask_floor": engine.mask_floor if engine else None, "path": path, "n": args.n, "ssim_written": quality,
                       "victim": args.victim, "victim_epochs": args.victim_epochs, "victim_seed": seed,
                       "clean_test_acc": round(res.test_accuracy, 4), "victim_train_acc": round(res.train_accuracy, 4),
                       "epoch_acc": [round(a, 4) for a in res.epoch_accuracy], "seconds": round(time.perf_counter() - start)}
                print(json.dumps(row), flush=True)
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
