"""The protection engine: uint8/uint16 pixel arrays in, protected arrays out, on CPU or GPU.

Working resolution (default): each image is resized, keeping its aspect ratio, so that its short
side is the generator's `working_size` (images already smaller run at native size); the noise
G(x_small) is upsampled to full size on the device (core/noise.py adds it in whole levels). Cost per
image is bounded, and images of the same working shape share a batch.

--full-res: the generator runs on the full-size image in overlapping TILE x TILE tiles (blended
with linear ramps), so memory stays bounded at any size; the noise is then at pixel scale.

Colour: a 3-channel generator sees a grayscale image replicated to RGB and its noise is averaged
back to one channel; a 1-channel generator sees the luminance of an RGB image and its noise is
added equally to R, G and B. Both keep |noise| <= epsilon.

Codes: by default the generator's encoder guesses each image's code (its class); a caller that knows
the labels passes them as `codes` and the image carries that code's pattern instead.
Mask: with a mask floor below 1 (the weights' recipe, or --mask-floor), the noise direction is
scaled by the local activity of the generator's input (core/noise.activity_mask): less in flat
regions, the full budget in texture; the budget stays exact.

Both `cgan protect` and `cgan verify` protect through `ProtectEngine.protect_batch_coded` (which
`protect_batch` wraps), so what verify measures is what protect ships. The engine leaves
process-wide torch state (threads, seeds) alone.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cgan_cli.core.choices import check_epsilon
from cgan_cli.core.device import autocast_context, resolve_device, resolve_precision
from cgan_cli.core.noise import (
    NO_MASK,
    NoiseAdder,
    activity_mask,
    as_tensor,
    luma,
    mask_floor_for,
)
from cgan_cli.core.weights import file_sha256, load_generator

TILE = 512  # full-res tile side (a multiple of 8, so periodic patterns stay in phase across tiles)
OVERLAP = 32


@dataclass(frozen=True)
class EngineConfig:
    weights: Path
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (reduced precision only on CUDA)
    epsilon: float | None = None  # /255 units; None = the epsilon the weights were trained for
    batch_size: int = 16
    full_res: bool = False
    mask_floor: float | None = None  # local-activity mask floor; None = the weights' recipe (no mask if absent)


def working_shape(height: int, width: int, working_size: int) -> tuple[int, int]:
    """Short side -> exactly working_size (never upscaled), long side in proportion, to the nearest pixel.

    Exactly, not rounded to a coarser grid: the generator's patterns are as fine as two working
    pixels, so a scraper that resizes the image back to the working size (the usual path of an
    upscaled photo) must land on the grid the noise was made on. Rounding a 28 px generator's short
    side to 32 cost the noise all but 0.08 of its correlation on that path (docs/method.md).
    """
    short = min(height, width)
    if short <= working_size:
        return height, width
    scale = working_size / short
    return max(1, round(height * scale)), max(1, round(width * scale))


def _ramp(length: int, overlap: int, device: torch.device) -> torch.Tensor:
    """Blend weights along one tile side: rise over `overlap`, flat, fall over `overlap`."""
    pos = torch.arange(length, device=device, dtype=torch.float32)
    rise = (pos + 1) / (overlap + 1)
    fall = (length - pos) / (overlap + 1)
    return torch.minimum(torch.minimum(rise, fall), torch.ones_like(pos))


def _tile_starts(size: int) -> list[int]:
    stride = TILE - OVERLAP
    return list(range(0, max(size - OVERLAP, 1), stride))


def tiled(generate, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`generate` at native resolution on one (1, C, H, W) image, tile by tile; memory ~ TILE^2 x batch."""
    _, c, h, w = x.shape
    if h <= TILE and w <= TILE:
        return generate(x)
    ys, xs = _tile_starts(h), _tile_starts(w)
    pad_h, pad_w = max(ys[-1] + TILE - h, 0), max(xs[-1] + TILE - w, 0)
    padded = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    acc = torch.zeros(1, c, h + pad_h, w + pad_w, device=x.device)
    weight = torch.zeros(1, 1, h + pad_h, w + pad_w, device=x.device)
    ramp = _ramp(TILE, OVERLAP, x.device)
    window = ramp[:, None] * ramp[None, :]
    starts = [(y, x0) for y in ys for x0 in xs]
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        noise = generate(torch.cat([padded[..., y : y + TILE, x0 : x0 + TILE] for y, x0 in chunk]))
        for (y, x0), n in zip(chunk, noise):
            acc[..., y : y + TILE, x0 : x0 + TILE] += n * window
            weight[..., y : y + TILE, x0 : x0 + TILE] += window
    return (acc / weight)[..., :h, :w]


def to_float(image: np.ndarray, device: torch.device, size: tuple[int, int] | None = None) -> torch.Tensor:
    """One (H, W, C) image as a (1, C, h, w) float batch entry in [0, 1], resized to `size` if given.

    8-bit pixels cross to the device as bytes (4x less host->device traffic than float32). On the CPU
    an 8-bit image is resized before it becomes float: torch's uint8 antialiased kernel is ~40x
    faster than the float one on 12 MP (docs/performance.md), and its output differs from the float
    resize by under one level. Other cases (16-bit, CUDA) resize in float.
    """
    max_value = 65535.0 if image.dtype == np.uint16 else 255.0
    resize = size is not None and tuple(image.shape[:2]) != size
    x = as_tensor(image if image.dtype == np.uint8 else image.astype(np.float32)).to(device).permute(2, 0, 1)[None]
    if resize and image.dtype == np.uint8 and device.type == "cpu":
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return x.float().div_(max_value).contiguous()
    x = x.float() / max_value
    if resize:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x


