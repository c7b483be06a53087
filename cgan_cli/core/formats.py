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
- Animated and multi-frame files (APNG, animated WebP/AVIF, HEIF collections, multi-page TIFF): every
  frame is protected on its own (the same budget) and written back with its frame count, durations,
  loop and disposal. Animated GIF is refused with a message that names --format webp / png (an
  animated WebP / APNG). Camera MPO files (a JPEG plus preview frames) are protected as their primary
  JPEG image; a PSD as its flattened composite.
- Read-only formats (PSD, CUR) are written as PNG, their suffix changed to .png.
- Bilevel TIFF with fax compression (group3/group4) is written as 8-bit L with LZW: fax coding stores
  1-bit pixels only.
- More than MAX_PIXELS pixels: refused before decoding (decompression-bomb and memory guard).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import PurePosixPath
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

MAX_PIXELS = 100_000_000  # 100 megapixels: above this a file is refused before it is decoded
ORIENTATION_TAG = 0x0112
FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "AVIF", "HEIF", "JPEG2000", "TGA", "PPM", "QOI", "ICO", "CUR", "PSD")
READ_ONLY = {"CUR": "PNG", "PSD": "PNG"}  # formats Pillow reads but cannot write: the format written instead
CONVERTED_SUFFIXES = {".cur": ".png", ".psd": ".png"}  # ...and the output's suffix
FRAME_FORMATS = frozenset({"PNG", "WEBP", "TIFF", "GIF", "AVIF", "HEIF"})  # whose extra frames are protected and kept
ALPHA_FORMATS = frozenset({"PNG", "WEBP", "TIFF", "AVIF", "HEIF", "JPEG2000", "TGA", "QOI", "ICO"})
GRAY16_FORMATS = frozenset({"PNG", "TIFF", "PPM", "JPEG2000"})
FAX_COMPRESSIONS = frozenset({"group3", "group4", "tiff_ccitt"})  # 1-bit only: protected pixels are 8-bit
FORCED_FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg"), "webp": ("WEBP", ".webp")}
DEFAULT_LOSSY_QUALITY = 95  # lossy WebP/AVIF/HEIF sources, and JPEG/WebP written from other formats
IMAGE_SUFFIXES = frozenset({  # picked up by name; any other file in a folder is kept only if its header is an image's
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif",
    ".avif", ".avifs", ".heic", ".heif", ".hif", ".jp2", ".j2k", ".j2c", ".jpc", ".jpf", ".jpx",
    ".tga", ".icb", ".vda", ".vst", ".ppm", ".pgm", ".pbm", ".pnm", ".qoi", ".ico", ".cur", ".psd",
})
SNIFF_BYTES = 32  # header bytes read to decide whether a file without an image suffix is an image
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, what PIL's convert("L") uses


class ImageError(ValueError):
    """An input cgan cannot protect faithfully; the message names the file's problem."""


class Frame(NamedTuple):
    """A frame or page after the first: same channels and dtype as the first; the same size except
    for TIFF pages (a page can be a thumbnail or an overview)."""

    pixels: np.ndarray
    alpha: np.ndarray | None


