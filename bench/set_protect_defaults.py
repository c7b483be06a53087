"""Record a protect-time default in existing weights (same tensors, metadata updated, atomic write).

Why: some settings are chosen after training, by measurement. The shipped RGB generators got
`--mask-floor 0.25` this way for its quality on photos (docs/method.md, Measurement 7), then
`--mask-floor 1` again when victims showed that at 0.25 they protect nothing (Measurement 8);
`cgan protect --mask-floor` still overrides it.

    python bench/set_protect_defaults.py --mask-floor 1 weights/cgan-rgb-default.safetensors weights/cgan-rgb-fast.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors import safe_open

from cgan_cli.core.weights import META_KEY, WeightsMeta, save_tensors_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mask-floor", type=float, required=True)
    ap.add_argument("weights", nargs="+", type=Path)
    args = ap.parse_args()
    for path in args.weights:
        with safe_open(str(path), "pt") as f:
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        meta = WeightsMeta.from_json(metadata[META_KEY])
        meta.protect_defaults = {**meta.protect_defaults, "mask_floor": args.mask_floor}
        save_tensors_atomic(path, tensors, {**metadata, META_KEY: meta.to_json()})
        print(f"{path}: protect_defaults = {meta.protect_defaults}")


if __name__ == "__main__":
    main()
