"""What each format's output holds after `cgan protect` (numbers go to docs/formats.md).

    .venv/bin/python bench/formats_psnr.py [--weights W] [--keep DIR]

Writes the photos of examples/photos in every format cgan protects (HEIC and AVIF at quality 90,
JPEG 2000, TGA, PPM, QOI, and 3-frame APNG / animated WebP / multi-page TIFF made of shifted crops),
runs `cgan protect --measure-written` over the folder with the shipped default generator, and prints
one markdown row per format: files, frames, the largest change cgan made (linf, /255) and its PSNR,
and the worst PSNR of the written file against its source (what a lossy re-encode delivers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "examples" / "photos"
FRAME_SHIFT = 24  # pixels between the crops that make an animation's frames


def write_inputs(folder: Path) -> None:
    import pillow_heif

    pillow_heif.register_heif_opener()
    folder.mkdir(parents=True, exist_ok=True)
    for photo in sorted(p for p in PHOTOS.iterdir() if p.suffix != ".md"):
        with Image.open(photo) as img:
            rgb = img.convert("RGB")
        stem = photo.stem
        rgb.save(folder / f"{stem}.heic", "HEIF", quality=90)
        rgb.save(folder / f"{stem}.avif", "AVIF", quality=90)
        rgb.save(folder / f"{stem}.jp2", "JPEG2000")
        rgb.save(folder / f"{stem}.tga", "TGA")
        rgb.save(folder / f"{stem}.ppm", "PPM")
        rgb.save(folder / f"{stem}.qoi", "QOI")
        w, h = rgb.size
        frames = [rgb.crop((i * FRAME_SHIFT, 0, w - (2 - i) * FRAME_SHIFT, h)) for i in range(3)]
        frames[0].save(folder / f"{stem}.anim.png", "PNG", save_all=True, append_images=frames[1:], duration=80, loop=0)
        frames[0].save(folder / f"{stem}.anim.webp", "WEBP", save_all=True, append_images=frames[1:], duration=80, lossless=True)
        frames[0].save(folder / f"{stem}.pages.tiff", "TIFF", save_all=True, append_images=frames[1:], compression="tiff_lzw")


def kind(source: str) -> str:
    name = Path(source).name
    return name.split(".", 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "cgan-rgb-default.safetensors")
    parser.add_argument("--keep", type=Path, help="write inputs and outputs here instead of a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        write_inputs(base / "in")
        subprocess.run([sys.executable, "-m", "cgan_cli", "protect", str(base / "in"), "--out", str(base / "out"),
                        "--weights", str(args.weights), "--measure-written", "--workers", "1"], check=False)
        rows: dict[str, list[dict]] = defaultdict(list)
        for line in (base / "out" / "manifest.jsonl").read_text().splitlines():
            rec = json.loads(line)
            rows[kind(rec["source"])].append(rec)
    print("| input | files | status | cgan's change: max linf (/255), min PSNR (dB) | written file vs source: max linf, min PSNR (dB) |")
    print("|---|---:|---|---|---|")
    for name, recs in sorted(rows.items()):
        statuses = ",".join(sorted({r["status"] for r in recs}))
        done = [r for r in recs if r["status"] == "protected"]
        linf = max((r["linf"] for r in done), default=None)
        psnr = min((r["psnr"] for r in done if r["psnr"] is not None), default=None)
        written = min((r["written_psnr"] for r in done if r["written_psnr"] is not None), default=None)
        written_linf = max((r["written_linf"] for r in done), default=None)
        print(f"| {name} ({recs[0]['format']}) | {len(recs)} | {statuses} | {linf}, {psnr} | {written_linf}, {written} |")


if __name__ == "__main__":
    main()
