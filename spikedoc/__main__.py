"""`python -m spikedoc`: the same CLI as the `spikedoc` command."""

from spikedoc.cli import main

if __name__ == "__main__":
    main()
