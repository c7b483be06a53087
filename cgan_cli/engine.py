"""The protection engine: uint8/uint16 pixel arrays in, protected arrays out, on CPU or GPU.

Working resolution (default): each image is resized, keeping its aspect ratio, so that its short
side is the generator's `working_size` (images already smaller run at native size); the noise
G(x_small) is upsampled to full size on the device. Cost per image is bounded, images of the same
working shape share a batch, and the noise lives at the scale scrapers downsample to before training.

--full-res: the generator runs on the full-size image in overlapping TILE x TILE tiles (blended
with linear ramps), so memory stays bounded at any size; the noise is then at pixel scale.

Colour: a 3-channel generator sees a grayscale image replicated to RGB and its noise is averaged
back to one channel; a 1-channel generator sees the luminance of an RGB image and its noise is
added equally to R, G and B. Both keep |noise| <= epsilon.

The delivered change is round(noise) in integer levels, clipped to +-floor(epsilon) levels (8-bit;
x257 for 16-bit), so max |output - input| <= epsilon/255 holds exactly on the returned arrays. On the
CPU, 8-bit images get their noise rounded to levels at working size and upsampled as bytes (fixed
point, ~3x cheaper at 12 MP); elsewhere the noise is upsampled in float and rounded at full size.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cgan_cli.models import upsample_noise
from cgan_cli.weights import file_sha256, load_generator

TILE = 512  # full-res tile side (a multiple of 8, so periodic patterns stay in phase across tiles)
OVERLAP = 32
ALIGN = 8  # working shapes are rounded to multiples of this, which also buckets aspect ratios
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, what PIL's convert("L") uses
FIXED_POINT_OFFSET = 128  # noise levels travel as bytes: level + 128
FIXED_POINT_LIMIT = 127  # the largest budget (in levels) a byte can carry that way


class EngineError(ValueError):
    """A device / precision / epsilon setting that cannot be used (a usage error)."""


@dataclass(frozen=True)
class EngineConfig:
    weights: Path
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (reduced precision only on CUDA)
    epsilon: float | None = None  # /255 units; None = the epsilon the weights were trained for
    batch_size: int = 16
    full_res: bool = False
    seed: int = 0
    cpu_threads: int | None = None  # torch intra-op threads on the CPU; None = torch's default


def cpu_threads_per_worker(workers: int) -> int:
    """Torch threads for each of `workers` engine processes (all cores for one in-process engine).

    Why: engines whose thread pools add up to more than the machine's cores fight each other and the
    codecs for the same cores; on the 2-core bench host two spinning threads made a 32 px generator
    batch ~45x slower than one thread (docs/performance.md).
    """
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        _, _, idx = name.partition(":")
        if idx and not idx.isdigit():
            raise EngineError(f"--device {name}: expected cuda:N with N a GPU index")
        if not torch.cuda.is_available():
            raise EngineError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        index = int(idx or 0)
        if index >= torch.cuda.device_count():
            raise EngineError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    raise EngineError(f"--device {name}: expected auto, cpu, cuda or cuda:N")


def resolve_precision(name: str, device: torch.device) -> str:
    if name not in ("auto", "fp32", "bf16", "fp16"):
        raise EngineError(f"--precision {name}: expected auto, fp32, bf16 or fp16")
    if device.type != "cuda":
        if name in ("bf16", "fp16"):
            raise EngineError(f"--precision {name} needs a CUDA device; the CPU path runs fp32")
        return "fp32"
    if name == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return name


def autocast_context(device: torch.device, precision: str):
    """Mixed precision only where it pays (CUDA); CPU and fp32 run exact, so CPU runs stay deterministic.

    `precision` is what resolve_precision returned; protect, train and the verify victims all use this.
    """
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def working_shape(height: int, width: int, working_size: int) -> tuple[int, int]:
    """Short side -> working_size (never upscaled), aspect kept, both sides rounded to ALIGN."""
    short = min(height, width)
    if short <= working_size:
        return height, width
    scale = working_size / short
    return (max(ALIGN, round(height * scale / ALIGN) * ALIGN), max(ALIGN, round(width * scale / ALIGN) * ALIGN))


def _tensor(image: np.ndarray) -> torch.Tensor:
    """A tensor view of a pixel array, read-only ones included (decoded files are: see codec._split).

    The engine only reads these views, so torch's warning about non-writable arrays does not apply.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(image)


def _ramp(length: int, overlap: int, device: torch.device) -> torch.Tensor:
    """Blend weights along one tile side: rise over `overlap`, flat, fall over `overlap`."""
    pos = torch.arange(length, device=device, dtype=torch.float32)
    rise = (pos + 1) / (overlap + 1)
    fall = (length - pos) / (overlap + 1)
    return torch.minimum(torch.minimum(rise, fall), torch.ones_like(pos))


def _tile_starts(size: int) -> list[int]:
    stride = TILE - OVERLAP
    return list(range(0, max(size - OVERLAP, 1), stride))


