"""`cgan verify` end to end on tiny synthetic data written by the tests.

The synthetic task: 4 classes of faint oriented shapes (bar, bar, diagonal, ring) under pixel noise,
learnable by a small CNN in a few epochs; a large class-wise pattern is an easier shortcut.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cgan_cli.cli import app
from cgan_cli.core.generators import ConfounderGenerator
from cgan_cli.core.weights import WeightsMeta, file_sha256, save_generator
from cgan_cli.learning.baselines import (
    classwise_noise,
    error_minimizing_noise,
    random_noise,
)
from cgan_cli.learning.config import EMConfig, VerifyConfig, VictimConfig
from cgan_cli.learning.data import LabeledImages, load_image_folder
from cgan_cli.learning.verify import (
    Method,
    VerifyError,
    match_protected,
    measured_linf,
    run_victims,
)

CLASSES = ["bar-h", "bar-v", "diagonal", "ring"]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on shared CI cores
    yield
    torch.set_num_threads(previous)


def synthetic(n_per_class: int, seed: int, size: int = 16, channels: int = 1) -> LabeledImages:
    gen = torch.Generator().manual_seed(seed)
    c, idx = size // 2, torch.arange(2, size - 2)
    shapes = torch.zeros(4, size, size)
    shapes[0, c - 1 : c + 1, 2:-2] = 1
    shapes[1, 2:-2, c - 1 : c + 1] = 1
    shapes[2, idx, idx] = 1
    shapes[2, idx[:-1], idx[:-1] + 1] = 1
    shapes[3, c - 3 : c + 3, c - 3 : c + 3] = 1
    shapes[3, c - 1 : c + 1, c - 1 : c + 1] = 0
    labels = torch.arange(4).repeat_interleave(n_per_class)
    x = 0.5 + 0.3 * (shapes[labels] - 0.5) + 0.2 * torch.randn(len(labels), size, size, generator=gen)
    pixels = torch.round(x.clamp(0, 1) * 255).to(torch.uint8)[:, None].expand(-1, channels, -1, -1).contiguous()
    return LabeledImages(pixels, labels, list(CLASSES), "synthetic")


def write_tree(root: Path, data: LabeledImages, pixels: torch.Tensor | None = None, suffix: str = ".png") -> None:
    pixels = data.pixels if pixels is None else pixels
    for i, (img, label) in enumerate(zip(pixels, data.labels.tolist())):
        folder = root / data.class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(folder / f"img{i:03d}{suffix}")


def flat(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def recipe(**overrides) -> VictimConfig:
    return VictimConfig(**{"epochs": 10, "batch_size": 32, "lr": 0.05, "seed": 0, **overrides})


@pytest.mark.slow
def test_blatant_classwise_pattern_makes_data_unlearnable_and_random_noise_does_not() -> None:
    train, test = synthetic(96, seed=0), synthetic(32, seed=1)
    methods = [
        Method("classwise", classwise_noise(train.pixels, train.labels, 4, epsilon=128, seed=0)),
        Method("random", random_noise(train.pixels, epsilon=128, seed=0)),
    ]
    rows = run_victims(train, test, methods, VerifyConfig(recipe()))
    classwise, rand = rows
    assert classwise.clean.test_accuracy >= 0.85  # the content is learnable...
    assert classwise.protected.train_accuracy >= 0.95  # ...the shortcut is learned perfectly...
    assert classwise.protected.test_accuracy <= 0.65  # ...and does not transfer to clean images
    assert classwise.drop >= 0.3
    assert abs(rand.drop) <= 0.2  # same budget, no class structure: the control barely matters
    assert classwise.chance == pytest.approx(0.25)


def test_same_seed_gives_identical_accuracies_including_random_countermeasures() -> None:
    train, test = synthetic(16, seed=0), synthetic(8, seed=1)
    methods = [Method("classwise", classwise_noise(train.pixels, train.labels, 4, epsilon=32, seed=0))]
    cfg = VerifyConfig(recipe(epochs=2), countermeasures=["none", "strong-aug", "adv:4"])
    first, second = run_victims(train, test, methods, cfg), run_victims(train, test, methods, cfg)
    assert [r.countermeasure for r in first] == ["none", "strong-aug", "adv:4"]
    for a, b in zip(first, second):
        assert a.clean.epoch_accuracy == b.clean.epoch_accuracy
        assert a.protected.epoch_accuracy == b.protected.epoch_accuracy
        assert a.protected.train_accuracy == b.protected.train_accuracy


def test_baseline_noises_respect_the_budget_and_have_their_structure() -> None:
    data = synthetic(8, seed=0)
    for pixels in (random_noise(data.pixels, 8, 0), classwise_noise(data.pixels, data.labels, 4, 8, 0)):
        assert pixels.dtype == torch.uint8 and measured_linf(data.pixels, pixels) <= 8
    flat = torch.full((8, 1, 8, 8), 128, dtype=torch.uint8)  # no clamping: the noise is visible as is
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    noise = classwise_noise(flat, labels, 4, 8, 0).int() - 128
    assert torch.equal(noise[0], noise[1]) and torch.equal(noise[0], noise[2])  # one pattern per class
    assert not torch.equal(noise[0], noise[3])
    sample = random_noise(flat, 8, 0).int() - 128
    assert not torch.equal(sample[0], sample[1])  # fresh per image


def test_error_minimizing_noise_drives_surrogate_error_below_the_stop_error() -> None:
    data = synthetic(16, seed=0)
    protected, details = error_minimizing_noise(data.pixels, data.labels, 4, 16, seed=0, cfg=EMConfig(pgd_steps=10, max_rounds=20, surrogate_width=8))
    assert details["stopped"] and details["surrogate_error"] < 0.01
    assert details["rounds"] < 20
    assert measured_linf(data.pixels, protected) <= 16


def test_match_protected_reorders_by_relative_path_and_rejects_mismatches(tmp_path: Path) -> None:
    data = synthetic(3, seed=0)
    shifted = (data.pixels.int() + 1).clamp(0, 255).to(torch.uint8)
    write_tree(tmp_path / "clean", data, suffix=".png")
    write_tree(tmp_path / "prot", data, shifted, suffix=".bmp")  # protect may change the suffix
    clean = load_image_folder(tmp_path / "clean", 16, 1)
    prot = load_image_folder(tmp_path / "prot", 16, 1)
    flipped = prot.subset(torch.arange(len(prot)).flip(0))  # order must not matter
    matched = match_protected(clean, flipped, tmp_path / "clean", tmp_path / "prot")
    assert torch.equal(matched, shifted)
    (tmp_path / "prot" / "ring" / "img011.bmp").unlink()
    (tmp_path / "prot" / "ring" / "stray.bmp").write_bytes((tmp_path / "prot" / "ring" / "img010.bmp").read_bytes())
    prot = load_image_folder(tmp_path / "prot", 16, 1)
    with pytest.raises(VerifyError, match=r"1 missing .*img011.*1 only in .*stray"):
        match_protected(clean, prot, tmp_path / "clean", tmp_path / "prot")


def test_cli_folder_mode_writes_table_report_and_plot(tmp_path: Path) -> None:
    train, test = synthetic(8, seed=0), synthetic(4, seed=1)
    write_tree(tmp_path / "clean", train)
    write_tree(tmp_path / "protected", train, classwise_noise(train.pixels, train.labels, 4, 24, 0))
    write_tree(tmp_path / "test", test)
    report = tmp_path / "out" / "check.json"
    result = CliRunner().invoke(app, [
        "verify", "--protected", str(tmp_path / "protected"), "--clean", str(tmp_path / "clean"), "--test", str(tmp_path / "test"),
        "--size", "16", "--channels", "1", "--epochs", "2", "--batch-size", "16", "--baseline", "random",
        "--countermeasure", "none", "--countermeasure", "jpeg:50", "--report", str(report), "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    assert [r["chance"] for r in rep["rows"]] == [0.25] * 4  # 4 balanced classes in the test tree
    cells = [[c.strip() for c in line.strip("│ ").split("│")] for line in result.output.splitlines() if line.count("│") > 5]
    table = [(row[0], row[2], row[-1]) for row in cells if row[0] in ("protected", "random")]  # method, countermeasure, chance
    assert sorted(table) == [("protected", "jpeg:50", "25.0%"), ("protected", "none", "25.0%"),
                             ("random", "jpeg:50", "25.0%"), ("random", "none", "25.0%")]
    assert rep["seed"] == 0 and rep["cgan_version"] and rep["torch_version"] == torch.__version__
    assert rep["config"]["epsilon"] == 24  # measured from the protected tree, reused by the baseline
    assert [(r["method"], r["countermeasure"]) for r in rep["rows"]] == [
        ("protected", "none"), ("random", "none"), ("protected", "jpeg:50"), ("random", "jpeg:50")]
    assert all(len(r["protected_trained_curve"]) == 2 for r in rep["rows"])
    methods = {m["method"]: m for m in rep["methods"]}
    assert methods["protected"]["seconds_to_protect"] is None and 0 < methods["random"]["seconds_to_protect"] < rep["seconds"]
    assert methods["random"]["measured_linf"] <= 24
    with Image.open(tmp_path / "out" / "check-curves.png") as img:
        assert img.size[0] >= 300 and len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 3  # curves in colour


def test_cli_with_weights_protects_in_memory_and_records_the_weights(tmp_path: Path) -> None:
    data = synthetic(6, seed=0)
    write_tree(tmp_path / "data", data)
    torch.manual_seed(0)
    generator = ConfounderGenerator(channels=1, num_codes=4, width=8, tile=4)
    weights = tmp_path / "g.safetensors"
    save_generator(weights, generator, WeightsMeta("confounder-v1", generator.arch_params(), 12.0, 16, 1, 4, list(CLASSES)))
    report = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "data"), "--weights", str(weights), "--epochs", "1",
                                      "--no-augment", "--report", str(report), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    assert rep["weights"]["sha256"] == file_sha256(weights)
    assert rep["config"]["epsilon"] == 12.0  # the weights' own budget
    gen_method = rep["methods"][0]
    assert gen_method["method"] == "generator" and 0 < gen_method["measured_linf"] <= 13  # 12 + rounding
    assert rep["data"]["train"]["images"] + rep["data"]["test"]["images"] == 24  # hold-out split
    assert rep["generator_data"]["generator_saw_training_images"] == "unknown"  # these weights record no training set
    assert "whether the generator saw these images is unknown" in flat(result)
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "data"), "--weights", str(weights), "--epochs", "1",
                                      "--no-augment", "--unseen", "--report", str(report), "--device", "cpu"])
    assert result.exit_code == 0, result.output  # cannot be checked: measured, with a warning in the report
    assert any(w.startswith("--unseen: whether the generator saw these images cannot be checked")
               for w in json.loads(report.read_text())["warnings"])


def test_cli_reports_mismatched_trees_clearly(tmp_path: Path) -> None:
    train = synthetic(2, seed=0)
    write_tree(tmp_path / "clean", train)
    write_tree(tmp_path / "test", train)
    write_tree(tmp_path / "protected", train.subset(torch.arange(4)))
    result = CliRunner().invoke(app, ["verify", "--protected", str(tmp_path / "protected"), "--clean", str(tmp_path / "clean"),
                                      "--test", str(tmp_path / "test"), "--size", "16"])
    assert result.exit_code == 2
    assert "class folders differ" in result.output
    result = CliRunner().invoke(app, ["verify", "fashion-mnist", "--epochs", "1"])
    assert result.exit_code == 2 and "nothing to verify" in result.output
    result = CliRunner().invoke(app, ["verify", "fashion-mnist", "--baseline", "random", "--countermeasure", "jpeg:0"])
    assert result.exit_code == 2 and "jpeg quality" in result.output
    result = CliRunner().invoke(app, ["verify", "fashion-mnist", "--baseline", "random", "--arch", "vit"])
    assert result.exit_code == 2 and "'vit'" in result.output


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist")
def test_cli_builtin_fashion_mnist_with_limits(tmp_path: Path) -> None:
    report = tmp_path / "fm.json"
    result = CliRunner().invoke(app, ["verify", "fashion-mnist", "--baseline", "classwise", "--epsilon", "16", "--limit", "200",
                                      "--test-limit", "100", "--epochs", "1", "--report", str(report), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    assert rep["data"]["train"]["images"] == 200 and rep["data"]["test"]["images"] == 100
    assert rep["data"]["train"]["name"] == "fashion-mnist/train" and rep["data"]["test"]["name"] == "fashion-mnist/test"
    assert rep["methods"][0]["measured_linf"] == 16
    assert 0.1 <= rep["rows"][0]["chance"] < 0.3  # most common of 10 classes among 100 test images


def _train_tiny_generator(data: Path, out: Path) -> Path:
    result = CliRunner().invoke(app, ["train", str(data), "--out", str(out), "--epochs", "1", "--code-epochs", "1",
                                      "--batch-size", "8", "--size", "16", "--width", "8", "--device", "cpu", "--checkpoint-every", "0"])
    assert result.exit_code == 0, result.output
    return out


def test_cli_unseen_refuses_images_the_generator_trained_on_and_reports_the_case(tmp_path: Path) -> None:
    seen, fresh = synthetic(6, seed=0), synthetic(6, seed=2)
    write_tree(tmp_path / "seen", seen)
    write_tree(tmp_path / "fresh", fresh)
    weights = _train_tiny_generator(tmp_path / "seen", tmp_path / "g.safetensors")
    common = ["--weights", str(weights), "--epochs", "1", "--no-augment", "--device", "cpu"]

    result = CliRunner().invoke(app, ["verify", str(tmp_path / "seen"), *common, "--report", str(tmp_path / "memorised.json")])
    assert result.exit_code == 0, result.output
    full = json.loads((tmp_path / "memorised.json").read_text())
    rep = full["generator_data"]
    assert rep["protocol"] == "as given" and rep["generator_saw_training_images"] is True
    assert (rep["training_images_seen"], rep["test_images_seen"]) == (20, 4)  # every image of the hold-out split
    assert (full["data"]["train"]["images"], full["data"]["test"]["images"]) == (20, 4)
    assert "memorised case" in flat(result)

    result = CliRunner().invoke(app, ["verify", str(tmp_path / "seen"), *common, "--unseen"])
    assert result.exit_code == 2
    assert "--unseen: the generator was trained on 20 of the victim's 20 training images and 4 of its 4 test" in flat(result)

    for i, name in enumerate(["img000.png", "img001.png", "img002.png"]):  # three of its training images slip into new data
        (tmp_path / "fresh" / "bar-h" / f"copy{i}.png").write_bytes((tmp_path / "seen" / "bar-h" / name).read_bytes())
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "fresh"), *common, "--unseen", "--holdout", "0.25"])
    assert result.exit_code == 2
    assert "unknown" not in flat(result) and "Traceback" not in flat(result)
    train_seen, test_seen = map(int, re.search(r"trained on (\d+) of the victim's \d+ training images and (\d+) of", flat(result)).groups())
    assert train_seen + test_seen == 3

    for i in range(3):
        (tmp_path / "fresh" / "bar-h" / f"copy{i}.png").unlink()
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "fresh"), *common, "--unseen", "--labels", "--report", str(tmp_path / "unseen.json")])
    assert result.exit_code == 0, result.output
    rep = json.loads((tmp_path / "unseen.json").read_text())
    assert rep["generator_data"] == {
        "protocol": "unseen", "generator_saw_training_images": False, "training_images_seen": 0,
        "training_checked_by": "per-image digests in the weights' metadata", "generator_saw_test_images": False,
        "test_images_seen": 0, "test_checked_by": "per-image digests in the weights' metadata"}
    assert rep["methods"][0]["codes"] == "label" and "never saw these training or test images" in flat(result)
    assert "image_digests" not in json.dumps(rep)  # the report names the weights' training set, not its digests


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist")
def test_cli_unseen_fashion_mnist_trains_and_tests_on_disjoint_test_split_images(tmp_path: Path) -> None:
    from cgan_cli.core.shipped import shipped_weights_dir
    from cgan_cli.learning.data import load_fashion_mnist

    report = tmp_path / "unseen.json"
    result = CliRunner().invoke(app, ["verify", "fashion-mnist", "--weights", str(shipped_weights_dir() / "cgan-fashion-mnist.safetensors"),
                                      "--unseen", "--limit", "200", "--test-limit", "100", "--epochs", "1", "--report", str(report), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    train, test = rep["data"]["train"], rep["data"]["test"]
    assert train["name"] == test["name"] == "fashion-mnist/test"  # the generator trained on fashion-mnist/train
    assert len(train["indices"]) == train["images"] == 200 and len(test["indices"]) == test["images"] == 100
    assert not set(train["indices"]) & set(test["indices"])
    assert rep["config"]["holdout"] == 0.2 and rep["config"]["unseen"] is True
    split, seen = load_fashion_mnist("test"), load_fashion_mnist("train")
    for part in (train, test):  # the recorded indices are the images used: their fingerprints match
        assert split.subset(torch.tensor(part["indices"])).fingerprint() == part["fingerprint"]
    generator_saw = set(seen.image_digests())
    victim = split.subset(torch.tensor(train["indices"] + test["indices"]))
    assert not generator_saw & set(victim.image_digests())  # none of them is among the generator's training images
    assert rep["generator_data"]["generator_saw_training_images"] is False and rep["generator_data"]["test_images_seen"] == 0
