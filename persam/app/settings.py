"""What ``persam app`` is configured with, the limits it keeps, and how it says no.

:class:`AppConfig` is the server's configuration (model, limits, folders); :class:`Settings` how the
page asks targets to be segmented.  :class:`NotFound`, :class:`AppFull` and :class:`SessionClosed`
are the app's refusals that are not a problem with the user's input (that is
:class:`~persam.errors.InputError`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from persam.data.listing import ExpansionLimits
from persam.errors import InputError
from persam.runs.defaults import DEFAULT_PRECISION

EMBEDDING_MIB = 4  # one 1 x 256 x 64 x 64 fp32 embedding
MAX_REFERENCES = 8
MAX_TARGETS = 500
MAX_CLICKS = 64
PREVIEW_SIDE = 1024  # the reference as the page shows it (clicks are mapped back to full size)
GALLERY_SIDE = 768  # overlays and heat maps in the gallery
THUMB_SIDE = 160
FOLDER_LIMITS = ExpansionLimits(max_entries=200_000, max_seconds=30.0)  # a person waits for a server folder's listing
CONCEPT_IN_ZIP = "reference.concept"


class NotFound(KeyError):
    """An id that this session does not have (never had, removed, or the session expired)."""

    def __str__(self) -> str:  # KeyError quotes its argument
        return str(self.args[0]) if self.args else "not found"


class AppFull(RuntimeError):
    """No room for a new session: every session the app keeps is working or was used recently."""


class SessionClosed(RuntimeError):
    """The session was evicted (or the app stopped) while a request of it waited for its turn."""


@dataclass
class AppConfig:
    model_type: str
    checkpoint: Optional[Path] = None  # its sha256 is recorded in concepts and results.json
    precision: str = DEFAULT_PRECISION
    max_sessions: int = 8
    max_embeddings: int = 48  # x 4 MiB
    max_megapixels: float = 50.0
    max_upload_mb: float = 64.0  # one file (a request's body may be 1 MiB more, for the form around it)
    max_session_mb: float = 1024.0  # the uploads a session keeps on disk, all together
    session_idle_s: float = 600.0  # a session used more recently than this is never replaced by a new one
    allow_folders: bool = False  # read target images from a folder on the server
    work_dir: Optional[Path] = None  # uploads go below it (default: a new temporary folder)
    # GF-SAM's DINOv2 (persam.app.gfsam), loaded when first used; without a checkpoint the page shows
    # the method disabled, with `gfsam_unavailable` as the reason
    dinov2_variant: Optional[str] = None
    dinov2_checkpoint: Optional[Path] = None
    gfsam_unavailable: str = "GF-SAM needs a DINOv2 checkpoint, which this app was not started with"

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_embeddings < 1:
            raise ValueError("max_sessions and max_embeddings must be at least 1")
        if not (self.max_megapixels > 0 and self.max_upload_mb > 0 and self.max_session_mb > 0):
            raise ValueError("max_megapixels, max_upload_mb and max_session_mb must be positive")
        if not self.session_idle_s >= 0:
            raise ValueError("session_idle_s must be at least 0")



@dataclass
class Settings:
    """How targets are segmented (the page's method panel; the method itself is the concept's)."""

    multi: bool = False
    max_objects: int = 5
    min_similarity: Optional[float] = None

    @classmethod
    def parse(cls, data: Optional[dict]) -> "Settings":
        from persam.runs.records import MAX_LABELS

        data = data or {}
        multi = data.get("multi", False)
        if not isinstance(multi, bool):  # bool("false") is True: a string is not read as a yes
            raise InputError(f"multi must be true or false, not {multi!r}")
        try:
            max_objects = int(data.get("max_objects", 5))
        except (TypeError, ValueError):
            raise InputError(f"max objects must be a whole number, not {data.get('max_objects')!r}") from None
        if not 1 <= max_objects <= MAX_LABELS:
            raise InputError(f"max objects must be between 1 and {MAX_LABELS}, not {max_objects}")
        threshold = data.get("min_similarity")
        if threshold is not None and threshold != "":
            try:
                threshold = float(threshold)
            except (TypeError, ValueError):
                threshold = math.nan
            if not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
                raise InputError(f"min similarity must be a cosine between -1 and 1, not {data.get('min_similarity')!r}")
        else:
            threshold = None
        return cls(multi, max_objects, threshold)
