"""The one error type that means "the command line cannot run as given" (exit code 2, nothing written)."""

from __future__ import annotations


class UsageError(ValueError):
    """A setting, input or file that cannot be used as given; the message says what to change."""