class ProtectEngine:
    """Loads a generator once and protects batches of pixel arrays with it."""

    def __init__(self, cfg: EngineConfig) -> None:
        check_epsilon(cfg.epsilon)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.generator, self.meta = load_generator(cfg.weights, self.device)
        self.weights_sha256 = file_sha256(cfg.weights)
        self.epsilon = float(cfg.epsilon if cfg.epsilon is not None else self.meta.epsilon)
        self.mask_floor = mask_floor_for(cfg.mask_floor, self.meta)
        self.add_noise = NoiseAdder(self.epsilon, self.device)

    def working_shape(self, height: int, width: int) -> tuple[int, int]:
        """The generator input shape for an image; --full-res runs tiles of the native image instead."""
        if self.cfg.full_res:
            return height, width
        return working_shape(height, width, self.meta.working_size)

    def generate(self, x: torch.Tensor) -> torch.Tensor:
        """G on a (B, C_img, h, w) float batch -> noise direction (B, C_img, h, w) in [-1, 1]."""
        return self.generate_coded(x)[0]

    def generate_coded(self, x: torch.Tensor, forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`generate`, with `forced` (B,) codes (-1 = let the encoder guess); also returns the (B,) codes used.

        A forced code gives the image exactly that code's tile (one-hot mixing weights, also for the
        soft-code confounder-v1); a guessed code is the encoder's top code. The direction is scaled
        by the local-activity mask of the same input (core/noise.py) when the weights or --mask-floor
        ask for one, so flat regions get less of the budget.
        """
        image, c_img, c_gen = x, x.shape[1], self.meta.channels
        if c_img == 1 and c_gen == 3:
            x = x.expand(-1, 3, -1, -1)
        elif c_img == 3 and c_gen == 1:
            x = luma(x)
        num_codes = self.generator.num_codes
        with autocast_context(self.device, self.precision):
            if forced is not None and bool((forced >= 0).all()):
                weights = F.one_hot(forced.long(), num_codes).float()  # every code given: the encoder is not run
            else:
                weights = self.generator.codes(x).float()
                if forced is not None:
                    known = forced >= 0
                    weights[known] = F.one_hot(forced[known].long(), num_codes).float()
            g = self.generator(x, codes=weights)
        g = g.float().clamp(-1.0, 1.0)
        if c_img == 1 and c_gen == 3:
            g = g.mean(1, keepdim=True)
        elif c_img == 3 and c_gen == 1:
            g = g.expand(-1, 3, -1, -1)
        if self.mask_floor < NO_MASK:
            g = g * activity_mask(image, self.mask_floor)
        return g, weights.argmax(dim=1)

    def check_codes(self, codes: list[int | None] | None, count: int) -> torch.Tensor | None:
        """Per-image codes (None = guess) as a (count,) tensor with -1 for a guess; range-checked."""
        if codes is None:
            return None
        if len(codes) != count:
            raise ValueError(f"{count} images but {len(codes)} codes")
        num_codes = self.generator.num_codes
        bad = [c for c in codes if c is not None and not 0 <= c < num_codes]
        if bad:
            raise ValueError(f"code {bad[0]} is outside this generator's codes 0..{num_codes - 1}")
        return torch.tensor([-1 if c is None else int(c) for c in codes], dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def protect_batch(self, images: list[np.ndarray], codes: list[int | None] | None = None) -> list[np.ndarray]:
        """Protect (H, W, C) uint8/uint16 arrays (C = 1 or 3); any mix of sizes. Order is kept.

        `codes`: one per image, the pattern it must carry (e.g. its true label), None = the encoder's guess.
        """
        return self.protect_batch_coded(images, codes)[0]

    @torch.inference_mode()
    def protect_batch_coded(self, images: list[np.ndarray], codes: list[int | None] | None = None) -> tuple[list[np.ndarray], list[int]]:
        """`protect_batch`, also returning the code each image got (what the manifest records).

        --full-res: every tile of an image gets the image's forced code; a guessed code is guessed per
        tile, and the code recorded is the one most of its tiles got.
        """
        forced = self.check_codes(codes, len(images))
        if self.cfg.full_res:
            out, used = [], []
            for i, image in enumerate(images):
                tile_codes: list[torch.Tensor] = []

                def generate(t: torch.Tensor, i: int = i, tile_codes: list = tile_codes) -> torch.Tensor:
                    g, c = self.generate_coded(t, None if forced is None else forced[i : i + 1].expand(len(t)))
                    tile_codes.append(c)
                    return g

                out.append(self.add_noise(image, tiled(generate, to_float(image, self.device), self.cfg.batch_size)))
                used.append(int(torch.cat(tile_codes).mode().values))
            return out, used
        out: list[np.ndarray | None] = [None] * len(images)
        used_codes: list[int] = [0] * len(images)
        groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[(*self.working_shape(*image.shape[:2]), image.shape[2])].append(i)
        for (wh, ww, _c), idx in groups.items():
            for start in range(0, len(idx), self.cfg.batch_size):
                chunk = idx[start : start + self.cfg.batch_size]
                noise, chunk_codes = self.generate_coded(torch.cat([to_float(images[i], self.device, (wh, ww)) for i in chunk]),
                                                         None if forced is None else forced[chunk])
                for i, n, c in zip(chunk, noise, chunk_codes.tolist()):
                    out[i] = self.add_noise(images[i], n[None])
                    used_codes[i] = c
        return out, used_codes  # type: ignore[return-value]

    def describe(self) -> dict:
        """What summary.json records about the weights."""
        return {"path": str(self.cfg.weights), "sha256": self.weights_sha256, "mask_floor": self.mask_floor, "metadata": self.meta.described()}
