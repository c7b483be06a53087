"""WebDataset shards through the real CLI: built here from real images, read back with webdataset."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import EPSILON, smooth_rgb
from PIL import Image
from typer.testing import CliRunner
from webdataset.tariterators import base_plus_ext as member_key

from cgan_cli.cli import app
from cgan_cli.core.urls import expand_shard_spec
from cgan_cli.learning.data import load_labeled
from cgan_cli.protect.tars import ShardError, hostile_reason, iter_members, shard_name

runner = CliRunner()
CGAN = [sys.executable, "-m", "cgan_cli"]


def image_bytes(seed: int, fmt: str, size: tuple[int, int] = (24, 32)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(smooth_rgb(*size, seed=seed)).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(shard: int, count: int = 3) -> list[tuple[str, bytes]]:
    """jpg / png images with cls, json and txt members; one key has an extra dot (`x.left.png`)."""
    members = []
    for i in range(count):
        key = f"s{shard}/{i:04d}"
        fmt, ext = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
        members += [
            (f"{key}.{ext}", image_bytes(10 * shard + i, fmt)),
            (f"{key}.cls", str(i % 3).encode()),
            (f"{key}.json", json.dumps({"shard": shard, "i": i}).encode()),
        ]
    members += [(f"s{shard}/x.left.png", image_bytes(99, "PNG")), (f"s{shard}/x.txt", b"caption with a dotted key\n")]
    return members


def protect(*args: str) -> "object":
    return runner.invoke(app, ["protect", *args, "--workers", "0"])


def read_wds(urls: list[str]) -> list[dict]:
    return list(wds.WebDataset(urls, shardshuffle=False))


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def assert_protected_copy(original: dict[str, bytes], protected: dict[str, bytes]) -> None:
    """Same members; images keep format/size/mode and are changed within epsilon (PNG exactly; JPEG
    re-encoding adds its own rounding, so there the mean change is bounded); the rest byte-identical."""
    assert sorted(original) == sorted(protected)
    for name, data in original.items():
        ext = name.rsplit(".", 1)[-1]
        if ext in ("jpg", "png"):
            a, b = Image.open(io.BytesIO(data)), Image.open(io.BytesIO(protected[name]))
            assert (a.size, a.mode, a.format) == (b.size, b.mode, b.format)
            diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
            assert diff.max() > 0, name
            assert (diff.max() if ext == "png" else diff.mean()) <= EPSILON, name
        else:
            assert protected[name] == data, name


def test_names_keys_and_hostile_rules():
    assert expand_shard_spec("d/t-{000..002}.tar") == ["d/t-000.tar", "d/t-001.tar", "d/t-002.tar"]
    assert expand_shard_spec("pipe:cat {a,b}.tar") == ["pipe:cat {a,b}.tar"]
    assert member_key("dir/a.left.png") == ("dir/a", "left.png")
    assert member_key("README") == (None, None)
    assert shard_name("pipe:curl -s http://h/train-007.tar", 0) == "train-007.tar"
    assert shard_name("../../x/y.tar", 0) == "y.tar"
    assert hostile_reason("../up.png") and hostile_reason("/etc/passwd") and hostile_reason("a/../../b.txt")
    assert hostile_reason("a/..b.png") is None and hostile_reason("./a/b.png") is None


def test_truncated_tar_is_reported_even_at_a_member_boundary(tmp_path):
    full = write_tar(tmp_path / "full.tar", sample_members(0)).read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        second = tar.getmembers()[1]
    boundary = second.offset_data + 512 * -(-second.size // 512)  # right after member 2: a valid prefix
    for cut in (boundary, boundary + 100, 300):  # at a boundary, mid-header, inside member 1
        names = []
        with pytest.raises(ShardError, match="truncated"):
            for m in iter_members(io.BytesIO(full[:cut]), "cut.tar"):
                names.append(m.name)
        assert len(names) == (2 if cut >= boundary else 0)


def test_protect_shards_roundtrip_with_webdataset(tmp_path, rgb_weights):
    src = tmp_path / "src"
    src.mkdir()
    originals = [sample_members(s) for s in range(2)]
    for s, members in enumerate(originals):
        write_tar(src / f"train-{s:06d}.tar", members)
    out = tmp_path / "protected"
    result = protect(str(src / "train-{000000..000001}.tar"), "--out", str(out), "-w", str(rgb_weights))
    assert result.exit_code == 0, result.output
    for s, members in enumerate(originals):
        assert tar_names(out / f"train-{s:06d}.tar") == [n for n, _ in members]  # same members, same order
    before = read_wds([str(src / f"train-{s:06d}.tar") for s in range(2)])
    after = read_wds([str(out / f"train-{s:06d}.tar") for s in range(2)])
    assert [x["__key__"] for x in after] == [x["__key__"] for x in before]
    assert "s0/x" in [x["__key__"] for x in after]  # the dotted key groups as webdataset groups it
    for a, b in zip(before, after):
        assert_protected_copy({k: v for k, v in a.items() if not k.startswith("__")},
                              {k: v for k, v in b.items() if not k.startswith("__")})
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"] == {"done": 2, "skipped": 0, "failed": 0}
    assert summary["counts"] == {"protected": 8, "skipped": 14, "failed": 0, "ignored": 0}
    marker = json.loads((out / ".done" / "train-000000.tar.json").read_text())
    assert marker["members_written"] == len(originals[0])

    # rerun: finished shards are skipped untouched; a shard without its marker is redone
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / ".done" / "train-000001.tar.json").unlink()
    rerun = protect(str(src / "train-{000000..000001}.tar"), "--out", str(out), "-w", str(rgb_weights))
    assert rerun.exit_code == 0, rerun.output
    assert json.loads((out / "summary.json").read_text())["shards"] == {"done": 1, "skipped": 1, "failed": 0}
    assert (out / "train-000000.tar").stat().st_mtime_ns == stamps["train-000000.tar"]
    assert (out / ".done" / "train-000001.tar.json").is_file()


def test_hostile_names_corrupt_member_and_truncated_shard(tmp_path, rgb_weights):
    src = tmp_path / "src"
    src.mkdir()
    good = image_bytes(1, "PNG")
    write_tar(src / "bad-names.tar", [
        ("../../escape.png", good), ("/tmp/abs.json", b"{}"), ("ok/0.png", good), ("ok/0.cls", b"1"),
        ("ok/1.jpg", b"\xff\xd8 this is not a jpeg"), ("ok/1.cls", b"2"),
    ])
    full = write_tar(tmp_path / "whole.tar", sample_members(3)).read_bytes()
    (src / "cut.tar").write_bytes(full[: len(full) // 2])
    out = tmp_path / "out"
    result = protect(str(src / "{bad-names,cut}.tar"), "--out", str(out), "-w", str(rgb_weights))
    assert result.exit_code == 1, result.output
    assert tar_names(out / "bad-names.tar") == ["ok/0.png", "ok/0.cls", "ok/1.cls"]  # the corrupt image is dropped
    assert not list(tmp_path.rglob("escape.png"))
    records = {r["source"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert "climbs out" in records["bad-names.tar/../../escape.png"]["error"]
    assert "absolute" in records["bad-names.tar//tmp/abs.json"]["error"]
    assert records["bad-names.tar/ok/1.jpg"]["status"] == "failed"
    # the truncated shard: reported, never left under its final name, no done marker
    assert not (out / "cut.tar").exists() and not (out / ".done" / "cut.tar.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["failed"] == 1 and "truncated" in summary["failed_shards"][0]["error"]
    assert "truncated" in records[str(src / "cut.tar")]["error"]


def test_reshard_keeps_keys_and_order(tmp_path, rgb_weights):
    shard = write_tar(tmp_path / "in.tar", sample_members(0, count=3))
    out = tmp_path / "out"
    result = protect(str(shard), "--out", str(out), "-w", str(rgb_weights), "--shard-size", "2", "--shard-pattern", "part-%03d.tar")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.tar")) == ["part-000.tar", "part-001.tar"]
    keys = [[x["__key__"] for x in read_wds([str(out / n)])] for n in ("part-000.tar", "part-001.tar")]
    assert keys == [["s0/0000", "s0/0001"], ["s0/0002", "s0/x"]]


def test_forced_format_renames_image_members_only(tmp_path, rgb_weights):
    shard = write_tar(tmp_path / "in.tar", sample_members(0, count=2))
    out = tmp_path / "out"
    result = protect(str(shard), "--out", str(out), "-w", str(rgb_weights), "--format", "png")
    assert result.exit_code == 0, result.output
    assert tar_names(out / "in.tar") == ["s0/0000.png", "s0/0000.cls", "s0/0000.json", "s0/0001.png", "s0/0001.cls",
                                         "s0/0001.json", "s0/x.left.png", "s0/x.txt"]


def test_stdin_to_stdout_and_pipe_url(tmp_path, rgb_weights):
    members = sample_members(5)
    shard = write_tar(tmp_path / "in.tar", members)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = " ".join(CGAN) + f" protect - --shards --out - -w {rgb_weights} --workers 0"
    subprocess.run(f"cat {shard} | {cmd} > {tmp_path / 'out.tar'}", shell=True, check=True, env=env, cwd=tmp_path)
    piped = subprocess.run([*CGAN, "protect", f"pipe:cat {shard}", "--out", "-", "-w", str(rgb_weights), "--workers", "0"],
                           env=env, capture_output=True)
    assert piped.returncode == 0, piped.stderr.decode()
    piped = piped.stdout
    (tmp_path / "piped.tar").write_bytes(piped)
    for produced in ("out.tar", "piped.tar"):
        assert tar_names(tmp_path / produced) == [n for n, _ in members]
        with tarfile.open(tmp_path / produced) as tar:
            assert_protected_copy(dict(members), {m.name: tar.extractfile(m).read() for m in tar.getmembers()})


def test_reader_closing_stdout_stops_the_run_with_one_message(tmp_path, rgb_weights):
    """`cgan protect shards --out - | head -c N`: stop at once, say so once, exit 1 (output incomplete)."""
    members = [(f"{i:04d}.png", image_bytes(i, "PNG", size=(120, 160))) for i in range(30)]
    shard = write_tar(tmp_path / "in.tar", members)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = " ".join(CGAN) + f" protect {shard} --out - -w {rgb_weights} --workers 0"
    proc = subprocess.run(["bash", "-c", f"{cmd} | head -c 2000 > /dev/null; exit ${{PIPESTATUS[0]}}"], env=env,
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.count("closed by its reader") == 1 and "output is incomplete" in proc.stderr
    assert "failed" not in proc.stderr and "Traceback" not in proc.stderr  # no per-member failures, no crash


def test_labeled_shards_feed_train_and_verify(tmp_path):
    for s in range(2):
        write_tar(tmp_path / f"lab-{s}.tar", sample_members(s, count=3))
    data = load_labeled(str(tmp_path / "lab-{0..1}.tar"), size=16, channels=3)
    assert len(data) == 6  # the x.left.png sample has no cls: skipped, as a webdataset pipeline would
    assert data.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert tuple(data.pixels.shape) == (6, 3, 16, 16)


def test_resharding_again_removes_the_earlier_runs_extra_shards(tmp_path, rgb_weights):
    """A second re-shard into the same folder with bigger shards must not leave the first run's tail
    (its samples would be in the dataset twice)."""
    shard = write_tar(tmp_path / "in.tar", sample_members(0, count=3))
    out = tmp_path / "out"
    common = (str(shard), "--out", str(out), "-w", str(rgb_weights), "--shard-pattern", "part-%03d.tar")
    assert protect(*common, "--shard-size", "1").exit_code == 0
    assert sorted(p.name for p in out.glob("*.tar")) == [f"part-{i:03d}.tar" for i in range(4)]
    (out / "part-009.tar").write_bytes(b"not part of the sequence: kept")
    result = protect(*common, "--shard-size", "3", "--json")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.tar")) == ["part-000.tar", "part-001.tar", "part-009.tar"]
    keys = [x["__key__"] for x in read_wds([str(out / "part-000.tar"), str(out / "part-001.tar")])]
    assert keys == ["s0/0000", "s0/0001", "s0/0002", "s0/x"]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["stale_removed"]) == ["part-002.tar", "part-003.tar"]


def test_dry_run_lists_shards_to_protect_and_skip_and_writes_nothing(tmp_path, rgb_weights):
    shards = [write_tar(tmp_path / f"in-{i}.tar", sample_members(i, count=1)) for i in range(2)]
    out = tmp_path / "out"
    assert protect(str(shards[0]), "--out", str(out), "-w", str(rgb_weights)).exit_code == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    pattern = str(tmp_path / "in-{0..1}.tar")
    dry = protect(pattern, "--out", str(out), "-w", str(rgb_weights), "--dry-run")
    assert dry.exit_code == 0, dry.output
    lines = [line.split("\t") for line in dry.stdout.splitlines()]
    assert lines == [["skip", str(shards[0]), str(out / "in-0.tar")], ["protect", str(shards[1]), str(out / "in-1.tar")]]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written
    as_json = protect(pattern, "--out", str(out), "-w", str(rgb_weights), "--dry-run", "--json")
    assert json.loads(as_json.stdout) == {"dry_run": True, "shards": {"protect": 1, "skip": 1}}
