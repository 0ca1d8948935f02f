"""python -m hpcseg: the hpcseg command."""

from .cli import main

main()
