"""`cgan train` on tiny real image folders: weights load, epsilon holds, checkpoints resume exactly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from cgan_cli.cli import app
from cgan_cli.core.generators import protect_tensor
from cgan_cli.core.weights import file_sha256, load_generator
from cgan_cli.learning.config import TrainConfig
from cgan_cli.learning.data import load_labeled, recorded_digests
from cgan_cli.learning.train import assign_tiles, build_nets, flatten_optimizer, train, unflatten_optimizer

SIDE = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of small RGB PNGs: bright squares vs dark stripes, with random jitter."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for cls in ("bright", "striped"):
        (root / cls).mkdir()
        for i in range(8):
            arr = rng.integers(0, 60, (SIDE, SIDE, 3), dtype=np.uint8)
            if cls == "bright":
                arr[4:12, 4:12] = 250
            else:
                arr[::2] = 200
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


def _config(folder: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(folder), out=out, epochs=1, code_epochs=1, batch_size=8, size=SIDE, reset_every=3,
                checkpoint_every=1, progress=False, seed=3, epsilon=8.0, assign_candidates=1)
    return TrainConfig(**{**base, **kw})


def test_cli_train_writes_loadable_generator_within_epsilon(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "g.safetensors"
    result = CliRunner().invoke(app, [
        "train", str(folder), "--out", str(out), "--epochs", "1", "--code-epochs", "1", "--batch-size", "8",
        "--size", str(SIDE), "--epsilon", "6", "--sample-every", "2", "--seed", "1", "--device", "cpu", "--width", "8",
    ])
    assert result.exit_code == 0, result.output
    gen, meta = load_generator(out)
    assert (meta.channels, meta.num_classes, meta.working_size, meta.epsilon) == (3, 2, SIDE, 6.0)
    assert meta.arch_params["width"] == 8 and meta.recipe["width"] == 8
    assert meta.class_names == ["bright", "striped"]
    assert meta.dataset["size"] == 16 and len(meta.dataset["fingerprint"]) == 64
    data = load_labeled(str(folder), "train", SIDE)
    assert recorded_digests(meta.dataset["image_digests"]) == set(data.image_digests()) and len(set(data.image_digests())) == 16
    assert meta.recipe["objective"] and meta.recipe["w_minmin"] == 1.0 and meta.seed == 1

    x = torch.rand(5, 3, SIDE + 7, SIDE)  # any H x W: fully convolutional
    with torch.no_grad():
        noise = 6.0 / 255.0 * gen(x)
        protected = protect_tensor(gen, x, 6.0)
    assert noise.abs().max() <= 6.0 / 255.0 + 1e-7
    assert noise.abs().max() > 3.0 / 255.0  # the noise is not trivially zero
    assert ((protected - x).abs().max() * 255.0) <= 6.5 + 1e-4

    metrics = json.loads((tmp_path / "g.metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["noise_linf_255"] <= 6.0 + 1e-5
    warned = "warning: the encoder reads the label of only" in result.stderr
    assert warned == (metrics["code_train_accuracy"] < 0.99), result.stderr  # a poorly fit encoder is flagged
    grid = Image.open(tmp_path / "g.samples" / "step0000002.png")
    assert grid.size == (3 * SIDE, 8 * SIDE)


def test_outputs_are_safetensors_not_pickle(folder: Path, tmp_path: Path) -> None:
    result = train(_config(folder, tmp_path / "g.safetensors"))
    ckpt = tmp_path / "g.ckpt.safetensors"
    for path in (result.out, ckpt):
        raw = path.read_bytes()
        header_len = int.from_bytes(raw[:8], "little")
        assert raw[8:9] == b"{" and json.loads(raw[8 : 8 + header_len])  # safetensors header, no pickle opcode
    with safe_open(str(ckpt), framework="pt") as fh:
        meta = json.loads(fh.metadata()["cgan-checkpoint"])
        keys = set(fh.keys())
    assert meta["step"] == result.steps == 4
    assert {"gen.tiles", "disc.net.0.weight", "surrogate.head.weight", "rng.aug"} <= keys
    assert any(k.startswith("opt_g.") and k.endswith(".exp_avg") for k in keys)


def test_resume_continues_from_checkpoint_step_and_matches_uninterrupted_run(folder: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    full = train(_config(folder, tmp_path / "full.safetensors", epochs=2))
    first = train(_config(folder, tmp_path / "part.safetensors", epochs=1))
    assert first.steps == 4
    resumed = train(_config(folder, tmp_path / "resumed.safetensors", epochs=2, resume=tmp_path / "part.ckpt.safetensors"))
    assert resumed.steps == full.steps == 6
    assert file_sha256(full.out) != file_sha256(first.out)
    a, _ = load_generator(full.out)
    b, _ = load_generator(resumed.out)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name


def test_codes_from_keeps_a_trained_encoder_and_retrains_only_the_patterns(folder: Path, tmp_path: Path) -> None:
    source = train(_config(folder, tmp_path / "source.safetensors", code_epochs=2, checkpoint_every=0))
    again = train(_config(folder, tmp_path / "again.safetensors", codes_from=source.out, tiles="structured", seed=5, checkpoint_every=0))
    assert (source.steps, again.steps) == (6, 2)  # 2 code epochs + 1 confounder epoch, then the confounder epoch alone
    old, _ = load_generator(source.out)
    new, meta = load_generator(again.out)
    for part in ("encoder", "code_head"):
        for (name, a), b in zip(getattr(old, part).state_dict().items(), getattr(new, part).state_dict().values()):
            assert torch.equal(a, b), f"{part}.{name}"
    assert not torch.equal(old.tiles, new.tiles)
    assert meta.recipe["codes_from"]["sha256"] == file_sha256(source.out) and meta.recipe["codes_from"]["seed"] == 3
    assert meta.recipe["tiles"] == "structured" and meta.seed == 5
    assert again.metrics["code_train_accuracy"] == source.metrics["code_train_accuracy"]


def test_a_v4_generator_takes_a_v3_encoder_and_its_local_head_offsets_no_image(folder: Path, tmp_path: Path) -> None:
    source = train(_config(folder, tmp_path / "v3.safetensors", arch="confounder-v3", checkpoint_every=0))
    v4 = train(_config(folder, tmp_path / "v4.safetensors", codes_from=source.out, arch="confounder-v4", checkpoint_every=0))
    old, _ = load_generator(source.out)
    new, meta = load_generator(v4.out)
    assert meta.arch == "confounder-v4" and type(new).__name__ == "CenteredLocalGenerator"
    assert all(torch.equal(a, b) for a, b in zip(old.encoder.state_dict().values(), new.encoder.state_dict().values()))
    x = torch.rand(4, 3, SIDE, SIDE + 5)
    with torch.no_grad():
        assert new.local_head(x).mean(dim=(2, 3)).abs().max() > 1e-3  # the head itself has an offset ...
        assert new.local(x).mean(dim=(2, 3)).abs().max() < 1e-5  # ... which v4 takes out of every image
        assert torch.equal(old.local(x), old.local_head(x))  # v3 unchanged
        assert new(x).abs().max() <= 1.0


@pytest.mark.parametrize("problem", ["missing", "width"])
def test_codes_from_that_cannot_fit_is_a_usage_error(folder: Path, tmp_path: Path, problem: str) -> None:
    source = tmp_path / "source.safetensors"
    if problem == "width":
        train(_config(folder, source, checkpoint_every=0, width=8))
    out = tmp_path / "g.safetensors"
    result = CliRunner().invoke(app, [
        "train", str(folder), "--out", str(out), "--codes-from", str(source), "--size", str(SIDE), "--device", "cpu",
    ])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --codes-from") and ("no such file" if problem == "missing" else "width") in result.stderr
    assert not out.exists()


def test_tile_order_search_keeps_the_order_its_victim_learned_least_from(folder: Path) -> None:
    data = load_labeled(str(folder), "train", SIDE)
    cfg = _config(folder, Path("unused"), assign_candidates=3, assign_steps=4, tiles="structured")
    nets = build_nets(cfg, 3, 2, torch.device("cpu"))
    bank = nets.gen.tiles.detach().clone()
    found = assign_tiles(nets.gen, data, cfg, torch.device("cpu"))
    assert found["orders"][0] == [0, 1] and len(found["orders"]) == 3 and sorted(found["orders"][1]) == [0, 1]
    assert found["chosen"] == min(range(3), key=found["victim_accuracy"].__getitem__)
    assert torch.equal(nets.gen.tiles.detach(), bank[found["orders"][found["chosen"]]])
    assert found["held_out_images"] == 3 and found["fit_images"] == 13  # disjoint parts of the 16 training images
    again = build_nets(cfg, 3, 2, torch.device("cpu"))
    repeat = assign_tiles(again.gen, data, cfg, torch.device("cpu"))
    assert {**repeat, "seconds": 0} == {**found, "seconds": 0} and found["seconds"] >= 0  # deterministic under the seed
    assert assign_tiles(nets.gen, data, dataclasses.replace(cfg, assign_candidates=1), torch.device("cpu")) == {}


def test_a_resumed_run_keeps_its_tile_order(folder: Path, tmp_path: Path) -> None:
    kw = dict(assign_candidates=2, assign_steps=2)
    full = train(_config(folder, tmp_path / "full.safetensors", epochs=2, **kw))
    train(_config(folder, tmp_path / "part.safetensors", epochs=1, **kw))
    resumed = train(_config(folder, tmp_path / "resumed.safetensors", epochs=2, resume=tmp_path / "part.ckpt.safetensors", **kw))
    assert full.metrics["tile_assignment"] == resumed.metrics["tile_assignment"] and len(full.metrics["tile_assignment"]["orders"]) == 2
    a, _ = load_generator(full.out)
    b, _ = load_generator(resumed.out)
    assert torch.equal(a.tiles, b.tiles)


def test_optimizer_state_round_trips_through_flat_tensors() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, groups = flatten_optimizer("opt", opt)
    clone = torch.optim.Adam(model.parameters(), lr=0.5)
    clone.load_state_dict(unflatten_optimizer("opt", tensors, json.loads(json.dumps(groups))))
    assert clone.param_groups[0]["lr"] == 0.1
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(clone.state[model.weight][key], opt.state[model.weight][key])
