"""Image files <-> pixel arrays, keeping everything about the file except the pixels the noise changes.

`decode_image` returns the image *as displayed* (EXIF orientation applied) with its alpha kept apart
and untouched, plus what is needed to write it back faithfully; `encode_image` writes protected
pixels back in the source's format, mode, size and metadata. Every input cgan cannot protect
faithfully raises `ImageError` with a message that says why, so the batch records it and moves on.

Support decisions (README "cgan protect" documents them for users):
- RGB, L, RGBA, LA: protected as is; alpha is never changed.
- 16-bit grayscale (PNG/TIFF "I;16"): protected at 16-bit precision and written back 16-bit.
- 16-bit-per-channel colour or gray+alpha (PNG, TIFF): refused; Pillow reads it as 8 bits per channel,
  so writing it back would silently lose precision.
- Palette (P, PA) and bilevel (1): protected as RGB(A) / L and written as such in the same format:
  a 256-colour palette cannot carry the noise. GIF (palette only) therefore needs --format.
- RGB/L with a tRNS transparency colour: the key becomes an alpha channel (RGBA / LA).
- CMYK, YCbCr, LAB, HSV, 32-bit int/float: refused (the noise is defined on RGB / gray levels).
- Animated or multi-frame files (GIF, WebP, TIFF pages): refused. Camera MPO files (a JPEG plus
  preview frames) are protected as their primary JPEG image.
- More than MAX_PIXELS pixels: refused before decoding (decompression-bomb and memory guard).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

MAX_PIXELS = 100_000_000  # 100 megapixels: above this a file is refused before it is decoded
ORIENTATION_TAG = 0x0112
FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")
FORCED_FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg"), "webp": ("WEBP", ".webp")}
DEFAULT_LOSSY_QUALITY = 95  # lossy WebP sources, and JPEG/WebP written from other formats
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})  # picked up by name
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, what PIL's convert("L") uses


class ImageError(ValueError):
    """An input cgan cannot protect faithfully; the message names the file's problem."""


@dataclass
class DecodedImage:
    """An image as displayed, split into what gets noise (pixels) and what is kept (everything else)."""

    pixels: np.ndarray  # (H, W, C) C in {1, 3}; uint8, or uint16 for 16-bit grayscale
    alpha: np.ndarray | None  # (H, W) same dtype, written back byte-identical
    mode: str  # the source's PIL mode (P, RGB, I;16, ...)
    format: str  # the source's format (JPEG, PNG, WEBP, TIFF, BMP, GIF)
    exif: bytes | None = None  # with orientation reset to 1: the pixels are already upright
    icc_profile: bytes | None = None
    xmp: bytes | None = None
    dpi: tuple[float, float] | None = None
    jpeg_qtables: list[list[int]] | None = None  # the source's quantisation tables, in table order
    jpeg_subsampling: int | None = None  # Pillow's code: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0
    webp_lossless: bool | None = None
    png_text: dict[str, str] = field(default_factory=dict)
    tiff_compression: str | None = None

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def max_value(self) -> int:
        return 65535 if self.pixels.dtype == np.uint16 else 255

    @property
    def out_mode(self) -> str:
        """The PIL mode written back (differs from `mode` only for palette/bilevel/tRNS sources)."""
        if self.pixels.dtype == np.uint16:
            return "I;16"
        base = "L" if self.pixels.shape[2] == 1 else "RGB"
        return base + "A" if self.alpha is not None else base


@dataclass(frozen=True)
class EncodeOptions:
    format: str | None = None  # None = keep the source's format; else png | jpeg | webp
    quality: int | None = None  # JPEG / lossy WebP quality; None = keep the source's tables / 95
    measure_written: bool = False  # re-decode each output to measure it (costs one decode per image)
    measure_ssim: bool = False  # SSIM of protected vs source per image (costs ~20 s per 12 MP on a loaded CPU core)


def is_image_name(name: str) -> bool:
    """Whether a file or tar member name carries an image suffix (its last suffix)."""
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def output_name(rel_out: str, options: EncodeOptions) -> str:
    """The output path: same name, or the forced format's suffix."""
    if options.format is None:
        return rel_out
    return str(PurePosixPath(rel_out).with_suffix(FORCED_FORMATS[options.format][1]))


def output_format(decoded: DecodedImage, options: EncodeOptions) -> str:
    """The format written, or ImageError when it cannot hold this image's protected pixels."""
    fmt = FORCED_FORMATS[options.format][0] if options.format else decoded.format
    if fmt == "GIF":
        raise ImageError("GIF stores a 256-colour palette, which cannot carry the noise; rerun with --format png")
    if decoded.alpha is not None and fmt in ("JPEG", "BMP"):
        raise ImageError(f"{fmt} cannot store the alpha channel; rerun with --format png or webp")
    if decoded.out_mode == "I;16" and fmt not in ("PNG", "TIFF"):
        raise ImageError(f"{fmt} cannot store 16-bit grayscale; rerun with --format png")
    return fmt


