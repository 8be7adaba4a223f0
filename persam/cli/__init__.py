"""The `persam` command: the only layer that knows argparse, flag names and exit codes."""

from persam.cli.commands import main

__all__ = ["main"]
