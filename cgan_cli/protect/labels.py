"""Labels at protect time: the code each image's pattern must carry, from the user instead of a guess.

A generator gives every image one of its codes (one pattern per class). Without labels its encoder
guesses the class, and on images it never saw a wrong guess hands a victim an image whose pattern
disagrees with its label (docs/method.md). When the user knows the labels, `--labels` sets the code:

- `folders`: class-per-subfolder trees. Folder names are matched to the generator's class names;
  when none match, sorted folder order gives the index (as torchvision's ImageFolder does), which
  needs exactly as many folders as codes.
- `cls`: a WebDataset sample's `cls` member (an index or a class name).
- FILE.csv: `path,label` rows; the label is a class name or an index.

An image whose label is missing or unknown to the generator fails with a per-file error: nothing
is protected with a guessed code behind the user's back. Torch-free.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path, PurePosixPath

from webdataset.tariterators import base_plus_ext

from cgan_cli.core.classes import ClassIndex
from cgan_cli.core.errors import UsageError
from cgan_cli.protect.sources import Sample, folder_samples

CLS_SUFFIXES = ("cls", "class", "label")  # WebDataset's class-label member suffixes


def labeled(sample: Sample, code: int | str | None, why_missing: str) -> Sample:
    """The sample with its code, or with a label error (a message, or `why_missing` when None)."""
    if isinstance(code, int):
        return replace(sample, label=code)
    return replace(sample, label_error=code if code is not None else why_missing)


# ---------------------------------------------------------------- --labels folders


def folder_class_map(root: Path, classes: ClassIndex) -> dict[str, int]:
    """Class folder name -> code for one input folder; UsageError when the folders cannot be mapped."""
    folders = sorted(e.name for e in Path(root).iterdir() if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise UsageError(f"--labels folders: {root} has no class subfolders (expected one folder per class)")
    return dict(zip(folders, classes.map_classes(folders, f"--labels folders: {root}")))


def folder_labeled_samples(root: Path, mapping: dict[str, int]) -> Iterator[Sample]:
    """Every image under `root`, labeled by its top-level folder; images outside a class folder fail."""
    for sample in folder_samples(root):
        parts = PurePosixPath(sample.rel_out).parts
        code = mapping.get(parts[0]) if len(parts) > 1 else None
        yield labeled(sample, code, f"--labels folders: {sample.id} is not inside a class folder of {root}")


# ---------------------------------------------------------------- --labels FILE.csv


def read_label_csv(path: Path) -> dict[str, str]:
    """`path,label` rows (an optional header `path,label`); UsageError for a malformed file."""
    table: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for line_no, row in enumerate(csv.reader(fh), start=1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) != 2:
                    raise UsageError(f"--labels {path}: line {line_no} has {len(row)} fields; expected path,label")
                key, label = row[0].strip(), row[1].strip()
                if line_no == 1 and key.lower() == "path" and label.lower() == "label":
                    continue
                key = PurePosixPath(key.replace("\\", "/")).as_posix()
                if key in table and table[key] != label:
                    raise UsageError(f"--labels {path}: {key} is listed twice with different labels ({table[key]!r}, {label!r})")
                table[key] = label
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--labels {path}: cannot read the CSV ({exc})") from None
    if not table:
        raise UsageError(f"--labels {path}: no path,label rows")
    return table


def csv_keys(sample: Sample) -> list[str]:
    """The names a CSV row may use for a sample: its path relative to its input folder (or shard),
    the path as given, its absolute path, and for a shard member its name and key inside the shard."""
    keys = [sample.rel_out, PurePosixPath(sample.id.replace("\\", "/")).as_posix()]
    if sample.path is not None:
        keys.append(Path(sample.path).resolve().as_posix())
    if sample.data is not None and "/" in sample.rel_out:
        member = sample.rel_out.split("/", 1)[1]
        keys += [member, member_key(member)[0]]
    return keys


def csv_labeler(path: Path, classes: ClassIndex) -> Callable[[Sample], Sample]:
    table = read_label_csv(path)
    resolved = {}
    for key in table:
        if Path(key).is_absolute():
            resolved[Path(key).resolve().as_posix()] = table[key]
        elif (path.parent / key).exists():
            resolved[(path.parent / key).resolve().as_posix()] = table[key]  # relative to the CSV's folder
    table = {**resolved, **table}

    def label(sample: Sample) -> Sample:
        if sample.passthrough:
            return sample
        text = next((table[k] for k in csv_keys(sample) if k in table), None)
        return labeled(sample, None if text is None else classes.code(text), f"--labels {path}: no row for {sample.rel_out}")

    return label


# ---------------------------------------------------------------- --labels cls (WebDataset shards)

GROUP_MEMBERS = 64  # a sample with more members than this is handed on without waiting for its cls


def member_key(name: str) -> tuple[str, str]:
    """webdataset's (key, suffix) of a member name; a name without a dot is its own key, with no suffix."""
    key, suffix = base_plus_ext(name)
    return (key, suffix) if key is not None else (name, "")


def _group_code(members: list[Sample], classes: ClassIndex) -> int | str | None:
    for member in members:
        if member.data is not None and member_key(member.rel_out)[1].lower() in CLS_SUFFIXES:
            try:
                return classes.code(member.data.decode("utf-8"))
            except UnicodeDecodeError:
                return f"the cls member {member.rel_out} is not text"
    return None


def cls_labeled(members: Iterable[Sample], classes: ClassIndex) -> Iterator[Sample]:
    """Label each shard sample's image members from the sample's cls member, in archive order.

    A sample's members are consecutive but its cls member may follow its image, so the members of one
    key are held (at most GROUP_MEMBERS) until the key changes, then yielded in their own order.
    """
    group: list[Sample] = []

    def flush() -> Iterator[Sample]:
        code = _group_code(group, classes)
        for member in group:
            if member.passthrough:
                yield member
            else:
                yield labeled(member, code, f"--labels cls: sample {member_key(member.rel_out)[0]} has no cls member")
        group.clear()

    for member in members:
        if group and (member_key(member.rel_out)[0] != member_key(group[0].rel_out)[0] or len(group) >= GROUP_MEMBERS):
            yield from flush()
        group.append(member)
    yield from flush()