def _png_bit_depth_16_colour(data: bytes) -> bool:
    """16-bit PNG with colour or alpha (IHDR colour type 2, 4 or 6): Pillow would read it as 8-bit."""
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 25 and data[24] == 16 and data[25] in (2, 4, 6)


def _webp_is_lossless(data: bytes) -> bool:
    """True when the WebP bitstream is VP8L (lossless), looking through a VP8X container's chunks."""
    pos = 12
    while pos + 8 <= len(data):
        fourcc = data[pos : pos + 4]
        if fourcc in (b"VP8L", b"VP8 "):
            return fourcc == b"VP8L"
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        pos += 8 + size + (size & 1)
    return False


def _open(data: bytes, name: str) -> Image.Image:
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        suffix = PurePosixPath(name).suffix
        hint = f"; its {suffix} suffix does not match its content" if suffix else ""
        raise ImageError(f"not an image (no supported image format recognised{hint})") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"over the {MAX_PIXELS // 1_000_000} megapixel limit (decompression-bomb guard): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt headers
        raise ImageError(f"corrupt image header: {exc}") from None


def _check_supported(img: Image.Image, data: bytes) -> str:
    fmt = "JPEG" if img.format == "MPO" else img.format
    if fmt not in FORMATS:
        raise ImageError(f"{img.format} files are not supported (supported: {', '.join(FORMATS)})")
    frames = getattr(img, "n_frames", 1)
    if frames > 1 and img.format != "MPO":
        raise ImageError(f"animated / multi-frame {fmt} ({frames} frames) is not supported; extract one frame first")
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{width}x{height} is {width * height / 1e6:.0f} megapixels, over the {MAX_PIXELS // 1_000_000} megapixel "
            "limit (decompression-bomb guard)"
        )
    if img.mode == "CMYK":
        raise ImageError("CMYK images are not supported (the noise is defined on RGB); convert to RGB first")
    if img.mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16", "I;16B", "I;16L"):
        raise ImageError(f"PIL mode {img.mode} is not supported (supported: RGB, RGBA, L, LA, palette, 16-bit gray)")
    bits = getattr(img, "tag_v2", {}).get(258) if fmt == "TIFF" else None
    deep_tiff = bits is not None and max(bits if isinstance(bits, tuple) else (bits,)) > 8 and not img.mode.startswith("I;16")
    if _png_bit_depth_16_colour(data) or deep_tiff:
        raise ImageError("16-bit-per-channel colour is not supported (it would be written back at 8 bits); convert to 8-bit first")
    return fmt


