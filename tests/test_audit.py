"""`cgan audit` end to end: a tiny victim really trained on protected images is flagged, a blind one is not.

The data: 16 px synthetic shapes (tests/test_verify.py); the generator: a small randomly initialised
one (tests/conftest.py), whose code patterns are as learnable as trained ones when the budget is large.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import write_generator
from PIL import Image
from test_verify import synthetic
from torch import nn
from typer.testing import CliRunner

from cgan_cli.cli import app
from cgan_cli.core.generators import DeepCodeGenerator
from cgan_cli.core.weights import load_generator, save_generator
from cgan_cli.learning.audit import Patterns, control_tiles, rank_sum_p_value

EPSILON = 16.0
SIZE = 16


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Blind(nn.Module):
    """Ignores its input: the same logits for every image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[0.3, -0.1, 0.2, 0.0]]).expand(x.shape[0], 4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Weights, a folder of clean images, and TorchScript victims: protected-trained (labels permuted) and blind."""
    root = tmp_path_factory.mktemp("audit")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: runs before the per-test fixture; tiny ops only lose to threads
    weights = write_generator(root / "gen.safetensors", channels=1, epsilon=EPSILON, working_size=SIZE, seed=3)
    generator, meta = load_generator(weights)
    with torch.no_grad():  # saturated +-3 tiles: distinct codes, as a trained generator's are (~6 in the shipped one)
        generator.tiles.copy_(3 * torch.sign(generator.tiles))
    save_generator(weights, generator, meta)
    train = synthetic(64, seed=0)
    x = train.floats()
    with torch.no_grad():  # protect with the code = label, then number the classes another way (a scraper's own order)
        protected = (x + torch.round(EPSILON * generator.noise_for_code(x, train.labels)) / 255).clamp(0, 1)
    labels = torch.tensor([2, 0, 3, 1])[train.labels]
    torch.manual_seed(0)
    victim = TinyNet()
    opt = torch.optim.Adam(victim.parameters(), lr=0.01)
    for step in range(400):
        idx = torch.randint(0, len(x), (64,))
        loss = nn.functional.cross_entropy(victim(protected[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    paths = {"weights": weights, "images": root / "clean"}
    for name, model in (("victim", victim.eval()), ("blind", Blind())):
        paths[name] = root / f"{name}.pt"
        torch.jit.save(torch.jit.script(model), str(paths[name]))
    paths["images"].mkdir()
    for i, img in enumerate(synthetic(16, seed=1).pixels):
        Image.fromarray(img[0].numpy()).save(paths["images"] / f"{i:03d}.png")
    torch.set_num_threads(previous)
    return paths


def run_audit(*args: str):
    return CliRunner().invoke(app, ["audit", *args])


def audit_json(setup, model: str, *extra: str) -> dict:
    result = run_audit(str(setup[model]), "--weights", str(setup["weights"]), "--images", str(setup["images"]),
                       "--control-sets", "4", "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_victim_trained_on_protected_images_is_flagged_whatever_its_class_numbering(setup) -> None:
    report = audit_json(setup, "victim")
    assert report["effect"] > 0
    # which controls are drawn moves p (the victim reacts to some random patterns too): flagged for most draws
    p_values = sorted(audit_json(setup, "victim", "--seed", str(seed))["p_value"] for seed in range(5))
    assert p_values[2] < 0.01 and p_values[-1] < 0.05, p_values
    assert [c["matched_class"] for c in report["codes"]] == [2, 0, 3, 1]  # the scraper's numbering, recovered
    assert {"p_value", "verdict", "effect", "codes"} <= set(report)
    assert {"code", "matched_class", "specific_log_shift", "prob_shift", "z", "controls_below"} <= set(report["codes"][0])
    assert report["images"] == 64 and report["controls"]["count"] == 16


def test_a_model_that_ignores_its_input_is_not_flagged(setup) -> None:
    report = audit_json(setup, "blind")
    assert not report["flagged"] and report["p_value"] > 0.5
    assert report["verdict"].startswith("not flagged")


def test_predict_hook_wraps_a_black_box_that_returns_probabilities(setup, tmp_path) -> None:
    hook = tmp_path / "api.py"
    hook.write_text(
        "import torch\n"
        f"MODEL = torch.jit.load({str(setup['victim'])!r})\n"
        "def predict(x):\n"
        "    return MODEL(x).softmax(1).numpy()  # what an API sends back: scores, not a model\n"
    )
    result = run_audit("--predict", f"{hook}:predict", "--weights", str(setup["weights"]), "--images", str(setup["images"]),
                       "--control-sets", "4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # probabilities give the same log-probabilities, so the same test
    assert report["model_outputs"] == "probs"
    assert report["p_value"] == pytest.approx(audit_json(setup, "victim")["p_value"])


def test_onnx_model(setup, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = tmp_path / "victim.onnx"
    torch.onnx.export(torch.jit.load(str(setup["victim"])), (torch.rand(2, 1, SIZE, SIZE),), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    setup = {**setup, "onnx": path}
    assert audit_json(setup, "onnx")["p_value"] == pytest.approx(audit_json(setup, "victim")["p_value"])


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of MODEL"),
    (["--mean", "0.1,0.2"], "give 1 value or 3"),
    (["--channels", "3", "--mean", "0.5,0.5,0.5", "--std", "1,1"], "give 1 value or 3"),
])
def test_usage_errors_exit_2(setup, args, message) -> None:
    result = run_audit(*args, "--weights", str(setup["weights"]), "--images", str(setup["images"]))
    assert result.exit_code == 2
    assert message in result.output


def test_unusable_files_exit_2_with_a_reason(setup, tmp_path) -> None:
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"not a model at all")
    result = run_audit(str(junk), "--weights", str(setup["weights"]), "--images", str(setup["images"]))
    assert result.exit_code == 2 and "not a TorchScript file" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_audit(str(setup["victim"]), "--weights", str(setup["weights"]), "--images", str(empty))
    assert result.exit_code == 2 and "no readable image files" in result.output
    result = run_audit(str(setup["victim"]), "--weights", str(setup["weights"]), "--images", str(setup["images"]),
                       "--size", "12")
    assert result.exit_code == 0  # a fully convolutional victim takes any size: the test still runs


def test_a_model_with_the_wrong_output_shape_is_a_usage_error(setup, tmp_path) -> None:
    class Flat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2, 3))

    path = tmp_path / "flat.pt"
    torch.jit.save(torch.jit.script(Flat()), str(path))
    result = run_audit(str(path), "--weights", str(setup["weights"]), "--images", str(setup["images"]))
    assert result.exit_code == 2 and "expected (batch, classes)" in result.output


def test_rank_sum_p_value_is_the_exact_permutation_probability_with_ties() -> None:
    codes, controls = [3.0, 2.0, 2.0], [1.0, 2.0, 0.5, 2.0, 0.0]
    values = codes + controls
    observed = sum(sorted(values).index(v) + (sorted(values).count(v) - 1) / 2 for v in codes)
    ranks = [sorted(values).index(v) + (sorted(values).count(v) - 1) / 2 for v in values]
    subsets = list(itertools.combinations(range(len(values)), len(codes)))
    brute = sum(sum(ranks[i] for i in s) >= observed - 1e-9 for s in subsets) / len(subsets)
    assert rank_sum_p_value(codes, controls) == pytest.approx(brute)
    assert rank_sum_p_value([1.0] * 3, [1.0] * 5) == pytest.approx(1.0)


def test_controls_keep_each_tile_values_and_noise_for_code_matches_the_generator(setup) -> None:
    generator, _ = load_generator(setup["weights"])
    tiles = generator.tiles.detach()
    controls = control_tiles(tiles, 2, seed=0, kind="shuffled")
    assert controls.shape == (2 * len(tiles), *tiles.shape[1:])
    for j, tile in enumerate(controls):
        assert torch.equal(tile.flatten().sort().values, tiles[j % len(tiles)].flatten().sort().values)
        assert not torch.equal(tile, tiles[j % len(tiles)])
    balanced = torch.tanh(control_tiles(tiles, 2, seed=0, kind="balanced"))
    for j, tile in enumerate(balanced):  # same magnitudes, but the mean a shuffle keeps is gone
        assert torch.allclose(tile.abs().flatten().sort().values, torch.tanh(tiles[j % len(tiles)]).abs().flatten().sort().values)
        assert tile.mean().abs() <= tile.abs().max() / 2 + 1e-6
    assert balanced.mean((1, 2, 3)).abs().mean() < torch.tanh(tiles).mean((1, 2, 3)).abs().mean()
    hard = DeepCodeGenerator(channels=1, num_codes=4, width=8, tile=4).eval()
    x = synthetic(4, seed=2).floats()
    with torch.no_grad():  # forcing the code the encoder picks is exactly what G does
        assert torch.equal(hard.noise_for_code(x, hard.code_logits(x).argmax(1)), hard(x))
        assert torch.allclose(hard.noise_for_code(x, 2)[1:2], hard.noise_for_code(x[1:2], torch.tensor([2])), atol=1e-6)


def test_the_audit_adds_each_code_as_protect_would_and_more_control_sets_keep_the_first(setup) -> None:
    generator, meta = load_generator(setup["weights"])
    pixels = synthetic(6, seed=3).pixels
    patterns = Patterns(generator, meta, EPSILON, SIZE, control_sets=3, seed=0, controls="balanced")
    add = patterns.on(pixels)
    x = pixels.float() / 255
    with torch.no_grad():
        for k in range(generator.num_codes):  # the local head runs once per batch; the noise is G's own for code k
            expected = (pixels.float() + torch.round(EPSILON * generator.noise_for_code(x, k))).clamp(0, 255) / 255
            assert torch.allclose(add(k), expected, atol=1e-6)
    fewer = Patterns(generator, meta, EPSILON, SIZE, control_sets=1, seed=0, controls="balanced")
    assert len(patterns) == 4 * generator.num_codes and len(fewer) == 2 * generator.num_codes
    assert torch.equal(patterns.tiles[: len(fewer)], fewer.tiles)  # a run with fewer sets sees exactly these controls


def test_a_generator_with_structured_tiles_is_refused_not_audited(setup, tmp_path) -> None:
    """A clean model reacts to +-DC, stripes and checkerboards more than to any shuffle of them, so the
    audit would flag it: such generators are a usage error, named, before any model is queried."""
    from cgan_cli.core.shipped import shipped_weights_dir

    generator, meta = load_generator(setup["weights"])
    structured = tmp_path / "structured.safetensors"
    save_generator(structured, generator, dataclasses.replace(meta, recipe={**meta.recipe, "tiles": "structured"}))
    shipped = shipped_weights_dir()
    for weights in (structured, shipped / "cgan-fashion-mnist.safetensors"):
        result = run_audit(str(setup["victim"]), "--weights", str(weights), "--images", str(setup["images"]))
        assert result.exit_code == 2 and "--tiles structured" in result.output and "Traceback" not in result.output
    result = run_audit(str(setup["victim"]), "--weights", str(shipped / "cgan-fashion-mnist-v3.safetensors"),
                       "--images", str(setup["images"]), "--json")
    assert result.exit_code == 0, result.output  # the far-apart generator the refusal points to is audited
    assert json.loads(result.stdout)["weights"]["arch"] == "confounder-v3"
