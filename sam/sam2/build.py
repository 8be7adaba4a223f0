"""Building SAM 2.1 from its config (:mod:`sam.sam2.config`) and loading Meta's checkpoints
(``sam2.1_hiera_*.pt``, ``{"model": state_dict}``) through the safe reader of :mod:`sam.checkpoint`,
with one-line errors that say which model a wrong file is for."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..checkpoint import CheckpointError, read_state_dict
from .config import SAM2_CONFIGS, Sam2Config
from .hiera import Hiera
from .image_encoder import FpnNeck, Sam2ImageEncoder
from .memory_attention import MemoryAttention
from .memory_encoder import MemoryEncoder
from .model import Sam2Model
from .position_encoding import SinePositionEncoding

__all__ = ["SAM2_CONFIGS", "Sam2Config", "build_sam2", "guess_sam2_variant", "load_sam2", "sam2_config"]


def sam2_config(variant: str, image_size: Optional[int] = None) -> Sam2Config:
    """The config of `variant` (a key of SAM2_CONFIGS), at another input side when `image_size` is given."""
    try:
        config = SAM2_CONFIGS[variant]
    except KeyError:
        raise ValueError(f"unknown SAM 2.1 model {variant!r}; known: {', '.join(SAM2_CONFIGS)}") from None
    if image_size is not None and image_size != config.image_size:
        if image_size % 32:
            raise ValueError(f"SAM 2.1 image size must be a multiple of 32, got {image_size}")
        config = replace(config, image_size=image_size)
    return config


def build_sam2(variant: str, image_size: Optional[int] = None) -> Sam2Model:
    """An untrained SAM 2.1 `variant` (weights come from :func:`load_sam2` or load_state_dict).

    `image_size` (a multiple of 32) builds it for another square input than 1024; Meta's checkpoints
    fit any size (the position embeddings are interpolated).
    """
    config = sam2_config(variant, image_size)
    trunk = Hiera(config.trunk)
    neck = FpnNeck(
        SinePositionEncoding(config.hidden_dim),
        d_model=config.hidden_dim,
        backbone_channel_list=trunk.channel_list,
        top_down_levels=config.fpn_top_down_levels,
        interpolation="nearest",
    )
    image_encoder = Sam2ImageEncoder(trunk, neck, scalp=config.scalp)
    memory_attention = MemoryAttention(d_model=config.hidden_dim, memory_dim=config.memory_dim,
                                       num_layers=config.memory_attention_layers)
    memory_encoder = MemoryEncoder(in_dim=config.hidden_dim, out_dim=config.memory_dim)
    return Sam2Model(config, image_encoder, memory_attention, memory_encoder)


def guess_sam2_variant(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """The SAM 2.1 size a state dict is for (from its trunk's width and depth), or None."""
    weight = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    if weight is None or weight.dim() != 4:
        return None
    blocks = {int(m.group(1)) for key in state_dict for m in [re.match(r"^image_encoder\.trunk\.blocks\.(\d+)\.", key)] if m}
    for name, config in SAM2_CONFIGS.items():
        if config.trunk.embed_dim == weight.shape[0] and sum(config.trunk.stages) == len(blocks):
            return name
    return None


def _describe(state_dict: Dict[str, torch.Tensor]) -> str:
    """What a state dict that is not the wanted SAM 2.1 looks like, for the error message."""
    variant = guess_sam2_variant(state_dict)
    if variant is not None:
        if "no_obj_embed_spatial" not in state_dict:
            return f"a SAM 2.0 checkpoint ({variant.replace('2.1', '2')}), not SAM 2.1"
        return f"a {variant} checkpoint"
    if any(key.startswith(("image_encoder.blocks.", "image_encoder.layers.", "image_encoder.neck.0.")) for key in state_dict):
        return "a SAM (v1) checkpoint, not SAM 2.1"
    return "not a SAM 2.1 checkpoint"


def load_sam2(variant: str, checkpoint: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
              image_size: Optional[int] = None) -> Sam2Model:
    """SAM 2.1 `variant` with the weights of `checkpoint` (Meta's ``sam2.1_hiera_*.pt``), in eval mode.

    Raises CheckpointError (one line naming the file) for a missing, unreadable or unsafe file, and for
    one that is another variant (saying which), SAM 2.0, SAM 1 or something else.
    """
    path = Path(checkpoint).expanduser()
    config = sam2_config(variant, image_size)
    state = read_state_dict(path, model_type=variant)
    with torch.device("meta"):  # no storage and no initial weights: the checkpoint's tensors are taken as they are
        model = build_sam2(variant, config.image_size)
    expected = model.state_dict()
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if set(state) != set(expected) or mismatched:
        found = _describe(state)
        if found == f"a {variant} checkpoint":  # the right size, yet other keys: say which
            missing = sorted(set(expected) - set(state))
            unexpected = sorted(set(state) - set(expected))
            details = f"missing {missing[:3]}, unexpected {unexpected[:3]}, mismatched shapes {mismatched[:3]}"
            raise CheckpointError(f"{path} looks like {variant} but its keys do not fit: {details}")
        raise CheckpointError(f"{path} does not fit {variant}: it is {found}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().to(device)
