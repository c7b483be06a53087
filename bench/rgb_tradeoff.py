"""The RGB default's trade-off: victim accuracy on its own Tux Paint set against SSIM on photos.

Victims: `cgan verify runs/tuxpaint --weights W [--epsilon E] [--mask-floor F] --seed S --report R`
reports (one per victim seed), grouped by the (epsilon, mask floor) each report's method records.
SSIM: `cgan protect examples/photos --measure-ssim` with the same settings, median over the photos of
the manifest's `ssim` (what the protect path wrote, against the original). One SVG (bench/ssim_plot.py)
and a markdown table:

    for E in 8 6 5 4; do for S in 0 1 2; do
      cgan verify runs/tuxpaint --weights weights/cgan-rgb-default.safetensors --epsilon $E \\
          --epochs 15 --batch-size 32 --lr 0.05 --seed $S --report runs/rgb-tradeoff/e$E-s$S.json
    done; done          # and --mask-floor F at 8/255
    python bench/rgb_tradeoff.py runs/rgb-tradeoff/*.json --out docs/rgb-ssim-vs-accuracy.svg
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ssim_plot import accuracy_text, grouped, svg

REPO = Path(__file__).resolve().parents[1]


def victim_rows(reports: list[Path]) -> tuple[list[dict], set[str]]:
    """One row per report (its generator row without countermeasure), in bench/ssim_plot.py's form."""
    rows, weights = [], set()
    for path in reports:
        report = json.loads(path.read_text())
        (method,) = [m for m in report["methods"] if m["method"] == "generator"]
        (row,) = [r for r in report["rows"] if r["method"] == "generator" and r["countermeasure"] == "none"]
        weights.add(report["weights"]["path"])
        rows.append({"epsilon": method["epsilon"], "mask_floor": method["mask_floor"], "clean_test_acc": row["protected_trained_accuracy"],
                     "clean_trained": row["clean_trained_accuracy"], "chance": row["chance"], "report": str(path),
                     "trained_epsilon": report["weights"]["trained_epsilon"]})
    return rows, weights


def levers(row: dict) -> tuple[str, ...]:
    """Which ways of trading protection for quality a point lies on: a smaller budget without the mask,
    the mask at the full budget; the full budget without the mask starts both."""
    full, no_mask = row["epsilon"] == row["trained_epsilon"], row["mask_floor"] >= 1
    return (("smaller budget, no mask",) if no_mask else ()) + ((f"mask, at {row['epsilon']:g}/255",) if full else ())


def short(row: dict) -> str:
    return f"{row['epsilon']:g}/255" if row["mask_floor"] >= 1 else f"floor {row['mask_floor']:g}"


def median_ssim(weights: str, photos: Path, epsilon: float, mask_floor: float) -> float:
    """Median SSIM over `photos` of what `cgan protect --measure-ssim` writes with these settings."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        subprocess.run([sys.executable, "-m", "cgan_cli", "protect", str(photos), "--out", str(out), "--weights", weights,
                        "--epsilon", f"{epsilon:g}", "--mask-floor", f"{mask_floor:g}", "--measure-ssim", "--workers", "0",
                        "--format", "png"], check=True, capture_output=True)
        records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        return statistics.median(r["ssim"] for r in records if r["status"] == "protected")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path, help="cgan verify --report files, one per victim seed")
    ap.add_argument("--photos", type=Path, default=REPO / "examples" / "photos")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows, weights = victim_rows(args.reports)
    if len(weights) != 1:
        raise SystemExit(f"reports of more than one weights file: {sorted(weights)}")
    (weights_path,) = weights
    cache: dict[tuple[float, float], float] = {}
    for row in rows:
        key = (row["epsilon"], row["mask_floor"])
        if key not in cache:
            cache[key] = median_ssim(weights_path, args.photos, *key)
        row["ssim_written"] = cache[key]
    clean = statistics.mean(r["clean_trained"] for r in rows)
    print("| budget, mask | median SSIM on the photos | victim accuracy on the stamps (mean, range) |\n|---|---:|---:|")
    for setting, accs, ssim in grouped(rows):
        print(f"| {setting} | {ssim:.3f} | {accuracy_text(accs)} |")
    title = f"RGB default: victims on its Tux Paint stamps, SSIM on {args.photos.name}/"
    lines = {"clean-trained": clean, "chance (largest class)": rows[0]["chance"]}
    args.out.write_text(svg(rows, title, lines, x_label=f"median SSIM of the protected {args.photos.name}/ (higher = less visible)",
                            x_min=math.floor(min(r["ssim_written"] for r in rows) * 50) / 50, series=levers, short=short))  # round ticks
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