def _split(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Colour channels (H, W, C) and alpha (H, W) after the palette / bilevel / tRNS conversions."""
    mode = img.mode
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)[..., None], None
    if mode == "1":
        img = img.convert("L")
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
    elif mode in ("L", "RGB") and "transparency" in img.info:
        img = img.convert(mode + "A")
    arr = np.asarray(img)  # one copy (Pillow's tobytes); read-only, which the engine never minds
    if arr.ndim == 2:
        return arr[..., None], None
    if img.mode in ("LA", "RGBA"):
        return np.ascontiguousarray(arr[..., :-1]), np.ascontiguousarray(arr[..., -1])
    return arr, None


def _upright(img: Image.Image) -> Image.Image:
    """The image as displayed. Only a real EXIF rotation / flip makes a new image: Pillow's
    exif_transpose copies even an upright image (~12 ms per 12 MP photo)."""
    if img.getexif().get(ORIENTATION_TAG, 1) in range(2, 9):
        return ImageOps.exif_transpose(img)
    return img


def _exif_upright(img: Image.Image, fmt: str) -> bytes | None:
    if fmt == "TIFF":
        return None  # a TIFF's tags describe its own strips; the writer regenerates them
    exif = img.getexif()
    if not len(exif):
        return None
    if ORIENTATION_TAG in exif:
        exif[ORIENTATION_TAG] = 1
    return exif.tobytes()


def decode_image(data: bytes, name: str = "") -> DecodedImage:
    """Decode a file's bytes to upright pixels + everything needed to re-encode it faithfully.

    `name` (the file name or tar member) only sharpens messages. Raises ImageError for every input
    that cannot be protected.
    """
    img = _open(data, name)
    fmt = _check_supported(img, data)
    try:
        img.load()
        upright = _upright(img)
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt streams raise OSError, SyntaxError, ...
        raise ImageError(f"truncated or corrupt {fmt} data: {exc}") from None
    pixels, alpha = _split(upright)
    info = img.info
    qtables = subsampling = None
    if fmt == "JPEG":
        qtables = [list(t) for _, t in sorted(getattr(img, "quantization", {}).items())] or None
        sampling = JpegImagePlugin.get_sampling(img)
        subsampling = sampling if sampling >= 0 else None
    dpi = info.get("dpi")
    return DecodedImage(
        pixels=pixels,
        alpha=alpha,
        mode=img.mode,
        format=fmt,
        exif=_exif_upright(img, fmt),
        icc_profile=info.get("icc_profile") or None,
        xmp=info.get("xmp") or None,
        dpi=(float(dpi[0]), float(dpi[1])) if dpi else None,
        jpeg_qtables=qtables,
        jpeg_subsampling=subsampling,
        webp_lossless=_webp_is_lossless(data) if fmt == "WEBP" else None,
        png_text={k: v for k, v in getattr(img, "text", {}).items() if isinstance(v, str)} if fmt == "PNG" else {},
        tiff_compression=info.get("compression") if fmt == "TIFF" else None,
    )


def _to_image(decoded: DecodedImage, pixels: np.ndarray) -> Image.Image:
    if pixels.shape != decoded.pixels.shape or pixels.dtype != decoded.pixels.dtype:
        raise ValueError(f"protected pixels {pixels.shape} {pixels.dtype} do not match the source {decoded.pixels.shape}")
    if pixels.dtype == np.uint16:
        return Image.fromarray(np.ascontiguousarray(pixels[..., 0]).astype(np.uint16))  # -> mode I;16
    arr = pixels[..., 0] if pixels.shape[2] == 1 else pixels
    if decoded.alpha is not None:
        arr = np.dstack([pixels, decoded.alpha])
    return Image.fromarray(np.ascontiguousarray(arr))


def _save_kwargs(decoded: DecodedImage, fmt: str, options: EncodeOptions) -> dict:
    common = {k: v for k, v in (("icc_profile", decoded.icc_profile), ("exif", decoded.exif)) if v}
    if decoded.dpi and fmt in ("JPEG", "PNG", "TIFF"):
        common["dpi"] = decoded.dpi
    if fmt == "JPEG":
        kw = {**common, **({"xmp": decoded.xmp} if decoded.xmp else {})}
        same_format = decoded.format == "JPEG"
        if options.quality is None and same_format and decoded.jpeg_qtables:
            kw["qtables"] = decoded.jpeg_qtables  # never silently drop the source's quality
        else:
            kw["quality"] = options.quality or DEFAULT_LOSSY_QUALITY
        if same_format and decoded.jpeg_subsampling is not None:
            kw["subsampling"] = decoded.jpeg_subsampling
        elif not same_format:
            kw["subsampling"] = 0  # 4:4:4: chroma noise survives
        return kw
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in decoded.png_text.items():
            info.add_text(key, value)
        return {**common, "pnginfo": info}
    if fmt == "WEBP":
        kw = {**common, **({"xmp": decoded.xmp} if decoded.xmp else {})}
        lossless = decoded.webp_lossless if decoded.format == "WEBP" else options.quality is None
        if lossless:
            return {**kw, "lossless": True, "quality": 100}
        return {**kw, "quality": options.quality or DEFAULT_LOSSY_QUALITY}
    if fmt == "TIFF":
        kw = {**common, "compression": decoded.tiff_compression or "tiff_lzw"}
        if kw["compression"] == "jpeg":
            kw["quality"] = options.quality or DEFAULT_LOSSY_QUALITY
        return kw
    return {}  # BMP: no metadata to keep


def encode_image(decoded: DecodedImage, pixels: np.ndarray, options: EncodeOptions = EncodeOptions()) -> bytes:
    """Protected pixels -> file bytes, in the source's format, size, mode and metadata (or the forced format)."""
    fmt = output_format(decoded, options)
    img = _to_image(decoded, pixels)
    buf = io.BytesIO()
    try:
        img.save(buf, fmt, **_save_kwargs(decoded, fmt, options))
    except (OSError, ValueError, KeyError) as exc:
        raise ImageError(f"cannot write {img.mode} as {fmt}: {exc}") from None
    return buf.getvalue()


FIDELITY_BLOCK = 1 << 16  # values per block: the temporaries stay in cache


def fidelity(original: np.ndarray, changed: np.ndarray, max_value: int) -> tuple[float, float | None]:
    """(L-inf in /255 units, PSNR in dB or None when identical) between two (H, W, C) pixel arrays.

    Exact integer arithmetic in cache-sized blocks, squares summed into int64: whole-image int64
    temporaries cost ~4x more at 12 MP (docs/performance.md). 8-bit differences and their squares
    fit int32; 16-bit squares need int64. A 1-channel original against a 3-channel array (gray
    written as RGB WebP) broadcasts.
    """
    a, b = (original, changed) if original.shape == changed.shape else np.broadcast_arrays(original, changed)
    a, b = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
    acc = np.int64 if max_value > 255 else np.int32
    worst, sse = 0, 0
    for start in range(0, a.size, FIDELITY_BLOCK):
        diff = np.subtract(a[start : start + FIDELITY_BLOCK], b[start : start + FIDELITY_BLOCK], dtype=acc)
        worst = max(worst, int(diff.max()), -int(diff.min()))
        sse += int(np.square(diff, out=diff).sum(dtype=np.int64))
    scale = 255.0 / max_value
    mse = sse / max(1, a.size) * scale**2
    psnr = None if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))
    return float(worst) * scale, psnr


