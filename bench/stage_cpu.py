"""CPU time per image of decode_image / encode_image / fidelity for one cgan checkout (before/after checks).

    .venv/bin/python bench/stage_cpu.py TREE FOLDER [--files 100] [--repeats 5]

TREE is a checkout to import cgan_cli from (e.g. `git archive REV | tar -x -C DIR`), FOLDER a folder
of images. Process CPU time, the minimum over the repeats: steadier than wall time on a shared machine.
Run it alternately for two trees and compare.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree))
    import numpy as np

    from cgan_cli.core.formats import decode_image, encode_image, fidelity

    datas = [f.read_bytes() for f in sorted(args.folder.iterdir()) if f.is_file()][: args.files]
    best = {"decode": float("inf"), "encode": float("inf"), "fidelity": float("inf")}
    for _ in range(args.repeats):
        t0 = time.process_time()
        decoded = [decode_image(data) for data in datas]
        best["decode"] = min(best["decode"], time.process_time() - t0)
        changed = [np.clip(d.pixels.astype(np.int16) + 3, 0, d.max_value).astype(d.pixels.dtype) for d in decoded]
        t0 = time.process_time()
        for d, pixels in zip(decoded, changed):
            encode_image(d, pixels)
        best["encode"] = min(best["encode"], time.process_time() - t0)
        t0 = time.process_time()
        for d, pixels in zip(decoded, changed):
            fidelity(d.pixels, pixels, d.max_value)
        best["fidelity"] = min(best["fidelity"], time.process_time() - t0)
    print(args.tree, args.folder, {k: round(v * 1000 / len(datas), 3) for k, v in best.items()}, "ms per image")


if __name__ == "__main__":
    main()