@dataclass
class DecodedImage:
    """An image as displayed, split into what gets noise (pixels) and what is kept (everything else).

    A multi-frame file (animation, TIFF pages) carries its first frame in `pixels` / `alpha` and the
    rest in `later_frames`; `frames_pixels` lists them all, which is what the engine protects.
    """

    pixels: np.ndarray  # (H, W, C) C in {1, 3}; uint8, or uint16 for 16-bit grayscale
    alpha: np.ndarray | None  # (H, W) same dtype, written back byte-identical
    mode: str  # the source's PIL mode (P, RGB, I;16, ...)
    format: str  # the source's format (JPEG, PNG, WEBP, TIFF, BMP, GIF, AVIF, HEIF, ...)
    exif: bytes | None = None  # with orientation reset to 1: the pixels are already upright
    icc_profile: bytes | None = None
    xmp: bytes | None = None
    dpi: tuple[float, float] | None = None
    jpeg_qtables: list[list[int]] | None = None  # the source's quantisation tables, in table order
    jpeg_subsampling: int | None = None  # Pillow's code: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0
    webp_lossless: bool | None = None
    png_text: dict[str, str] = field(default_factory=dict)
    tiff_compression: str | None = None
    tga_compression: str | None = None
    j2k_codestream: bool = False  # a bare JPEG 2000 codestream (.j2k), not a JP2 container
    ico_sizes: list[tuple[int, int]] | None = None
    later_frames: list[Frame] = field(default_factory=list)
    durations: list[float] | None = None  # ms per frame, every frame
    disposals: list[int] | None = None  # APNG dispose_op per frame
    loop: int | None = None
    background: tuple | None = None  # WebP animation background colour

    @property
    def frame_count(self) -> int:
        return 1 + len(self.later_frames)

    @property
    def frames_pixels(self) -> list[np.ndarray]:
        """Every frame's colour channels, first frame first: one engine input each."""
        return [self.pixels, *(frame.pixels for frame in self.later_frames)]

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


SUFFIX_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                  ".tiff": "TIFF", ".gif": "GIF"}  # what a file name's suffix promises


def format_for_output_name(out_name: str, src_name: str) -> str | None:
    """The --format that makes a named output file hold what its suffix promises: None when the
    suffix means the source's own format; ValueError when cgan cannot convert to it."""
    want = SUFFIX_FORMATS.get(PurePosixPath(out_name).suffix.lower())
    if want is None or want == SUFFIX_FORMATS.get(PurePosixPath(src_name).suffix.lower()):
        return None
    for key, (fmt, _suffix) in FORCED_FORMATS.items():
        if fmt == want:
            return key
    raise ValueError(f"cgan converts to {', '.join(FORCED_FORMATS)} only, not {want}")


_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1")
_MAGIC = (  # (offset, bytes, format): what sniff_format recognises
    (0, b"\xff\xd8\xff", "JPEG"), (0, b"\x89PNG\r\n\x1a\n", "PNG"), (0, b"GIF87a", "GIF"), (0, b"GIF89a", "GIF"),
    (0, b"II*\x00", "TIFF"), (0, b"MM\x00*", "TIFF"), (0, b"BM", "BMP"), (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG2000"), (0, b"qoif", "QOI"), (0, b"8BPS", "PSD"),
)


def sniff_format(head: bytes) -> str | None:
    """The image format a file's first SNIFF_BYTES announce (magic numbers), or None.

    Only formats cgan protects, with signatures strong enough that a text or data file never
    matches; TGA has no signature and is recognised by its suffix only.
    """
    for offset, magic, fmt in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":  # ISO base media: the major brand, then compatible brands
        brands = [head[i : i + 4] for i in range(8, min(len(head), int.from_bytes(head[:4], "big")) - 3, 4) if i != 12]
        if any(b in (b"avif", b"avis") for b in brands):
            return "AVIF"
        if any(b in _HEIF_BRANDS for b in brands):
            return "HEIF"
    if len(head) > 2 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3] in b" \t\r\n#":
        return "PPM"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and len(head) > 5 and head[4] | head[5] and head[5] == 0:
        return "ICO" if head[2] == 1 else "CUR"
    return None


@lru_cache(maxsize=1)
def _pillow_image_suffixes() -> frozenset[str]:
    """Suffixes of every format Pillow can open: such files are attempted (an unsupported one fails
    with a message naming its format) rather than ignored."""
    Image.init()
    not_pictures = {"MPEG", "HDF5", "BUFR", "GRIB", "IPTC"}  # video, data, metadata: Pillow only identifies them
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and fmt not in not_pictures)


def is_image_file(name: str, read_head: Callable[[int], bytes]) -> bool:
    """Whether a file in a folder is an image to attempt: by its suffix, else by its first bytes.

    `read_head(n)` is called only for a suffix that names no image format (or no suffix at all).
    """
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in IMAGE_SUFFIXES or suffix in _pillow_image_suffixes():
        return True
    return sniff_format(read_head(SNIFF_BYTES)) is not None


