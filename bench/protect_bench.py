"""How close `cgan protect` runs to the speed of the I/O (numbers go to docs/performance.md).

    .venv/bin/python bench/protect_bench.py [--scale 1.0] [--repeats 3] [--workers 2] [--baseline-tree DIR]
    .venv/bin/python bench/protect_bench.py --stages          # per-image cost of each pipeline stage
    .venv/bin/python bench/protect_bench.py --em 500          # generator vs EM noise, Fashion-MNIST train set
    .venv/bin/python bench/protect_bench.py --device cuda --scale 0.3   # the same ratios on a GPU machine

For every case (28-32 px PNGs x 10k, ~0.5 MP JPEG photos x 1k, ~12 MP JPEGs x 100; `--scale` shrinks
the counts) it runs, interleaved and repeated, in fresh child processes:

- floor:   a bare pass over the same files with the same workers and formats: decode, re-encode with
           the same `EncodeOptions`, write through the same `FolderSink` (temp + fsync + rename);
           one process per worker does it all, so no pixels cross a process boundary.
- protect: `run_protect`, what `cgan protect` runs (worker processes that decode, protect and encode,
           manifest + summary), with its default settings and `--workers`; like the CLI, the child
           starts the workers' fork server before it imports torch itself.
- baseline (with --baseline-tree DIR): the same, importing cgan_cli from another checkout, so that
           before/after ratios are measured under the same load.

and reports median(protect wall) / median(floor wall), both measured inside the child from the
moment work starts (interpreter start and importing torch excluded from both; worker start-up
included). The generator is the shipped default, weights/cgan-rgb-default.safetensors (`--weights`
for another), and protect runs with its defaults (the manifest's linf/psnr measured in memory);
`--measure-written` adds the re-decode of every output. Memory is the peak PSS summed over the
child and all its descendant processes (see TreeMemory), and the memory row runs the same
small-image case at 1/10 of the count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

try:
    from cgan_cli.protect.sinks import FolderSink
except ImportError:  # an older tree (--baseline-tree): flat modules
    from cgan_cli.sinks import FolderSink

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = ROOT / "weights" / "cgan-rgb-default.safetensors"
FMNIST_WEIGHTS = ROOT / "weights" / "cgan-fashion-mnist.safetensors"

# (label, count at --scale 1, height, width, suffix)
CASES = [
    ("32 px PNG", 10_000, 32, 32, ".png"),
    ("0.5 MP JPEG", 1_000, 612, 816, ".jpg"),
    ("12 MP JPEG", 100, 3000, 4000, ".jpg"),
]


# -- inputs ------------------------------------------------------------------------------------
EXAMPLES = ROOT / "examples" / "photos"


def photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A crop of a real example photo scaled to cover (height, width), plus mild sensor-like noise.

    Real content matters: codec cost depends on image entropy, and smooth synthetic gradients decode
    and encode several times faster than photos, which would flatter neither side honestly.
    """
    names = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".jpg", ".png", ".webp"))
    with Image.open(names[int(rng.integers(len(names)))]) as img:
        img = img.convert("RGB")
        scale = max(height / img.height, width / img.width) * float(rng.uniform(1.0, 1.3))
        img = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))), Image.BILINEAR)
        top, left = int(rng.integers(img.height - height + 1)), int(rng.integers(img.width - width + 1))
        arr = np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.float32)
    arr += rng.normal(0, 2.0, arr.shape).astype(np.float32)
    return np.clip(arr, 0, 255).astype(np.uint8)


def write_inputs(folder: Path, count: int, height: int, width: int, suffix: str) -> None:
    """`count` files; a few distinct photos, varied per file by a roll so no two files are equal."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    bases = [photo(rng, height, width) for _ in range(min(count, 8))]
    for i in range(count):
        img = np.roll(bases[i % len(bases)], shift=(i * 7) % height, axis=0)
        kwargs = {"quality": 90} if suffix == ".jpg" else {}
        Image.fromarray(img).save(folder / f"{i:05d}{suffix}", **kwargs)


# -- children ----------------------------------------------------------------------------------
def _floor_one(path_and_out: tuple[str, str, str]) -> int:
    """Worker: read, decode, re-encode with the same options, write durably. Returns bytes written."""
    from cgan_cli.core.formats import EncodeOptions, decode_image, encode_image
    from cgan_cli.protect.sources import Sample

    path, rel, out = path_and_out
    decoded = decode_image(Path(path).read_bytes(), path)
    payload = encode_image(decoded, decoded.pixels, EncodeOptions())
    _WorkerSink(Path(out)).write(Sample(path, rel, Path(path)), payload)
    return len(payload)


class _WorkerSink(FolderSink):
    """FolderSink.write (temp + fsync + rename) without the start-up sweep of stale temp files.

    The parent made the folder and swept it once; a sweep per worker would delete the temp files
    other workers are writing.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)


