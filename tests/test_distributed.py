"""torchrun: a real 2-process gloo run over real shards; every shard is protected exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_shards import sample_members, write_tar

from cgan_cli.protect.distributed import DistContext, init_distributed, rank_share

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def run_group(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run torchrun in its own session; on timeout kill the whole group, so no rank outlives the test."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout}s:\n{stderr[-3000:]}") from None
    return proc.returncode, stderr


def test_rank_shares_are_disjoint_and_cover_everything():
    items = [f"s{i:02d}" for i in range(11)]
    shares = [rank_share(items, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shares, [])) == items
    assert all(not set(a) & set(b) for i, a in enumerate(shares) for b in shares[i + 1 :])


def test_without_torchrun_there_is_no_process_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.active, ctx.device) == (0, 1, False, "cpu")


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_protect_disjoint_shards(tmp_path: Path, rgb_weights: Path):
    src = tmp_path / "src"
    src.mkdir()
    shards = [write_tar(src / f"part-{i:03d}.tar", sample_members(i, count=2)) for i in range(5)]
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "cgan_cli", "protect", str(src / "part-{000..004}.tar"),
           "--out", str(out), "-w", str(rgb_weights), "--workers", "0", "--device", "cpu"]
    returncode, stderr = run_group(cmd, env, timeout=240)
    assert returncode == 0, stderr[-3000:]

    markers = {p.name.removesuffix(".json"): json.loads(p.read_text()) for p in (out / ".done").glob("*.json")}
    assert sorted(markers) == [p.name for p in shards]
    assert {name: m["rank"] for name, m in markers.items()} == {p.name: i % 2 for i, p in enumerate(shards)}

    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    expected = [f"{p.name}/{n}" for p in shards for n in tarfile.open(p).getnames()]
    assert sorted(r["source"] for r in records) == sorted(expected)  # every member exactly once, rank files merged
    assert not list(out.glob("manifest.rank*.jsonl"))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["shards"] == {"done": 5, "skipped": 0, "failed": 0}
    assert summary["counts"]["protected"] == 5 * 3 and summary["total"] == len(expected)
