"""codec: decode to upright pixels + metadata, encode back faithfully, refuse bad inputs clearly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    MAKE_TAG,
    ORIENTATION_TAG,
    huge_png_header_bytes,
    jpeg_with_orientation,
    png_16bit_colour_bytes,
    smooth_rgb,
)
from PIL import Image, ImageOps, JpegImagePlugin

from cgan_cli.core.formats import (
    EncodeOptions,
    ImageError,
    decode_image,
    encode_image,
    fidelity,
    output_name,
    written_fidelity,
)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _shift(pixels: np.ndarray, by: int) -> np.ndarray:
    top = 65535 if pixels.dtype == np.uint16 else 255
    return np.clip(pixels.astype(np.int64) + by, 0, top).astype(pixels.dtype)


def test_exif_orientation_applied_and_reset(tmp_path: Path) -> None:
    data = jpeg_with_orientation(tmp_path / "r.jpg").read_bytes()
    dec = decode_image(data, "r.jpg")
    with Image.open(io.BytesIO(data)) as src:
        shown = np.asarray(ImageOps.exif_transpose(src))
    assert dec.pixels.shape == (48, 32, 3)  # stored 48 wide x 32 tall, displayed rotated
    assert np.array_equal(dec.pixels, shown)
    out = Image.open(io.BytesIO(encode_image(dec, dec.pixels)))
    exif = out.getexif()
    assert exif[ORIENTATION_TAG] == 1 and exif[MAKE_TAG] == "cgan-test-camera"
    assert out.size == (32, 48)


def test_jpeg_keeps_quantisation_tables_and_subsampling_unless_quality_given() -> None:
    data = _encode(Image.fromarray(smooth_rgb(64, 64)), "JPEG", quality=70, subsampling=1)
    dec = decode_image(data)
    src = Image.open(io.BytesIO(data))
    same = Image.open(io.BytesIO(encode_image(dec, dec.pixels)))
    assert same.quantization == src.quantization
    assert JpegImagePlugin.get_sampling(same) == JpegImagePlugin.get_sampling(src) == 1
    requant = Image.open(io.BytesIO(encode_image(dec, dec.pixels, EncodeOptions(quality=98))))
    assert requant.quantization != src.quantization


def test_rgba_alpha_byte_identical_and_icc_text_kept() -> None:
    rgba = np.dstack([smooth_rgb(16, 20), np.arange(320, dtype=np.uint8).reshape(16, 20)])
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "someone")
    data = _encode(Image.fromarray(rgba), "PNG", pnginfo=info, icc_profile=b"fake-icc-profile-bytes")
    dec = decode_image(data)
    assert dec.pixels.shape == (16, 20, 3) and dec.out_mode == "RGBA"
    out = Image.open(io.BytesIO(encode_image(dec, _shift(dec.pixels, 3))))
    assert out.mode == "RGBA"
    assert np.array_equal(np.asarray(out)[..., 3], rgba[..., 3])
    assert out.info["icc_profile"] == b"fake-icc-profile-bytes" and out.text["Author"] == "someone"


def test_grayscale_stays_l_and_16bit_stays_16bit() -> None:
    gray = decode_image(_encode(Image.fromarray(smooth_rgb(10, 12)[..., 1]), "PNG"))
    assert gray.pixels.shape == (10, 12, 1)
    assert Image.open(io.BytesIO(encode_image(gray, gray.pixels))).mode == "L"
    deep = (np.arange(120, dtype=np.uint16).reshape(10, 12) * 500)
    dec = decode_image(_encode(Image.fromarray(deep), "PNG"))
    assert dec.pixels.dtype == np.uint16 and dec.max_value == 65535
    written = encode_image(dec, _shift(dec.pixels, 257))
    back = Image.open(io.BytesIO(written))
    assert back.mode == "I;16"
    assert np.array_equal(np.asarray(back).astype(np.int64), np.clip(deep.astype(np.int64) + 257, 0, 65535))
    assert written_fidelity(dec, decode_image(written))[0] == pytest.approx(1.0, abs=1e-9)  # 257/65535*255 = 1 level
    assert fidelity(dec.pixels, _shift(dec.pixels, 257), dec.max_value)[0] == pytest.approx(1.0, abs=1e-9)


def test_palette_protected_as_rgb_and_transparency_becomes_alpha() -> None:
    pal = Image.fromarray(smooth_rgb(12, 12)).quantize(8)
    dec = decode_image(_encode(pal, "PNG"))
    assert dec.mode == "P" and dec.out_mode == "RGB"
    assert Image.open(io.BytesIO(encode_image(dec, dec.pixels))).mode == "RGB"
    pal.info["transparency"] = 0
    dec_t = decode_image(_encode(pal, "PNG", transparency=0))
    assert dec_t.out_mode == "RGBA" and dec_t.alpha is not None and (dec_t.alpha == 0).any()


def test_webp_lossless_stays_lossless_and_lossy_stays_lossy() -> None:
    img = Image.fromarray(smooth_rgb(16, 16))
    lossless = decode_image(_encode(img, "WEBP", lossless=True))
    lossy = decode_image(_encode(img, "WEBP", quality=80))
    assert lossless.webp_lossless is True and lossy.webp_lossless is False
    shifted = _shift(lossless.pixels, 2)
    out = encode_image(lossless, shifted)
    assert out[12:16] == b"VP8L" and np.array_equal(decode_image(out).pixels, shifted)
    assert encode_image(lossy, lossy.pixels)[12:16] == b"VP8 "


def test_tiff_compression_kept() -> None:
    dec = decode_image(_encode(Image.fromarray(smooth_rgb(8, 8)), "TIFF", compression="tiff_deflate"))
    out = Image.open(io.BytesIO(encode_image(dec, dec.pixels)))
    assert dec.tiff_compression in ("tiff_deflate", "tiff_adobe_deflate")  # Pillow names deflate either way
    assert out.format == "TIFF" and out.info["compression"] == dec.tiff_compression


def test_forced_format_changes_suffix_and_refuses_alpha_in_jpeg() -> None:
    assert output_name("a/b.tif", EncodeOptions(format="png")) == "a/b.png"
    assert output_name("a/b.png", EncodeOptions(format="jpeg")) == "a/b.jpg"
    assert output_name("a/b.png", EncodeOptions()) == "a/b.png"
    rgba = decode_image(_encode(Image.fromarray(np.zeros((4, 4, 4), np.uint8)), "PNG"))
    with pytest.raises(ImageError, match="alpha"):
        encode_image(rgba, rgba.pixels, EncodeOptions(format="jpeg"))
    gif = decode_image(_encode(Image.fromarray(smooth_rgb(8, 8)).quantize(4), "GIF"))
    with pytest.raises(ImageError, match="--format png"):
        encode_image(gif, gif.pixels)
    assert Image.open(io.BytesIO(encode_image(gif, gif.pixels, EncodeOptions(format="png")))).format == "PNG"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"just some text, not pixels\n", "not an image"),
        (png_16bit_colour_bytes(), "16-bit-per-channel"),
        (huge_png_header_bytes(), "megapixel"),
    ],
)
def test_bad_bytes_raise_clear_errors(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_truncated_cmyk_and_animated_gif_refused() -> None:
    png = _encode(Image.fromarray(smooth_rgb(40, 40)), "PNG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(png[: len(png) // 2])
    with pytest.raises(ImageError, match="CMYK"):
        decode_image(_encode(Image.fromarray(smooth_rgb(8, 8)).convert("CMYK"), "JPEG"))
    frames = [Image.fromarray(smooth_rgb(8, 8, s)).quantize(4) for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    gif = decode_image(buf.getvalue())
    assert gif.frame_count == 3
    with pytest.raises(ImageError, match="--format webp or --format png"):
        encode_image(gif, gif.frames_pixels)


def test_fidelity_is_exact_at_the_extremes_of_range_and_width() -> None:
    """Block-wise int32 sums must not overflow: full-range differences on rows wider than a block."""
    black, white = np.zeros((3, 20_000, 3), np.uint8), np.full((3, 20_000, 3), 255, np.uint8)
    assert fidelity(black, white, 255) == (255.0, pytest.approx(0.0, abs=1e-12))
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    diff = a.astype(np.int64) - b
    linf, psnr = fidelity(a, b, 255)
    assert linf == np.abs(diff).max() and psnr == pytest.approx(10 * np.log10(255**2 / (diff**2).mean()), rel=1e-12)
    gray, rgb = a[..., :1], np.repeat(a[..., :1], 3, axis=2)
    assert fidelity(gray, rgb, 255) == (0.0, None)  # a gray source written as RGB broadcasts
    deep = np.zeros((4, 5, 1), np.uint16)
    assert fidelity(deep, deep + 257, 65535)[0] == pytest.approx(1.0)
