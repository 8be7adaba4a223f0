"""The run's key and the content hashes it is made of, and strict JSON.

Every record of a results.json carries the key of what made its mask (:func:`settings_key` of
:func:`mask_settings`: the reference or concept by content, the method and its settings, the model
and the checkpoint's sha256); :func:`differences` says, for a message, how two settings differ.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from persam.runs.records import RunOptions

UNRECORDED_KEY = "unrecorded"  # the key of records from a results.json written before keys existed


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, remembered for the process per (path, size, mtime), so that
    a big checkpoint is read once however often it is asked for."""
    p = Path(path).resolve()
    stat = p.stat()
    return _sha256_of(str(p), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    from sam.download import sha256_file

    return sha256_file(path)


def image_sha256(path) -> Optional[str]:
    """sha256 of an image file, local or a URI (not remembered: there are many); None when it
    cannot be read (reported when it is loaded)."""
    from persam.data.sources import image_sha256 as sha256_of_image

    return sha256_of_image(path)


def as_image_path(p):
    """A local Path, or the UriPath of a URI (persam.data.sources)."""
    from persam.data.uri_sources import UriPath, is_uri

    if isinstance(p, UriPath):
        return p
    return UriPath(str(p)) if is_uri(str(p)) else Path(p)


def mask_settings(options: RunOptions) -> Dict[str, object]:
    """Everything that makes the run's masks, readable: the caller's `made_with` plus the options
    that change masks (not save_similarity or overlay_format, which only add or change pictures)."""
    settings = dict(options.made_with)
    settings["multi"] = options.multi
    if options.multi:
        settings["max_objects"] = options.max_objects
    settings["min_similarity"] = options.min_similarity
    return strict_json(settings)


def settings_key(settings: Dict[str, object]) -> str:
    """A short hex digest of the settings (canonical JSON): equal keys, equally made masks."""
    text = json.dumps(strict_json(settings), sort_keys=True, allow_nan=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def differences(old_key: str, old: Optional[dict], new: dict) -> str:
    """The settings that differ, for a message: 'different checkpoint_sha256, method'."""
    if old_key == UNRECORDED_KEY or not isinstance(old, dict):
        return "settings not recorded: an older persam made them"
    names = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return f"different {', '.join(names)}" if names else "different settings"


def strict_json(value):
    """`value` with every non-finite float (NaN, Infinity) replaced by None and numpy scalars made
    plain, so that it can be written as strict JSON."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

