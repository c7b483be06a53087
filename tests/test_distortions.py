"""The distortion layer of `cgan train`: every distortion keeps shape and range, passes the gradient it
claims, repeats under a seed, and the clean and protected batches always get the same draw."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cgan_cli.cli import app
from cgan_cli.learning.config import Distortions
from cgan_cli.learning.distortions import (
    REGISTRY,
    check,
    distort_pair,
    jpeg,
    jpeg_round_trip,
    shift,
)

CFG = Distortions()


def _batch(channels: int, seed: int = 0, side: int = 28) -> torch.Tensor:
    return torch.rand(6, channels, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_distortion_keeps_shape_and_range_and_repeats_under_a_seed(name: str, channels: int) -> None:
    x = _batch(channels)
    a = REGISTRY[name](x, torch.Generator().manual_seed(5), CFG)
    b = REGISTRY[name](x, torch.Generator().manual_seed(5), CFG)
    assert a.shape == x.shape
    assert a.min() >= -1e-6 and a.max() <= 1 + 1e-6
    assert torch.equal(a, b)
    if name != "grayscale" or channels == 3:  # grayscale is the identity on 1-channel data
        assert not torch.equal(a, x)


@pytest.mark.parametrize("name", ["resize", "blur", "grayscale", "shift", "crop_flip"])
def test_differentiable_distortions_pass_a_gradient_to_every_pixel_they_read(name: str) -> None:
    x = _batch(3).requires_grad_(True)
    weights = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    (REGISTRY[name](x, torch.Generator().manual_seed(2), CFG) * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad != 0).float().mean() > 0.5  # not a detached or constant output


def test_jpeg_is_a_real_codec_with_a_straight_through_gradient() -> None:
    x = _batch(3, side=32)
    cfg = dataclasses.replace(CFG, jpeg_min=40, jpeg_max=40)
    x8 = torch.round(x * 255) / 255
    out = jpeg(x8.clone().requires_grad_(True), torch.Generator().manual_seed(0), cfg)
    levels = out.detach() * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # decoded 8-bit pixels
    assert (out.detach() - x8).abs().mean() > 2 / 255  # q40 changes random pixels a lot
    # Straight through: d(sum out)/dx is exactly 1 everywhere.
    xr = x8.clone().requires_grad_(True)
    jpeg(xr, torch.Generator().manual_seed(0), cfg).sum().backward()
    assert torch.equal(xr.grad, torch.ones_like(xr))
    # With zero grid offset the forward pass is Pillow's own encode + decode at that quality.
    arr = np.asarray(Image.fromarray((x8[0].permute(1, 2, 0) * 255).round().byte().numpy()))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=40, subsampling=2)
    reference = torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))).float()

    assert torch.equal(torch.from_numpy(np.array(jpeg_round_trip(arr, 40, (0, 0)))).float(), reference)


def test_subpixel_shift_averages_away_a_period_2_checkerboard() -> None:
    """Why the shift distortion exists: half a pixel off the grid, a Nyquist pattern loses most of its amplitude."""
    yy, xx = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    board = 0.5 + 0.1 * (((yy + xx) % 2) * 2 - 1).float()[None, None]
    cfg = dataclasses.replace(CFG, shift_max=0.5)
    amplitudes = []
    for seed in range(20):
        out = shift(board, torch.Generator().manual_seed(seed), cfg)
        amplitudes.append(float((out - 0.5)[..., 2:-2, 2:-2].abs().mean()))
    assert min(amplitudes) < 0.1 * 0.5  # some draws remove at least half of it
    assert max(amplitudes) <= 0.1 + 1e-6


def test_pair_gets_the_same_draw_so_equal_inputs_stay_equal() -> None:
    x = _batch(3)
    cfg = dataclasses.replace(CFG, resize=1.0, jpeg=1.0, blur=1.0, grayscale=1.0, shift=1.0, crop_flip=1.0)
    for seed in range(5):
        a, b = distort_pair(x, x.clone(), torch.Generator().manual_seed(seed), cfg)
        assert torch.equal(a, b)
    noisy = (x + 0.03).clamp(0, 1)
    a, b = distort_pair(x, noisy, torch.Generator().manual_seed(0), cfg)
    assert (b - a).abs().mean() < 0.03 + 0.01  # no crop mismatch: the difference stays noise-sized


def test_no_distortions_leave_the_pair_untouched() -> None:
    x = _batch(1)
    a, b = distort_pair(x, x + 0.01, torch.Generator().manual_seed(0), Distortions.none())
    assert torch.equal(a, x) and torch.equal(b, x + 0.01)


def test_impossible_ranges_are_usage_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="jpeg quality range"):
        check(dataclasses.replace(CFG, jpeg_min=90, jpeg_max=30))
    with pytest.raises(ValueError, match="resize range"):
        check(dataclasses.replace(CFG, resize_min=2.0, resize_max=0.5))
    result = CliRunner().invoke(app, ["train", "fashion-mnist", "--out", str(tmp_path / "g.safetensors"),
                                      "--dist-jpeg-min", "90", "--dist-jpeg-max", "30", "--device", "cpu"])
    assert result.exit_code == 2 and "jpeg quality range" in result.output
    assert not (tmp_path / "g.safetensors").exists()


def test_every_registered_distortion_has_its_probability_field() -> None:
    assert set(REGISTRY) == set(Distortions.PROBABILITIES)
    assert all(getattr(Distortions.none(), name) == 0.0 for name in REGISTRY)
