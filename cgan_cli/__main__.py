"""`python -m cgan_cli ...` (what torchrun launches) and the `cgan` script: the typer app, with a
Ctrl-C answered by exit code 130 and one line wherever it lands, its own import included."""

import sys


def main() -> None:
    """Import the CLI (typer, rich: ~0.2 s, longer on a loaded machine) under a Ctrl-C guard, run it,
    and exit with its code."""
    from cgan_cli.core.errors import INTERRUPTED  # imports nothing

    try:
        from cgan_cli.cli import app
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: before start-up finished; nothing was written\n")
        code = INTERRUPTED
    else:
        try:
            app()  # standalone typer: always ends in SystemExit
            code = 0
        except SystemExit as exc:
            code = exc.code
    if code == INTERRUPTED:
        # CPython marks a KeyboardInterrupt that passed through exec() of a string (dataclasses and
        # namedtuple build their methods so, hundreds of times while torch imports) as unhandled even
        # when it was caught, and then ends the process by SIGINT instead of this exit code (about 1
        # Ctrl-C in 8 during start-up). Any later exec() of a string clears the mark.
        exec("")
    raise SystemExit(code)


if __name__ == "__main__":
    main()
