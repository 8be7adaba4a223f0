"""``persam app``: personalize by clicking, in a web page (the optional ``[app]`` extra).

    persam/app/state.py    AppState: the one shared model, the embedding cache and the sessions
    persam/app/settings.py the configuration, the limits, the page's settings, the app's refusals
    persam/app/cache.py    the shared model behind a lock, the bounded embedding cache, a session's view
    persam/app/session.py  a browser's session: its uploads, references, concept and targets
    persam/app/items.py    what a session keeps of each reference and target
    persam/app/results.py  what a session finds in its targets: results, overlays, heat maps, the zip
    persam/app/images.py   pictures for the page (JPEG, PNG, data URLs) and the megapixel check
    persam/app/guard.py    Host names, Origins and request sizes (the Gate middleware)
    persam/app/cookie.py   the session cookie and the middleware that finds or starts a session
    persam/app/server.py   FastAPI routes that translate HTTP into those calls, and `serve`
    persam/app/static/     the page (plain HTML, JavaScript and CSS; nothing fetched from the web)

Every method step is persam's own (reference_mask_from_prompts, learn_concept, segment,
segment_objects, similarity maps, save/load_concept, and persam.runs.folder's OutputFolder for the zip):
the page runs exactly what the command line runs.

Importing this package needs nothing beyond the core install; :func:`require_app_extra` says
which package of the extra is missing.
"""

from __future__ import annotations

import importlib

from persam.errors import InputError

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
