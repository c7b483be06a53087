"""How often the RGB default's encoder guesses the right category on stamps it never saw.

Its training set (`examples/build_rgb_dataset.py`) takes at most MAX_PER_CLASS stamps per Tux Paint
category; the stamps it left out of the larger categories are unseen images of exactly that kind.
This copies them into WORK/<category>/, runs `cgan protect` on the folder (no labels: every code is
the encoder's guess, recorded in the manifest) and compares each manifest `code` with the folder.

    sudo apt-get install -y tuxpaint-stamps-default
    python bench/rgb_unseen_codes.py --work runs/rgb-unseen
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

from build_rgb_dataset import MAX_PER_CLASS, STAMPS, pick_evenly  # noqa: E402

from cgan_cli.core.shipped import shipped_weights_dir  # noqa: E402
from cgan_cli.core.weights import read_meta  # noqa: E402


def unseen_stamps(work: Path, classes: list[str]) -> dict[str, int]:
    """Copy the stamps the training set did not pick, per category the generator knows."""
    counts = {}
    for category in classes:
        images = sorted((STAMPS / category).rglob("*.png"))
        rest = sorted(set(images) - set(pick_evenly(images, MAX_PER_CLASS)))
        if rest:
            (work / category).mkdir(parents=True)
            for path in rest:
                shutil.copyfile(path, work / category / "_".join(path.relative_to(STAMPS / category).parts))
            counts[category] = len(rest)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (replaced)")
    ap.add_argument("--weights", type=Path, default=shipped_weights_dir() / "cgan-rgb-default.safetensors")
    args = ap.parse_args()
    classes = read_meta(args.weights).class_names
    shutil.rmtree(args.work, ignore_errors=True)
    src, out = args.work / "stamps", args.work / "protected"
    print("unseen stamps:", unseen_stamps(src, classes))
    subprocess.run([sys.executable, "-m", "cgan_cli", "protect", str(src), "--out", str(out), "--weights", str(args.weights),
                    "--workers", "0"], check=True)
    guesses: dict[str, Counter] = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["status"] == "protected":
            guesses.setdefault(Path(rec["output"]).parts[0], Counter())[classes[rec["code"]]] += 1
    right = total = 0
    for category, counts in sorted(guesses.items()):
        n = sum(counts.values())
        right, total = right + counts[category], total + n
        print(f"{category}: {counts[category]} of {n} guessed right ({counts[category] / n:.1%}); guesses {dict(counts.most_common())}")
    print(f"all: {right} of {total} ({right / total:.1%})")


if __name__ == "__main__":
    main()
