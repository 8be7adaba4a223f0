"""Does a checkpoint file load into the model a download entry names?

The downloader (:mod:`sam.download`) checks a file's sha256 when the registry knows it.  For the
files no trustworthy digest was found for (DINOv2 ViT-g/14 and the SAM 2.1 checkpoints) this is the
check instead: the downloaded file must load, key for key and shape for shape, into the model it was
downloaded for, so that a truncated transfer, an HTML error page or another model is refused before
it is renamed into the cache.  Kept apart from :mod:`sam.download` so that the downloader stays free
of the model builders (which import :mod:`sam.checkpoint`, which imports the downloader's registry).
"""

from __future__ import annotations

import os
from typing import Union

from .download import MODELS


def check_checkpoint_fits(model_type: str, path: Union[str, os.PathLike]) -> None:
    """Raise :class:`~sam.checkpoint.CheckpointError` (one line naming ``path``) unless the file
    loads into ``model_type``'s model.  ``model_type`` is a key of :data:`sam.download.MODELS`."""
    family = MODELS[model_type].family
    if family == "dinov2":
        from .dinov2 import load_dinov2

        load_dinov2(model_type[len("dinov2_"):], path)
    elif family == "sam2":
        from .sam2.build import load_sam2

        load_sam2(model_type, path)
    else:
        from .build import build_sam

        build_sam(model_type, path)
