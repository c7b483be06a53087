"""The one error type that means "the command line cannot run as given" (exit code 2, nothing written),
and what a run stopped by Ctrl-C exits with and says."""

from __future__ import annotations


class UsageError(ValueError):
    """A setting, input or file that cannot be used as given; the message says what to change."""


INTERRUPTED = 130  # exit code of a run stopped by Ctrl-C (SIGINT), as the shell reports one


def interrupted_line(protected: int) -> str:
    """The one line a Ctrl-C stopping `cgan protect` prints, wherever it lands (start-up, torch import, mid-run)."""
    return f"interrupted: {protected} protected; rerun the same command to resume"
