"""`python -m ckptmap`: the same command line as `ckptmap`."""

from .cli import main

main()
