"""Build the labeled RGB training set for the shipped default generator from Tux Paint's stamps.

No labeled natural-photo set can be downloaded here, so we use the ~800 photo and clip-art cut-outs
that Debian's `tuxpaint-stamps-default` package ships (GPL-2, Bill Kendrick and contributors), one
class per top-level category. Categories with fewer than MIN_PER_CLASS images are dropped and big
ones capped at MAX_PER_CLASS (evenly spaced picks), so classes are not wildly unbalanced.

    sudo apt-get install -y tuxpaint-stamps-default
    python examples/build_rgb_dataset.py /tmp/tuxpaint-classes

The images are not redistributed with cgan; this script rebuilds the exact set from the package.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

STAMPS = Path("/usr/share/tuxpaint/stamps")
MIN_PER_CLASS = 30
MAX_PER_CLASS = 120


def pick_evenly(paths: list[Path], limit: int) -> list[Path]:
    if len(paths) <= limit:
        return paths
    step = len(paths) / limit
    return [paths[int(i * step)] for i in range(limit)]


def build(out: Path) -> dict[str, int]:
    if not STAMPS.is_dir():
        sys.exit(f"{STAMPS} not found: sudo apt-get install -y tuxpaint-stamps-default")
    counts = {}
    for category in sorted(p for p in STAMPS.iterdir() if p.is_dir()):
        images = sorted(category.rglob("*.png"))
        if len(images) < MIN_PER_CLASS:
            continue
        chosen = pick_evenly(images, MAX_PER_CLASS)
        target = out / category.name
        target.mkdir(parents=True, exist_ok=True)
        for path in chosen:
            # Flatten the sub-tree into the name so files from different sub-folders never collide.
            shutil.copyfile(path, target / "_".join(path.relative_to(category).parts))
        counts[category.name] = len(chosen)
    return counts


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    counts = build(Path(sys.argv[1]))
    print(f"{sum(counts.values())} images in {len(counts)} classes: {counts}")
