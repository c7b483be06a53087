"""The ceiling for class-wise noise: hand-made patterns chosen with the TRUE labels (no generator).

A victim (SmallCNN, victims.train_victim defaults, crop + flip) is trained on the protected
Fashion-MNIST subset and tested on the clean test set. What this measures is how good a pattern
can be at all; `cgan train` can only lose against it (its encoder must guess the label).

    .venv/bin/python bench/classwise_ceiling.py --patterns clean rand2 rand4 rand8 full stripes mix --epsilon 8

`structured` is `cgan train --tiles structured`'s 4x4 bank in its own order (class c gets entry c),
`structured:S` the same bank in the order `torch.randperm(10, seed S)` (class c gets entry order[c]),
`mix4` the bank in `mix`'s order. `--unseen` is bench/unseen_bench.py's protocol: the victim trains on
all 10,000 protected test images and is tested on `--n` clean training images.
"""

from __future__ import annotations

import argparse

import torch

from cgan_cli.core.generators import quantize_8bit
from cgan_cli.learning.config import VictimConfig
from cgan_cli.learning.data import load_fashion_mnist
from cgan_cli.learning.tiles import structured_tiles
from cgan_cli.learning.victims import train_victim

SIDE = 28


def tiled(tiles: torch.Tensor) -> torch.Tensor:
    """(K, 1, p, p) tiles repeated over the image, anchored top-left."""
    reps = -(-SIDE // tiles.shape[-1])
    return tiles.repeat(1, 1, reps, reps)[..., :SIDE, :SIDE]


def stripes(period: int, vertical: bool) -> torch.Tensor:
    line = ((torch.arange(SIDE) % period) < period / 2).float() * 2 - 1
    pat = line[None, :].expand(SIDE, SIDE) if vertical else line[:, None].expand(SIDE, SIDE)
    return pat[None]


def checker(cell: int) -> torch.Tensor:
    i = torch.arange(SIDE)
    return (((i[:, None] // cell + i[None, :] // cell) % 2).float() * 2 - 1)[None]


def patterns(name: str, gen: torch.Generator) -> torch.Tensor:
    """(10, 1, 28, 28) patterns in {-1, +1}."""
    if name.startswith("rand"):
        p = int(name[4:])
        return tiled(torch.randint(0, 2, (10, 1, p, p), generator=gen).float() * 2 - 1)
    if name == "full":  # one random pixel pattern per class, no repetition
        return torch.randint(0, 2, (10, 1, SIDE, SIDE), generator=gen).float() * 2 - 1
    if name == "stripes":  # horizontal and vertical square waves, periods 2..6 (flip/shift robust)
        return torch.stack([stripes(p, v) for v in (False, True) for p in (2, 3, 4, 5, 6)])
    if name == "mix":  # high-frequency stripes + checkerboards + two constant offsets
        return torch.stack([stripes(2, False), stripes(2, True), checker(1), stripes(4, False), stripes(4, True),
                            checker(2), stripes(3, False), stripes(3, True), torch.ones(1, SIDE, SIDE), -torch.ones(1, SIDE, SIDE)])
    if name.startswith("structured") or name == "mix4":
        bank = structured_tiles(10, (1, 4, 4), seed=0)
        if name == "mix4":
            return tiled(bank[[2, 3, 4, 5, 6, 7, 8, 9, 0, 1]])
        order = torch.randperm(10, generator=torch.Generator().manual_seed(int(name[11:]))) if ":" in name else torch.arange(10)
        return tiled(bank[order])
    if name == "clean":
        return torch.zeros(10, 1, SIDE, SIDE)
    raise ValueError(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", nargs="+", default=["clean", "rand2", "rand4", "rand8", "full", "stripes", "mix"])
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--victim-epochs", type=int, default=3)
    ap.add_argument("--victim-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--unseen", action="store_true", help="train on the protected test split, test on --n clean training images")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train_set, test_set = load_fashion_mnist("train"), load_fashion_mnist("test")
    idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[: args.n]
    subset_x, subset_y = train_set.floats()[idx], train_set.labels[idx]
    x, y, test_x, test_y = (test_set.floats(), test_set.labels, subset_x, subset_y) if args.unseen else (subset_x, subset_y, test_set.floats(), test_set.labels)
    gen = torch.Generator().manual_seed(0)
    print("| pattern | eps | victim seed | clean-test acc | victim train acc |\n|---|---|---|---|---|")
    for name in args.patterns:
        px = quantize_8bit(x + args.epsilon / 255.0 * patterns(name, gen)[y])
        for seed in args.victim_seeds:
            res = train_victim(px, y, test_x, test_y, 10, VictimConfig(epochs=args.victim_epochs, seed=seed))
            print(f"| {name} | {args.epsilon:g} | {seed} | {res.test_accuracy:.3f} | {res.train_accuracy:.3f} |", flush=True)


if __name__ == "__main__":
    main()
