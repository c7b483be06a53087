"""Protection of images the generator never saw, through `cgan protect`'s own engine.

The shipped Fashion-MNIST generator was trained on the 60,000 training images. Here it protects the
10,000 TEST images (never seen), a fresh victim (SmallCNN) trains on those protected images with
their true labels, and is tested on clean TRAINING images (a fixed subset). Code variants:

  clean   no protection (the baseline)
  guess   the encoder guesses each image's code (what `cgan protect` does without --labels)
  labels  the true label is the code (`cgan protect --labels ...`)
  clusters  k-means (--clusters K, seed 0) of the encoder's pooled features over the 10,000 images;
          every image of a cluster gets the cluster's majority guess (with only num_codes tiles, the
          one cluster -> code map that keeps a pattern tied to one class)
  mixed   true-label codes for a seeded random --label-fraction of the images, the guess for the rest:
          code/label agreement between the guess's and the labels', with the guess's own (structured)
          errors, to find how much agreement a label-free scheme would need
  seen    control: the same protocol on images the generator WAS trained on (a fixed 10,000 of the
          training split, true-label codes), victim tested on the clean test split: separates "unseen"
          from "only 10,000 images"

    nice -n 10 .venv/bin/python bench/unseen_bench.py --variants clean guess labels --seeds 0 1 2
    nice -n 10 .venv/bin/python bench/unseen_bench.py --purity     # cluster purity vs guess accuracy, no victims

One JSON line per (variant, victim seed) on stdout and in --json; docs/method.md records them.

The CLI has this as a protocol: `cgan verify fashion-mnist --weights W --unseen [--labels]` trains
the victim on the test split less a --holdout part and tests it on that part (images neither the
generator nor the victim saw), rather than on training images as here; docs/method.md, Measurement 6.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cgan_cli.core.engine import EngineConfig, ProtectEngine
from cgan_cli.core.shipped import shipped_weights_dir
from cgan_cli.learning.config import VictimConfig
from cgan_cli.learning.data import load_fashion_mnist
from cgan_cli.learning.verify import protect_with_engine
from cgan_cli.learning.victims import train_victim

VARIANTS = ("clean", "guess", "labels", "clusters", "mixed", "seen")


def kmeans(points: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means from k seeded random points; returns each point's cluster."""
    centres = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(seed))[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(points, centres).argmin(1)
        for j in range(k):
            members = assign == j
            if members.any():
                centres[j] = points[members].mean(0)
    return torch.cdist(points, centres).argmin(1)


@torch.inference_mode()
def encoder_outputs(generator: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled encoder features, code logits) of a confounder-v3 generator, 1,000 images at a time."""
    feats = torch.cat([generator.encoder(x[i : i + 1000]).mean(dim=(2, 3)) for i in range(0, len(x), 1000)])
    return feats, generator.code_head(feats)


def majority(values: torch.Tensor, groups: torch.Tensor, k: int, num_classes: int) -> torch.Tensor:
    """Per group, the most frequent value (k,)."""
    counts = torch.zeros(k, num_classes, dtype=torch.long).index_put_((groups, values), torch.ones_like(values), accumulate=True)
    return counts.argmax(1)


def purity_table(generator: torch.nn.Module, data) -> None:
    """How consistent can cluster codes be? Purity = images whose label is their cluster's majority label:
    an upper bound on label/pattern agreement for ANY one-pattern-per-cluster scheme."""
    feats, logits = encoder_outputs(generator, data.floats())
    guess = logits.argmax(1)
    print(f"encoder guess agrees with the label: {(guess == data.labels).float().mean():.4f}")
    print("| space | clusters | purity | majority-guess agreement |\n|---|---:|---:|---:|")
    for space, points in (("pooled features", feats), ("code logits", logits), ("code softmax", logits.softmax(1))):
        for k in (10, 30, 100, 300):
            assign = kmeans(points, k)
            purity = (majority(data.labels, assign, k, 10)[assign] == data.labels).float().mean()
            agree = (majority(guess, assign, k, 10)[assign] == data.labels).float().mean()
            print(f"| {space} | {k} | {purity:.4f} | {agree:.4f} |", flush=True)


def emit(row: dict, path: Path | None) -> None:
    """One result: a JSON line on stdout, appended to `path` too."""
    print(json.dumps(row), flush=True)
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--weights", type=Path, default=None, help="default: the shipped cgan-fashion-mnist.safetensors")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="victim seeds")
    ap.add_argument("--victim-epochs", type=int, default=10)
    ap.add_argument("--test-n", type=int, default=10000, help="clean TRAINING images the victim is tested on (fixed subset)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clusters", type=int, default=100, help="k of the clusters variant")
    ap.add_argument("--label-fraction", type=float, default=0.5, help="mixed: share of images given their true label's code")
    ap.add_argument("--purity", action="store_true", help="print the cluster purity table and stop")
    ap.add_argument("--json", type=Path, help="append one JSON line per result here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = args.weights or shipped_weights_dir() / "cgan-fashion-mnist.safetensors"

    unseen, seen = load_fashion_mnist("test"), load_fashion_mnist("train")
    test = seen.subset(torch.randperm(len(seen), generator=torch.Generator().manual_seed(0))[: args.test_n])
    engine = ProtectEngine(EngineConfig(weights, "cpu", "fp32", args.epsilon, batch_size=256))
    if args.purity:
        purity_table(engine.generator, unseen)
        return
    for variant in args.variants:
        start = time.perf_counter()
        if variant == "seen":
            control = seen.subset(torch.randperm(len(seen), generator=torch.Generator().manual_seed(1))[: len(unseen)])
            pixels = protect_with_engine(engine, control.pixels, codes=control.labels)
            for seed in args.seeds:
                res = train_victim(pixels.float() / 255.0, control.labels, unseen.floats(), unseen.labels, 10,
                                   VictimConfig(epochs=args.victim_epochs, seed=seed))
                row = {"variant": variant, "epsilon": args.epsilon, "victim_seed": seed, "victim_epochs": args.victim_epochs,
                       "train_n": len(control), "test_n": len(unseen), "clean_test_acc": round(res.test_accuracy, 4),
                       "victim_train_acc": round(res.train_accuracy, 4), "curve": [round(c, 4) for c in res.epoch_accuracy],
                       "victim_seconds": round(res.seconds, 1), "weights": str(weights)}
                emit(row, args.json)
            continue
        codes_used = None
        codes = None
        if variant == "labels":
            codes = unseen.labels
        elif variant == "clusters":
            feats, logits = encoder_outputs(engine.generator, unseen.floats())
            assign = kmeans(feats, args.clusters)
            codes = majority(logits.argmax(1), assign, args.clusters, 10)[assign]
        elif variant == "mixed":
            _, logits = encoder_outputs(engine.generator, unseen.floats())
            known = torch.rand(len(unseen), generator=torch.Generator().manual_seed(0)) < args.label_fraction
            codes = torch.where(known, unseen.labels, logits.argmax(1))
        if variant == "clean":
            pixels = unseen.pixels
        else:
            pixels = protect_with_engine(engine, unseen.pixels, codes=codes)
        protect_seconds = time.perf_counter() - start
        if variant == "guess":
            codes_used = encoder_outputs(engine.generator, unseen.floats())[1].argmax(1)
        codes_used = codes if variant in ("clusters", "mixed") else codes_used
        code_agreement = None if codes_used is None else round(float((codes_used == unseen.labels).float().mean()), 4)
        for seed in args.seeds:
            vcfg = VictimConfig(epochs=args.victim_epochs, seed=seed)
            res = train_victim(pixels.float() / 255.0, unseen.labels, test.floats(), test.labels, 10, vcfg)
            row = {"variant": variant, "epsilon": args.epsilon, "victim_seed": seed, "victim_epochs": args.victim_epochs,
                   "train_n": len(unseen), "test_n": len(test), "clean_test_acc": round(res.test_accuracy, 4),
                   "victim_train_acc": round(res.train_accuracy, 4), "curve": [round(c, 4) for c in res.epoch_accuracy],
                   "code_label_agreement": 1.0 if variant == "labels" else code_agreement,
                   "clusters": args.clusters if variant == "clusters" else None,
                   "label_fraction": args.label_fraction if variant == "mixed" else None,
                   "protect_seconds": round(protect_seconds, 1), "victim_seconds": round(res.seconds, 1), "weights": str(weights)}
            emit(row, args.json)


if __name__ == "__main__":
    main()
