"""`python -m cgan_cli ...` (what torchrun launches) runs the same CLI as `cgan ...`."""

from cgan_cli.cli import app

if __name__ == "__main__":
    app()
