"""``persam app``: personalize by clicking, in a web page (the optional ``[app]`` extra).

    persam/app/state.py    the work of the page, without HTTP: one shared model behind a lock,
                           per-browser-session references, targets and concept, bounded caches
    persam/app/server.py   FastAPI routes that translate HTTP into those calls, and `serve`
    persam/app/static/     the page (plain HTML, JavaScript and CSS; nothing fetched from the web)

Every method step is persam's own (reference_mask_from_prompts, learn_concept, segment,
segment_objects, similarity maps, save/load_concept, and persam.run's OutputFolder for the zip):
the page runs exactly what the command line runs.

Importing this package needs nothing beyond the core install; :func:`require_app_extra` says
which package of the extra is missing.
"""

from __future__ import annotations

import importlib

from ..io import InputError

APP_PACKAGES = (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("multipart", "python-multipart"))


def require_app_extra() -> None:
    """InputError (one line) naming the packages of the ``[app]`` extra that are not installed."""
    missing = []
    for module, package in APP_PACKAGES:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise InputError(
            f"`persam app` needs the app extra ({', '.join(missing)} not installed): "
            f"pip install -e \".[app]\" (or pip install fastapi uvicorn python-multipart)"
        )
