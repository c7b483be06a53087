"""Protection of images the generator never saw, through `cgan protect`'s own engine.

The shipped Fashion-MNIST generator was trained on the 60,000 training images. Here it protects the
10,000 TEST images (never seen), a fresh victim (SmallCNN) trains on those protected images with
their true labels, and is tested on clean TRAINING images (a fixed subset). Code variants:

  clean   no protection (the baseline)
  guess   the encoder guesses each image's code (what `cgan protect` does without --labels)
  labels  the true label is the code (`cgan protect --labels ...`)

    nice -n 10 .venv/bin/python bench/unseen_bench.py --variants clean guess labels --seeds 0 1 2

One JSON line per (variant, victim seed) on stdout and in --json; docs/method.md records them.
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

VARIANTS = ("clean", "guess", "labels")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--weights", type=Path, default=None, help="default: the shipped cgan-fashion-mnist.safetensors")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="victim seeds")
    ap.add_argument("--victim-epochs", type=int, default=10)
    ap.add_argument("--test-n", type=int, default=10000, help="clean TRAINING images the victim is tested on (fixed subset)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="append one JSON line per result here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = args.weights or shipped_weights_dir() / "cgan-fashion-mnist.safetensors"

    unseen, seen = load_fashion_mnist("test"), load_fashion_mnist("train")
    test = seen.subset(torch.randperm(len(seen), generator=torch.Generator().manual_seed(0))[: args.test_n])
    engine = ProtectEngine(EngineConfig(weights, "cpu", "fp32", args.epsilon, batch_size=256))
    for variant in args.variants:
        start = time.perf_counter()
        codes_used = None
        if variant == "clean":
            pixels = unseen.pixels
        else:
            pixels = protect_with_engine(engine, unseen.pixels, codes=unseen.labels if variant == "labels" else None)
        protect_seconds = time.perf_counter() - start
        if variant == "guess":
            with torch.inference_mode():
                codes_used = torch.cat([engine.generator.code_logits(unseen.floats()[i : i + 1000]).argmax(1) for i in range(0, len(unseen), 1000)])
        code_agreement = None if codes_used is None else round(float((codes_used == unseen.labels).float().mean()), 4)
        for seed in args.seeds:
            vcfg = VictimConfig(epochs=args.victim_epochs, seed=seed)
            res = train_victim(pixels.float() / 255.0, unseen.labels, test.floats(), test.labels, 10, vcfg)
            row = {"variant": variant, "epsilon": args.epsilon, "victim_seed": seed, "victim_epochs": args.victim_epochs,
                   "train_n": len(unseen), "test_n": len(test), "clean_test_acc": round(res.test_accuracy, 4),
                   "victim_train_acc": round(res.train_accuracy, 4), "curve": [round(c, 4) for c in res.epoch_accuracy],
                   "code_label_agreement": 1.0 if variant == "labels" else code_agreement,
                   "protect_seconds": round(protect_seconds, 1), "victim_seconds": round(res.seconds, 1), "weights": str(weights)}
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
