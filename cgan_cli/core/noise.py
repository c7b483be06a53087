"""Adding the generator's noise to full-size pixels in whole integer levels, within the budget exactly.

The delivered change is round(noise) in integer levels, clipped to +-floor(epsilon) levels (8-bit;
x257 for 16-bit), so max |output - input| <= epsilon/255 holds exactly on the returned arrays. On the
CPU, 8-bit images get their noise rounded to levels at working size and upsampled as bytes (fixed
point, ~3x cheaper at 12 MP); elsewhere the noise is upsampled in float and rounded at full size.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from cgan_cli.core.formats import LUMA

if TYPE_CHECKING:
    from cgan_cli.core.weights import WeightsMeta

FIXED_POINT_OFFSET = 128  # noise levels travel as bytes: level + 128
FIXED_POINT_LIMIT = 127  # the largest budget (in levels) a byte can carry that way


def budget_levels(epsilon: float, max_value: int) -> int:
    """The largest change in integer levels that stays within epsilon (/255 units)."""
    return math.floor(epsilon / 255.0 * max_value + 1e-9)


ACTIVITY_WINDOW = 5  # local-activity mask: side of the window its local std is taken over (working-size px)
ACTIVITY_FULL = 0.15  # local std (of [0, 1] luma) at and above which a pixel gets the full budget
NO_MASK = 1.0  # mask floor that leaves every pixel at the full budget


def mask_floor_for(override: float | None, meta: WeightsMeta) -> float:
    """The mask floor a run uses: the --mask-floor override, else the weights' protect default, else
    the floor they were trained with, else no mask."""
    if override is not None:
        return float(override)
    return float(meta.protect_defaults.get("mask_floor", meta.recipe.get("mask_floor", NO_MASK)))


def luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) BT.601 luma, as PIL's convert("L") weighs the channels."""
    return (x * torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)


def activity_mask(x: torch.Tensor, floor: float) -> torch.Tensor:
    """(B, C, h, w) image in [0, 1] -> (B, 1, h, w) noise scale in [floor, 1]: less in flat regions.

    A just-noticeable-difference proxy: the local standard deviation of the luma over a
    ACTIVITY_WINDOW square, normalised by ACTIVITY_FULL and clipped to 1, mapped linearly to
    [floor, 1]. Noise hides in texture and shows on flat areas (sky, skin, coffee crema). Scaling a
    direction in [-1, 1] by it keeps |noise| <= epsilon, so the integer budget stays exact.
    """
    if floor >= NO_MASK:
        return torch.ones_like(x[:, :1])
    gray = x.mean(1, keepdim=True) if x.shape[1] != 3 else luma(x)
    pad = ACTIVITY_WINDOW // 2
    padded = F.pad(gray, (pad, pad, pad, pad), mode="replicate")
    mean = F.avg_pool2d(padded, ACTIVITY_WINDOW, stride=1)
    mean_sq = F.avg_pool2d(padded * padded, ACTIVITY_WINDOW, stride=1)
    std = (mean_sq - mean * mean).clamp_min(0.0).sqrt()
    return floor + (1.0 - floor) * (std / ACTIVITY_FULL).clamp(max=1.0)


