"""`python -m cgan_cli ...` (what torchrun launches) and the `cgan` script: the typer app, with a
Ctrl-C during its own import answered like one at any later point (exit 130, one line, no traceback)."""

import sys


def main() -> None:
    """Import the CLI (typer, rich: ~0.2 s, longer on a loaded machine) under a Ctrl-C guard, then run it."""
    try:
        from cgan_cli.cli import app
    except KeyboardInterrupt:
        from cgan_cli.core.errors import INTERRUPTED  # imports nothing, so a partial import cannot break it

        sys.stderr.write("interrupted: before start-up finished; nothing was written\n")
        raise SystemExit(INTERRUPTED) from None
    app()


if __name__ == "__main__":
    main()
