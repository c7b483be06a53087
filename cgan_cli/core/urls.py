"""What a SRC or DATA argument names: WebDataset shards (paths, brace patterns, `pipe:` URLs) or not.

Both sides read shards: `protect` streams them, `train` / `verify` load labeled samples from them.
URLs are expanded exactly as webdataset expands them, so every URL that works with
`webdataset.WebDataset` works here.
"""

from __future__ import annotations

from cgan_cli.core.choices import STDIN

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def expand_shard_spec(spec: str) -> list[str]:
    """`a-{000..009}.tar::b.tar` -> list of URLs, exactly as webdataset expands them."""
    if spec == STDIN or spec.startswith("pipe:"):
        return [spec]  # a shell command may hold braces of its own; never expand them
    from webdataset.shardlists import (
        expand_urls,  # imports torch: only when a pattern needs it
    )

    return expand_urls(spec)


def looks_like_shards(spec: str) -> bool:
    """True for inputs that should be read as tar shards rather than a folder or an image."""
    if spec.startswith("pipe:"):
        return True
    if not any(mark in spec for mark in ("{", "::", "$")):  # nothing to expand: no webdataset (torch) import
        return spec.lower().endswith(SHARD_SUFFIXES)
    return any(url.lower().endswith(SHARD_SUFFIXES) for url in expand_shard_spec(spec))