def output_name(rel_out: str, options: EncodeOptions) -> str:
    """The output path: same name, the forced format's suffix, or .png for a read-only format."""
    path = PurePosixPath(rel_out)
    if options.format is not None:
        return str(path.with_suffix(FORCED_FORMATS[options.format][1]))
    converted = CONVERTED_SUFFIXES.get(path.suffix.lower())
    return str(path.with_suffix(converted)) if converted else rel_out


def output_format(decoded: DecodedImage, options: EncodeOptions) -> str:
    """The format written, or ImageError when it cannot hold this image's protected pixels."""
    fmt = FORCED_FORMATS[options.format][0] if options.format else READ_ONLY.get(decoded.format, decoded.format)
    if fmt == "GIF" and decoded.frame_count > 1:
        raise ImageError(f"GIF stores a 256-colour palette, which cannot carry the noise; rerun with --format webp or "
                         f"--format png to write this {decoded.frame_count}-frame animation as animated WebP / APNG")
    if fmt == "GIF":
        raise ImageError("GIF stores a 256-colour palette, which cannot carry the noise; rerun with --format png")
    if decoded.frame_count > 1 and fmt not in FRAME_FORMATS:
        raise ImageError(f"{fmt} cannot store {decoded.frame_count} frames; rerun with --format webp or png (animated)")
    if decoded.alpha is not None and fmt not in ALPHA_FORMATS:
        raise ImageError(f"{fmt} cannot store the alpha channel; rerun with --format png or webp")
    if decoded.out_mode == "I;16" and fmt not in GRAY16_FORMATS:
        raise ImageError(f"{fmt} cannot store 16-bit grayscale; rerun with --format png")
    return fmt


def _png_bit_depth_16_colour(data: bytes) -> bool:
    """16-bit PNG with colour or alpha (IHDR colour type 2, 4 or 6): Pillow would read it as 8-bit."""
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 25 and data[24] == 16 and data[25] in (2, 4, 6)


def _webp_is_lossless(data: bytes, pos: int = 12, end: int | None = None) -> bool:
    """True when the WebP bitstream is VP8L (lossless), looking through VP8X chunks and into an
    animation's first ANMF frame."""
    end = len(data) if end is None else end
    while pos + 8 <= end:
        fourcc = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if fourcc in (b"VP8L", b"VP8 "):
            return fourcc == b"VP8L"
        if fourcc == b"ANMF":  # 16 bytes of frame header, then the frame's own chunks
            return _webp_is_lossless(data, pos + 24, min(end, pos + 8 + size))
        pos += 8 + size + (size & 1)
    return False


