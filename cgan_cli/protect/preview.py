"""`cgan preview`: look before publishing. One PNG, one row per input: original | protected | noise amplified.

The protected column is exactly what `cgan protect` would write for these settings (the same engine,
decoder and budget); the third column shows the change, `amplify` times larger around mid-gray, so
where the noise sits (and how strong it is) can be judged at a glance.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cgan_cli.core.atomic import write_atomic
from cgan_cli.core.engine import EngineConfig, ProtectEngine
from cgan_cli.core.errors import UsageError
from cgan_cli.core.formats import ImageError, decode_image
from cgan_cli.protect.config import PreviewConfig
from cgan_cli.protect.sources import iter_samples

LABEL_HEIGHT = 16


def _rgb(pixels: np.ndarray, max_value: int) -> np.ndarray:
    """(H, W, C) pixels as 8-bit RGB for display (16-bit gray scaled down, gray replicated)."""
    if max_value > 255:
        pixels = (pixels.astype(np.uint32) * 255 // max_value).astype(np.uint8)
    return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels


def noise_image(original: np.ndarray, protected: np.ndarray, amplify: float, max_value: int = 255) -> np.ndarray:
    """The change, `amplify` times larger, around mid-gray (128 = unchanged)."""
    diff = (protected.astype(np.float32) - original.astype(np.float32)) * (255.0 / max_value)
    return np.clip(128 + amplify * diff, 0, 255).astype(np.uint8)


def preview_row(original: np.ndarray, protected: np.ndarray, amplify: float, height: int, max_value: int = 255) -> Image.Image:
    """original | protected | noise amplified, each scaled to `height` pixels high (Lanczos)."""
    tiles = [_rgb(original, max_value), _rgb(protected, max_value), _rgb(noise_image(original, protected, amplify, max_value), 255)]
    h, w = original.shape[:2]
    size = (max(1, round(w * height / h)), height)
    row = Image.new("RGB", (3 * size[0], height), "white")
    for i, tile in enumerate(tiles):
        row.paste(Image.fromarray(tile).resize(size, Image.Resampling.LANCZOS), (i * size[0], 0))
    return row


def preview(cfg: PreviewConfig, emit: Callable[[str], None] = print) -> Path:
    """Protect the first `count` images of the inputs in memory and write the side-by-side PNG."""
    engine = ProtectEngine(EngineConfig(cfg.weights, cfg.device, "auto", cfg.epsilon, 1, cfg.full_res))
    rows: list[tuple[str, Image.Image]] = []
    for sample in iter_samples(list(cfg.inputs)):
        if len(rows) >= cfg.count:
            break
        if sample.ignored is not None:  # not an image (by content), hidden: not an input here either
            continue
        try:
            decoded = decode_image(sample.read(), sample.id)
        except (ImageError, OSError) as exc:
            emit(f"skipped {sample.id}: {exc}")
            continue
        (protected,) = engine.protect_batch([decoded.pixels])
        rows.append((Path(sample.id).name, preview_row(decoded.pixels, protected, cfg.amplify, cfg.height, decoded.max_value)))
    if not rows:
        raise UsageError(f"nothing to preview: no readable images under {', '.join(cfg.inputs)}")
    width = max(row.width for _, row in rows)
    sheet = Image.new("RGB", (width, LABEL_HEIGHT + sum(row.height + LABEL_HEIGHT for _, row in rows)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    third = rows[0][1].width // 3
    for i, title in enumerate(("original", f"protected ({engine.epsilon:g}/255)", f"noise x{cfg.amplify:g}")):
        draw.text((i * third + 4, 2), title, fill="black", font=font)
    y = LABEL_HEIGHT
    for name, row in rows:
        draw.text((4, y + 2), name, fill=(90, 90, 90), font=font)
        sheet.paste(row, (0, y + LABEL_HEIGHT))
        y += row.height + LABEL_HEIGHT
    buf = io.BytesIO()
    sheet.save(buf, "PNG", optimize=True)
    write_atomic(cfg.out, buf.getvalue())
    return Path(cfg.out)
