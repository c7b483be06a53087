"""Throughput and memory of `cgan protect` on synthetic photos (numbers go to docs/protect.md).

    .venv/bin/python bench/protect_bench.py [--threads 2] [--device cpu]

Uses a randomly initialised generator with the default confounder-v1 hyper-parameters (speed does
not depend on training) and photo-like JPEGs written into a temp folder. Each case is a fresh
subprocess so that peak RSS is per run: the "flat memory" claim is checked by running the same
image size at 10x the count.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def write_photos(folder: Path, count: int, height: int, width: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        phase = rng.uniform(0, 6.28, 3)
        img = np.stack([128 + 90 * np.sin(x / (17 + 5 * c) + y / (23 + 3 * c) + phase[c]) for c in range(3)], -1)
        img += rng.normal(0, 6, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def write_weights(path: Path, working_size: int) -> None:
    import torch

    from cgan_cli.models import ConfounderGenerator
    from cgan_cli.weights import WeightsMeta, save_generator

    torch.manual_seed(0)
    model = ConfounderGenerator()
    save_generator(path, model, WeightsMeta(model.arch, model.arch_params(), 8.0, working_size, 3, 10, recipe={"bench": "random init"}))


def run_case(src: Path, out: Path, weights: Path, extra: list[str], threads: int) -> dict:
    """One `cgan protect` in a child process; returns its summary plus the child's peak RSS."""
    code = (
        "import resource, sys, torch; torch.set_num_threads(%d); from cgan_cli.cli import app\n"
        "try:\n    app(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n" % threads
    )
    cmd = [sys.executable, "-c", code, "protect", str(src), "--out", str(out), "--weights", str(weights), "--json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    rss = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("RSS"))
    return {"summary": summary, "main_rss_mb": rss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the protect process")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cases = [
        # (label, count, height, width, extra args)
        ("64px x40, workers 0", 40, 64, 64, ["--workers", "0"]),
        ("64px x400, workers 0", 400, 64, 64, ["--workers", "0"]),
        ("64px x400, workers 2", 400, 64, 64, ["--workers", "2"]),
        ("1024x768 x96, working-res", 96, 768, 1024, ["--workers", "2"]),
        ("1024x768 x8, --full-res", 8, 768, 1024, ["--workers", "2", "--full-res"]),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        weights = tmp_path / "bench.safetensors"
        write_weights(weights, working_size=64)
        rows = []
        for i, (label, count, h, w, extra) in enumerate(cases):
            src = tmp_path / f"src-{count}-{h}x{w}"
            if not src.exists():
                write_photos(src, count, h, w)
            res = run_case(src, tmp_path / f"out{i}", weights, ["--device", args.device, *extra], args.threads)
            s = res["summary"]
            recs = [json.loads(line) for line in (tmp_path / f"out{i}" / "manifest.jsonl").read_text().splitlines()]
            psnr = [r["psnr"] for r in recs if r["psnr"] is not None]
            rows.append((label, s["counts"]["protected"], s["wall_seconds"], s["images_per_second"], res["main_rss_mb"], float(np.median(psnr))))
    print(f"| case | protected | wall s | images/s | main RSS MB | median PSNR dB |")
    print("|---|---|---|---|---|---|")
    for label, n, wall, ips, rss, psnr in rows:
        print(f"| {label} | {n} | {wall:.2f} | {ips:.1f} | {rss:.0f} | {psnr:.1f} |")
    print(f"\nhost: {resource.getpagesize()}-byte pages, python {sys.version.split()[0]}, torch threads {args.threads}, device {args.device}")


if __name__ == "__main__":
    main()
