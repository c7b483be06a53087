"""Shards vs folders: throughput on the same images, and peak memory against shard count and size.

    .venv/bin/python bench/shards_bench.py --weights W.safetensors [--images 400] [--side 128]

Builds real JPEG + cls + json samples and protects them (1) as a folder, (2) as 2 shards of the same
images, (3) 4x the images in 8 shards, (4) 4x the images in one shard; each `cgan protect` runs in
its own process and prints one JSON line with images/s (process start included) and the process's
peak RSS (os.wait4). Numbers recorded in docs/shards.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CGAN = [sys.executable, "-m", "cgan_cli", "protect"]


def photo(side: int, seed: int) -> bytes:
    """A smooth, photo-like JPEG (gradients + texture), so encode sizes are realistic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    img = np.stack([x, y, 0.5 + 0.5 * np.sin(9 * (x + y) + seed)], -1) * 200 + rng.normal(0, 6, (side, side, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build(root: Path, images: int, shards: int, side: int) -> None:
    """`images` samples in `shards` tars under root/shards, and the same JPEGs under root/folder."""
    (root / "folder").mkdir(parents=True)
    (root / "shards").mkdir()
    per = -(-images // shards)
    for s in range(shards):
        with tarfile.open(root / "shards" / f"part-{s:06d}.tar", "w") as tar:
            for i in range(s * per, min(images, (s + 1) * per)):
                data = photo(side, i)
                (root / "folder" / f"{i:06d}.jpg").write_bytes(data)
                for name, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.cls", str(i % 10).encode()),
                                      (f"{i:06d}.json", json.dumps({"i": i}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def run(args: list[str]) -> tuple[float, float, int, int]:
    """Wall seconds, CPU seconds (with its decode workers), exit code and peak RSS (MiB) of one
    `cgan protect` process. CPU seconds are the fair comparison on a machine shared with other jobs."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([*CGAN, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    cpu = usage.ru_utime + usage.ru_stime
    return time.perf_counter() - t0, cpu, os.waitstatus_to_exitcode(status), usage.ru_maxrss // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        few, many, big = Path(tmp, "few"), Path(tmp, "many"), Path(tmp, "big")
        build(few, a.images, 2, a.side)
        build(many, 4 * a.images, 8, a.side)
        build(big, 4 * a.images, 1, a.side)
        common = ["-w", a.weights, "--workers", str(a.workers)]
        runs = [
            ("folder", a.images, [str(few / "folder"), "--out", str(few / "out-folder"), *common]),
            ("shards x2", a.images, [str(few / "shards" / "part-{000000..000001}.tar"), "--out", str(few / "out-shards"), *common]),
            ("shards x8 (4x images)", 4 * a.images, [str(many / "shards" / "part-{000000..000007}.tar"), "--out", str(many / "out"), *common]),
            ("shards x1 (4x images, one shard)", 4 * a.images, [str(big / "shards" / "part-000000.tar"), "--out", str(big / "out"), *common]),
        ]
        for label, n, args in runs:
            seconds, cpu, code, rss = run(args)
            print(json.dumps({"run": label, "images": n, "side": a.side, "workers": a.workers, "exit": code,
                              "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1),
                              "cpu_s": round(cpu, 2), "cpu_ms_per_image": round(1000 * cpu / n, 1), "peak_rss_mib": rss}))


if __name__ == "__main__":
    main()
