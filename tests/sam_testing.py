"""Helpers for tests: seeded random SAM weights, the matching official model, SAM's own order
of operations in our decoder."""

from contextlib import contextmanager
from functools import partial
from typing import Dict, Iterator

import torch

from sam.build import VIT_CONFIGS, build_sam_model


def random_state_dict(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> Dict[str, torch.Tensor]:
    """Seeded random values for every floating tensor of `model` (norm weights around 1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if not value.dtype.is_floating_point:
            state[key] = value.clone()
            continue
        noise = torch.randn(value.shape, generator=generator) * std
        is_norm_scale = key.endswith(".weight") and value.dim() == 1 and ("norm" in key or "neck.1" in key or "neck.3" in key)
        if key.endswith("running_var"):
            state[key] = 1.0 + noise.abs()
        elif is_norm_scale:
            state[key] = 1.0 + noise
        elif key.endswith("positional_encoding_gaussian_matrix"):
            state[key] = torch.randn(value.shape, generator=generator)
        else:
            state[key] = noise
    return state


def materialize(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """Give a model built on the meta device real storage holding `state` (skips the costly default init)."""
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    if hasattr(model, "pixel_mean"):  # non-persistent buffers are not in the state dict
        model.pixel_mean.copy_(torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1))
        model.pixel_std.copy_(torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1))
    return model.eval()


def random_sam(model_type: str, img_size: int = 1024, seed: int = 0):
    """Our SAM with seeded random weights, and those weights."""
    if model_type == "vit_t":  # TinyViT has non-persistent index buffers: build it for real
        model = build_sam_model(model_type, img_size=img_size)
        state = random_state_dict(model, seed)
        model.load_state_dict(state, strict=True)
        return model.eval(), state
    with torch.device("meta"):
        model = build_sam_model(model_type, img_size=img_size)
    state = random_state_dict(model, seed)
    return materialize(model, state), state


def official_sam_model(segment_anything, model_type: str, state: Dict[str, torch.Tensor], img_size: int = 1024):
    """Meta's SAM with the structure of `model_type` at input side `img_size`, holding `state`."""
    with torch.device("meta"):
        model = _official_structure(segment_anything, model_type, img_size)
    return materialize(model, state)


def _official_structure(segment_anything, model_type: str, img_size: int):
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    config = VIT_CONFIGS[model_type]
    grid = img_size // 16
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=config.depth,
            embed_dim=config.embed_dim,
            img_size=img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=config.num_heads,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=config.global_attn_indexes,
            window_size=14,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )


def conv_mask_logits(decoder, src, hyper_in, height, width):
    """SAM's own output stage: tokens back to an image, the two transposed convolutions, the product."""
    batch, _, channels = src.shape
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(batch, channels, height, width))
    b, c, h, w = upscaled.shape
    return (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)


@contextmanager
def sams_order_of_operations() -> Iterator[None]:
    """Our decoder computing as Meta's segment_anything does, for comparisons: projected
    attention (no folding), the transposed convolutions in image layout, channels-first
    features and mask embedding. Patches the classes while the context is open."""
    from sam.mask_decoder import MaskDecoder
    from sam.predictor import SamPredictor
    from sam.prompt_encoder import PromptEncoder
    from sam.transformer import Attention

    patches = [
        (Attention, "forward", Attention.attend_plain),
        (MaskDecoder, "mask_logits", conv_mask_logits),
        (SamPredictor, "decoder_features", lambda self: self.features.contiguous()),
        (PromptEncoder, "embed_masks", lambda self, masks: self.mask_downscaling(masks)),
    ]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
