"""`python -m spikedoc`: the same CLI as the `spikedoc` command."""

from spikedoc.cli import app

if __name__ == "__main__":
    app(prog_name="spikedoc")
