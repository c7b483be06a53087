"""The class tiles' initial draw: far apart under the victim's shift and flip.

The tiles start saturated (+-1 after tanh), where tanh passes little gradient, so one confounder epoch
moves them little and their random draw largely decides the result. Two Fashion-MNIST seeds with the
same 100% code fit gave 11.0% and 29.2% victims at 16/255; the worse seed's tiles had pairs a cyclic
shift or flip apart from each other (cosine 0.79), and re-drawing them far apart brought it to 13.4%
(docs/method.md, Measurement 5). A victim that cannot tell two classes apart by the shortcut learns
their content, and content generalises.
"""

from __future__ import annotations

import torch

CANDIDATES = 4000  # random +-1 tiles each greedy pick chooses from


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


def far_apart_tiles(k: int, shape: tuple[int, ...], seed: int, candidates: int = CANDIDATES) -> torch.Tensor:
    """(k, *shape) +-1 tiles, greedy: each next one is the candidate least similar to any shift or flip
    of the ones already chosen. Deterministic in `seed` (its own generator; global RNG untouched)."""
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