SSIM_SIGMA, SSIM_RADIUS = 1.5, 5  # Wang et al. 2004: 11x11 Gaussian window, sigma 1.5
SSIM_ROWS = 256  # output rows per stripe: bounds the float temporaries at any image size


def _gaussian_weights() -> np.ndarray:
    t = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    g = np.exp(-(t**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def _window_mean(x, weights: list[float]):
    """Separable Gaussian 'valid' filter of a (rows, W) float32 tensor as shifted multiply-adds
    (torch's depthwise conv2d is ~10x slower for this on CPU)."""
    n = len(weights)
    h, w = x.shape
    r = x[:, : w - n + 1] * weights[0]
    for k in range(1, n):
        r.add_(x[:, k : k + w - n + 1], alpha=weights[k])
    o = r[: h - n + 1] * weights[0]
    for k in range(1, n):
        o.add_(r[k : k + h - n + 1], alpha=weights[k])
    return o


def ssim(original: np.ndarray, changed: np.ndarray, max_value: int) -> float:
    """Mean structural similarity (Wang et al. 2004) of two (H, W, C) arrays, averaged over channels.

    The standard definition: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, over the
    positions where the whole window fits ("valid"), in float32 stripes of SSIM_ROWS output rows so
    memory stays bounded. Images smaller than the window get one window over the whole image.
    """
    import torch

    a_all, b_all = (original, changed) if original.shape == changed.shape else np.broadcast_arrays(original, changed)
    h, w, c = a_all.shape
    win = 2 * SSIM_RADIUS + 1
    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    if h < win or w < win:
        a64, b64 = a_all.astype(np.float64), b_all.astype(np.float64)
        ma, mb = a64.mean((0, 1)), b64.mean((0, 1))
        cov = ((a64 - ma) * (b64 - mb)).mean((0, 1))
        num = (2 * ma * mb + c1) * (2 * cov + c2)
        return float((num / ((ma**2 + mb**2 + c1) * (a64.var((0, 1)) + b64.var((0, 1)) + c2))).mean())
    weights = [float(v) for v in _gaussian_weights()]
    total, count = 0.0, 0
    with torch.inference_mode():
        for ch in range(c):
            for top in range(0, h - win + 1, SSIM_ROWS):
                rows = slice(top, min(h, top + SSIM_ROWS + win - 1))
                a = torch.from_numpy(np.ascontiguousarray(a_all[rows, :, ch], dtype=np.float32))
                b = torch.from_numpy(np.ascontiguousarray(b_all[rows, :, ch], dtype=np.float32))
                mu_a, mu_b = _window_mean(a, weights), _window_mean(b, weights)
                sq = _window_mean(a * a + b * b, weights)  # E[a^2] + E[b^2]: only their sum is needed
                ab = _window_mean(a * b, weights)
                mu_ab = mu_a * mu_b
                num = (2 * mu_ab + c1) * (2 * (ab - mu_ab) + c2)
                mu_sq = mu_a * mu_a + mu_b * mu_b
                den = (mu_sq + c1) * (sq - mu_sq + c2)
                total += float((num / den).sum(dtype=torch.float64))
                count += num.numel()
    return total / count


def written_fidelity(original: DecodedImage, written: DecodedImage) -> tuple[float, float | None]:
    """`fidelity` of a re-decoded output against its source (--measure-written)."""
    a, b = original.pixels, written.pixels
    if a.shape[:2] != b.shape[:2] or original.max_value != written.max_value:
        raise ImageError(f"written image is {b.shape[1]}x{b.shape[0]} {written.out_mode}, source is {a.shape[1]}x{a.shape[0]} {original.out_mode}")
    return fidelity(a, b, original.max_value)
