"""Where tensors run and at what precision: one answer for protect, train, verify and audit."""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from cgan_cli.core.choices import Precision
from cgan_cli.core.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """`auto | cpu | cuda | cuda:N` -> a device that exists here, or UsageError saying why not."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        _, _, idx = name.partition(":")
        if idx and not idx.isdigit():
            raise UsageError(f"--device {name}: expected cuda:N with N a GPU index")
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        index = int(idx or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    raise UsageError(f"--device {name}: expected auto, cpu, cuda or cuda:N")


def resolve_precision(name: str, device: torch.device) -> str:
    if name not in {p.value for p in Precision}:
        raise UsageError(f"--precision {name}: expected {', '.join(p.value for p in Precision)}")
    if device.type != "cuda":
        if name in ("bf16", "fp16"):
            raise UsageError(f"--precision {name} needs a CUDA device; the CPU path runs fp32")
        return "fp32"
    if name == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return name


def autocast_context(device: torch.device, precision: str):
    """Mixed precision only where it pays (CUDA); CPU and fp32 run exact, so CPU runs stay deterministic.

    `precision` is what resolve_precision returned; protect, train and the verify victims all use this.
    """
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def cpu_threads_per_worker(workers: int) -> int:
    """Torch threads for each of `workers` engine processes (all cores for one in-process engine).

    Why: engines whose thread pools add up to more than the machine's cores fight each other and the
    codecs for the same cores; on the 2-core bench host two spinning threads made a 32 px generator
    batch ~45x slower than one thread (docs/performance.md).
    """
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def set_cpu_threads(threads: int | None) -> None:
    """Give this process's torch `threads` CPU threads; an explicit OMP_NUM_THREADS wins."""
    if threads and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
