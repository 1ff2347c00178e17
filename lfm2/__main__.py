"""`python -m lfm2` is the `lfm2` command."""

from lfm2.cli import main

main()
