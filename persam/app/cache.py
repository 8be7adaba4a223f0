"""The shared model and the embeddings: one predictor behind one lock, embeddings cached by content.

:class:`SharedModel` holds the app's one predictor and the lock that serialises its forward calls;
:class:`EmbeddingCache` keeps image embeddings (least recently used first out) under per-session
keys; :class:`SessionPredictor` is a session's view of the shared predictor, with its own current
image, that encodes an image only when its embedding is not cached.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict
from typing import Callable, Optional, Tuple

import numpy as np

from sam.predictor import ImageEmbedding, SamPredictor


class EmbeddingCache:
    """Image embeddings by key, least recently used first out, at most `capacity` entries."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: "OrderedDict[Tuple[str, str], ImageEmbedding]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Tuple[str, str]) -> Optional[ImageEmbedding]:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: Tuple[str, str], embedding: ImageEmbedding) -> None:
        with self._lock:
            self._items[key] = embedding
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def drop_session(self, session_id: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == session_id]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items


class SharedModel:
    """The one predictor of the app and the lock that serialises its forward calls."""

    def __init__(self, predictor: SamPredictor) -> None:
        if hasattr(predictor, "prepare"):
            predictor.prepare()  # build the encoder once, before the sessions' views share it
        self.predictor = predictor
        self.lock = threading.RLock()
        self.encodes = 0  # images encoded since the start (for tests and the status line)


def pixels_key(image: np.ndarray) -> str:
    """A content key of an RGB image: equal pixels, equal key."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(image.shape).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


class SessionPredictor:
    """A session's view of the shared predictor: its own current image, the shared model.

    Duck-types :class:`~sam.predictor.SamPredictor` for persam's method steps.  Encoding goes
    through the embedding cache (:meth:`select`, and :meth:`set_image` by pixel content), and
    every model call holds the shared lock."""

    def __init__(self, shared: SharedModel, cache: EmbeddingCache, session_id: str) -> None:
        view = copy.copy(shared.predictor)  # shares the model and the encoder, not the current image
        view.reset_image()
        self._view = view
        self._shared = shared
        self._cache = cache
        self._session_id = session_id
        self.encodes = 0  # images this session encoded

    def __getattr__(self, name):  # features, original_size, input_size, model, set_embedding, ...
        return getattr(self._view, name)

    def select(self, key: str, load: Callable[[], np.ndarray]) -> bool:
        """Make the image of content `key` current: its cached embedding, else encode `load()`.
        True when it was encoded."""
        embedding = self._cache.get((self._session_id, key))
        if embedding is not None:
            self._view.set_embedding(*embedding)
            return False
        image = load()
        with self._shared.lock:
            features = self._view.set_image(image)
            self._shared.encodes += 1
        self.encodes += 1
        self._cache.put((self._session_id, key), ImageEmbedding(features, self._view.original_size, self._view.input_size))
        return True

    def embedding(self, key: str, load: Callable[[], np.ndarray]) -> ImageEmbedding:
        self.select(key, load)
        return ImageEmbedding(self._view.features, self._view.original_size, self._view.input_size)

    def set_image(self, image: np.ndarray):
        """As SamPredictor.set_image, from the cache when these pixels were encoded before."""
        self.select(pixels_key(image), lambda: image)
        return self._view.features

    def encode_images(self, *args, **kwargs):
        with self._shared.lock:
            return self._view.encode_images(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._shared.lock:
            return self._view.predict(*args, **kwargs)

    def predict_torch(self, *args, **kwargs):
        with self._shared.lock:
            return self._view.predict_torch(*args, **kwargs)

    def predict_each(self, *args, **kwargs):
        with self._shared.lock:
            return self._view.predict_each(*args, **kwargs)

    def upscale(self, low_res):
        with self._shared.lock:
            return self._view.upscale(low_res)

    def upscale_image(self, image, low_res):
        with self._shared.lock:
            return self._view.upscale_image(image, low_res)