@lru_cache(maxsize=1)
def heif_opener() -> bool:
    """Register pillow-heif's HEIF opener once per process (the first time a HEIF file is seen, or
    before code that opens image files with Pillow directly); False when pillow-heif is missing."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _open(data: bytes, name: str) -> Image.Image:
    if not data:
        raise ImageError("empty file (0 bytes)")
    if sniff_format(data[:SNIFF_BYTES]) == "HEIF" and not heif_opener():
        raise ImageError("HEIF/HEIC needs the pillow-heif package (pip install pillow-heif)")
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


def _frame_count(img: Image.Image, fmt: str) -> int:
    """Frames cgan protects: every frame of an animation / page of a TIFF; 1 for MPO (primary
    image), PSD (flattened composite) and ICO (largest icon)."""
    return int(getattr(img, "n_frames", 1)) if fmt in FRAME_FORMATS else 1


def _check_supported(img: Image.Image, data: bytes) -> tuple[str, int]:
    """(format, frames to protect) or ImageError."""
    fmt = "JPEG" if img.format == "MPO" else img.format
    if fmt not in FORMATS:
        raise ImageError(f"{img.format} files are not supported (supported: {', '.join(FORMATS)}); convert to PNG first")
    frames = _frame_count(img, fmt)
    width, height = img.size
    if width * height * frames > MAX_PIXELS:
        what = f"{frames} frames of {width}x{height}" if frames > 1 else f"{width}x{height}"
        raise ImageError(
            f"{what} is {width * height * frames / 1e6:.0f} megapixels, over the {MAX_PIXELS // 1_000_000} megapixel "
            "limit (decompression-bomb guard)"
        )
    if img.mode == "CMYK":
        raise ImageError("CMYK images are not supported (the noise is defined on RGB); convert to RGB first")
    gray16 = img.mode.startswith("I;16") or (img.mode == "I" and fmt == "PPM")  # 16-bit PGM opens as I
    if img.mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA") and not gray16:
        raise ImageError(f"PIL mode {img.mode} is not supported (supported: RGB, RGBA, L, LA, palette, 16-bit gray)")
    bits = getattr(img, "tag_v2", {}).get(258) if fmt == "TIFF" else None
    deep_tiff = bits is not None and max(bits if isinstance(bits, tuple) else (bits,)) > 8 and not img.mode.startswith("I;16")
    if _png_bit_depth_16_colour(data) or deep_tiff:
        raise ImageError("16-bit-per-channel colour is not supported (it would be written back at 8 bits); convert to 8-bit first")
    return fmt, frames


def _split(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Colour channels (H, W, C) and alpha (H, W) after the palette / bilevel / tRNS conversions."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
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


_TRANSPOSE = {  # EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


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


def _read_frames(img: Image.Image, count: int) -> tuple[list[tuple[np.ndarray, np.ndarray | None]], list, list]:
    """Every frame as displayed (Pillow composites animation frames onto the canvas), with its
    duration and APNG disposal; all frames brought to one channel count and alpha."""
    method = _TRANSPOSE.get(img.getexif().get(ORIENTATION_TAG, 1))
    splits, durations, disposals = [], [], []
    for index in range(count):
        img.seek(index)
        img.load()
        splits.append(_split(img if method is None else img.transpose(method)))
        durations.append(img.info.get("duration"))
        disposals.append(img.info.get("disposal"))
    if len({p.dtype.str for p, _ in splits}) > 1:
        raise ImageError(f"its {count} pages differ in bit depth; split them into separate files first")
    channels = max(p.shape[2] for p, _ in splits)
    with_alpha = any(a is not None for _, a in splits)
    top = 65535 if splits[0][0].dtype == np.uint16 else 255
    unified = []
    for pixels, alpha in splits:  # a GIF's first frame can be RGB and a later one RGBA, or gray
        if pixels.shape[2] < channels:
            pixels = np.repeat(pixels, channels, axis=2)
        if with_alpha and alpha is None:
            alpha = np.full(pixels.shape[:2], top, pixels.dtype)
        unified.append((pixels, alpha))
    return unified, durations, disposals


def decode_image(data: bytes, name: str = "") -> DecodedImage:
    """Decode a file's bytes to upright pixels + everything needed to re-encode it faithfully.

    `name` (the file name or tar member) only sharpens messages. Raises ImageError for every input
    that cannot be protected.
    """
    img = _open(data, name)
    fmt, count = _check_supported(img, data)
    mode, info = img.mode, dict(img.info)  # the first frame's: seeking to later frames changes both
    try:
        img.load()
        if count == 1:
            pixels, alpha = _split(_upright(img))
            later, durations, disposals = [], [], []
        else:
            frames, durations, disposals = _read_frames(img, count)
            (pixels, alpha), later = frames[0], [Frame(p, a) for p, a in frames[1:]]
        exif = _exif_upright(img, fmt)  # after the pixels were turned upright: this resets the orientation tag
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt streams raise OSError, SyntaxError, ...
        raise ImageError(f"truncated or corrupt {fmt} data: {exc}") from None
    qtables = subsampling = None
    if fmt == "JPEG":
        qtables = [list(t) for _, t in sorted(getattr(img, "quantization", {}).items())] or None
        sampling = JpegImagePlugin.get_sampling(img)
        subsampling = sampling if sampling >= 0 else None
    dpi = info.get("dpi")
    return DecodedImage(
        pixels=pixels,
        alpha=alpha,
        mode=mode,
        format=fmt,
        exif=exif,
        icc_profile=info.get("icc_profile") or None,
        xmp=info.get("xmp") or None,
        dpi=(float(dpi[0]), float(dpi[1])) if dpi else None,
        jpeg_qtables=qtables,
        jpeg_subsampling=subsampling,
        webp_lossless=_webp_is_lossless(data) if fmt == "WEBP" else None,
        png_text={k: v for k, v in getattr(img, "text", {}).items() if isinstance(v, str)} if fmt == "PNG" else {},
        tiff_compression=info.get("compression") if fmt == "TIFF" else None,
        tga_compression=info.get("compression") if fmt == "TGA" else None,
        j2k_codestream=fmt == "JPEG2000" and getattr(img, "codec", "") == "j2k",
        ico_sizes=sorted(info.get("sizes", ())) or None if fmt == "ICO" else None,
        later_frames=later,
        durations=durations if any(d is not None for d in durations) else None,
        disposals=disposals if fmt == "PNG" and all(d is not None for d in disposals) and disposals else None,
        loop=info.get("loop"),
        background=info.get("background") if fmt == "WEBP" else None,
    )


def _to_image(source: np.ndarray, pixels: np.ndarray, alpha: np.ndarray | None) -> Image.Image:
    if pixels.shape != source.shape or pixels.dtype != source.dtype:
        raise ValueError(f"protected pixels {pixels.shape} {pixels.dtype} do not match the source {source.shape}")
    if pixels.dtype == np.uint16:
        return Image.fromarray(np.ascontiguousarray(pixels[..., 0]).astype(np.uint16))  # -> mode I;16
    arr = pixels[..., 0] if pixels.shape[2] == 1 else pixels
    if alpha is not None:
        arr = np.dstack([pixels, alpha])
    return Image.fromarray(np.ascontiguousarray(arr))


def _save_kwargs(decoded: DecodedImage, fmt: str, options: EncodeOptions) -> dict:
    common = {k: v for k, v in (("icc_profile", decoded.icc_profile), ("exif", decoded.exif)) if v}
    if decoded.dpi and fmt in ("JPEG", "PNG", "TIFF"):
        common["dpi"] = decoded.dpi
    xmp = {"xmp": decoded.xmp} if decoded.xmp else {}
    if fmt == "JPEG":
        kw = {**common, **xmp}
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
        kw = {**common, **xmp}
        lossless = decoded.webp_lossless if decoded.format == "WEBP" else options.quality is None
        if lossless:
            return {**kw, "lossless": True, "quality": 100}
        return {**kw, "quality": options.quality or DEFAULT_LOSSY_QUALITY}
    if fmt == "TIFF":
        compression = decoded.tiff_compression or "tiff_lzw"
        kw = {**common, "compression": "tiff_lzw" if compression in FAX_COMPRESSIONS else compression}
        if kw["compression"] == "jpeg":
            kw["quality"] = options.quality or DEFAULT_LOSSY_QUALITY
        return kw
    if fmt in ("AVIF", "HEIF"):  # lossy: 4:4:4 so the chroma noise survives
        return {**common, **xmp, "quality": options.quality or DEFAULT_LOSSY_QUALITY, "subsampling": "4:4:4"}
    if fmt == "JPEG2000":  # written lossless (reversible 5/3 wavelet): the noise survives exactly
        return {"no_jp2": decoded.j2k_codestream}
    if fmt == "TGA":
        return {"compression": decoded.tga_compression} if decoded.tga_compression else {}
    if fmt == "ICO":
        return {"sizes": decoded.ico_sizes} if decoded.ico_sizes else {}
    return {}  # BMP, PPM, QOI: no metadata to keep


def _animation_kwargs(decoded: DecodedImage, fmt: str) -> dict:
    """Frame timing for a multi-frame write: durations, loop, APNG disposal (frames are whole
    composited pictures, so each replaces the canvas: blend op source)."""
    kw: dict = {}
    if decoded.durations is not None and fmt in ("PNG", "WEBP", "AVIF"):
        durations = [d or 0 for d in decoded.durations]
        kw["duration"] = durations if fmt == "PNG" else [int(round(d)) for d in durations]
    if fmt in ("PNG", "WEBP", "AVIF"):
        kw["loop"] = decoded.loop if decoded.loop is not None else (1 if decoded.format == "GIF" else 0)
    if fmt == "PNG":
        kw["blend"] = [0] * decoded.frame_count
        if decoded.disposals is not None:
            kw["disposal"] = decoded.disposals
    if fmt == "WEBP" and decoded.background is not None:
        kw["background"] = decoded.background
    return kw


def encode_image(decoded: DecodedImage, pixels: np.ndarray | list[np.ndarray], options: EncodeOptions = EncodeOptions()) -> bytes:
    """Protected pixels -> file bytes, in the source's format, size, mode and metadata (or the forced format).

    `pixels` is one array, or one per frame (`decoded.frames_pixels` order) for a multi-frame image.
    """
    fmt = output_format(decoded, options)
    frames = pixels if isinstance(pixels, list) else [pixels]
    if len(frames) != decoded.frame_count:
        raise ValueError(f"{len(frames)} protected frames for a {decoded.frame_count}-frame source")
    alphas = [decoded.alpha, *(frame.alpha for frame in decoded.later_frames)]
    images = [_to_image(source, arr, alpha) for source, arr, alpha in zip(decoded.frames_pixels, frames, alphas)]
    kwargs = _save_kwargs(decoded, fmt, options)
    if len(images) > 1:
        kwargs.update(save_all=True, append_images=images[1:], **_animation_kwargs(decoded, fmt))
    buf = io.BytesIO()
    try:
        if fmt == "HEIF" and not heif_opener():
            raise OSError("HEIF needs the pillow-heif package (pip install pillow-heif)")
        images[0].save(buf, fmt, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"cannot write {images[0].mode} as {fmt}: {exc}") from None
    return buf.getvalue()


FIDELITY_BLOCK = 1 << 16  # values per block: the temporaries stay in cache


def fidelity(original: np.ndarray | list[np.ndarray], changed: np.ndarray | list[np.ndarray], max_value: int) -> tuple[float, float | None]:
    """(L-inf in /255 units, PSNR in dB or None when identical) between two (H, W, C) pixel arrays,
    or two lists of frames (the worst frame's L-inf, the PSNR over every frame's pixels).

    Exact integer arithmetic in cache-sized blocks, squares summed into int64: whole-image int64
    temporaries cost ~4x more at 12 MP (docs/performance.md). 8-bit differences and their squares
    fit int32; 16-bit squares need int64. A 1-channel original against a 3-channel array (gray
    written as RGB WebP) broadcasts.
    """
    pairs = zip(original, changed) if isinstance(original, list) else [(original, changed)]
    acc = np.int64 if max_value > 255 else np.int32
    worst, sse, count = 0, 0, 0
    for first, second in pairs:
        a, b = (first, second) if first.shape == second.shape else np.broadcast_arrays(first, second)
        a, b = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
        count += a.size
        for start in range(0, a.size, FIDELITY_BLOCK):
            diff = np.subtract(a[start : start + FIDELITY_BLOCK], b[start : start + FIDELITY_BLOCK], dtype=acc)
            worst = max(worst, int(diff.max()), -int(diff.min()))
            sse += int(np.square(diff, out=diff).sum(dtype=np.int64))
    scale = 255.0 / max_value
    mse = sse / max(1, count) * scale**2
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
    """`fidelity` of a re-decoded output against its source, every frame (--measure-written)."""
    if original.frame_count != written.frame_count:
        raise ImageError(f"written image has {written.frame_count} frames, source has {original.frame_count}")
    for a, b in zip(original.frames_pixels, written.frames_pixels):
        if a.shape[:2] != b.shape[:2] or original.max_value != written.max_value:
            raise ImageError(f"written image is {b.shape[1]}x{b.shape[0]} {written.out_mode}, source is {a.shape[1]}x{a.shape[0]} {original.out_mode}")
    if original.frame_count == 1:
        return fidelity(original.pixels, written.pixels, original.max_value)
    return fidelity(original.frames_pixels, written.frames_pixels, original.max_value)
