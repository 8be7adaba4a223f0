"""Shared test fixtures: paths to ../shared/data and the official segment_anything package."""

import os
import sys
import types
from pathlib import Path

import pytest

# The encoder backend "auto" would pick (OpenVINO / ONNX Runtime when installed) exports each test
# model into the cache; tests run torch unless they ask for a backend (tests/test_backends.py).
os.environ.setdefault("PERSAM_BACKEND", "torch")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PERSEG = SHARED_DATA / "perseg_subset"
DAVIS = SHARED_DATA / "davis2017"


def import_official_sam():
    """Import Meta's `segment_anything` (test-only reference).

    It imports torchvision at import time although its modeling code never
    uses it; there is no CPU build of torchvision here, so a stub stands in.
    """
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except ImportError:
            stub = types.ModuleType("torchvision")
            transforms = types.ModuleType("torchvision.transforms")
            functional = types.ModuleType("torchvision.transforms.functional")
            functional.resize = _torchvision_resize_pil
            functional.to_pil_image = _torchvision_to_pil_image
            stub.transforms = transforms
            transforms.functional = functional
            ops = types.ModuleType("torchvision.ops")
            boxes = types.ModuleType("torchvision.ops.boxes")
            boxes.batched_nms = None
            boxes.box_area = None
            ops.boxes = boxes
            stub.ops = ops
            sys.modules.update({
                "torchvision": stub,
                "torchvision.transforms": transforms,
                "torchvision.transforms.functional": functional,
                "torchvision.ops": ops,
                "torchvision.ops.boxes": boxes,
            })
    return pytest.importorskip("segment_anything")


def _torchvision_to_pil_image(pic):
    """torchvision's `to_pil_image` for what `ResizeLongestSide.apply_image` passes: H x W x 3 uint8."""
    import numpy as np
    from PIL import Image

    if not isinstance(pic, np.ndarray) or pic.dtype != np.uint8 or pic.ndim != 3 or pic.shape[2] != 3:
        raise TypeError("the test stub only converts H x W x 3 uint8 arrays")
    return Image.fromarray(pic)  # mode RGB


def _torchvision_resize_pil(img, size):
    """torchvision's `resize` of a PIL image to (h, w) with its default interpolation: Pillow BILINEAR."""
    from PIL import Image

    return img.resize((int(size[1]), int(size[0])), Image.Resampling.BILINEAR)


@pytest.fixture(scope="session")
def official_sam():
    return import_official_sam()


@pytest.fixture(scope="session")
def perseg_dir():
    if not PERSEG.is_dir():
        pytest.skip(f"shared data not found at {PERSEG}")
    return PERSEG


@pytest.fixture(scope="session")
def random_vit_t_checkpoint(tmp_path_factory):
    """A MobileSAM-layout checkpoint file with seeded random weights."""
    return write_random_checkpoint(tmp_path_factory.mktemp("checkpoint") / "mobile_sam.pt")


def write_random_checkpoint(path: Path, model_type: str = "vit_t", seed: int = 0) -> Path:
    """Save seeded random weights of `model_type` in the official layout at `path`; returns it."""
    import torch

    from sam.build import build_sam_model
    from sam_testing import random_state_dict

    torch.save(random_state_dict(build_sam_model(model_type), seed=seed), path)
    return path


@pytest.fixture
def one_torch_thread():
    """The test on one torch thread, restored after it: SAM 2's tests run many small steps, which on a
    shared, loaded 2-core CPU run many times slower on two threads that wait for each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
