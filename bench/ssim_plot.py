"""Victim accuracy on the photo path against the SSIM of what `cgan protect` wrote: one SVG, no plotting library.

Reads the JSON rows of bench/photo_path_bench.py (one per victim; rows of one path), plots each
(epsilon, mask floor) as a point, and marks the clean-trained accuracy, the target and chance:

    python bench/photo_path_bench.py --weights weights/cgan-fashion-mnist.safetensors --paths photo112 \
        --epsilon 16 --json runs/ssim-sweep.jsonl          # and --epsilon 4, --mask-floor 0.25, the default
    python bench/ssim_plot.py runs/ssim-sweep.jsonl --path photo112 --out docs/ssim-vs-accuracy.svg
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 640, 400, 60


def label(row: dict) -> str:
    floor = row.get("mask_floor")
    mask = "no mask" if floor is None or floor >= 1 else f"mask floor {floor:g}"
    return f"{row['epsilon']:g}/255, {mask}"


def grouped(rows: list[dict]) -> list[tuple[str, list[float], float]]:
    """One entry per (epsilon, mask floor): the victims' accuracies (one per victim seed) and the SSIM."""
    groups: dict[str, tuple[list[float], float]] = {}
    for r in rows:
        accs, _ = groups.setdefault(label(r), ([], r["ssim_written"]))
        accs.append(r["clean_test_acc"])
    return sorted(((k, accs, ssim) for k, (accs, ssim) in groups.items()), key=lambda g: g[2])


def accuracy_text(accs: list[float]) -> str:
    mean = sum(accs) / len(accs)
    return f"{mean:.1%}" if len(accs) == 1 else f"{mean:.1%} ({min(accs):.1%}-{max(accs):.1%})"


COLOURS = ("#c0392b", "#2471a3", "#1e8449")


def svg(rows: list[dict], title: str, lines: dict[str, float],
        x_label: str = "mean SSIM of the protected upload (higher = less visible)", x_min: float = 0.5,
        series: Callable[[dict], tuple[str, ...]] | None = None, short: Callable[[dict], str] | None = None) -> str:
    """One point per setting (a bar over its victims). `series` (row -> the names of the series it belongs
    to) joins each series' points by a line in its own colour, with a legend, and labels each point
    `short(row)` and the mean accuracy; without it, every point is one colour with a two-line label."""
    xs = [r["ssim_written"] for r in rows]
    x_lo, x_hi = min(xs + [x_min]) - 0.02, 1.0
    y_lo, y_hi = 0.0, min(1.0, max(0.4, round(max(r["clean_test_acc"] for r in rows) + 0.15, 1)))

    def px(x: float) -> float:
        return MARGIN + (x - x_lo) / (x_hi - x_lo) * (WIDTH - 2 * MARGIN)

    def py(y: float) -> float:
        return HEIGHT - MARGIN - (y - y_lo) / (y_hi - y_lo) * (HEIGHT - 2 * MARGIN)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="11">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="13">{title}</text>',
           f'<line x1="{MARGIN}" y1="{py(0)}" x2="{WIDTH - MARGIN}" y2="{py(0)}" stroke="black"/>',
           f'<line x1="{MARGIN}" y1="{py(0)}" x2="{MARGIN}" y2="{py(y_hi)}" stroke="black"/>',
           f'<text x="{WIDTH / 2}" y="{HEIGHT - 15}" text-anchor="middle">{x_label}</text>',
           f'<text x="15" y="{HEIGHT / 2}" text-anchor="middle" transform="rotate(-90 15 {HEIGHT / 2})">victim accuracy on clean test images</text>']
    for i in range(round(y_hi * 10) + 1):
        y = i / 10
        out.append(f'<text x="{MARGIN - 6}" y="{py(y) + 4}" text-anchor="end">{y:.0%}</text>')
    steps = 5
    for i in range(steps + 1):
        x = x_lo + (x_hi - x_lo) * i / steps
        out.append(f'<text x="{px(x)}" y="{py(0) + 16}" text-anchor="middle">{x:.2f}</text>')
    above = [f"{name}: {y:.1%}" for name, y in lines.items() if y > y_hi]
    if above:
        out.append(f'<text x="{WIDTH - MARGIN}" y="{py(y_hi) - 8}" text-anchor="end" fill="gray">above the chart: {", ".join(above)}</text>')
    for name, y in lines.items():
        if y > y_hi:
            continue
        out.append(f'<line x1="{MARGIN}" y1="{py(y)}" x2="{WIDTH - MARGIN}" y2="{py(y)}" stroke="gray" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{WIDTH - MARGIN - 4}" y="{py(y) - 4}" text-anchor="end" fill="gray">{name}</text>')
    names = list(dict.fromkeys(n for r in rows for n in series(r))) if series else [""]
    for k, name in enumerate(names):
        colour = COLOURS[k % len(COLOURS)]
        members = [r for r in rows if series is None or name in series(r)]
        points, shorts = grouped(members), {label(r): (short or label)(r) for r in members}
        if series:
            out.append(f'<polyline fill="none" stroke="{colour}" points="'
                       + " ".join(f"{px(ssim):.1f},{py(sum(accs) / len(accs)):.1f}" for _, accs, ssim in points) + '"/>')
            out.append(f'<text x="{MARGIN + 10}" y="{MARGIN + 14 * k}" fill="{colour}">{name}</text>')
        for i, (setting, accs, ssim) in enumerate(points):
            x, y = px(ssim), py(sum(accs) / len(accs))
            if len(accs) > 1:  # one victim per seed: the bar spans them
                out.append(f'<line x1="{x:.1f}" y1="{py(min(accs)):.1f}" x2="{x:.1f}" y2="{py(max(accs)):.1f}" stroke="{colour}"/>')
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>')
            if series:  # one short label per point, each series on its own side
                anchor, dx, dy = ("start", 8, 14) if k % 2 == 0 else ("end", -8, -6)
                mean = sum(accs) / len(accs)
                out.append(f'<text x="{x + dx:.1f}" y="{y + dy:.1f}" text-anchor="{anchor}" fill="{colour}">{shorts[setting]}: {mean:.1%}</text>')
                continue
            # neighbours in SSIM alternate above / below their point, so their two-line labels do not collide
            y0 = y - 34 if i % 2 == 0 else y + 20
            out.append(f'<text x="{x:.1f}" y="{y0:.1f}" text-anchor="middle">{setting}</text>')
            out.append(f'<text x="{x:.1f}" y="{y0 + 13:.1f}" text-anchor="middle">{accuracy_text(accs)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", type=Path, help="JSON lines of bench/photo_path_bench.py")
    ap.add_argument("--path", default="photo112", help="the path whose rows are plotted")
    ap.add_argument("--clean", type=float, default=0.901, help="the clean-trained victim's accuracy (a reference line)")
    ap.add_argument("--target", type=float, default=0.20)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["path"] == args.path and r["weights"] != "clean"]
    if not rows:
        raise SystemExit(f"no rows for path {args.path} in {args.rows}")
    print("| budget, mask | SSIM of the upload | victim accuracy (mean, range) |\n|---|---:|---:|")
    for setting, accs, ssim in grouped(rows):
        print(f"| {setting} | {ssim:.3f} | {accuracy_text(accs)} |")
    title = f"Fashion-MNIST, {args.path} path, SmallCNN victims ({rows[0]['n']:,} images, {rows[0]['victim_epochs']} epochs)"
    args.out.write_text(svg(rows, title, {"clean-trained": args.clean, "target": args.target, "chance": 0.10}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
