"""``python -m persam`` runs the command-line interface."""

import sys

from persam.cli import main

if __name__ == "__main__":
    sys.exit(main())
