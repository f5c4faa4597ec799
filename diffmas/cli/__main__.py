"""``python -m diffmas.cli``."""

from diffmas.cli import main

main()
