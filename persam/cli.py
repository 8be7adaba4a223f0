"""Command-line interface: ``persam SUBCOMMAND ...``.

Each subcommand is a ``cmd_NAME(args) -> int`` function registered in :func:`build_parser`
(``subparser.set_defaults(func=cmd_NAME)``).  Expected failures raise ordinary exceptions
(``CheckpointError``, ``DownloadError``, ``ValueError``, ``OSError``); :func:`main` turns them
into one ``persam: error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from sam.download import MODELS, DownloadError, download_checkpoint

PROG = "persam"
EXIT_ERROR = 2


class _UsageError(Exception):
    """Raised by the parser instead of exiting, so that main() returns the exit code."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse API
        raise _UsageError(self, message)


def _error(message: str) -> int:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_ERROR


# --------------------------------------------------------------------------------------------
# subcommands


def cmd_download(args: argparse.Namespace) -> int:
    """``persam download MODEL [--cache-dir DIR] [--url URL]``: fetch and verify checkpoints."""
    names = sorted(MODELS) if args.model == "all" else [args.model]
    if args.url and len(names) > 1:
        return _error("--url can only be used with a single model, not with `all`")
    status = 0
    for name in names:
        try:
            path = download_checkpoint(
                name, cache_dir=args.cache_dir, url=args.url, progress=not args.quiet
            )
        except (DownloadError, ValueError, OSError) as exc:
            status = _error(f"{name}: {exc}" if len(names) > 1 else exc)
            continue
        print(path)
    return status


# --------------------------------------------------------------------------------------------
# parser and entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Personalized one-shot segmentation (PerSAM, PerSAM-F) on Segment Anything.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "download",
        help="download and verify a model checkpoint",
        description="Download a checkpoint into the cache (resuming a partial download) and "
        "print its path.  The cache is $PERSAM_CACHE, else ~/.cache/persam.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        choices=sorted(MODELS) + ["all"],
        help=f"one of {', '.join(sorted(MODELS))}, or all",
    )
    p.add_argument("--cache-dir", metavar="DIR", default=None, help="download folder")
    p.add_argument("--url", metavar="URL", default=None, help="download from this URL instead")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)

    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        sub_parser, message = exc.args
        return _error(f"{message} (see `{sub_parser.prog} --help`)")
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (DownloadError, ValueError, OSError) as exc:  # CheckpointError is a ValueError
        return _error(str(exc))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
