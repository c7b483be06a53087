"""Prepared GPU check for `cgan protect` (run it where a CUDA device exists; results -> docs/performance.md).

    .venv/bin/python bench/gpu_check.py [--out DIR] [--seconds 8]

1. Agreement: CUDA fp32, bf16 and fp16 (autocast) protect the same images; every output must stay
   within epsilon of its input (exact bound), and reduced precision may differ from fp32 only by
   epsilon rounding: at most 1 level on any pixel. CUDA fp32 is also compared with the CPU path.
2. Throughput: ProtectEngine.protect_batch images/s at 256 px and at 12 MP (4000x3000), per
   precision, including host->device->host copies (what `cgan protect` does today).
3. Decode/encode on the device: torchvision.io.decode_jpeg / encode_jpeg with device="cuda" on the
   same images, to size what keeping the pixels on the GPU between decode and encode would buy.
4. The card, driver, torch and torchvision versions.

The generator is the shipped default, weights/cgan-rgb-default.safetensors (`--weights` for another),
as in bench/protect_bench.py. Writes
gpu_check.json into --out (default: $OUT if set, else the current directory) and prints it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protect_bench import DEFAULT_WEIGHTS, photo  # noqa: E402  (same generator and inputs as the CPU bench)

from cgan_cli.core.engine import EngineConfig, ProtectEngine  # noqa: E402

SIZES = {"256px": (256, 256, 64), "12MP": (3000, 4000, 4)}  # (height, width, batch)


def timed_rate(fn, images: int, seconds: float) -> float:
    """Images/s of fn() (which handles `images` images), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        done += images
    torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def agreement(weights: Path, images: dict[str, list[np.ndarray]], epsilon: float) -> dict:
    engines = {p: ProtectEngine(EngineConfig(weights, device="cuda", precision=p)) for p in ("fp32", "bf16", "fp16")}
    cpu = ProtectEngine(EngineConfig(weights, device="cpu"))
    result: dict = {}
    for name, batch in images.items():
        batch = batch[:2]
        outs = {p: e.protect_batch(batch) for p, e in engines.items()}
        outs["cpu-fp32"] = cpu.protect_batch(batch)
        for label, out in outs.items():
            linf = max(int(np.abs(o.astype(np.int32) - x).max()) for o, x in zip(out, batch))
            vs = [np.abs(o.astype(np.int32) - r) for o, r in zip(out, outs["fp32"])]
            row = {
                "linf_levels": linf,
                "within_epsilon": linf <= int(epsilon),
                "max_diff_vs_cuda_fp32": int(max(v.max() for v in vs)),
                "frac_pixels_differing_vs_cuda_fp32": float(np.mean([(v > 0).mean() for v in vs])),
            }
            row["ok"] = row["within_epsilon"] and row["max_diff_vs_cuda_fp32"] <= 1
            result[f"{name}/{label}"] = row
    return result


def throughput(weights: Path, images: dict[str, list[np.ndarray]], seconds: float) -> dict:
    rates = {}
    for precision in ("fp32", "bf16", "fp16"):
        for name, (_, _, batch) in SIZES.items():
            engine = ProtectEngine(EngineConfig(weights, device="cuda", precision=precision, batch_size=batch))
            rates[f"{name}/{precision}"] = round(timed_rate(lambda: engine.protect_batch(images[name]), batch, seconds), 2)
    return rates


def device_codec(images: dict[str, list[np.ndarray]], seconds: float) -> dict:
    """torchvision's nvJPEG decode/encode rates (images/s), or why they could not run."""
    try:
        from torchvision.io import decode_jpeg, encode_jpeg
    except ImportError as exc:
        return {"error": str(exc)}
    rates: dict = {}
    for name, batch in images.items():
        buf = io.BytesIO()
        Image.fromarray(batch[0]).save(buf, "JPEG", quality=90)
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        try:
            decoded = decode_jpeg(data, device="cuda")
            rates[f"{name}/decode_jpeg_cuda"] = round(timed_rate(lambda: decode_jpeg(data, device="cuda"), 1, seconds / 2), 2)
            rates[f"{name}/encode_jpeg_cuda"] = round(timed_rate(lambda: encode_jpeg(decoded, quality=90), 1, seconds / 2), 2)
        except Exception as exc:  # noqa: BLE001 - report, do not stop the check
            rates[f"{name}/error"] = f"{type(exc).__name__}: {exc}"
    return rates


def card() -> dict:
    props = torch.cuda.get_device_properties(0)
    import torchvision

    return {
        "name": props.name, "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
        "bf16_supported": torch.cuda.is_bf16_supported(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--seconds", type=float, default=8.0, help="timing window per measurement")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="generator (default: the shipped RGB default)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    images = {name: [photo(rng, h, w) for _ in range(batch)] for name, (h, w, batch) in SIZES.items()}
    weights = args.weights
    epsilon = ProtectEngine(EngineConfig(weights, device="cpu")).epsilon
    report = {"card": card(), "weights": str(weights), "epsilon": epsilon, "agreement": agreement(weights, images, epsilon),
              "protect_batch_images_per_s": throughput(weights, images, args.seconds),
              "device_codec_images_per_s": device_codec(images, args.seconds)}
    report["ok"] = all(row["ok"] for key, row in report["agreement"].items() if not key.endswith("cpu-fp32"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
