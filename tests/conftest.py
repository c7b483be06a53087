"""Shared fixtures: tiny generator weights files and real image files of every awkward kind.

Weights here are randomly initialised (test-only): they exercise loading, shapes and the epsilon
bound, never the protective effect. Images are small, written with Pillow in their real formats.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cgan_cli.core.generators import ConfounderGenerator
from cgan_cli.core.weights import WeightsMeta, save_generator

EPSILON = 8.0
WORKING_SIZE = 32
MAKE_TAG = 0x010F
ORIENTATION_TAG = 0x0112


def write_generator(path: Path, channels: int = 3, epsilon: float = EPSILON, working_size: int = WORKING_SIZE, seed: int = 0,
                    model_class: type[ConfounderGenerator] = ConfounderGenerator) -> Path:
    """A small randomly initialised generator (ConfounderGenerator unless told) with complete, valid WeightsMeta."""
    torch.manual_seed(seed)
    model = model_class(channels=channels, num_codes=4, width=8, tile=8)
    meta = WeightsMeta(
        arch=model.arch, arch_params=model.arch_params(), epsilon=epsilon, working_size=working_size,
        channels=channels, num_classes=4, class_names=["a", "b", "c", "d"], recipe={"test": "random init"},
        seed=seed, command="tests/conftest.py", code_version="test",
    )
    save_generator(path, model, meta)
    return path


@pytest.fixture(scope="session")
def rgb_weights(tmp_path_factory) -> Path:
    return write_generator(tmp_path_factory.mktemp("weights") / "rgb.safetensors", channels=3)


@pytest.fixture(scope="session")
def gray_weights(tmp_path_factory) -> Path:
    return write_generator(tmp_path_factory.mktemp("weights") / "gray.safetensors", channels=1)


def smooth_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like image (smooth gradients + a little texture) that JPEG compresses sanely."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.5 * np.sin((x + y) / 9.0)], axis=-1)
    img = 40 + 170 * base + rng.normal(0, 4, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_with_orientation(path: Path, orientation: int = 6) -> Path:
    """An asymmetric (48 wide, 32 tall stored) JPEG whose EXIF says: rotate for display."""
    img = Image.fromarray(smooth_rgb(32, 48))
    exif = img.getexif()
    exif[ORIENTATION_TAG] = orientation
    exif[MAKE_TAG] = "cgan-test-camera"
    img.save(path, "JPEG", quality=90, exif=exif.tobytes())
    return path


def png_16bit_colour_bytes(width: int = 8, height: int = 8) -> bytes:
    """A valid 48-bit (16 bits per channel) RGB PNG, written by hand (Pillow cannot write one)."""
    raw = b"".join(b"\x00" + bytes(range(6)) * width for _ in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def huge_png_header_bytes(width: int = 40_000, height: int = 40_000) -> bytes:
    """A PNG that claims 1.6 gigapixels (a decompression bomb's header) with a token payload."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def write_zoo(root: Path) -> dict[str, Path]:
    """One real file per case the protect command must handle, in a folder tree."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    files: dict[str, Path] = {}
    files["exif_jpeg"] = jpeg_with_orientation(root / "rotated.jpg")
    rgba = np.dstack([smooth_rgb(24, 30, 1), np.tile(np.arange(30, dtype=np.uint8) * 8, (24, 1))])
    files["rgba_png"] = root / "cutout.png"
    Image.fromarray(rgba).save(files["rgba_png"])
    files["gray_png"] = root / "sub" / "gray.png"
    Image.fromarray(smooth_rgb(20, 26, 2)[..., 0]).save(files["gray_png"])
    files["gray16_png"] = root / "sub" / "depth16.png"
    Image.fromarray((np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) * 131)).save(files["gray16_png"])
    files["palette_png"] = root / "palette.png"
    Image.fromarray(smooth_rgb(20, 20, 3)).quantize(16).save(files["palette_png"])
    files["cmyk_jpeg"] = root / "print.jpg"
    Image.fromarray(smooth_rgb(16, 16, 4)).convert("CMYK").save(files["cmyk_jpeg"], "JPEG")
    files["rgb48_png"] = root / "deep.png"
    files["rgb48_png"].write_bytes(png_16bit_colour_bytes())
    files["large_jpeg"] = root / "sub" / "large.jpg"
    Image.fromarray(smooth_rgb(600, 900, 5)).save(files["large_jpeg"], "JPEG", quality=92)
    buf = io.BytesIO()
    Image.fromarray(smooth_rgb(40, 40, 6)).save(buf, "PNG")
    files["truncated_png"] = root / "truncated.png"
    files["truncated_png"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    files["zero_jpeg"] = root / "empty.jpg"
    files["zero_jpeg"].write_bytes(b"")
    files["text_as_png"] = root / "notes.png"
    files["text_as_png"].write_text("this is not an image\n")
    files["bomb_png"] = root / "bomb.png"
    files["bomb_png"].write_bytes(huge_png_header_bytes())
    return files


GOOD = ("exif_jpeg", "rgba_png", "gray_png", "gray16_png", "palette_png", "large_jpeg")
BAD = ("cmyk_jpeg", "rgb48_png", "truncated_png", "zero_jpeg", "text_as_png", "bomb_png")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Built once per session (its 600x900 JPEG is the costly part); tests only read it: protect
    never writes into its input, and the zoo test checks that by hash."""
    return write_zoo(tmp_path_factory.mktemp("zoo") / "photos")


def read_records(path: Path) -> list[dict]:
    """All parseable lines of a manifest (a torn last line from a killed run is ignored)."""
    import json

    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
