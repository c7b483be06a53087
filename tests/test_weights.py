"""weights.py: a generator round-trips through safetensors, and every bad file is refused by name."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import write_generator
from safetensors.torch import load_file, save_file

from cgan_cli.core.generators import ConfounderGenerator
from cgan_cli.core.weights import (
    META_KEY,
    WeightsError,
    WeightsMeta,
    load_generator,
    read_meta,
    save_generator,
)


def _rewrite(src: Path, dst: Path, tensors: dict | None = None, meta: dict | None = None) -> Path:
    """Copy a weights file, replacing tensors and/or metadata fields (still a valid safetensors file)."""
    raw = json.loads(read_meta(src).to_json())
    raw.update(meta or {})
    save_file(tensors if tensors is not None else load_file(str(src)), str(dst), metadata={META_KEY: json.dumps(raw)})
    return dst


def test_round_trip_same_outputs(tmp_path: Path) -> None:
    path = write_generator(tmp_path / "g.safetensors", seed=3)
    model, meta = load_generator(path)
    torch.manual_seed(3)
    ref = ConfounderGenerator(channels=3, num_codes=4, width=8, tile=8).eval()
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(model(x), ref(x))
    assert meta.working_size == 32 and meta.epsilon == 8.0 and meta.class_names == ["a", "b", "c", "d"]


def test_missing_and_non_safetensors_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_generator(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_generator(junk)


def test_no_metadata_block(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError, match="no 'cgan' metadata"):
        load_generator(path)


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"format_version": 99}, "format_version is 99"),
        ({"arch": "unet-9000"}, "architecture 'unet-9000' unknown"),
        ({"arch_params": {"channels": 3, "num_codes": 4, "width": 8, "tile": 8, "depth": 5}}, "bad hyper-parameters"),
        ({"channels": 1}, "metadata says 1 channels"),
    ],
)
def test_bad_metadata_named(tmp_path: Path, meta: dict, message: str) -> None:
    path = _rewrite(write_generator(tmp_path / "g.safetensors"), tmp_path / "bad.safetensors", meta=meta)
    with pytest.raises(WeightsError, match=message):
        load_generator(path)


def test_missing_required_field_named(tmp_path: Path) -> None:
    path = tmp_path / "g.safetensors"
    model = ConfounderGenerator(width=8)
    raw = json.loads(WeightsMeta(model.arch, model.arch_params(), 8.0, 32, 3, 10).to_json())
    del raw["working_size"]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={META_KEY: json.dumps(raw)})
    with pytest.raises(WeightsError, match="working_size"):
        load_generator(path)


def test_key_shape_and_nan_errors_name_the_tensor(tmp_path: Path) -> None:
    good = write_generator(tmp_path / "g.safetensors")
    tensors = load_file(str(good))
    missing = {k: v for k, v in tensors.items() if k != "tiles"}
    with pytest.raises(WeightsError, match="missing \\['tiles'\\]"):
        load_generator(_rewrite(good, tmp_path / "m.safetensors", tensors=missing))
    with pytest.raises(WeightsError, match="unexpected \\['extra'\\]"):
        load_generator(_rewrite(good, tmp_path / "u.safetensors", tensors={**tensors, "extra": torch.zeros(1)}))
    with pytest.raises(WeightsError, match="tensor tiles has shape \\(4, 3, 4, 4\\), expected \\(4, 3, 8, 8\\)"):
        load_generator(_rewrite(good, tmp_path / "s.safetensors", tensors={**tensors, "tiles": torch.zeros(4, 3, 4, 4)}))
    nan = {**tensors, "tiles": torch.full_like(tensors["tiles"], float("nan"))}
    with pytest.raises(WeightsError, match="tensor tiles holds NaN"):
        load_generator(_rewrite(good, tmp_path / "n.safetensors", tensors=nan))


def test_save_is_atomic_and_meta_survives(tmp_path: Path) -> None:
    model = ConfounderGenerator(width=8)
    meta = WeightsMeta(model.arch, model.arch_params(), 4.0, 64, 3, 10, recipe={"lr": 0.1})
    path = tmp_path / "deep" / "g.safetensors"
    save_generator(path, model, meta)
    assert read_meta(path) == replace(meta)
    assert [p.name for p in path.parent.iterdir()] == ["g.safetensors"]  # no temp file left behind


def test_every_shipped_generator_loads_and_is_documented() -> None:
    """What weights/ ships must load (safetensors, no pickle), bound its noise, carry its training
    record, and appear in weights/README.md under its name with its exact sha256."""
    from cgan_cli.core.shipped import default_weights, shipped_weights_dir
    from cgan_cli.core.weights import file_sha256

    root = shipped_weights_dir()
    readme = (root / "README.md").read_text()
    files = sorted(root.glob("*.safetensors"))
    assert default_weights() in files
    for path in files:
        gen, meta = load_generator(path)
        assert f"## {path.name}" in readme and file_sha256(path) in readme, path.name
        metrics = json.loads(path.with_name(path.name.replace(".safetensors", ".metrics.json")).read_text())
        assert metrics["code_train_accuracy"] >= 0.99 and metrics["noise_linf_255"] <= meta.epsilon + 1e-4
        with torch.no_grad():
            out = gen(torch.rand(2, meta.channels, meta.working_size, meta.working_size))
        assert out.abs().max() <= 1.0 and out.abs().max() > 0.5  # tanh-bounded, not trivially zero
