"""Ablations of the `cgan train` objective, measured the honest way: a fresh victim (victims.train_victim)
trained on the protected Fashion-MNIST train subset, tested on the clean test set.

    .venv/bin/python bench/train_ablation.py --variants clean classwise-p2 ny ny+mm ny+mm+aug full --epsilon 8

Each variant prints one markdown row (docs/method.md records them). Keep runs small: the machine is shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from cgan_cli.core.generators import protect_tensor, quantize_8bit
from cgan_cli.core.weights import load_generator
from cgan_cli.learning.config import Distortions, TrainConfig, VictimConfig
from cgan_cli.learning.data import load_fashion_mnist
from cgan_cli.learning.train import train
from cgan_cli.learning.victims import train_victim

# Objective variants: TrainConfig overrides. "full" is the shipped recipe.
VARIANTS: dict[str, dict] = {
    "codes-only": {"epochs": 0},  # learned codes, random saturated tiles (stage 1 only)
    "ny": {"w_minmin": 0.0, "w_adv": 0.0, "distortions": Distortions.none()},
    "ny+mm": {"w_adv": 0.0, "distortions": Distortions.none()},
    "ny+mm+aug": {"w_adv": 0.0, "distortions": dataclasses.replace(Distortions.none(), crop_flip=1.0)},
    "full": {},
}


def classwise_p2(labels: torch.Tensor, side: int, seed: int) -> torch.Tensor:
    """Ceiling reference: random +-1 2x2 tiles per class, chosen with the TRUE labels."""
    tiles = torch.randint(0, 2, (10, 1, 2, 2), generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
    reps = -(-side // 2)
    return tiles.repeat(1, 1, reps, reps)[..., :side, :side][labels]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["clean", "classwise-p2", *VARIANTS])
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--n", type=int, default=20000, help="fixed train subset size (first N of a seeded permutation)")
    ap.add_argument("--code-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--victim", default="cnn")
    ap.add_argument("--victim-epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", type=Path, help="evaluate this generator file instead of training one")
    ap.add_argument("--json", type=Path, help="append one JSON line per result here")
    ap.add_argument("--unseen", action="store_true",
                    help="protect images the generator never saw: the victim trains on the protected TEST split "
                         "(10,000) and is tested on the clean 60,000-image TRAIN split; use with --weights")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    train_set, test_set = load_fashion_mnist("train"), load_fashion_mnist("test")
    if args.unseen:
        train_set, test_set = test_set, train_set
    subset = train_set.subset(torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[: args.n])
    x, y = subset.floats(), subset.labels
    vcfg = VictimConfig(arch=args.victim, epochs=args.victim_epochs)
    workdir = Path(tempfile.mkdtemp(prefix="cgan-ablation-"))
    base = TrainConfig(data="fashion-mnist", out=workdir / "codes.safetensors", epsilon=args.epsilon,
                       code_epochs=args.code_epochs, epochs=args.epochs, progress=False, checkpoint_every=0)
    codes_ckpt, codes_seconds = workdir / "codes.ckpt.safetensors", 0.0
    if not args.weights and set(args.variants) - {"clean", "classwise-p2"}:
        codes = train(dataclasses.replace(base, epochs=0, checkpoint_every=10**9), data=subset)
        codes_seconds = codes.seconds
    print("| variant | eps | n | victim | victim epochs | clean-test acc | victim train acc | code train acc | G seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant in args.variants:
        code_acc, g_seconds = float("nan"), 0.0
        if variant == "clean":
            px = x
        elif variant == "classwise-p2":
            px = quantize_8bit(x + args.epsilon / 255.0 * classwise_p2(y, x.shape[-1], seed=0))
        else:
            if args.weights:
                gen, _ = load_generator(args.weights)
            else:
                # Every variant continues from the same stage-1 checkpoint (the codes), trained once.
                cfg = dataclasses.replace(base, **VARIANTS[variant], out=workdir / f"{variant}.safetensors")
                result = train(dataclasses.replace(cfg, resume=codes_ckpt), data=subset)
                gen, _ = load_generator(result.out)
                code_acc, g_seconds = result.metrics["code_train_accuracy"], result.seconds + codes_seconds
            with torch.no_grad():
                px = torch.cat([protect_tensor(gen, x[i : i + 1000], args.epsilon) for i in range(0, len(x), 1000)])
        start = time.perf_counter()
        res = train_victim(px, y, test_set.floats(), test_set.labels, 10, vcfg)
        row = {"variant": variant, "epsilon": args.epsilon, "n": args.n, "victim": args.victim, "victim_epochs": args.victim_epochs,
               "clean_test_acc": res.test_accuracy, "victim_train_acc": res.train_accuracy, "code_train_acc": code_acc,
               "g_seconds": round(g_seconds), "victim_seconds": round(time.perf_counter() - start)}
        print(f"| {variant} | {args.epsilon:g} | {args.n} | {args.victim} | {args.victim_epochs} | {res.test_accuracy:.3f} "
              f"| {res.train_accuracy:.3f} | {code_acc:.3f} | {g_seconds:.0f} |", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
