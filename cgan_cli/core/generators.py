"""The confounder generators, as plain `nn.Module`s, and the formula that turns their output into a protected image.

Every image tensor here is float in [0, 1], shape (B, C, H, W). Both sides use this module: the
protect engine loads a generator to run it, `cgan train` builds one to train it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    # GroupNorm, not BatchNorm: a protected image must not depend on what else is in its batch.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
        nn.GroupNorm(min(8, c_out), c_out),
        nn.SiLU(inplace=True),
    )


class ConfounderGenerator(nn.Module):
    """Image -> noise direction in [-1, 1]; the protected image is clamp(x + epsilon * G(x)).

    Fully convolutional. An encoder reads the image and outputs soft "confounder codes" (it learns
    to guess the label, since the noise must predict the label while the label is never an input);
    the codes mix a bank of learned periodic tiles, which are repeated over the whole image (so the
    shortcut survives crops and shifts), and a small local head adds an image-dependent texture.
    Output is tanh-bounded, so epsilon * G(x) respects the L-inf budget exactly.
    """

    arch = "confounder-v1"

    def __init__(self, channels: int = 3, num_codes: int = 10, width: int = 32, tile: int = 8) -> None:
        super().__init__()
        self.channels, self.num_codes, self.width, self.tile = channels, num_codes, width, tile
        self.encoder = nn.Sequential(
            _conv_block(channels, width),
            _conv_block(width, 2 * width, stride=2),
            _conv_block(2 * width, 4 * width, stride=2),
            _conv_block(4 * width, 4 * width),
        )
        self.code_head = nn.Conv2d(4 * width, num_codes, 1)
        self.tiles = nn.Parameter(torch.randn(num_codes, channels, tile, tile))
        self.local_head = nn.Sequential(_conv_block(channels, width), nn.Conv2d(width, channels, 3, padding=1))

    def arch_params(self) -> dict[str, int]:
        return {"channels": self.channels, "num_codes": self.num_codes, "width": self.width, "tile": self.tile}

    def code_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_codes) logits: which confounder pattern this image gets."""
        return self.code_head(self.encoder(x)).mean(dim=(2, 3))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_codes) mixing weights of the tiles."""
        return self.code_logits(x).softmax(dim=1)

    def forward(self, x: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """Noise direction for `x`; `codes` (B,) indices or (B, num_codes) mixing weights replace the
        encoder's guess when the caller knows which pattern each image must carry (its true label)."""
        codes = self.codes(x) if codes is None else as_code_weights(codes, self.num_codes).to(x.dtype)
        return self.tiled_noise(x, torch.einsum("bk,kcij->bcij", codes, self.tiles))

    def tiled_noise(self, x: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
        """tanh(per-image tile (B, C, t, t) repeated over the image + local head): G's output for given tiles."""
        return self.noise_over(self.local(x), tiles)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """The local head's (B, C, H, W) image-dependent part, added to the tiles before the tanh."""
        return self.local_head(x)

    @staticmethod
    def noise_over(local: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
        """tanh(tiles repeated over `local`, the local head's (B, C, H, W) output): the tile part alone, so a
        caller trying many tiles on the same images (`cgan audit`) runs the local head once."""
        h, w = local.shape[-2:]
        reps = (-(-h // tiles.shape[-2]), -(-w // tiles.shape[-1]))
        pattern = tiles.repeat(1, 1, *reps)[..., :h, :w]
        return torch.tanh(pattern + local)

    def noise_for_code(self, x: torch.Tensor, code: int | torch.Tensor) -> torch.Tensor:
        """The noise direction G would add to `x` had its encoder chosen `code` (an int, or (B,) ints).

        The encoder is skipped, so the pattern follows the given code, not a guess: what protecting with
        known labels needs, and what `cgan audit` shows a model to see if it learned the shortcut.
        """
        return self.forward(x, torch.as_tensor(code, device=x.device).expand(x.shape[0]))


def as_code_weights(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """(B,) code indices -> (B, num_codes) one-hot mixing weights; (B, num_codes) weights pass through."""
    if codes.dim() == 1:
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= num_codes):
            raise ValueError(f"code out of range 0..{num_codes - 1}")
        return F.one_hot(codes.long(), num_codes).float()
    if codes.dim() != 2 or codes.shape[1] != num_codes:
        raise ValueError(f"codes must be (B,) indices or (B, {num_codes}) weights, got shape {tuple(codes.shape)}")
    return codes


class HardCodeGenerator(ConfounderGenerator):
    """confounder-v1's structure, but every image gets exactly one tile: the encoder's top code.

    Soft mixing weakens the pattern wherever the encoder is unsure (tiles of opposite sign average
    out); measured on Fashion-MNIST that left the noise far less learnable (docs/method.md). The
    codes are trained before the tiles and then frozen, so the argmax needs no gradient.
    """

    arch = "confounder-v2"

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.code_logits(x)
        return F.one_hot(logits.argmax(dim=1), self.num_codes).to(logits.dtype)


class DeepCodeGenerator(HardCodeGenerator):
    """confounder-v2 with an encoder that can actually fit the training images.

    v1/v2 read the class from a linear map of globally pooled 4-layer features, which stalled at
    ~90% train accuracy on Fashion-MNIST and ~63% on the 560 RGB stamps; every misread image gets
    another class's pattern, and that is what let victims learn the content (docs/method.md). v3
    downsamples three times (receptive field covers a 64 px image) and reads the pooled features
    with a two-layer head. Same tiles, local head and output bound.
    """

    arch = "confounder-v3"

    def __init__(self, channels: int = 3, num_codes: int = 10, width: int = 32, tile: int = 8) -> None:
        super().__init__(channels, num_codes, width, tile)
        self.encoder = nn.Sequential(
            _conv_block(channels, width),
            _conv_block(width, 2 * width, stride=2),
            _conv_block(2 * width, 2 * width),
            _conv_block(2 * width, 4 * width, stride=2),
            _conv_block(4 * width, 4 * width),
            _conv_block(4 * width, 8 * width, stride=2),
        )
        self.code_head = nn.Sequential(nn.Linear(8 * width, 8 * width), nn.SiLU(inplace=True), nn.Linear(8 * width, num_codes))

    def code_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.code_head(self.encoder(x).mean(dim=(2, 3)))


class CenteredLocalGenerator(DeepCodeGenerator):
    """confounder-v3 whose local head cannot shift a whole image: its output loses its per-image,
    per-channel mean, so a constant offset, the one pattern no crop or flip changes, comes only from
    a class's tile. One v3 local head trained with the structured bank learned a +1.5 offset on every
    image, adding +DC to every class; its victims scored 9 points above two seeds without it
    (docs/method.md, Measurement 9). Same parameters as v3, so `cgan train --codes-from` takes a v3 encoder."""

    arch = "confounder-v4"

    def local(self, x: torch.Tensor) -> torch.Tensor:
        out = self.local_head(x)
        return out - out.mean(dim=(-2, -1), keepdim=True)


GENERATORS: dict[str, type[nn.Module]] = {
    cls.arch: cls for cls in (ConfounderGenerator, HardCodeGenerator, DeepCodeGenerator, CenteredLocalGenerator)
}


def build_generator(arch: str, params: dict[str, int]) -> nn.Module:
    """Construct a generator by the architecture name and hyper-parameters stored with its weights."""
    if arch not in GENERATORS:
        raise ValueError(f"unknown generator architecture {arch!r}; this cgan knows {sorted(GENERATORS)}")
    return GENERATORS[arch](**params)


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] floats to the 256 levels an 8-bit file can hold."""
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


def protect_tensor(generator: nn.Module, x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Protected images clamp(x + epsilon/255 * G(x)), quantized to 8 bits as a written file would be.

    `x` is float in [0, 1] at the generator's working resolution; epsilon is in /255 units. Rounding
    can move a pixel by at most half a level, so the delivered L-inf is <= epsilon + 0.5 (in /255).
    """
    noise = (epsilon / 255.0) * generator(x)
    return quantize_8bit(x + noise)
