"""Image sets the learning side holds in memory: labeled ones for `train` and `verify` (built-in
Fashion-MNIST, class-per-subfolder trees, WebDataset shards with `cls`) and unlabeled folders for `audit`.

A `LabeledImages` holds uint8 pixels (N, C, H, W) in memory: the small sets that training, victim
evaluation and audits use fit easily (Fashion-MNIST train is 47 MB). Streaming protection of large
collections does not go through here; it uses the source -> engine -> sink pipeline.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from webdataset.tariterators import tarfile_samples

from cgan_cli.core.errors import UsageError
from cgan_cli.core.formats import IMAGE_SUFFIXES, heif_opener, is_image_name
from cgan_cli.core.urls import expand_shard_spec, looks_like_shards

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]
BUILTIN_DATASETS = ("fashion-mnist",)
DIGEST_BYTES = 6  # per image: a false match among 100k recorded images is ~1 in 3 billion per image checked
MAX_DIGESTS = 100_000  # more training images than this: only the whole-set fingerprint is recorded (header size)


class DatasetError(UsageError):
    """A dataset that cannot be read; the message says what is missing and how to get it."""


@dataclass
class LabeledImages:
    pixels: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    class_names: list[str]
    name: str = ""
    paths: list[str] = field(default_factory=list)  # source file per image, where there is one
    origin: torch.Tensor | None = None  # each image's position in the set as loaded; None = that set itself

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def size(self) -> int:
        return int(self.pixels.shape[-1])

    def floats(self) -> torch.Tensor:
        """Pixels as float32 in [0, 1]."""
        return self.pixels.float().div_(255.0)

    def subset(self, index: torch.Tensor | slice) -> "LabeledImages":
        positions = torch.arange(len(self))[index]
        paths = [self.paths[i] for i in positions.tolist()] if self.paths else []
        origin = positions if self.origin is None else self.origin[positions]
        return LabeledImages(self.pixels[index], self.labels[index], self.class_names, self.name, paths, origin)

    def fingerprint(self) -> str:
        """sha256 over pixels and labels: identifies exactly which data a generator was trained on."""
        digest = hashlib.sha256()
        digest.update(self.pixels.numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()

    def image_digests(self) -> list[bytes]:
        """Per image, the first DIGEST_BYTES of sha256 over its pixels: which images, in any order."""
        arr = self.pixels.numpy()
        return [hashlib.sha256(arr[i].tobytes()).digest()[:DIGEST_BYTES] for i in range(len(self))]


def record_digests(data: LabeledImages) -> str | None:
    """The sorted per-image digests as base64, for the weights' metadata; None above MAX_DIGESTS images.

    Why: `cgan verify` must tell whether a generator trained on the very images it is measured on
    (the easy, memorised case) from the weights alone; a whole-set fingerprint answers only "the same
    set", not "which of these images". Digests are over pixels at the generator's working size.
    """
    if len(data) > MAX_DIGESTS:
        return None
    return base64.b64encode(b"".join(sorted(set(data.image_digests())))).decode("ascii")


def recorded_digests(text: str) -> set[bytes]:
    raw = base64.b64decode(text)
    return {raw[i : i + DIGEST_BYTES] for i in range(0, len(raw), DIGEST_BYTES)}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR) -> LabeledImages:
    """Fashion-MNIST from the IDX files of Debian's `dataset-fashion-mnist` package (never downloads)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    files = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DatasetError(
                f"Fashion-MNIST not found in {root} (looked for {candidates[0].name}). "
                "Install it with: sudo apt-get install -y dataset-fashion-mnist"
            )
        files.append(found)
    images, labels = _read_idx(files[0]), _read_idx(files[1])
    pixels = torch.from_numpy(images.copy()).unsqueeze(1)
    return LabeledImages(pixels, torch.from_numpy(labels.astype(np.int64)), list(FASHION_MNIST_CLASSES), f"fashion-mnist/{split}")


def _to_square(img: Image.Image, size: int, mode: str) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "P"):
        # Cut-outs with transparency go onto white, as they would be shown.
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        canvas.alpha_composite(img)
        img = canvas
    img = img.convert(mode)
    return ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)


