"""The class tiles' initial draw: far apart under the victim's shift and flip, or a structured bank.

The tiles start saturated (+-1 after tanh), where tanh passes little gradient, so one confounder epoch
moves them little and their initial draw largely decides the result. Two Fashion-MNIST seeds with the
same 100% code fit gave 11.0% and 29.2% victims at 16/255; the worse seed's tiles had pairs a cyclic
shift or flip apart from each other (cosine 0.79), and re-drawing them far apart brought it to 13.4%
(docs/method.md, Measurement 5). A victim that cannot tell two classes apart by the shortcut learns
their content, and content generalises.

The structured bank goes further: patterns whose shift- and flip-invariant content differs class to
class (a constant offset of either sign, stripes and checkerboards of each period the tile holds), the
hand-made bank that beat every random draw as plain class-wise noise (docs/method.md, Measurement 9).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CANDIDATES = 4000  # random +-1 tiles each greedy pick chooses from

# The structured bank, strongest first (a generator with fewer codes takes a prefix): each entry is
# (period it needs, sign pattern from row i and column j); period 1 fits any tile.
STRUCTURED: tuple[tuple[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], ...] = (
    (1, lambda i, j: torch.ones_like(i)),  # +DC: no crop or flip changes it
    (1, lambda i, j: torch.zeros_like(i)),  # -DC
    (2, lambda i, j: i % 2),  # horizontal stripes, period 2
    (2, lambda i, j: j % 2),  # vertical stripes, period 2
    (2, lambda i, j: (i + j) % 2),  # checkerboard, 1 px cells
    (4, lambda i, j: (i // 2) % 2),  # horizontal stripes, period 4
    (4, lambda i, j: (j // 2) % 2),  # vertical stripes, period 4
    (4, lambda i, j: (i // 2 + j // 2) % 2),  # checkerboard, 2 px cells
    (4, lambda i, j: (i // 2 + j) % 2),  # checkerboard, 2 x 1 cells
    (4, lambda i, j: (i + j // 2) % 2),  # checkerboard, 1 x 2 cells
)


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


def far_apart_tiles(
    k: int, shape: tuple[int, ...], seed: int, candidates: int = CANDIDATES, start: torch.Tensor | None = None
) -> torch.Tensor:
    """(k, *shape) +-1 tiles, greedy: each next one is the candidate least similar to any shift or flip
    of the ones already chosen (`start`, if given, else a random first one). Deterministic in `seed`
    (its own generator; global RNG untouched)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, 2, (candidates, *shape), generator=gen).float() * 2 - 1
    pool_unit = unit_rows(pool)
    chosen = list(start) if start is not None and len(start) else [pool[0]]
    while len(chosen) < k:
        score = torch.full((candidates,), -1.0)
        for t in chosen:
            score = torch.maximum(score, (unit_rows(variants(t)) @ pool_unit.T).max(0).values)
        chosen.append(pool[int(score.argmin())])
    return torch.stack(chosen[:k])


def structured_tiles(k: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(k, C, p, p) +-1 tiles: the entries of `STRUCTURED` whose period divides p, in order, the same in
    every channel; codes beyond those are drawn far apart from them (`far_apart_tiles`, under `seed`)."""
    channels, p = shape[0], shape[-1]
    i, j = torch.arange(p)[:, None].expand(p, p), torch.arange(p)[None, :].expand(p, p)
    bank = [sign(i, j).float() * 2 - 1 for period, sign in STRUCTURED if p % period == 0]
    start = torch.stack(bank[:k])[:, None].expand(-1, channels, p, p).contiguous()
    return far_apart_tiles(k, shape, seed, start=start)


INITIAL_TILES = {"far-apart": far_apart_tiles, "structured": structured_tiles}  # = core.choices.TileBank's values
