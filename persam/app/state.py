"""What the page does, without HTTP: one shared model, one :class:`Session` per browser.

* **One model, one lock.**  The SAM model is loaded once (:class:`AppState`).  Every browser
  session works through its own :class:`SessionPredictor`, a view of the shared predictor with its
  own current image; the model's forward calls (encode, decode) are serialised by one lock, since
  torch modules are not meant for concurrent forwards.
* **Encode once.**  Image embeddings are kept in :class:`EmbeddingCache`, a least-recently-used
  cache bounded in entries (4 MiB each) and shared by all sessions under per-session keys.  A click
  on the reference, a new method or threshold only decodes; an image is encoded again only after
  its embedding was evicted.
* **Sessions never mix.**  Each session keeps its uploads in its own folder (bounded in bytes)
  and looks its images up by random ids in its own tables.  A session is made only when a person
  starts one (:meth:`AppState.new_session`, the server's first state-changing request); the
  sessions are bounded, and a new one replaces the least recently used session that has been idle
  for a while (its folder removed), never one that is working: the app refuses the new one
  instead (:class:`AppFull`).
* **Nothing is decoded that is too large.**  Every uploaded or server-side image (reference,
  mask, target) has its size read from its header and checked against ``max_megapixels`` before
  it is decoded (:func:`check_pixels`).
* **The method is persam's.**  Clicks go through :func:`persam.method.target.reference_mask_from_prompts`,
  learning through :func:`persam.method.pipeline.learn_concept`, targets through
  :func:`persam.method.pipeline.segment` / :func:`persam.method.multi.segment_objects`, heat maps through
  :func:`persam.method.pipeline.locate` and :mod:`persam.data.visualize`, concept files through :mod:`persam.data.concept`, and
  the zip is written by :class:`persam.runs.folder.OutputFolder`, as ``persam apply`` writes its folder.

The pieces: :mod:`persam.app.settings` (configuration, limits, refusals), :mod:`persam.app.cache`
(the shared model and the embeddings), :mod:`persam.app.session` (a browser's session),
:mod:`persam.app.items` (its images), :mod:`persam.app.results` (what it finds in its targets) and
:mod:`persam.app.images` (pictures for the page).  This module holds :class:`AppState`: the model,
the cache and the sessions.

Every problem with the user's input raises :class:`~persam.errors.InputError` (one line naming the
user's file, never a server path); :class:`NotFound` is an unknown id.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import List, Optional

from sam.predictor import SamPredictor

from persam.app.cache import EmbeddingCache, SharedModel
from persam.app.gfsam import AppDinov2
from persam.app.session import Session
from persam.app.settings import AppConfig, AppFull

__all__ = ["AppState"]


class AppState:
    """The model, the embedding cache and the sessions (at most max_sessions; a new one replaces the
    least recently used session that is not working, else it is refused)."""

    def __init__(self, predictor: SamPredictor, config: AppConfig) -> None:
        self.config = config
        self.model = SharedModel(predictor)
        self.dinov2 = AppDinov2(config, predictor)  # GF-SAM's, loaded when first used
        self.embeddings = EmbeddingCache(config.max_embeddings)
        self._own_work_dir = config.work_dir is None
        self.work_dir = Path(config.work_dir) if config.work_dir else Path(tempfile.mkdtemp(prefix="persam-app-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._sessions: "OrderedDict[str, Session]" = OrderedDict()
        self._lock = threading.Lock()
        self._sha256: Optional[str] = None

    def checkpoint_sha256(self) -> Optional[str]:
        if self._sha256 is None and self.config.checkpoint is not None and Path(self.config.checkpoint).is_file():
            from persam.runs.key import file_sha256

            self._sha256 = file_sha256(self.config.checkpoint)
        return self._sha256

    def find(self, session_id: Optional[str]) -> Optional[Session]:
        """The session of that id (now the most recently used), or None (never was, or evicted)."""
        with self._lock:
            session = self._sessions.get(session_id or "")
            if session is not None:
                self._sessions.move_to_end(session.id)
            return session

    def new_session(self) -> Session:
        """A new session (a person starts working).  At max_sessions it replaces the least recently
        used session that is not working (see Session.working), whose files are deleted; AppFull
        when every session is working."""
        with self._lock:
            while len(self._sessions) >= self.config.max_sessions:
                if not self._evict_one():
                    idle = self.config.session_idle_s
                    raise AppFull(f"the app already serves {len(self._sessions)} sessions, the most it keeps, and each "
                                  f"was used in the last {idle / 60:g} minutes; try again later")
            session = Session(self, secrets.token_urlsafe(24))
            self._sessions[session.id] = session
            return session

    def _evict_one(self) -> bool:
        """Close the least recently used session that is not working (under its lock); False if none."""
        now = time.monotonic()
        for old in list(self._sessions.values()):
            if old.working(self.config.session_idle_s, now) or not old.lock.acquire(blocking=False):
                continue
            try:
                self._drop(old)
            finally:
                old.lock.release()
            return True
        return False

    def _drop(self, session: Session) -> None:
        del self._sessions[session.id]
        self.embeddings.drop_session(session.id)
        session.close()

    def discard(self, session: Session) -> None:
        """Forget a session nobody was told of (its first request failed and left nothing in it)."""
        with self._lock:
            if self._sessions.get(session.id) is session and session.lock.acquire(blocking=False):
                try:
                    self._drop(session)
                finally:
                    session.lock.release()

    def session_ids(self) -> List[str]:
        with self._lock:
            return list(self._sessions)

    def status(self) -> dict:
        return {"model_type": self.config.model_type, "device": str(self.model.predictor.device),
                "sessions": len(self._sessions), "max_sessions": self.config.max_sessions,
                "cached_embeddings": len(self.embeddings),
                "max_embeddings": self.config.max_embeddings, "encodes": self.model.encodes,
                "allow_folders": self.config.allow_folders, "max_megapixels": self.config.max_megapixels,
                "max_upload_mb": self.config.max_upload_mb, "gfsam": self.dinov2.status()}

    def close(self) -> None:
        with self._lock:
            for session in self._sessions.values():
                session.close()
            self._sessions.clear()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
