"""Pilot: does the distortion layer in `cgan train` make the noise survive the trip to the internet?

One seed, reduced scale (a fixed Fashion-MNIST subset, short training), for this shared CPU. Three
stages, so the two generators can train in parallel from the same code stage:

    # 1. the code stage once (encoder fits the subset); writes WORK/codes.ckpt.safetensors
    python bench/robust_pilot.py codes --work WORK --n 10000 --code-epochs 20
    #    or, much cheaper: the shipped generator's encoder (trained on all 60k, 100% fit) as the codes,
    #    with fresh far-apart tiles, local head and helper nets
    python bench/robust_pilot.py codes --work WORK --codes-from weights/cgan-fashion-mnist.safetensors
    # 2. the confounder stage from those codes, with and without the distortion layer
    python bench/robust_pilot.py confounder --work WORK --variant distorted --epochs 2
    python bench/robust_pilot.py confounder --work WORK --variant plain --epochs 2
    # 3. victims (SmallCNN) trained on what each generator protects through ProtectEngine
    python bench/robust_pilot.py victims --work WORK --variant distorted [--conditions written photo112 ...]
    # no victims: how much of the written noise is left after each path (correlation, RMS ratio)
    python bench/robust_pilot.py survival --weights A.safetensors B.safetensors --n 1000

Conditions (the training images a victim sees; the test set is clean, passed through the same
countermeasure transform as `cgan verify` does):
- written: the 28 px images protected by the engine as they are;
- photoS: each image bicubic-upscaled to S px, protected at that size by the engine (noise made at
  28 px, upsampled), box-downsized (area) to 28 px by the victim's loader;
- jpeg:50, blur:1, rescale:2: `cgan verify`'s countermeasures applied to the written images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from cgan_cli.core.engine import EngineConfig, ProtectEngine
from cgan_cli.core.weights import load_generator
from cgan_cli.learning.config import Distortions, TrainConfig, VictimConfig
from cgan_cli.learning.countermeasures import parse_countermeasure
from cgan_cli.learning.data import load_fashion_mnist
from cgan_cli.learning.train import build_nets, save_checkpoint, train
from cgan_cli.learning.verify import protect_with_engine
from cgan_cli.learning.victims import accuracy, train_victim
from photo_path_bench import photo_path, survival  # the photo path and noise survival, shared with that bench

VARIANTS = {"distorted": Distortions(), "plain": dataclasses.replace(Distortions.none(), crop_flip=1.0)}
SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "cgan-fashion-mnist.safetensors"
CONDITIONS = ("written", "photo56", "photo112", "jpeg:50", "blur:1", "rescale:2")


def subset(n: int):
    train_set = load_fashion_mnist("train")
    return train_set.subset(torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[:n])


def base_config(args, out: Path) -> TrainConfig:
    return TrainConfig(data="fashion-mnist", out=out, epsilon=args.epsilon, code_epochs=args.code_epochs, epochs=0,
                       seed=args.seed, progress=False, checkpoint_every=10**9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["codes", "confounder", "victims", "survival"])
    ap.add_argument("--work", type=Path)
    ap.add_argument("--weights", nargs="+", type=Path, default=[], help="survival: the generators to compare")
    ap.add_argument("--variant", choices=[*sorted(VARIANTS), "clean", "shipped"],
                    help="clean: victims only, no protection; shipped: victims of weights/cgan-fashion-mnist.safetensors")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--code-epochs", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=2, help="confounder-stage epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--victim-epochs", type=int, default=5)
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--codes-from", type=Path, help="codes stage: take the encoder + code head of these weights")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage == "survival":
        survival(args.weights, subset(args.n).pixels, [c for c in args.conditions if c != "written"])
        return
    if args.work is None:
        ap.error("--work is required for this stage")
    args.work.mkdir(parents=True, exist_ok=True)
    data = subset(args.n)
    codes_out = args.work / "codes.safetensors"

    if args.stage == "codes" and args.codes_from:
        cfg = dataclasses.replace(base_config(args, codes_out), code_epochs=0)
        nets = build_nets(cfg, data.channels, len(data.class_names), torch.device("cpu"))
        source, _ = load_generator(args.codes_from)
        nets.gen.encoder.load_state_dict(source.encoder.state_dict())
        nets.gen.code_head.load_state_dict(source.code_head.state_dict())
        save_checkpoint(args.work / "codes.ckpt.safetensors", nets, 0, cfg, torch.Generator().manual_seed(cfg.seed + 1))
        (args.work / "codes.from").write_text(str(args.codes_from) + "\n")
        print(json.dumps({"stage": "codes", "from": str(args.codes_from),
                          "code_train_accuracy": accuracy(nets.gen.code_logits, data.pixels, data.labels)}))
        return
    if args.stage == "codes":
        result = train(base_config(args, codes_out), data=data)
        print(json.dumps({"stage": "codes", "seconds": result.seconds, **result.metrics}))
        return
    out = SHIPPED if args.variant == "shipped" else args.work / f"{args.variant}.safetensors"
    if args.stage == "confounder":
        cfg = dataclasses.replace(base_config(args, out), epochs=args.epochs, distortions=VARIANTS[args.variant],
                                  code_epochs=0 if (args.work / "codes.from").exists() else args.code_epochs,
                                  resume=args.work / "codes.ckpt.safetensors", checkpoint_every=0)
        result = train(cfg, data=data)
        print(json.dumps({"stage": "confounder", "variant": args.variant, "seconds": result.seconds, **result.metrics}))
        return

    test = load_fashion_mnist("test")
    engine = ProtectEngine(EngineConfig(weights=out, device="cpu", epsilon=args.epsilon)) if args.variant != "clean" else None
    vcfg = VictimConfig(epochs=args.victim_epochs, seed=args.seed)
    written = protect_with_engine(engine, data.pixels) if engine is not None else data.pixels
    for condition in args.conditions:
        start = time.perf_counter()
        test_px = test.pixels
        if condition.startswith("photo"):
            train_px = photo_path(data.pixels, condition, engine)
        elif condition == "written":
            train_px = written
        else:
            cm = parse_countermeasure(condition)
            train_px, test_px = cm.apply(written), cm.apply(test.pixels)
        res = train_victim(train_px.float() / 255, data.labels, test_px.float() / 255, test.labels, 10, vcfg)
        row = {"variant": args.variant, "condition": condition, "n": args.n, "victim_epochs": args.victim_epochs,
               "clean_test_acc": round(res.test_accuracy, 4), "victim_train_acc": round(res.train_accuracy, 4),
               "seconds": round(time.perf_counter() - start)}
        print(json.dumps(row), flush=True)
        with open(args.work / "victims.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
