"""A generator's codes as users name them: class names or indices -> code (torch-free).

`cgan protect --labels` and `cgan verify --labels` both turn a user's class label into the code of
the generator's pattern for that class; this is the one place that decides how names match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from cgan_cli.core.errors import UsageError


def normalize_name(name: str) -> str:
    """Class names compare case-blind, with spaces, underscores and slashes read as hyphens."""
    return re.sub(r"[\s_/\\-]+", "-", name.strip().lower())


@dataclass(frozen=True)
class ClassIndex:
    """The generator's codes and class names: turns a user's label into a code, or says why not."""

    class_names: tuple[str, ...]
    num_codes: int

    @classmethod
    def from_meta(cls, meta) -> ClassIndex:
        """From a weights file's WeightsMeta: its class names and how many codes the generator has."""
        return cls(tuple(meta.class_names), int(meta.arch_params.get("num_codes", meta.num_classes)))

    @cached_property
    def by_name(self) -> dict[str, int]:
        """Normalised class name -> code (built once: `code` runs once per labeled image)."""
        return {normalize_name(n): i for i, n in enumerate(self.class_names)}

    def code(self, label: str) -> int | str:
        """The code for `label` (a class name or an index), or an error message."""
        text = label.strip()
        if re.fullmatch(r"[+-]?\d+", text):
            index = int(text)
            if 0 <= index < self.num_codes:
                return index
            return f"label {text} is outside this generator's codes 0..{self.num_codes - 1}"
        code = self.by_name.get(normalize_name(text))
        if code is not None:
            return code
        known = ", ".join(self.class_names) if self.class_names else "none: use indices"
        return f"label {text!r} is not one of this generator's classes ({known}) nor an index 0..{self.num_codes - 1}"

    def map_classes(self, names: list[str], what: str) -> list[int]:
        """A dataset's sorted class names -> codes: by name when every name matches, by position when
        none does and the counts agree (like torchvision's ImageFolder); UsageError naming `what` else."""
        unknown = [n for n in names if normalize_name(n) not in self.by_name]
        if self.class_names and not unknown:
            return [self.by_name[normalize_name(n)] for n in names]
        if self.class_names and len(unknown) < len(names):
            raise UsageError(f"{what}: class folder(s) {', '.join(unknown)} match none of the generator's classes "
                             f"({', '.join(self.class_names)}); rename them, or give the labels with --labels FILE.csv")
        if len(names) != self.num_codes:
            known = f"its class names ({', '.join(self.class_names)}) nor, " if self.class_names else ""
            raise UsageError(f"{what} has {len(names)} class folders but the generator has {self.num_codes} codes: the "
                             f"names match neither {known}by position, its number of codes; name the folders after the "
                             "classes, or give the labels with --labels FILE.csv")
        return list(range(len(names)))
