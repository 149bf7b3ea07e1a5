"""Entry point of ``python -m rlhf_lite``."""

from .cli import main

main()
