"""`python -m hybridq` runs the CLI."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the CLI is still importing
    sys.exit(130)

main()