def as_tensor(image: np.ndarray) -> torch.Tensor:
    """A tensor view of a pixel array, read-only ones included (decoded files are).

    The engine only reads these views, so torch's warning about non-writable arrays does not apply.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(image)


class NoiseAdder:
    """Adds (1, C, h, w) noise directions in [-1, 1] to (H, W, C) images; keeps full-size scratch buffers.

    Why the buffers: a fresh 36-144 MB array per 12 MP image costs more in page faults than the
    arithmetic on it (measured ~50 ms of ~70 ms per float pass, ~7 of ~11 ms per byte upsample); the
    allocator returns blocks this big to the kernel on every free.
    """

    def __init__(self, epsilon: float, device: torch.device) -> None:
        self.epsilon, self.device = epsilon, device
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, image: np.ndarray, noise: torch.Tensor) -> np.ndarray:
        max_value = 65535 if image.dtype == np.uint16 else 255
        limit = budget_levels(self.epsilon, max_value)
        if self.device.type == "cpu" and image.dtype == np.uint8 and limit <= FIXED_POINT_LIMIT:
            return self.fixed_point(image, noise, limit)
        return self.full_float(image, noise, max_value, limit)

    def _reused(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A full-size scratch tensor kept between images of the same size (4-d: channels-last)."""
        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype:
            self._buffers.pop(name, None)  # free the old buffer before allocating the new one
            fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=self.device, memory_format=fmt)
        return buf

    def _upsampled(self, small: torch.Tensor, name: str, h: int, w: int) -> torch.Tensor:
        """Bilinear to (h, w) into a reused buffer; bilinear weights are convex, so bounds hold."""
        small = small.contiguous(memory_format=torch.channels_last)
        if tuple(small.shape[-2:]) == (h, w):
            return small
        full = self._reused(name, (1, small.shape[1], h, w), small.dtype)
        torch.ops.aten.upsample_bilinear2d.out(small, [h, w], False, None, None, out=full)
        return full

    def fixed_point(self, image: np.ndarray, noise: torch.Tensor, limit: int) -> np.ndarray:
        """CPU, 8-bit: round the noise to whole levels at working size, upsample it as bytes, add once.

        Why: the full-size float path (float upsample, scale, round, add, cast) costs ~80 ms per
        12 MP image; torch's uint8 bilinear kernel plus one int16 add costs ~18 ms
        (docs/performance.md). Rounding before rather than after the upsample moves some pixels by
        one level against the float path, never past the budget.
        """
        h, w = image.shape[:2]
        levels = noise.mul(self.epsilon).round_().clamp_(-limit, limit).add_(FIXED_POINT_OFFSET)
        full = self._upsampled(levels.to(torch.uint8), "noise_bytes", h, w)
        offset_delta = full[0].permute(1, 2, 0).numpy()  # (H, W, C) view of channels-last bytes
        total = self._reused("sums", (h, w, image.shape[2]), torch.int16).numpy()
        np.add(image, offset_delta, out=total, dtype=np.int16)  # image + delta + OFFSET, one pass
        np.clip(total, FIXED_POINT_OFFSET, 255 + FIXED_POINT_OFFSET, out=total)
        total -= FIXED_POINT_OFFSET
        return total.astype(np.uint8)

    def full_float(self, image: np.ndarray, noise: torch.Tensor, max_value: int, limit: int) -> np.ndarray:
        """16-bit images, budgets above 127 levels and CUDA: full-size float noise in one reused buffer.

        Every full-size step runs in place on one (H, W, C)-ordered buffer, so the image is never
        transposed and only the returned array is freshly allocated.
        """
        h, w = image.shape[:2]
        buf = self._reused("noise_float", (1, noise.shape[1], h, w), torch.float32)
        full = self._upsampled(noise.float(), "noise_float", h, w)
        if full is not buf:
            buf.copy_(full)
        delta = buf[0].permute(1, 2, 0)  # (H, W, C) view of the channels-last buffer: contiguous
        delta.mul_(self.epsilon / 255.0 * max_value).round_().clamp_(-limit, limit)  # exact below 2^24
        if self.device.type == "cpu":
            # numpy's mixed uint8 + float32 add and float32 -> uint8 cast are 3-4x faster than
            # torch's on CPU (13 vs 54 ms and 10 vs 27 ms at 12 MP; docs/performance.md)
            d = delta.numpy()
            np.add(d, image, out=d)
            np.clip(d, 0, max_value, out=d)
            return d.astype(image.dtype)
        x = as_tensor(image).to(self.device)
        delta.add_(x if image.dtype == np.uint8 else x.to(torch.int32)).clamp_(0, max_value)
        out = delta.to(torch.uint8 if image.dtype == np.uint8 else torch.int32)
        return out.cpu().numpy().astype(image.dtype, copy=False)
