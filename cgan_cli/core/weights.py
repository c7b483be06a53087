"""Generator weights on disk: safetensors tensors + one JSON metadata block. No pickle anywhere.

`torch.load` on a file someone downloaded can execute code; safetensors cannot. Loading checks
the format version, the architecture, every key and every shape, and says which one is wrong.
Reading the metadata (`read_meta`) is torch-free, so the CLI can check a weights file within
milliseconds, before torch or any worker starts; torch is imported by the functions that need it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from cgan_cli.core.atomic import write_atomic
from cgan_cli.core.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT_VERSION = 1
META_KEY = "cgan"
DIGESTS_KEY = "image_digests"  # in WeightsMeta.dataset: which images the generator trained on (learning/data.record_digests)


class WeightsError(UsageError):
    """A weights file that cgan refuses to use; the message says what is wrong."""


@dataclass
class WeightsMeta:
    """Everything `protect` needs to use a generator, plus how it was made."""

    arch: str
    arch_params: dict[str, int]
    epsilon: float  # in /255 units, the budget the generator was trained for
    working_size: int  # generator input side in pixels (images are resized to this for the code)
    channels: int  # 1 = grayscale, 3 = RGB
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)  # training hyper-parameters and objective
    dataset: dict[str, Any] = field(default_factory=dict)  # name, size, fingerprint, DIGESTS_KEY (older files: no digests)
    protect_defaults: dict[str, Any] = field(default_factory=dict)  # settings chosen after training by measurement (mask_floor)
    seed: int | None = None
    command: str = ""
    code_version: str = ""
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def described(self) -> dict[str, Any]:
        """The metadata for a summary or report: the per-image digests (up to ~0.8 MB) left out."""
        record = asdict(self)
        record["dataset"] = {k: v for k, v in self.dataset.items() if k != DIGESTS_KEY}
        return record

    @classmethod
    def from_json(cls, text: str) -> "WeightsMeta":
        raw = json.loads(text)
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise WeightsError(f"metadata format_version is {version!r}; this cgan reads version {FORMAT_VERSION}")
        known = set(cls.__dataclass_fields__)
        missing = [k for k in ("arch", "arch_params", "epsilon", "working_size", "channels", "num_classes") if k not in raw]
        if missing:
            raise WeightsError(f"metadata lacks required field(s): {', '.join(missing)}")
        return cls(**{k: v for k, v in raw.items() if k in known})


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically, so a crash never leaves half a file."""
    from safetensors.torch import save

    write_atomic(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


def save_generator(path: Path, model: nn.Module, meta: WeightsMeta) -> None:
    save_tensors_atomic(path, model.state_dict(), {META_KEY: meta.to_json()})


def read_meta(path: Path) -> WeightsMeta:
    """Metadata only, without loading tensors (cheap: safetensors keeps it in the header)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    if raw is None:
        raise WeightsError(f"{path}: no '{META_KEY}' metadata block; not a cgan generator file")
    try:
        return WeightsMeta.from_json(raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise WeightsError(f"{path}: metadata is not valid cgan JSON ({exc})") from exc


def load_generator(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, WeightsMeta]:
    """Build the generator that `path` describes and load its weights, validating everything."""
    import torch
    from safetensors.torch import load_file

    from cgan_cli.core.generators import GENERATORS, build_generator

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    meta = read_meta(path)
    if meta.arch not in GENERATORS:
        raise WeightsError(f"{path}: architecture {meta.arch!r} unknown; this cgan knows {sorted(GENERATORS)}")
    try:
        model = build_generator(meta.arch, meta.arch_params)
    except TypeError as exc:
        raise WeightsError(f"{path}: bad hyper-parameters {meta.arch_params} for {meta.arch}: {exc}") from exc
    if getattr(model, "channels", meta.channels) != meta.channels:
        raise WeightsError(f"{path}: metadata says {meta.channels} channels, architecture has {model.channels}")
    tensors = load_file(str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{path}: key mismatch for {meta.arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, ref in expected.items():
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise WeightsError(f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, expected {tuple(ref.shape)}")
        if not torch.isfinite(tensors[key].float()).all():
            raise WeightsError(f"{path}: tensor {key} holds NaN or Inf")
    model.load_state_dict(tensors)
    return model.to(device).eval(), meta
