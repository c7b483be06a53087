"""Victim accuracy against image quality: an SVG scatter of `photo_path_bench.py --json` rows.

One point per row (x: ssim_written, the SSIM of what `cgan protect` wrote; y: the victim's accuracy
on clean test images), labelled with the budget and mask floor; the clean-trained accuracy, when a
row with weights "clean" is given, is a dashed line. Plain SVG, so no plotting library is needed.

    python bench/plot_tradeoff.py runs/tradeoff/rows.jsonl --out docs/tradeoff.svg
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

W, H, PAD = 560, 380, 60


def scale(v: float, lo: float, hi: float, a: float, b: float) -> float:
    return a + (v - lo) / (hi - lo) * (b - a)


def svg(rows: list[dict], title: str) -> str:
    points = [r for r in rows if r["weights"] != "clean"]
    clean = [r["clean_test_acc"] for r in rows if r["weights"] == "clean"]
    xs = [r["ssim_written"] for r in points]
    x_lo, x_hi = min(xs) - 0.005, max(xs) + 0.005
    y_lo, y_hi = 0.0, 1.0

    def xy(x: float, y: float) -> tuple[float, float]:
        return scale(x, x_lo, x_hi, PAD, W - 20), scale(y, y_lo, y_hi, H - PAD, 20)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="14" text-anchor="middle" font-size="12">{title}</text>']
    for i in range(6):  # grid and tick labels
        y = y_lo + i * (y_hi - y_lo) / 5
        _, py = xy(x_lo, y)
        out.append(f'<line x1="{PAD}" y1="{py:.1f}" x2="{W - 20}" y2="{py:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{PAD - 6}" y="{py + 4:.1f}" text-anchor="end">{y:.0%}</text>')
        x = x_lo + i * (x_hi - x_lo) / 5
        px, _ = xy(x, y_lo)
        out.append(f'<text x="{px:.1f}" y="{H - PAD + 16}" text-anchor="middle">{x:.3f}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 16}" text-anchor="middle">SSIM of the protected upload vs the original (higher = less visible)</text>')
    out.append(f'<text x="14" y="{H / 2}" text-anchor="middle" transform="rotate(-90 14 {H / 2})">victim accuracy on clean test images (lower = better protected)</text>')
    for acc in clean[:1]:
        _, py = xy(x_lo, acc)
        out.append(f'<line x1="{PAD}" y1="{py:.1f}" x2="{W - 20}" y2="{py:.1f}" stroke="#888" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{W - 22}" y="{py - 4:.1f}" text-anchor="end" fill="#555">trained on clean images: {acc:.1%}</text>')
    for r in points:
        px, py = xy(r["ssim_written"], r["clean_test_acc"])
        floor = r.get("mask_floor")
        colour = "#c0392b" if floor is None or floor >= 1 else "#2471a3"
        label = f'{r["epsilon"]:g}/255' + ("" if floor is None or floor >= 1 else f", mask {floor:g}")
        out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="{colour}"/>')
        out.append(f'<text x="{px + 6:.1f}" y="{py - 6:.1f}">{label} ({r["clean_test_acc"]:.1%})</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", type=Path, help="photo_path_bench.py --json output")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="Fashion-MNIST, photo path 112 px, SmallCNN victims")
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    args.out.write_text(svg(rows, args.title))


if __name__ == "__main__":
    main()
