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


def variants(tile: torch.Tensor) -> torch.Tensor:
    """(2 * p * p, C, p, p): every cyclic shift of the tile and of its horizontal mirror."""
    p = tile.shape[-1]
    return torch.stack([torch.roll(t, (dy, dx), (-2, -1)) for t in (tile, tile.flip(-1)) for dy in range(p) for dx in range(p)])


def unit_rows(tiles: torch.Tensor) -> torch.Tensor:
    """(N, ...) tiles -> (N, D) unit vectors, so a matrix product gives cosine similarities."""
    flat = tiles.flatten(1)
    return flat / flat.norm(dim=1, keepdim=True)


def worst_similarity(tiles: torch.Tensor) -> float:
    """Highest cosine similarity between one class's tile and any shift/flip of another's."""
    worst = -1.0
    for i in range(len(tiles)):
        sims = unit_rows(variants(tiles[i])) @ unit_rows(tiles).T  # (variants, K)
        sims[:, i] = -1.0
        worst = max(worst, float(sims.max()))
    return worst


def far_apart_tiles(k: int, shape: tuple[int, ...], candidates: int, seed: int) -> torch.Tensor:
    """Greedy: each next tile is the random +-1 candidate least similar to the ones already chosen."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, 2, (candidates, *shape), generator=gen).float() * 2 - 1
    pool_unit = unit_rows(pool)
    chosen = [pool[0]]
    for _ in range(k - 1):
        score = torch.full((candidates,), -1.0)
        for t in chosen:
            score = torch.maximum(score, (unit_rows(variants(t)) @ pool_unit.T).max(0).values)
        chosen.append(pool[int(score.argmin())])
    return torch.stack(chosen)


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
    tiles = far_apart_tiles(before.shape[0], tuple(before.shape[1:]), args.candidates, args.seed)
    print(f"worst pair similarity under shift/flip: trained tiles {worst_similarity(before):.2f}, far-apart tiles {worst_similarity(tiles):.2f}")
    tensors["tiles"] = 3.0 * tiles  # saturated after tanh, as cgan train initialises them
    save_file(tensors, args.out, metadata=meta)


if __name__ == "__main__":
    main()
