"""`python -m hybridq` runs the CLI."""

from .cli import main

main()
