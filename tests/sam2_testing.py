"""Helpers for SAM 2.1 tests: seeded random weights for a variant, and Meta's model holding them.

Meta's ``sam2`` package (the parity reference, ``pip install --no-deps sam2==1.1.0 hydra-core iopath``)
is imported with torchvision stubbed where it is missing: its modeling code never calls it, only
``sam2.utils.transforms`` names it at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from typing import Dict, Iterator
from unittest import mock

import pytest
import torch

from sam.sam2.build import SAM2_CONFIGS, build_sam2

OFFICIAL_CONFIG_FILES = {
    "sam2.1_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


def import_official_sam2():
    """Meta's `sam2` package, or skip the test saying how to install it."""
    _stub_torchvision_transforms()
    try:
        importlib.import_module("sam2.modeling.sam2_base")
    except ImportError as exc:
        pytest.skip(f"Meta's sam2 package is not installed ({exc}): pip install --no-deps sam2==1.1.0 hydra-core iopath")
    return sys.modules["sam2"]


def _stub_torchvision_transforms() -> None:
    """Stand-ins for the torchvision names `sam2.utils.transforms` imports (never called in tests)."""
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is not None:
        return  # the real one
    if "torchvision" not in sys.modules:  # the stub segment_anything's parity tests use, whichever runs first
        import conftest

        try:
            conftest.import_official_sam()
        except pytest.skip.Exception:  # segment_anything missing: its stub is in place all the same
            pass
    root = sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))
    transforms = sys.modules.setdefault("torchvision.transforms", types.ModuleType("torchvision.transforms"))
    root.transforms = transforms
    for name in ("Normalize", "Resize", "ToTensor"):
        if not hasattr(transforms, name):
            setattr(transforms, name, _not_available(name))


def _not_available(name: str):
    def stand_in(*args, **kwargs):
        raise RuntimeError(f"torchvision.transforms.{name} is a test stub; torchvision is not installed")

    return stand_in


@lru_cache(maxsize=None)
def _state_shapes(variant: str) -> Dict[str, torch.Size]:
    with torch.device("meta"):
        return {key: value.shape for key, value in build_sam2(variant).state_dict().items()}


def random_sam2_state(variant: str, seed: int = 0, std: float = 0.05) -> Dict[str, torch.Tensor]:
    """Seeded random values for every tensor of a SAM 2.1 variant, keyed as Meta's checkpoints.

    Every parameter gets a random value, including those Meta initialises to zero or 1e-6 (layer
    scales, no-object embeddings, memory time encodings), so that every path changes the outputs.
    Norm scales are around 1, the prompt encoder's Gaussian frequencies have unit variance. Keys are
    drawn in sorted order, so the values depend only on (variant, seed).
    """
    shapes = _state_shapes(variant)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(shapes):
        noise = torch.randn(shapes[key], generator=generator)
        if key.endswith("positional_encoding_gaussian_matrix"):
            state[key] = noise
        elif key.endswith(".weight") and len(shapes[key]) == 1:  # LayerNorm / LayerNorm2d scales
            state[key] = 1.0 + std * noise
        else:
            state[key] = std * noise
    return state


@contextmanager
def skipped_weight_init() -> Iterator[None]:
    """Build modules without drawing their initial weights (they are all overwritten by a state dict
    right after): the default initialisation is most of the time it takes to build hiera_l twice."""
    def keep(tensor, *args, **kwargs):
        return tensor

    names = ["kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "zeros_", "ones_", "constant_"]
    with ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(torch.nn.init, name, keep))
        official_base = sys.modules.get("sam2.modeling.sam2_base")
        if official_base is not None:  # it imported trunc_normal_ by name
            stack.enter_context(mock.patch.object(official_base, "trunc_normal_", keep))
        yield


def random_sam2(variant: str, seed: int = 0, image_size: int = 1024):
    """Our SAM 2.1 model with seeded random weights, and those weights."""
    state = random_sam2_state(variant, seed)
    with skipped_weight_init():
        model = build_sam2(variant, image_size=image_size)
    model.load_state_dict(state, strict=True)
    return model.eval(), state


def official_sam2_model(variant: str, state: Dict[str, torch.Tensor], video: bool = False, image_size: int = 1024):
    """Meta's SAM 2.1 `variant` (SAM2Base, or SAM2VideoPredictor with video=True) holding `state`.

    Built as Meta's `build_sam2` / `build_sam2_video_predictor` build it (their post-processing
    overrides included), on the CPU: the official code cannot be built on the meta device.
    """
    import_official_sam2()
    from sam2.build_sam import build_sam2 as official_build_sam2
    from sam2.build_sam import build_sam2_video_predictor

    if variant not in OFFICIAL_CONFIG_FILES:
        raise KeyError(f"no official config for {variant!r}; known: {sorted(OFFICIAL_CONFIG_FILES)}")
    overrides = [] if image_size == 1024 else [f"++model.image_size={image_size}"]
    build = build_sam2_video_predictor if video else official_build_sam2
    with skipped_weight_init():
        model = build(OFFICIAL_CONFIG_FILES[variant], ckpt_path=None, device="cpu", hydra_overrides_extra=overrides)
    model.load_state_dict(state, strict=True)
    return model.eval()


__all__ = ["SAM2_CONFIGS", "import_official_sam2", "official_sam2_model", "random_sam2", "random_sam2_state"]
