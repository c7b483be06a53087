"""Labels at protect time: codes from class folders, a CSV or a shard's cls member, never a silent guess."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_records, smooth_rgb, write_generator
from PIL import Image
from test_shards import write_tar
from typer.testing import CliRunner

from cgan_cli.cli import app
from cgan_cli.core.engine import EngineConfig, ProtectEngine
from cgan_cli.core.generators import HardCodeGenerator
from cgan_cli.learning.data import LabeledImages
from cgan_cli.learning.verify import generator_method, label_codes, protect_with_engine

CLASSES = ["a", "b", "c", "d"]  # conftest's generators: 4 codes with these class names


@pytest.fixture(scope="module")
def hard_weights(tmp_path_factory) -> Path:
    """A confounder-v2 (hard top code) generator: a forced code is exactly one tile, as is a guess."""
    return write_generator(tmp_path_factory.mktemp("w") / "hard.safetensors", model_class=HardCodeGenerator)


@pytest.fixture(scope="module")
def gray_hard_weights(tmp_path_factory) -> Path:
    return write_generator(tmp_path_factory.mktemp("w") / "gray-hard.safetensors", channels=1, model_class=HardCodeGenerator)


def protect(*args: str):
    return CliRunner().invoke(app, ["protect", *args, "--workers", "0"])


def class_tree(root: Path, folders: list[str], per_class: int = 2) -> dict[str, str]:
    """Real PNGs in one folder per class; returns relative path -> folder."""
    made = {}
    for c, folder in enumerate(folders):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rel = f"{folder}/img{i}.png"
            Image.fromarray(smooth_rgb(20 + 4 * i, 24, seed=10 * c + i)).save(root / rel)
            made[rel] = folder
    return made


def by_output(out: Path) -> dict[str, dict]:
    return {r["output"]: r for r in read_records(out / "manifest.jsonl") if r["output"]}


def test_engine_forced_codes_replace_the_guess(hard_weights, gray_hard_weights):
    images = [smooth_rgb(32, 40, seed=s) for s in range(6)]
    engine = ProtectEngine(EngineConfig(hard_weights, device="cpu"))
    guessed, guesses = engine.protect_batch_coded(images)
    other = [(g + 1) % 4 for g in guesses]
    forced, used = engine.protect_batch_coded(images, other)
    assert used == other
    for a, b in zip(guessed, forced):
        assert not np.array_equal(a, b)  # another code: another tile
    same, used_same = engine.protect_batch_coded(images, guesses)
    assert used_same == guesses and all(np.array_equal(a, b) for a, b in zip(guessed, same))
    mixed, used_mixed = engine.protect_batch_coded(images, [other[0]] + [None] * 5)  # None: still the guess
    assert used_mixed == [other[0], *guesses[1:]]
    assert all(np.array_equal(a, b) for a, b in zip(guessed[1:], mixed[1:]))
    with pytest.raises(ValueError, match="outside"):
        engine.protect_batch_coded(images[:1], [4])

    # a 1-channel generator on RGB input, full-res tiles: every tile of an image carries the forced code
    big = smooth_rgb(600, 540, seed=7)
    tiled = ProtectEngine(EngineConfig(gray_hard_weights, device="cpu", full_res=True, batch_size=4))
    (guess_out,), (guess_code,) = tiled.protect_batch_coded([big])
    code = (guess_code + 2) % 4
    (forced_out,), (used_code,) = tiled.protect_batch_coded([big], [code])
    assert used_code == code and not np.array_equal(guess_out, forced_out)
    assert np.abs(forced_out.astype(int) - big.astype(int)).max() <= engine.epsilon
    assert (forced_out[..., 0].astype(int) - big[..., 0] == forced_out[..., 1].astype(int) - big[..., 1]).mean() > 0.9


def test_soft_code_generator_takes_a_forced_code_as_one_tile(rgb_weights):
    """confounder-v1 mixes tiles by soft weights; a forced code is the one-hot mix (one full tile)."""
    engine = ProtectEngine(EngineConfig(rgb_weights, device="cpu"))
    image = smooth_rgb(32, 32, seed=3)
    (soft,), (guess,) = engine.protect_batch_coded([image])
    (hard,), (used,) = engine.protect_batch_coded([image], [guess])
    assert used == guess and not np.array_equal(soft, hard)


def test_folders_by_class_name_and_sorted_fallback(tmp_path, hard_weights):
    src = tmp_path / "named"
    made = class_tree(src, ["D", "b", "c", "a"])  # names match case-blind, in any order
    Image.fromarray(smooth_rgb(20, 20, seed=99)).save(src / "loose.png")  # outside any class folder
    out = tmp_path / "out"
    result = protect(str(src), "--out", str(out), "-w", str(hard_weights), "--labels", "folders")
    assert result.exit_code == 1, result.output  # the loose image failed, nothing else
    recs = by_output(out)
    for rel, folder in made.items():
        assert recs[rel]["status"] == "protected"
        assert (recs[rel]["code"], recs[rel]["code_source"]) == (CLASSES.index(folder.lower()), "label")
    loose = by_output(out)["loose.png"]
    assert loose["status"] == "failed" and "not inside a class folder" in loose["error"] and loose["code"] is None
    assert not (out / "loose.png").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == "folders" and summary["label_map"][str(src)] == {"D": 3, "a": 0, "b": 1, "c": 2}

    # without labels the same images get the generator's guesses; with labels, where the guess differs, other pixels
    plain = tmp_path / "plain"
    assert protect(str(src), "--out", str(plain), "-w", str(hard_weights)).exit_code == 0
    differs = 0
    for rel in made:
        guessed = by_output(plain)[rel]
        assert guessed["code_source"] == "guess"
        same_code = guessed["code"] == recs[rel]["code"]
        same_pixels = np.array_equal(np.asarray(Image.open(plain / rel)), np.asarray(Image.open(out / rel)))
        assert same_code == same_pixels
        differs += not same_code
    assert differs > 0

    sorted_src = tmp_path / "numbered"
    class_tree(sorted_src, ["k3", "k1", "k0", "k2"], per_class=1)  # no class names match: sorted order, like ImageFolder
    out2 = tmp_path / "out2"
    assert protect(str(sorted_src), "--out", str(out2), "-w", str(hard_weights), "--labels", "folders").exit_code == 0
    assert {rel: r["code"] for rel, r in by_output(out2).items()} == {"k0/img0.png": 0, "k1/img0.png": 1, "k2/img0.png": 2, "k3/img0.png": 3}


def test_folders_that_do_not_fit_are_usage_errors(tmp_path, hard_weights):
    few = tmp_path / "few"
    class_tree(few, ["x", "y"], per_class=1)
    result = protect(str(few), "--out", str(tmp_path / "o1"), "-w", str(hard_weights), "--labels", "folders")
    assert result.exit_code == 2 and "2 class folders but the generator has 4 codes" in result.output
    assert not (tmp_path / "o1").exists()
    partly = tmp_path / "partly"
    class_tree(partly, ["a", "b", "c", "zebra"], per_class=1)
    result = protect(str(partly), "--out", str(tmp_path / "o2"), "-w", str(hard_weights), "--labels", "folders")
    assert result.exit_code == 2 and "zebra" in result.output and "match none of the generator's classes" in result.output
    result = protect(str(partly / "a" / "img0.png"), "--out", str(tmp_path / "o3"), "-w", str(hard_weights), "--labels", "folders")
    assert result.exit_code == 2 and "is not a folder" in result.output
    result = protect(str(partly), "--out", str(tmp_path / "o4"), "-w", str(hard_weights), "--labels", "nope.csv")
    assert result.exit_code == 2 and "file not found" in result.output
    result = protect(str(partly), "--out", str(tmp_path / "o5"), "-w", str(hard_weights), "--labels", "cls")
    assert result.exit_code == 2 and "not shards" in result.output
    assert "Traceback" not in result.output


def test_csv_labels_names_indices_and_unknown_labels(tmp_path, hard_weights):
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(5):
        Image.fromarray(smooth_rgb(24, 24, seed=i)).save(src / f"p{i}.png")
    table = tmp_path / "labels.csv"
    table.write_text("path,label\np0.png,c\np1.png,1\np2.png,zebra\np3.png,7\n")  # p4 has no row
    out = tmp_path / "out"
    result = protect(str(src), "--out", str(out), "-w", str(hard_weights), "--labels", str(table))
    assert result.exit_code == 1
    recs = by_output(out)
    assert (recs["p0.png"]["code"], recs["p0.png"]["code_source"]) == (2, "label")
    assert (recs["p1.png"]["code"], recs["p1.png"]["code_source"]) == (1, "label")
    assert recs["p2.png"]["status"] == "failed" and "'zebra' is not one of this generator's classes" in recs["p2.png"]["error"]
    assert recs["p3.png"]["status"] == "failed" and "outside this generator's codes 0..3" in recs["p3.png"]["error"]
    assert recs["p4.png"]["status"] == "failed" and "no row for p4.png" in recs["p4.png"]["error"]
    assert sorted(p.name for p in out.glob("*.png")) == ["p0.png", "p1.png"]

    # resume: a rerun with the same labels skips; a changed label redoes that file with its new code
    table.write_text("path,label\np0.png,d\np1.png,1\n")
    protect(str(src / "p0.png"), str(src / "p1.png"), "--out", str(out), "-w", str(hard_weights), "--labels", str(table))
    last = {r["output"]: r for r in read_records(out / "manifest.jsonl")[-2:]}
    assert (last["p0.png"]["status"], last["p0.png"]["code"]) == ("protected", 3)
    assert (last["p1.png"]["status"], last["p1.png"]["code"]) == ("skipped", 1)

    bad = tmp_path / "bad.csv"
    bad.write_text("p0.png,a,extra\n")
    result = protect(str(src), "--out", str(tmp_path / "o2"), "-w", str(hard_weights), "--labels", str(bad))
    assert result.exit_code == 2 and "line 1 has 3 fields" in result.output


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(smooth_rgb(24, 28, seed=seed)).save(buf, "PNG")
    return buf.getvalue()


def test_shards_label_from_cls_before_or_after_the_image(tmp_path, hard_weights):
    members = [
        ("k0.cls", b"2"), ("k0.png", _png(0)),  # cls first
        ("k1.png", _png(1)), ("k1.json", b"{}"), ("k1.cls", b"b\n"),  # cls after the image, by class name
        ("k2.png", _png(2)),  # no cls: fails
        ("k3.png", _png(3)), ("k3.cls", b"9"),  # unknown index: fails
    ]
    shard = write_tar(tmp_path / "in.tar", members)
    out = tmp_path / "out"
    result = protect(str(shard), "--out", str(out), "-w", str(hard_weights), "--labels", "cls")
    assert result.exit_code == 1, result.output
    recs = {r["source"]: r for r in read_records(out / "manifest.jsonl")}
    assert (recs["in.tar/k0.png"]["code"], recs["in.tar/k0.png"]["code_source"]) == (2, "label")
    assert (recs["in.tar/k1.png"]["code"], recs["in.tar/k1.png"]["code_source"]) == (1, "label")
    assert recs["in.tar/k2.png"]["status"] == "failed" and "has no cls member" in recs["in.tar/k2.png"]["error"]
    assert recs["in.tar/k3.png"]["status"] == "failed" and "outside" in recs["in.tar/k3.png"]["error"]
    with tarfile.open(out / "in.tar") as tar:
        names = tar.getnames()
        assert names == ["k0.cls", "k0.png", "k1.png", "k1.json", "k1.cls", "k3.cls"]  # archive order kept
        assert tar.extractfile("k1.cls").read() == b"b\n"


def test_verify_protects_with_true_labels_through_the_engine(tmp_path, hard_weights):
    """`cgan verify --weights W --labels` gives every training image its label's code, as protect --labels does;
    `--mask-floor` shapes the noise as protect's does."""
    pixels = torch.from_numpy(np.stack([smooth_rgb(32, 32, seed=s) for s in range(8)])).permute(0, 3, 1, 2).contiguous()
    train = LabeledImages(pixels, torch.tensor([0, 1, 2, 3, 3, 2, 1, 0]), ["D", "c", "b", "a"])  # another class order
    engine = ProtectEngine(EngineConfig(hard_weights, device="cpu"))
    codes = label_codes(engine.meta, train)
    assert codes.tolist() == [3, 2, 1, 0, 0, 1, 2, 3]  # matched by name, not by position
    method, _ = generator_method(hard_weights, train, 8.0, "cpu", "fp32", labels=True)
    assert method.details["codes"] == "label"
    assert torch.equal(method.pixels, protect_with_engine(engine, pixels, codes=codes))
    guessed, _ = generator_method(hard_weights, train, 8.0, "cpu", "fp32")
    _, guesses = engine.protect_batch_coded([p.permute(1, 2, 0).numpy() for p in pixels])
    for i, guess in enumerate(guesses):
        assert torch.equal(guessed.pixels[i], method.pixels[i]) == (guess == int(codes[i]))

    flat = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)  # no texture: the mask leaves its floor of the noise
    flat_train = LabeledImages(flat, torch.tensor([0, 1]), ["D", "c", "b", "a"])
    masked, _ = generator_method(hard_weights, flat_train, 8.0, "cpu", "fp32", labels=True, mask_floor=0.25)
    unmasked, _ = generator_method(hard_weights, flat_train, 8.0, "cpu", "fp32", labels=True, mask_floor=1.0)
    assert (masked.details["mask_floor"], unmasked.details["mask_floor"]) == (0.25, 1.0)
    assert (unmasked.pixels.int() - 128).abs().max() == 8 and (masked.pixels.int() - 128).abs().max() == 2
    result = CliRunner().invoke(app, ["verify", "fashion-mnist", "--mask-floor", "0.5", "--baseline", "random", "--epsilon", "8"])
    assert result.exit_code == 2 and "give --weights" in result.output

    other = LabeledImages(pixels, torch.zeros(8, dtype=torch.long), ["x", "y"])
    with pytest.raises(Exception, match="match neither"):
        label_codes(engine.meta, other)
    result = CliRunner().invoke(app, ["verify", "fashion-mnist", "--labels", "--baseline", "random", "--epsilon", "8"])
    assert result.exit_code == 2 and "give --weights" in result.output
