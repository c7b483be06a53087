"""Do far-apart class tiles fix the seed variance? (docs/method.md, Measurement 5)

Rewrites a trained generator's tiles with saturated +-1 tiles drawn greedily so that no class's
tile is close to any cyclic shift or horizontal flip of another's (what the victim's crop + flip
can map one onto the other), keeps its encoder and local head, and writes a new file to evaluate
with bench/train_ablation.py --weights. Also prints the worst pair similarity before and after.

    .venv/bin/python bench/tile_separation.py GEN.safetensors OUT.safetensors [--candidates 4000]
"""

from __future__ import annotations

import argparse

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cgan_cli.learning.tiles import far_apart_tiles, worst_similarity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("out")
    ap.add_argument("--candidates", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tensors = load_file(args.weights)
    with safe_open(args.weights, "pt") as fh:
        meta = fh.metadata()
    before = torch.tanh(tensors["tiles"])
    tiles = far_apart_tiles(before.shape[0], tuple(before.shape[1:]), args.seed, args.candidates)
    print(f"worst pair similarity under shift/flip: trained tiles {worst_similarity(before):.2f}, far-apart tiles {worst_similarity(tiles):.2f}")
    tensors["tiles"] = 3.0 * tiles  # saturated after tanh, as cgan train initialises them
    save_file(tensors, args.out, metadata=meta)


if __name__ == "__main__":
    main()
