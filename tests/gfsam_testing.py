"""Test helper: the official GF-SAM (ANDYZAQ/GF-SAM, matcher/GFSAM.py) imported unchanged from the
mirror, with the packages it needs that cannot be installed here (torchvision, matplotlib) stubbed.

The official repository vendors its own `segment_anything` (a PerSAM-style fork whose
`predict_torch` takes `features=`) and Meta's `dinov2`; both are imported from the extracted
snapshot while the official modules load, and the modules that were there before are put back
afterwards, so other tests keep Meta's pip `segment_anything`.
"""

import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator

import torch
import torch.nn.functional as F

MIRROR = Path("/work/.mirror/ANDYZAQ+GF-SAM/repo")
NEEDED = ("matcher/GFSAM.py", "matcher/__init__.py", "dinov2", "segment_anything")
OWN_PACKAGES = ("segment_anything", "dinov2", "matcher", "torchvision", "matplotlib")


def extract_official(destination: Path) -> Path:
    """The snapshot's files GF-SAM needs, extracted under `destination`; raises FileNotFoundError
    without the mirror, CalledProcessError when git cannot read it."""
    if not MIRROR.is_dir():
        raise FileNotFoundError(f"the GF-SAM mirror is not at {MIRROR}")
    archive = subprocess.run(["git", "-C", str(MIRROR), "archive", "HEAD", *NEEDED], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
    return destination


class _Compose:
    def __init__(self, steps):
        self.steps = steps

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


class _ToTensor:
    def __call__(self, picture):
        raise TypeError("the stub only passes tensors through (MaybeToTensor)")


class _Resize:
    """torchvision 0.14.1's Resize (the version GF-SAM's requirements.txt pins) on a float tensor:
    an int size is the shorter side; bilinear with align_corners=False and, for tensors in that
    version, no antialias."""

    def __init__(self, size, interpolation=None, antialias=None):
        self.size = size

    def __call__(self, x):
        height, width = x.shape[-2:]
        if isinstance(self.size, int):
            short, long = sorted((height, width))
            new_short, new_long = self.size, int(self.size * long / short)
            size = (new_short, new_long) if height <= width else (new_long, new_short)
        else:
            size = tuple(self.size)
        batch = x[None] if x.dim() == 3 else x
        out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=False)
        return out[0] if x.dim() == 3 else out


class _Normalize:
    def __init__(self, mean, std, inplace=False):
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def __call__(self, x):
        return (x - self.mean.view(-1, 1, 1)) / self.std.view(-1, 1, 1)


def _stub_modules() -> Dict[str, types.ModuleType]:
    from conftest import _torchvision_resize_pil, _torchvision_to_pil_image

    torchvision = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize = _torchvision_resize_pil
    functional.to_pil_image = _torchvision_to_pil_image
    transforms.functional = functional
    transforms.Compose, transforms.ToTensor = _Compose, _ToTensor
    transforms.Resize, transforms.Normalize = _Resize, _Normalize
    transforms.InterpolationMode = types.SimpleNamespace(BILINEAR="bilinear", BICUBIC="bicubic", NEAREST="nearest")

    def unused_class(name):  # base classes of training augmentations GF-SAM never builds
        return type(name, (), {"__init__": lambda self, *a, **k: None})

    transforms.__getattr__ = unused_class
    torchvision.transforms = transforms
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")
    boxes.batched_nms = boxes.box_area = None
    ops.boxes = boxes
    torchvision.ops = ops
    datasets = types.ModuleType("torchvision.datasets")
    datasets.__getattr__ = unused_class
    torchvision.datasets = datasets
    matplotlib = types.ModuleType("matplotlib")
    pyplot = types.ModuleType("matplotlib.pyplot")
    matplotlib.pyplot = pyplot
    return {"torchvision": torchvision, "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional, "torchvision.ops": ops, "torchvision.ops.boxes": boxes,
            "torchvision.datasets": datasets, "matplotlib": matplotlib, "matplotlib.pyplot": pyplot}


def _owned(name: str) -> bool:
    return name.split(".")[0] in OWN_PACKAGES


@contextmanager
def official_modules(root: Path) -> Iterator[types.SimpleNamespace]:
    """While open: the official GFSAM module, its segment_anything and dinov2, imported from
    `root` (extract_official); sys.modules and sys.path are restored when it closes."""
    saved = {name: module for name, module in sys.modules.items() if _owned(name)}
    for name in saved:
        del sys.modules[name]
    sys.modules.update(_stub_modules())
    sys.path.insert(0, str(root))
    try:
        import importlib

        gfsam = importlib.import_module("matcher.GFSAM")
        segment_anything = importlib.import_module("segment_anything")
        vits = importlib.import_module("dinov2.models.vision_transformer")
        yield types.SimpleNamespace(gfsam=gfsam, segment_anything=segment_anything, vits=vits)
    finally:
        sys.path.remove(str(root))
        for name in [name for name in sys.modules if _owned(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
