"""The trip to the internet, inside `cgan train`: what a platform and a scraper do to a protected image.

A protected image is rarely trained on as written: it is re-encoded (JPEG), resized to another size on
another grid, sometimes blurred or turned gray, then cropped and flipped by the victim's loader. Every
loss in `cgan train` that stands for the victim (N->Y noise classifier, min-min surrogate) sees the
image after a random draw of these, so the generator is pushed towards noise that survives them.

Each distortion is one function `(x, gen, cfg) -> x` on a float batch (B, C, H, W) in [0, 1] that
returns the same shape and range; `cfg` is `learning.config.Distortions`, where each distortion's
probability is the field of the same name. To add one: write the function, add it to `REGISTRY`, and
give `Distortions` a probability field of that name (and its name in `PROBABILITIES`) and `cgan train` its option.

`distort_pair` applies one random draw to the clean and the protected batch alike (same sizes, offsets,
qualities, crops), so `protected - clean` is the noise as the victim receives it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cgan_cli.core.noise import luma
from cgan_cli.learning.config import Distortions
from cgan_cli.learning.victims import crop_flip

Distortion = Callable[[torch.Tensor, torch.Generator, Distortions], torch.Tensor]

RESIZE_FILTERS = ("bilinear", "bicubic", "area", "antialias")
JPEG_BLOCK = 8


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high], both included."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def resample(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """One resize with a scraper's filter: bilinear, bicubic, area (box average) or antialiased bilinear."""
    if mode == "antialias":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def resize(x: torch.Tensor, gen: torch.Generator, cfg: Distortions) -> torch.Tensor:
    """To a random size (resize_min..resize_max x the side) on a random grid offset, and back.

    The offset (0-3 px of reflect padding before the resize, cropped after) moves the resampling grid
    against the noise pattern; each of the two resizes draws its own filter.
    """
    scale = _uniform(gen, cfg.resize_min, cfg.resize_max)
    oy, ox = _randint(gen, 0, 3), _randint(gen, 0, 3)
    down, up = (RESIZE_FILTERS[_randint(gen, 0, len(RESIZE_FILTERS) - 1)] for _ in range(2))
    padded = F.pad(x, (ox, 0, oy, 0), mode="reflect") if oy or ox else x
    ph, pw = padded.shape[-2:]
    small = resample(padded, (max(2, round(ph * scale)), max(2, round(pw * scale))), down)
    back = resample(small, (ph, pw), up)
    return back[..., oy:, ox:].clamp(0.0, 1.0)


def jpeg_round_trip(arr: np.ndarray, quality: int, offset: tuple[int, int]) -> np.ndarray:
    """One (H, W, C) uint8 image through a real JPEG encode + decode (4:2:0 chroma for RGB), its
    8x8 block grid moved by `offset` (reflect padding before encoding, cropped after)."""
    oy, ox = offset
    h, w, c = arr.shape
    if oy or ox:
        arr = np.pad(arr, ((oy, 0), (ox, 0), (0, 0)), mode="reflect")
    buf = io.BytesIO()
    if c == 1:
        Image.fromarray(arr[..., 0], "L").save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality, subsampling=2)
    buf.seek(0)
    with Image.open(buf) as img:
        out = np.asarray(img.convert("L" if c == 1 else "RGB")).reshape(arr.shape)
    return out[oy : oy + h, ox : ox + w]


