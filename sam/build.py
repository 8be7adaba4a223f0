"""Build SAM models by type and load their checkpoints.

    vit_b, vit_l, vit_h  Meta's SAM with a ViT-B/L/H image encoder
    vit_t                MobileSAM: TinyViT image encoder, SAM's decoder
"""

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .transformer import TwoWayTransformer

PROMPT_EMBED_DIM = 256
VIT_PATCH_SIZE = 16


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: Tuple[int, ...]


VIT_CONFIGS: Dict[str, ViTConfig] = {
    "vit_b": ViTConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": ViTConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": ViTConfig(1280, 32, 16, (7, 15, 23, 31)),
}
MODEL_TYPES: Tuple[str, ...] = ("vit_b", "vit_l", "vit_h", "vit_t")


def build_image_encoder(model_type: str, img_size: int = 1024) -> nn.Module:
    """The image encoder of `model_type`, randomly initialised (its `img_size` attribute is the input side)."""
    if model_type == "vit_t":
        from .tiny_vit import TinyViT

        if img_size != 1024:
            raise ValueError("vit_t (TinyViT) is built for 1024 x 1024 inputs only")
        return TinyViT(img_size=img_size)
    if model_type not in VIT_CONFIGS:
        raise ValueError(f"unknown model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    config = VIT_CONFIGS[model_type]
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=VIT_PATCH_SIZE,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=4.0,
        out_chans=PROMPT_EMBED_DIM,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=14,
        global_attn_indexes=config.global_attn_indexes,
    )


def build_sam_model(model_type: str, img_size: int = 1024) -> Sam:
    """A randomly initialised SAM of `model_type` in eval mode.

    `img_size` other than 1024 gives a smaller input frame with the same
    structure (used by tests); official checkpoints need 1024.
    """
    image_encoder = build_image_encoder(model_type, img_size)
    grid = img_size // VIT_PATCH_SIZE
    prompt_encoder = PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(grid, grid),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=PROMPT_EMBED_DIM,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, num_heads=8, mlp_dim=2048),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return Sam(image_encoder, prompt_encoder, mask_decoder).eval()


def build_sam(
    model_type: str,
    checkpoint: Optional[Union[str, Path]] = None,
    device: Union[str, torch.device] = "cpu",
) -> Sam:
    """SAM of `model_type` with the weights of `checkpoint` (Meta .pth, MobileSAM .pt or
    HuggingFace safetensors/bin), on `device`, in eval mode.

    Without a checkpoint the weights are random (for tests); nothing is ever
    downloaded here: use `persam download MODEL` or `sam.download` for that.
    """
    model = build_sam_model(model_type)
    if checkpoint is not None:
        from .checkpoint import load_into

        load_into(model, checkpoint, model_type)
    return model.to(device).eval()
