"""Do far-apart class tiles fix the seed variance? (docs/method.md, Measurement 5)

Rewrites a trained generator's tiles with saturated +-1 tiles drawn greedily so that no class's
tile is close to any cyclic shift or horizontal flip of another's (what the victim's crop + flip
can map one onto the other), keeps its encoder and local head, and writes a new file to evaluate
with bench/train_ablation.py --weights. Also prints the worst pair similarity before and after.
`--bank mix` writes a fixed hand-made bank instead (4x4 versions of bench/classwise_ceiling.py's
`mix`: stripes and checkerboards of periods 2 and 4, and +-DC), for 10-code 4x4 generators.

    .venv/bin/python bench/tile_separation.py GEN.safetensors OUT.safetensors [--candidates 4000] [--bank mix]
"""

from __future__ import annotations

import argparse

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cgan_cli.learning.tiles import far_apart_tiles, structured_tiles, worst_similarity


def mix_bank() -> torch.Tensor:
    """(10, 1, 4, 4) in {-1, +1}: cgan train's structured bank (learning/tiles.py) in this script's
    original order: h / v stripes of periods 2 and 4, checkerboards, then +1 and -1."""
    return structured_tiles(10, (1, 4, 4), seed=0)[[2, 3, 4, 5, 6, 7, 8, 9, 0, 1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("out")
    ap.add_argument("--candidates", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bank", choices=["far-apart", "mix"], default="far-apart")
    args = ap.parse_args()
    tensors = load_file(args.weights)
    with safe_open(args.weights, "pt") as fh:
        meta = fh.metadata()
    before = torch.tanh(tensors["tiles"])
    if args.bank == "mix":
        tiles = mix_bank()
        if tiles.shape != before.shape:
            raise SystemExit(f"--bank mix is (10, 1, 4, 4); these tiles are {tuple(before.shape)}")
    else:
        tiles = far_apart_tiles(before.shape[0], tuple(before.shape[1:]), args.seed, args.candidates)
    print(f"worst pair similarity under shift/flip: trained tiles {worst_similarity(before):.2f}, new tiles {worst_similarity(tiles):.2f}")
    tensors["tiles"] = 3.0 * tiles  # saturated after tanh, as cgan train initialises them
    save_file(tensors, args.out, metadata=meta)


if __name__ == "__main__":
    main()
