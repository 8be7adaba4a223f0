"""GF-SAM on the page ("GF-SAM (every instance)" in the learn step): its DINOv2, loaded once for
every session when first used, and what a session does with it (learn, find, the zip's task).

The method is the command line's (persam.method.gfsam through persam.runs.gfsam_run), with the
official settings.  GF-SAM encodes each photo itself (SAM and DINOv2 on its 1024-pixel frame), so
a target is not taken from the embedding cache: it runs on the app's one predictor under the
shared lock, as every model call of the app does.  Without a DINOv2 checkpoint (AppConfig) the
method is refused with the configured reason, which the page shows beside the disabled choice.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from persam.errors import InputError

METHOD = "gfsam"


class AppDinov2:
    """The app's DINOv2: loaded on first use (a checkpoint that does not load is said then, once per try)."""

    def __init__(self, config, predictor) -> None:
        self.config = config
        self._predictor = predictor
        self._model = None
        self._sha256: Optional[str] = None
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self.config.dinov2_checkpoint is not None

    def status(self) -> dict:
        return {"available": self.available, "dinov2": self.config.dinov2_variant if self.available else None,
                "why": None if self.available else self.config.gfsam_unavailable}

    def require(self) -> None:
        if not self.available:
            raise InputError(self.config.gfsam_unavailable)

    def sha256(self) -> str:
        self.require()
        if self._sha256 is None:
            from persam.runs.key import file_sha256

            self._sha256 = file_sha256(self.config.dinov2_checkpoint)
        return self._sha256

    def model(self):
        self.require()
        with self._lock:
            if self._model is None:
                from persam.runs.models import build_dinov2_features

                self._model = build_dinov2_features(self.config.dinov2_variant, Path(self.config.dinov2_checkpoint),
                                                    self._predictor.device.type, self.config.precision,
                                                    self._predictor.backend, log=None)
            return self._model


def settings():
    from persam.method.gfsam import GFSAMSettings

    return GFSAMSettings()


def learn(session, pairs: List[Tuple[np.ndarray, np.ndarray]]):
    """A GF-SAM concept of the session's references (image, mask) pairs."""
    from persam.method.gfsam import GFSAM

    dinov2 = session.app.dinov2
    with session.app.model.lock:
        gfsam = GFSAM(session.app.model.predictor, dinov2.model(), settings(), dinov2_sha256=dinov2.sha256())
        return gfsam.learn(pairs[0][0], pairs[0][1], *pairs[1:])


def find(session, concept, image: np.ndarray, page_settings) -> Tuple[List, float]:
    """The instances in one target, as the page's settings ask (persam.method.pipeline.Segmentation
    each, persam.runs.gfsam_run.as_segmentations), and GF-SAM's score."""
    from dataclasses import replace

    from persam.method.gfsam import segment
    from persam.runs.gfsam_run import as_segmentations

    dinov2 = session.app.dinov2.model()
    run_settings = replace(settings(), min_similarity=page_settings.min_similarity)
    with session.app.model.lock:
        found = segment(session.app.model.predictor.sibling(), dinov2, concept, image, run_settings)
    return as_segmentations(found, page_settings.multi, page_settings.max_objects), float(found.score)


def zip_task(session, concept):
    """The task the zip's run segments with (persam.runs.gfsam_run.GFSAMTask)."""
    from persam.runs.gfsam_run import GFSAMTask

    return GFSAMTask(concept, settings(), session.app.dinov2.model())


def check_loaded(session, concept, name: str) -> None:
    """InputError when a loaded GF-SAM concept cannot run here (no DINOv2, or another one)."""
    dinov2 = session.app.dinov2
    if not dinov2.available:
        raise InputError(f"{name} is a GF-SAM concept; {dinov2.config.gfsam_unavailable}")
    if concept.dinov2_variant != dinov2.config.dinov2_variant or (
            concept.dinov2_sha256 and concept.dinov2_sha256 != dinov2.sha256()):
        raise InputError(f"concept {name} was learned with DINOv2 {concept.dinov2_variant} "
                         f"(sha {str(concept.dinov2_sha256)[:12]}), not this app's {dinov2.config.dinov2_variant} "
                         f"(sha {dinov2.sha256()[:12]}): learn it again here")
