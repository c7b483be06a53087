"""Each countermeasure transforms the victim's training data exactly as documented."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cgan_cli.core.choices import COUNTERMEASURES
from cgan_cli.learning.countermeasures import (
    REGISTRY,
    adversarial_hook,
    gaussian_blur,
    grayscale,
    jpeg,
    parse_countermeasure,
    rescale,
    strong_aug_hook,
)
from cgan_cli.learning.nets import SmallCNN


def textured(n: int = 6, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth gradients plus per-pixel noise: content for JPEG to lose and blur to smooth."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    smooth = (ramp[None, :] + ramp[:, None]) / 2
    x = 0.7 * smooth + 0.3 * torch.rand(n, channels, size, size, generator=gen)
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8)


def checkerboard(n: int = 2, channels: int = 1, size: int = 32) -> torch.Tensor:
    idx = torch.arange(size)
    board = ((idx[:, None] + idx[None, :]) % 2).to(torch.uint8) * 255
    return board.expand(n, channels, size, size).contiguous()


def high_freq_energy(pixels: torch.Tensor) -> float:
    """Energy of the discrete Laplacian: large for pixel-level noise, zero for flat regions."""
    x = pixels.float() / 255
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(x, lap, groups=x.shape[1]).pow(2).mean().item()


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_returns_valid_8bit_images_that_differ_more_at_low_quality(channels: int) -> None:
    x = textured(channels=channels)
    low, high = jpeg(x, 10), jpeg(x, 95)
    for out in (low, high):
        assert out.dtype == torch.uint8 and out.shape == x.shape
    diff_low = (low.int() - x.int()).abs().float().mean().item()
    diff_high = (high.int() - x.int()).abs().float().mean().item()
    assert diff_high > 0  # even quality 95 re-quantizes noisy pixels (and subsamples colour on RGB)
    assert diff_low > 1.2 * diff_high + 1
    assert diff_low < 60  # still the same picture, not garbage


def test_jpeg_matches_a_pil_round_trip_of_the_same_image() -> None:
    x = textured(n=1, channels=3)
    out = jpeg(x, 60)
    buf = io.BytesIO()
    Image.fromarray(x[0].permute(1, 2, 0).numpy(), "RGB").save(buf, format="JPEG", quality=60)
    expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert np.array_equal(out[0].permute(1, 2, 0).numpy(), expected)


def test_grayscale_makes_channels_equal_and_matches_pil_luma() -> None:
    x = textured(channels=3)
    out = grayscale(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    pil_luma = np.asarray(Image.fromarray(x[0].permute(1, 2, 0).numpy(), "RGB").convert("L")).astype(int)
    assert np.abs(out[0, 0].numpy().astype(int) - pil_luma).max() <= 1
    gray = textured(channels=1)
    assert torch.equal(grayscale(gray), gray)


def test_blur_removes_high_frequency_energy_and_keeps_flat_images() -> None:
    x = textured(channels=3)
    mild, strong = gaussian_blur(x, 0.7), gaussian_blur(x, 2.0)
    assert mild.shape == x.shape and mild.dtype == torch.uint8
    assert high_freq_energy(mild) < 0.5 * high_freq_energy(x)
    assert high_freq_energy(strong) < high_freq_energy(mild)
    flat = torch.full((1, 3, 16, 16), 137, dtype=torch.uint8)
    assert torch.equal(gaussian_blur(flat, 1.5), flat)


def test_rescale_keeps_shape_and_destroys_pixel_level_patterns() -> None:
    board = checkerboard()
    out = rescale(board, 2)
    assert out.shape == board.shape and out.dtype == torch.uint8
    assert high_freq_energy(out) < 0.05 * high_freq_energy(board)
    assert (out.float() - 127.5).abs().max() < 20  # the pattern averages to gray
    smooth = textured(channels=1)
    smooth = gaussian_blur(smooth, 2.0)  # content at coarse scale survives
    assert (rescale(smooth, 2).int() - smooth.int()).abs().float().mean() < 6


def test_strong_aug_cuts_out_mixes_and_returns_soft_targets() -> None:
    x = torch.zeros(8, 1, 16, 16)
    y = torch.arange(8) % 4
    out, target = strong_aug_hook(seed=3, num_classes=4)(x, y, torch.nn.Identity())
    assert out.shape == x.shape and target.shape == (8, 4)
    assert torch.allclose(target.sum(1), torch.ones(8))
    assert ((target > 0).sum(1) <= 2).all()  # a mix of at most two labels
    assert (out > 0).any()  # cut-out squares (gray) appear in the black images
    assert (out > 0).float().mean() < 0.9  # but do not cover everything
    again, target2 = strong_aug_hook(seed=3, num_classes=4)(x, y, torch.nn.Identity())
    assert torch.equal(out, again) and torch.equal(target, target2)


def test_adversarial_hook_stays_in_budget_and_raises_the_loss() -> None:
    torch.manual_seed(0)
    model = SmallCNN(1, 4, width=8).train()
    x = torch.rand(16, 1, 16, 16)
    y = torch.randint(0, 4, (16,))
    out = adversarial_hook(seed=0, num_classes=4, epsilon=8)(x, y, model)
    assert model.training  # the hook restores the training mode it found
    assert (out - x).abs().max() <= 8 / 255 + 1e-6
    assert out.min() >= 0 and out.max() <= 1
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(out), y) > F.cross_entropy(model(x), y)


def test_parse_countermeasure_accepts_the_documented_forms_and_rejects_others() -> None:
    x = textured(n=2, channels=3, size=16)
    assert torch.equal(parse_countermeasure("none").apply(x), x)
    assert torch.equal(parse_countermeasure("jpeg:75").apply(x), jpeg(x, 75))
    assert torch.equal(parse_countermeasure("blur:1.5").apply(x), gaussian_blur(x, 1.5))
    assert torch.equal(parse_countermeasure("rescale:2").apply(x), rescale(x, 2))
    assert torch.equal(parse_countermeasure("grayscale").apply(x), grayscale(x))
    assert parse_countermeasure("strong-aug").hook(0, 10) is not None
    assert parse_countermeasure("adv:4").hook(0, 10) is not None
    assert parse_countermeasure("jpeg:75").hook(0, 10) is None
    for bad in ("jpeg:0", "jpeg:abc", "rescale:1", "blur:-1", "sharpen", "jpeg", "grayscale:2"):
        with pytest.raises(ValueError):
            parse_countermeasure(bad)


def test_registry_and_cli_help_list_the_same_countermeasures() -> None:
    """A countermeasure is one builder in REGISTRY plus one help line in COUNTERMEASURES: never one without the other."""
    assert list(REGISTRY) == list(COUNTERMEASURES)
    x = textured(n=1, channels=3, size=16)
    for form in COUNTERMEASURES:
        name, _, arg = form.partition(":")
        spec = f"{name}:2" if arg else name  # 2 is valid for every argument (quality, sigma, factor, eps)
        parsed = parse_countermeasure(spec)
        assert parsed.spec == spec
        assert parsed.apply(x).shape == x.shape
