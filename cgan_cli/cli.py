"""Command line: parses options and wires source -> engine -> sink. No logic lives here."""

from __future__ import annotations

import typer

from cgan_cli import __version__

app = typer.Typer(
    name="cgan",
    help="Make image data unlearnable: add bounded, imperceptible ConfounderGAN noise to every image.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cgan {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """cgan: protect images, train generators, verify unlearnability."""


# --- protect (issue 2) ---


# --- train (issue 3) ---


# --- verify (issue 4) ---