def child_floor(src: Path, out: Path, workers: int) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    try:
        from cgan_cli.protect.sources import folder_samples
    except ImportError:  # an older tree (--baseline-tree)
        from cgan_cli.sources import folder_samples

    t0 = time.perf_counter()
    FolderSink(out)  # create the folder, sweep stale temps: as protect's sink does once
    jobs = [(str(s.path), s.rel_out, str(out)) for s in folder_samples(src)]
    if workers <= 0:
        total = sum(map(_floor_one, jobs))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            total = sum(pool.map(_floor_one, jobs, chunksize=max(1, min(64, len(jobs) // (8 * workers)))))
    return {"wall": time.perf_counter() - t0, "bytes": total, "n": len(jobs)}


def child_protect(src: Path, out: Path, workers: int, weights: Path, batch: int, measure_written: bool, device: str) -> dict:
    try:  # the package layout since the core/protect/learning split
        from cgan_cli.protect.workers import start_fork_server
    except ImportError:  # an older tree (--baseline-tree): flat modules
        from cgan_cli.workers import start_fork_server
    if workers > 0:  # as `cgan protect` does: the workers' fork server imports torch while this process does
        start_fork_server()
    try:
        from cgan_cli.protect.config import ProtectConfig
        from cgan_cli.protect.run import run_protect
    except ImportError:
        from cgan_cli.protect import ProtectConfig, run_protect

    extra = {"measure_written": True} if measure_written else {}  # (older trees, for --baseline-tree, lack the field)
    cfg = ProtectConfig((str(src),), out, weights=weights, device=device, workers=workers, batch_size=batch, **extra)
    summary = run_protect(cfg)
    return {"wall": summary.wall_seconds, "n": summary.counts["protected"], "failed": summary.counts["failed"]}


def run_child(mode: str, src: Path, out: Path, args: argparse.Namespace) -> dict:
    """One timed run in a fresh process; mode "baseline" is protect with cgan_cli from --baseline-tree."""
    env = dict(os.environ)
    if mode == "baseline":
        env["PYTHONPATH"] = str(args.baseline_tree)  # ahead of the editable install of this checkout
    cmd = [sys.executable, __file__, "--child", "floor" if mode == "floor" else "protect", "--src", str(src), "--out",
           str(out), "--weights", str(args.weights), "--workers", str(args.workers), "--batch-size", str(args.batch_size),
           "--device", args.device]
    if args.measure_written and mode != "floor":
        cmd.append("--measure-written")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(args: argparse.Namespace) -> None:
    memory = TreeMemory()
    if args.child == "floor":
        res = child_floor(Path(args.src), Path(args.out), args.workers)
    else:
        res = child_protect(Path(args.src), Path(args.out), args.workers, Path(args.weights), args.batch_size, args.measure_written, args.device)
    res["rss_mb"], res["pss_mb"] = memory.stop()
    print(json.dumps(res))


class TreeMemory:
    """Peak memory of this process plus every descendant (fork server, workers), sampled every 0.25 s.

    Two sums over the process tree: RSS counts the torch libraries every process maps once per
    process; PSS splits shared pages between the processes that map them, so it is what the run
    really costs the machine. The main process's own VmHWM is folded into the RSS peak (it cannot be
    missed between samples).
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.peak_rss = self.peak_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def _tree(pid: int) -> list[int]:
        pids, todo = [], [pid]
        while todo:
            p = todo.pop()
            pids.append(p)
            for task in Path(f"/proc/{p}/task").glob("*/children"):
                try:
                    todo += [int(c) for c in task.read_text().split()]
                except OSError:
                    pass
        return pids

    @staticmethod
    def _kb(pid: int) -> tuple[int, int]:
        rss = pss = 0
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
        except OSError:
            pass  # exited between listing and reading
        return rss, pss

    def _sample(self) -> None:
        sizes = [self._kb(p) for p in self._tree(os.getpid())]
        self.peak_rss = max(self.peak_rss, sum(r for r, _ in sizes) / 1024)
        self.peak_pss = max(self.peak_pss, sum(p for _, p in sizes) / 1024)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._sample()

    def stop(self) -> tuple[float, float]:
        """(peak summed RSS MB, peak summed PSS MB)."""
        self._stop.set()
        self._thread.join()
        own_hwm = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
        return max(self.peak_rss, own_hwm), self.peak_pss


# -- stage costs (in process) ------------------------------------------------------------------
def _ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def stage_costs(src: Path, weights: Path, batch: int, out: Path) -> dict[str, float]:
    """Milliseconds per image for every stage protect runs, on one representative file (median of 5)."""
    import hashlib
    from multiprocessing.reduction import (
        ForkingPickler,  # what the process pool itself uses
    )

    from cgan_cli.core.engine import EngineConfig, ProtectEngine
    from cgan_cli.core.formats import (
        EncodeOptions,
        decode_image,
        encode_image,
        fidelity,
        written_fidelity,
    )
    from cgan_cli.protect.pipeline import prepare
    from cgan_cli.protect.sinks import FolderSink
    from cgan_cli.protect.sources import folder_samples

    sample = next(iter(folder_samples(src)))
    data = sample.read()
    decoded = decode_image(data)
    engine = ProtectEngine(EngineConfig(weights, device="cpu", batch_size=batch))
    n = min(batch, 8)
    arrays = [decoded.pixels.copy() for _ in range(n)]
    protected = engine.protect_batch([decoded.pixels])[0]
    payload = encode_image(decoded, protected)
    prepared = prepare(sample, None, EncodeOptions())
    sink = FolderSink(out)
    return {
        "read + sha256": _ms(lambda: hashlib.sha256(sample.read()).hexdigest()),
        "decode": _ms(lambda: decode_image(data)),
        "worker -> main pickle (GPU layout only)": _ms(lambda: ForkingPickler.loads(ForkingPickler.dumps(prepared))),
        f"generator + noise (batch {n}, per image)": _ms(lambda: engine.protect_batch(arrays)) / n,
        "encode": _ms(lambda: encode_image(decoded, protected)),
        "fidelity in memory (manifest linf/psnr)": _ms(lambda: fidelity(decoded.pixels, protected, decoded.max_value)),
        "re-decode + fidelity (--measure-written)": _ms(lambda: written_fidelity(decoded, decode_image(payload))),
        "sha256 out": _ms(lambda: hashlib.sha256(payload).hexdigest()),
        "write (temp + fsync + rename)": _ms(lambda: sink.write(sample, payload)),
    }


# -- generator vs error-minimizing noise (Fashion-MNIST train set) ------------------------------
def em_comparison(limit: int, rounds: int, threads: int) -> dict:
    """Seconds to protect all 60k Fashion-MNIST training images: generator (measured on all of them,
    in memory) vs sample-wise EM noise (measured on `limit` images for `rounds` rounds, extrapolated
    per image-round; EM needs at least one round over every image, usually many)."""
    import torch

    from cgan_cli.core.engine import EngineConfig, ProtectEngine
    from cgan_cli.learning.baselines import error_minimizing_noise
    from cgan_cli.learning.config import EMConfig
    from cgan_cli.learning.data import load_fashion_mnist

    torch.set_num_threads(threads)
    data = load_fashion_mnist("train")
    pixels = data.pixels  # (N, 1, 28, 28) uint8
    engine = ProtectEngine(EngineConfig(FMNIST_WEIGHTS, device="cpu", batch_size=256, cpu_threads=threads))
    images = list(pixels.permute(0, 2, 3, 1).contiguous().numpy())  # (28, 28, 1) arrays, as decoded files are
    t0 = time.perf_counter()
    for i in range(0, len(images), 1024):
        engine.protect_batch(images[i : i + 1024])
    gen_s = time.perf_counter() - t0
    idx = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(0))[:limit]
    cfg = EMConfig(max_rounds=rounds, stop_error=0.0)  # fixed rounds: a per-round cost, not convergence
    t0 = time.perf_counter()
    _, details = error_minimizing_noise(pixels[idx], data.labels[idx], len(data.class_names), 8.0, 0, cfg)
    em_s = time.perf_counter() - t0
    per_image_round = em_s / (limit * details["rounds"])
    n = len(pixels)
    return {"images": n, "generator_s": gen_s, "em_subset": limit, "em_rounds": details["rounds"], "em_subset_s": em_s,
            "em_s_per_round_full": per_image_round * n, "speedup_one_round": per_image_round * n / gen_s}


# -- driver ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every case's image count")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="decode workers (protect) = processes (floor)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for --stages and --em (protect picks its own)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cases", default="0,1,2", help="comma-separated case indices")
    parser.add_argument("--stages", action="store_true", help="print per-stage costs instead of the ratio table")
    parser.add_argument("--no-memory", action="store_true", help="skip the 1/10-count memory row")
    parser.add_argument("--baseline-tree", type=Path, help="also time protect from another checkout (git archive REV | tar -x -C DIR), interleaved")
    parser.add_argument("--em", type=int, metavar="N", help="generator vs EM noise on Fashion-MNIST (EM timed on N images)")
    parser.add_argument("--em-rounds", type=int, default=2, help="EM rounds timed on the subset")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="generator to time (default: the shipped RGB default)")
    parser.add_argument("--measure-written", action="store_true", help="protect with --measure-written (re-decode every output)")
    parser.add_argument("--device", default="cpu", help="protect's --device (cuda: the GPU layout, decode workers + one engine)")
    parser.add_argument("--child", choices=["floor", "protect"], help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    if args.em:
        res = em_comparison(args.em, args.em_rounds, args.threads)
        print(json.dumps(res, indent=2))
        print(f"\ngenerator: {res['images']} images in {res['generator_s']:.1f} s; EM: {res['em_s_per_round_full'] / 60:.0f} min "
              f"per round over {res['images']} images (extrapolated from {res['em_subset']} x {res['em_rounds']} rounds); "
              f"one EM round alone is {res['speedup_one_round']:.0f}x the generator's total time")
        return
    cases = [CASES[int(i)] for i in args.cases.split(",")]
    with tempfile.TemporaryDirectory(dir=os.environ.get("CGAN_BENCH_TMP")) as tmp:
        tmp_path = Path(tmp)
        if args.stages:
            import torch

            torch.set_num_threads(args.threads)
            for label, count, h, w, suffix in cases:
                src = tmp_path / f"src-{h}x{w}"
                write_inputs(src, 1, h, w, suffix)
                costs = stage_costs(src, args.weights, args.batch_size, tmp_path / f"stage-{h}x{w}")
                print(f"\n{label} ({w}x{h}), ms per image, median of 5")
                for name, ms in costs.items():
                    print(f"  {name:42s} {ms:9.2f}")
            return
        rows = []
        for label, count, h, w, suffix in cases:
            n = max(1, round(count * args.scale))
            src = tmp_path / f"src-{h}x{w}-{n}"
            write_inputs(src, n, h, w, suffix)
            modes = ["floor", "protect"] + (["baseline"] if args.baseline_tree else [])
            runs: dict[str, list[dict]] = {mode: [] for mode in modes}
            for r in range(args.repeats):
                for mode in modes[r % len(modes):] + modes[: r % len(modes)]:  # rotate: no mode always runs first
                    res = run_child(mode, src, tmp_path / f"out-{mode}-{h}-{r}", args)
                    runs[mode].append(res)
                    print(f"  {label} x{n} {mode} run {r}: {res['wall']:.2f} s, rss {res['rss_mb']:.0f} MB, pss {res['pss_mb']:.0f} MB",
                          file=sys.stderr)
            floor = statistics.median(x["wall"] for x in runs["floor"])
            prot = statistics.median(x["wall"] for x in runs["protect"])
            rss = max(x["pss_mb"] for x in runs["protect"])
            rows.append((f"{label} x{n}", floor, prot, prot / floor, n / prot, rss))
            if args.baseline_tree:
                base = statistics.median(x["wall"] for x in runs["baseline"])
                base_rss = max(x["pss_mb"] for x in runs["baseline"])
                rows.append((f"{label} x{n}, baseline tree", floor, base, base / floor, n / base, base_rss))
            if not args.no_memory and suffix == ".png":
                small = max(1, n // 10)
                src_small = tmp_path / f"src-{h}x{w}-{small}"
                write_inputs(src_small, small, h, w, suffix)
                res = run_child("protect", src_small, tmp_path / f"out-mem-{small}", args)
                rows.append((f"{label} x{small} (memory check)", float("nan"), res["wall"], float("nan"), small / res["wall"], res["pss_mb"]))
    print("| case | floor s (median) | protect s (median) | protect / floor | protect images/s | protect peak PSS MB (all processes) |")
    print("|---|---|---|---|---|---|")
    for label, floor, prot, ratio, ips, rss in rows:
        print(f"| {label} | {floor:.2f} | {prot:.2f} | {ratio:.2f} | {ips:.1f} | {rss:.0f} |")
    print(f"\n{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, python "
          f"{platform.python_version()}; workers {args.workers}, batch {args.batch_size}, "
          f"repeats {args.repeats}, scale {args.scale}, weights {args.weights.name}, measure_written {args.measure_written}, "
          f"device {args.device}")


if __name__ == "__main__":
    main()