class ProtectEngine:
    """Loads a generator once and protects batches of pixel arrays with it."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        if cfg.epsilon is not None and not 1 <= cfg.epsilon <= 255:
            raise EngineError(f"--epsilon {cfg.epsilon}: must be in [1, 255] (/255 units; below 1 no 8-bit pixel changes)")
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cpu" and cfg.cpu_threads and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(cfg.cpu_threads)  # an explicit OMP_NUM_THREADS wins
        self.generator, self.meta = load_generator(cfg.weights, self.device)
        self.weights_sha256 = file_sha256(cfg.weights)
        self.epsilon = float(cfg.epsilon if cfg.epsilon is not None else self.meta.epsilon)
        torch.manual_seed(cfg.seed)
        self._buffers: dict[str, torch.Tensor] = {}

    # -- shapes -------------------------------------------------------------------------------
    def working_shape(self, height: int, width: int) -> tuple[int, int]:
        """The generator input shape for an image; --full-res runs tiles of the native image instead."""
        if self.cfg.full_res:
            return height, width
        return working_shape(height, width, self.meta.working_size)

    # -- generator calls ----------------------------------------------------------------------
    def _autocast(self):
        return autocast_context(self.device, self.precision)

    def _generate(self, x: torch.Tensor) -> torch.Tensor:
        """G on a (B, C_img, h, w) float batch -> noise direction (B, C_img, h, w) in [-1, 1]."""
        c_img, c_gen = x.shape[1], self.meta.channels
        if c_img == 1 and c_gen == 3:
            x = x.expand(-1, 3, -1, -1)
        elif c_img == 3 and c_gen == 1:
            x = (x * torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        with self._autocast():
            g = self.generator(x)
        g = g.float().clamp(-1.0, 1.0)
        if c_img == 1 and c_gen == 3:
            g = g.mean(1, keepdim=True)
        elif c_img == 3 and c_gen == 1:
            g = g.expand(-1, 3, -1, -1)
        return g

    def _generate_tiled(self, x: torch.Tensor) -> torch.Tensor:
        """G at native resolution on one (1, C, H, W) image, tile by tile; memory ~ TILE^2 x batch."""
        _, c, h, w = x.shape
        if h <= TILE and w <= TILE:
            return self._generate(x)
        ys, xs = _tile_starts(h), _tile_starts(w)
        pad_h, pad_w = max(ys[-1] + TILE - h, 0), max(xs[-1] + TILE - w, 0)
        padded = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        acc = torch.zeros(1, c, h + pad_h, w + pad_w, device=x.device)
        weight = torch.zeros(1, 1, h + pad_h, w + pad_w, device=x.device)
        ramp = _ramp(TILE, OVERLAP, x.device)
        window = (ramp[:, None] * ramp[None, :])[None, None]
        starts = [(y, x0) for y in ys for x0 in xs]
        for i in range(0, len(starts), self.cfg.batch_size):
            chunk = starts[i : i + self.cfg.batch_size]
            tiles = torch.cat([padded[..., y : y + TILE, x0 : x0 + TILE] for y, x0 in chunk])
            noise = self._generate(tiles)
            for (y, x0), n in zip(chunk, noise):
                acc[..., y : y + TILE, x0 : x0 + TILE] += n * window[0]
                weight[..., y : y + TILE, x0 : x0 + TILE] += window[0]
        return (acc / weight)[..., :h, :w]

    # -- public -------------------------------------------------------------------------------
    def _reused(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A full-size scratch tensor kept between images of the same size (4-d: channels-last).

        Why: a fresh 36-144 MB array per 12 MP image costs more in page faults than the arithmetic
        on it (measured ~50 ms of ~70 ms per float pass, ~7 of ~11 ms per byte upsample); the
        allocator returns blocks this big to the kernel on every free.
        """
        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype:
            self._buffers.pop(name, None)  # free the old buffer before allocating the new one
            fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=self.device, memory_format=fmt)
        return buf

    def _apply(self, image: np.ndarray, noise: torch.Tensor) -> np.ndarray:
        """Upsample one image's noise to full size, add it in integer levels, clip to +-epsilon."""
        max_value = 65535 if image.dtype == np.uint16 else 255
        limit = math.floor(self.epsilon / 255.0 * max_value + 1e-9)
        if self.device.type == "cpu" and image.dtype == np.uint8 and limit <= FIXED_POINT_LIMIT:
            return self._apply_fixed_point(image, noise, limit)
        return self._apply_float(image, noise, max_value, limit)

    def _apply_fixed_point(self, image: np.ndarray, noise: torch.Tensor, limit: int) -> np.ndarray:
        """CPU, 8-bit: round the noise to whole levels at working size, upsample it as bytes, add once.

        Why: the full-size float path (float upsample, scale, round, add, cast) costs ~80 ms per
        12 MP image; torch's uint8 bilinear kernel plus one int16 add costs ~18 ms
        (docs/performance.md). Bilinear weights are convex, so the upsampled levels stay within
        +-limit exactly; rounding before rather than after the upsample moves some pixels by one
        level against the float path, never past the budget.
        """
        h, w = image.shape[:2]
        levels = noise.mul(self.epsilon).round_().clamp_(-limit, limit).add_(FIXED_POINT_OFFSET)
        small = levels.to(torch.uint8).contiguous(memory_format=torch.channels_last)
        if tuple(small.shape[-2:]) != (h, w):
            full = self._reused("noise_bytes", (1, small.shape[1], h, w), torch.uint8)
            torch.ops.aten.upsample_bilinear2d.out(small, [h, w], False, None, None, out=full)
            small = full
        offset_delta = small[0].permute(1, 2, 0).numpy()  # (H, W, C) view of channels-last bytes
        total = self._reused("sums", (h, w, image.shape[2]), torch.int16).numpy()
        np.add(image, offset_delta, out=total, dtype=np.int16)  # image + delta + OFFSET, one pass
        np.clip(total, FIXED_POINT_OFFSET, 255 + FIXED_POINT_OFFSET, out=total)
        total -= FIXED_POINT_OFFSET
        return total.astype(np.uint8)

    def _apply_float(self, image: np.ndarray, noise: torch.Tensor, max_value: int, limit: int) -> np.ndarray:
        """16-bit images, budgets above 127 levels and CUDA: full-size float noise in one reused buffer.

        Every full-size step runs in place on one (H, W, C)-ordered buffer, so the image is never
        transposed and only the returned array is freshly allocated.
        """
        levels = self.epsilon / 255.0 * max_value
        h, w = image.shape[:2]
        buf = self._reused("noise_float", (1, noise.shape[1], h, w), torch.float32)
        small = noise.contiguous(memory_format=torch.channels_last)
        if tuple(small.shape[-2:]) == (h, w):
            buf.copy_(small)
        else:  # = models.upsample_noise, written into the reused buffer
            torch.ops.aten.upsample_bilinear2d.out(small, [h, w], False, None, None, out=buf)
        delta = buf[0].permute(1, 2, 0)  # (H, W, C) view of the channels-last buffer: contiguous
        delta.mul_(levels).round_().clamp_(-limit, limit)  # whole levels; float32 is exact below 2^24
        if self.device.type == "cpu":
            # numpy's mixed uint8 + float32 add and float32 -> uint8 cast are 3-4x faster than
            # torch's on CPU (13 vs 54 ms and 10 vs 27 ms at 12 MP; docs/performance.md)
            d = delta.numpy()
            np.add(d, image, out=d)
            np.clip(d, 0, max_value, out=d)
            return d.astype(image.dtype)
        x = _tensor(image).to(self.device)
        delta.add_(x if image.dtype == np.uint8 else x.to(torch.int32)).clamp_(0, max_value)
        out = delta.to(torch.uint8 if image.dtype == np.uint8 else torch.int32)
        return out.cpu().numpy().astype(image.dtype, copy=False)

    def _to_float(self, image: np.ndarray) -> torch.Tensor:
        max_value = 65535.0 if image.dtype == np.uint16 else 255.0
        # 8-bit pixels cross to the device as bytes (4x less host->device traffic than float32)
        x = _tensor(image if image.dtype == np.uint8 else image.astype(np.float32)).to(self.device)
        return (x.float() / max_value).permute(2, 0, 1)[None]

    def _small(self, image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """One image as a (1, C, h, w) float batch entry at the generator's working shape.

        On the CPU an 8-bit image is resized before it becomes float: torch's uint8 antialiased
        kernel is ~40x faster than the float one on 12 MP (docs/performance.md), and its output
        differs from the float resize by under one level. Other cases (16-bit, CUDA) resize in float.
        """
        max_value = 65535.0 if image.dtype == np.uint16 else 255.0
        if image.dtype == np.uint8 and self.device.type == "cpu" and tuple(image.shape[:2]) != size:
            x = _tensor(image).permute(2, 0, 1)[None]
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
            return x.float().div_(max_value).contiguous()
        return self._resize(self._to_float(image), size)

    @torch.inference_mode()
    def protect_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Protect (H, W, C) uint8/uint16 arrays (C = 1 or 3); any mix of sizes. Order is kept."""
        out: list[np.ndarray | None] = [None] * len(images)
        if self.cfg.full_res:
            for i, image in enumerate(images):
                out[i] = self._apply(image, self._generate_tiled(self._to_float(image)))
            return out  # type: ignore[return-value]
        groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[(*self.working_shape(*image.shape[:2]), image.shape[2])].append(i)
        for (wh, ww, _c), idx in groups.items():
            for start in range(0, len(idx), self.cfg.batch_size):
                chunk = idx[start : start + self.cfg.batch_size]
                small = torch.cat([self._small(images[i], (wh, ww)) for i in chunk])
                noise = self._generate(small)
                for i, n in zip(chunk, noise):
                    out[i] = self._apply(images[i], n[None])
        return out  # type: ignore[return-value]

    @staticmethod
    def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)

    def describe(self) -> dict:
        """What summary.json records about the weights."""
        return {"path": str(self.cfg.weights), "sha256": self.weights_sha256, "metadata": asdict(self.meta)}