def jpeg(x: torch.Tensor, gen: torch.Generator, cfg: Distortions) -> torch.Tensor:
    """Real JPEG (Pillow) at a random quality per image, off the 8x8 grid by a random shift.

    Straight-through gradient: the forward pass is the decoded JPEG, the backward pass the identity,
    so the generator is trained on what the codec really leaves without differentiating through it.
    """
    arrays = torch.round(x.detach().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(arrays)
    for i, arr in enumerate(arrays):
        quality = _randint(gen, cfg.jpeg_min, cfg.jpeg_max)
        offset = (_randint(gen, 0, JPEG_BLOCK - 1), _randint(gen, 0, JPEG_BLOCK - 1))
        out[i] = jpeg_round_trip(arr, quality, offset)
    decoded = torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255.0
    return x + (decoded - x).detach()


def gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def gaussian_blur_float(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a float batch, kernel radius ceil(3 sigma), reflect padding."""
    _, c, h, w = x.shape
    radius = min(math.ceil(3 * sigma), h - 1, w - 1)
    kernel = gaussian_kernel(sigma, radius).to(x.device, x.dtype)
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def blur(x: torch.Tensor, gen: torch.Generator, cfg: Distortions) -> torch.Tensor:
    """Gaussian blur, sigma uniform in [0.3, blur_max] px."""
    return gaussian_blur_float(x, _uniform(gen, 0.3, max(0.3, cfg.blur_max)))


def grayscale(x: torch.Tensor, gen: torch.Generator, cfg: Distortions) -> torch.Tensor:
    """RGB -> luma replicated over the 3 channels (the victim's input stays 3-channel); 1 channel: no-op."""
    return x if x.shape[1] != 3 else luma(x).expand_as(x)


def shift(x: torch.Tensor, gen: torch.Generator, cfg: Distortions) -> torch.Tensor:
    """Translate by a fractional offset (up to shift_max px each way; bilinear, reflected borders).

    An integer shift only moves the phase of a short-period pattern; a half-pixel one averages a
    period-2 pattern away, which is what resampling on another grid does.
    """
    b, _, h, w = x.shape
    dy, dx = _uniform(gen, -cfg.shift_max, cfg.shift_max), _uniform(gen, -cfg.shift_max, cfg.shift_max)
    theta = torch.tensor([[1.0, 0.0, 2 * dx / w], [0.0, 1.0, 2 * dy / h]], device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta.expand(b, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def crop_flip_distortion(x: torch.Tensor, gen: torch.Generator, cfg: Distortions) -> torch.Tensor:
    """The victim's own loader: random crop (reflect pad 1/8 of the side) + horizontal flip."""
    return crop_flip(x, gen)


# Applied in this order (platform first, the victim's loader last); each with its probability in cfg.
REGISTRY: dict[str, Distortion] = {
    "resize": resize,
    "blur": blur,
    "grayscale": grayscale,
    "shift": shift,
    "jpeg": jpeg,
    "crop_flip": crop_flip_distortion,
}


def check(cfg: Distortions) -> None:
    """Ranges that cannot be drawn from, as ValueError (`cgan train` turns it into exit 2)."""
    for name in REGISTRY:
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"distortion {name}: probability must be in [0, 1], got {getattr(cfg, name)}")
    if not 0 < cfg.resize_min <= cfg.resize_max:
        raise ValueError(f"resize range {cfg.resize_min}..{cfg.resize_max}: need 0 < min <= max")
    if not 1 <= cfg.jpeg_min <= cfg.jpeg_max <= 100:
        raise ValueError(f"jpeg quality range {cfg.jpeg_min}..{cfg.jpeg_max}: need 1 <= min <= max <= 100")


def chosen(gen: torch.Generator, cfg: Distortions) -> list[str]:
    """Which distortions this step applies: each independently with its probability."""
    return [name for name in REGISTRY if float(torch.rand((), generator=gen)) < getattr(cfg, name)]


def distort_pair(clean: torch.Tensor, protected: torch.Tensor, gen: torch.Generator, cfg: Distortions) -> tuple[torch.Tensor, torch.Tensor]:
    """Both batches through the same random draw of the distortions (same parameters per image)."""
    for name in chosen(gen, cfg):
        state = gen.get_state()
        clean = REGISTRY[name](clean, gen, cfg)
        gen.set_state(state)
        protected = REGISTRY[name](protected, gen, cfg)
    return clean, protected