def load_image_folder(root: Path, size: int, channels: int = 3) -> LabeledImages:
    """A class-per-subfolder tree (root/<class>/<image>), every image fitted to size x size."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder of class subfolders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root}: no class subfolders (expected {root}/<class>/<image files>)")
    mode = "L" if channels == 1 else "RGB"
    heif_opener()  # .heic files count as images (is_image_name)
    arrays, labels, paths = [], [], []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).rglob("*")):
            if not is_image_name(path.name) or not path.is_file():
                continue
            try:
                with Image.open(path) as img:
                    arr = np.asarray(_to_square(img, size, mode))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise DatasetError(f"{path}: unreadable image ({exc}); fix or remove it") from exc
            arrays.append(arr.reshape(size, size, channels))
            labels.append(label)
            paths.append(str(path))
    if not arrays:
        raise DatasetError(f"{root}: class subfolders hold no images")
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return LabeledImages(pixels, torch.tensor(labels, dtype=torch.int64), classes, root.name, paths)


def load_unlabeled(root: Path, size: int, channels: int, limit: int | None = None, seed: int = 0) -> tuple[torch.Tensor, list[str], list[str]]:
    """Every image under `root` (recursive, hidden files skipped), fitted like a labeled folder, no labels needed.

    Returns uint8 pixels (N, C, size, size), the files used, and "file: why" for each that could not
    be read (skipped, so one bad file does not stop an audit). With `limit`, a seeded random subset
    of the files is decoded.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_name(p.name)
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if limit is not None and len(files) > limit:
        keep = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
        files = [files[i] for i in keep.tolist()]
    mode = "L" if channels == 1 else "RGB"
    heif_opener()  # .heic files count as images (is_image_name)
    arrays, used, skipped = [], [], []
    for path in files:
        try:
            with Image.open(path) as img:
                arrays.append(np.asarray(_to_square(img, size, mode)).reshape(size, size, channels))
            used.append(str(path))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            skipped.append(f"{path}: {exc}")
    if not arrays:
        raise DatasetError(f"{root}: no readable image files ({' '.join(sorted(IMAGE_SUFFIXES))})"
                           + (f"; e.g. {skipped[0]}" if skipped else ""))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return pixels, used, skipped


def load_shards(spec: str, size: int, channels: int = 3) -> LabeledImages:
    """Labeled WebDataset shards (paths, brace patterns, pipe: URLs): one image + one `cls` per sample.

    Samples are grouped by key the webdataset way; `cls` holds the integer label as text. Samples
    without an image or a `cls` member are skipped (webdataset pipelines drop them too).
    """
    mode = "L" if channels == 1 else "RGB"
    heif_opener()  # .heic members count as images (is_image_name)
    arrays, labels, paths = [], [], []
    for url in expand_shard_spec(spec):
        for fields in tarfile_samples([{"url": url}]):
            key = fields["__key__"]
            image_ext = next((e for e in fields if not e.startswith("__") and is_image_name(f"member.{e}")), None)
            if image_ext is None or "cls" not in fields:
                continue
            try:
                label = int(fields["cls"].decode("utf-8").strip())
                with Image.open(io.BytesIO(fields[image_ext])) as img:
                    arr = np.asarray(_to_square(img, size, mode))
            except (ValueError, OSError) as exc:
                raise DatasetError(f"{url}: sample {key!r}: unreadable image or label ({exc})") from exc
            arrays.append(arr.reshape(size, size, channels))
            labels.append(label)
            paths.append(f"{url}#{key}.{image_ext}")
    if not arrays:
        raise DatasetError(f"{spec}: no samples with both an image and a cls member")
    if min(labels) < 0:
        raise DatasetError(f"{spec}: negative cls label {min(labels)}")
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    names = [str(i) for i in range(max(labels) + 1)]
    return LabeledImages(pixels, torch.tensor(labels, dtype=torch.int64), names, Path(spec).name, paths)


def load_labeled(source: str, split: str = "train", size: int | None = None, channels: int | None = None) -> LabeledImages:
    """Resolve a DATA argument: a built-in name, WebDataset shards, or a class-per-subfolder tree."""
    if source in BUILTIN_DATASETS:
        return load_fashion_mnist(split)
    if looks_like_shards(str(source)):
        return load_shards(str(source), size=size or 64, channels=channels or 3)
    return load_image_folder(Path(source), size=size or 64, channels=channels or 3)


def split_holdout(data: LabeledImages, fraction: float, seed: int) -> tuple[LabeledImages, LabeledImages]:
    """Deterministic stratified split: (train, held-out test)."""
    gen = torch.Generator().manual_seed(seed)
    test_idx = []
    for label in range(len(data.class_names)):
        idx = (data.labels == label).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test_idx.append(idx[: max(1, int(round(len(idx) * fraction)))] if len(idx) > 1 else idx[:0])
    test = torch.cat(test_idx).sort().values
    mask = torch.ones(len(data), dtype=torch.bool)
    mask[test] = False
    return data.subset(mask.nonzero().flatten()), data.subset(test)
