"""persam: personalized one-shot segmentation (PerSAM, PerSAM-F, GF-SAM) on a Segment Anything core.

The public face; everything a program needs to learn an object once and find it again::

    from persam import PerSAM, load_image, load_mask
    method = PerSAM(predictor)
    concept = method.learn(load_image("ref.jpg"), load_mask("ref.png"))
    found = method.segment(load_image("photo.jpg"), concept)

Names load on first use, so `import persam` (or a light submodule such as persam.data.sources)
does not import torch.
"""

from importlib import import_module
from typing import Any, Dict

_WHERE: Dict[str, str] = {
    "PerSAM": "persam.method.pipeline",
    "PerSAMF": "persam.method.pipeline",
    "GFSAM": "persam.method.gfsam",
    "GFSAMSettings": "persam.method.gfsam",
    "Concept": "persam.method.pipeline",
    "Segmentation": "persam.method.pipeline",
    "learn_concept": "persam.method.pipeline",
    "segment": "persam.method.pipeline",
    "segment_images": "persam.method.pipeline",
    "segment_objects": "persam.method.multi",
    "load_concept": "persam.data.concept",
    "save_concept": "persam.data.concept",
    "load_image": "persam.data.io",
    "load_mask": "persam.data.io",
    "InputError": "persam.errors",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'persam' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
