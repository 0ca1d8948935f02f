"""python -m hpcseg.cli: the hpcseg command."""

from . import main

main()
