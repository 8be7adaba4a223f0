"""The SAM 2.1 model object: every submodule and parameter under Meta's checkpoint names, and the
image-side steps (encode a frame, decode prompts on it) that the video tracker builds on.

Parameters at the top level, as in Meta's ``SAM2Base``: ``maskmem_tpos_enc`` (temporal encoding of
the memory frames), ``no_mem_embed`` / ``no_mem_pos_enc`` (added to a frame with no memory),
``no_obj_ptr`` (the object pointer of a frame without the object), ``no_obj_embed_spatial`` (added
to the memory of such a frame); modules ``mask_downsample`` (a mask prompt to decoder scale),
``obj_ptr_proj`` and ``obj_ptr_tpos_proj`` (object pointers and their temporal encodings).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import Sam2Config
from .image_encoder import Sam2ImageEncoder
from .layers import MLP
from .mask_decoder import Sam2MaskDecoder, sam2_two_way_transformer
from .prompt_encoder import Sam2PromptEncoder

__all__ = ["NO_OBJECT_SCORE", "Sam2Model", "SamHeadsOutput"]

# Mask logit Meta gives every pixel of a frame where the object score says "absent".
NO_OBJECT_SCORE = -1024.0


class SamHeadsOutput(NamedTuple):
    """One decoding of B prompt sets (M = 3 with multimask output, else 1; S the model's image size)."""

    low_res_multimasks: torch.Tensor  # (B, M, S/4, S/4) logits, NO_OBJECT_SCORE where the object is absent
    high_res_multimasks: torch.Tensor  # (B, M, S, S) logits, bilinear from the low-res ones
    ious: torch.Tensor  # (B, M) predicted IoU
    low_res_masks: torch.Tensor  # (B, 1, S/4, S/4) the best of the M (highest predicted IoU)
    high_res_masks: torch.Tensor  # (B, 1, S, S)
    obj_ptr: torch.Tensor  # (B, 256) object pointer (no_obj_ptr where the object is absent)
    object_score_logits: torch.Tensor  # (B, 1) > 0: the object is in the frame


class Sam2Model(nn.Module):
    """SAM 2.1: image encoder, prompt encoder, mask decoder, memory attention and memory encoder.

    Built by :func:`sam.sam2.build.build_sam2`; ``config`` holds the variant's settings (tracking
    flags included). Images reach :meth:`forward_image` normalised, (B, 3, S, S) with S =
    ``config.image_size`` (see :mod:`sam.sam2.transforms`).
    """

    def __init__(self, config: Sam2Config, image_encoder: Sam2ImageEncoder, memory_attention: nn.Module,
                 memory_encoder: nn.Module) -> None:
        super().__init__()
        self.config = config
        hidden, memory = config.hidden_dim, config.memory_dim
        self.image_size = config.image_size
        self.hidden_dim, self.mem_dim = hidden, memory
        self.image_encoder = image_encoder
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.memory_attention = memory_attention
        self.memory_encoder = memory_encoder
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(config.num_maskmem, 1, 1, memory))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, hidden))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, hidden))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, hidden))
        self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, memory))
        grid = config.image_size // config.backbone_stride
        self.sam_prompt_encoder = Sam2PromptEncoder(hidden, (grid, grid), (config.image_size, config.image_size), 16)
        self.sam_mask_decoder = Sam2MaskDecoder(
            sam2_two_way_transformer(depth=2, embedding_dim=hidden, num_heads=8, mlp_dim=2048),
            transformer_dim=hidden,
            use_high_res_features=True,
            iou_prediction_use_sigmoid=True,
            dynamic_multimask_via_stability=config.dynamic_multimask_via_stability,
            dynamic_multimask_stability_delta=config.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh=config.dynamic_multimask_stability_thresh,
            pred_obj_scores=True,
            pred_obj_scores_mlp=True,
            use_multimask_token_for_obj_ptr=config.use_multimask_token_for_obj_ptr,
        )
        self.obj_ptr_proj = MLP(hidden, hidden, hidden, 3)
        self.obj_ptr_tpos_proj = nn.Linear(hidden, memory)

    @property
    def image_embedding_size(self) -> int:
        return self.image_size // self.config.backbone_stride

    def forward_image(self, images: torch.Tensor) -> Dict[str, object]:
        """Normalised images (B, 3, S, S) -> the image encoder's dict, with ``backbone_fpn`` levels 0 and 1
        already projected by the decoder's conv_s0 / conv_s1 (B, 32, S/4, S/4) and (B, 64, S/8, S/8), as Meta
        precomputes them; level 2 (B, 256, S/16, S/16) is the image embedding."""
        out = self.image_encoder(images)
        levels = list(out["backbone_fpn"])
        levels[0] = self.sam_mask_decoder.conv_s0(levels[0])
        levels[1] = self.sam_mask_decoder.conv_s1(levels[1])
        out["backbone_fpn"] = levels
        return out

    def forward_sam_heads(
        self,
        backbone_features: torch.Tensor,
        point_inputs: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        mask_inputs: Optional[torch.Tensor] = None,
        high_res_features: Optional[list] = None,
        multimask_output: bool = False,
    ) -> SamHeadsOutput:
        """Decode on image embeddings (B, 256, S/16, S/16) as Meta's ``_forward_sam_heads``.

        point_inputs: (coords (B, P, 2) in S x S input pixels as (x, y), labels (B, P) int); none: one
        padding point. mask_inputs: (B, 1, H, W) mask logits or probabilities, resized (antialiased
        bilinear) to the prompt encoder's S/4 x S/4 when of another size. high_res_features: the
        projected levels 0 and 1 of :meth:`forward_image`.
        """
        batch, device = backbone_features.shape[0], backbone_features.device
        if point_inputs is None:
            coords = torch.zeros(batch, 1, 2, device=device)
            labels = -torch.ones(batch, 1, dtype=torch.int32, device=device)
        else:
            coords, labels = point_inputs
        mask_prompt = None
        if mask_inputs is not None:
            mask_prompt = mask_inputs
            if tuple(mask_inputs.shape[-2:]) != tuple(self.sam_prompt_encoder.mask_input_size):
                mask_prompt = F.interpolate(mask_inputs.float(), size=self.sam_prompt_encoder.mask_input_size,
                                            align_corners=False, mode="bilinear", antialias=True)
        sparse, dense = self.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=mask_prompt)
        low_res_multimasks, ious, pointer_tokens, object_score_logits = self.sam_mask_decoder(
            image_embeddings=backbone_features,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=False,
            high_res_features=high_res_features,
        )
        is_present = object_score_logits > 0
        low_res_multimasks = torch.where(is_present[:, None, None], low_res_multimasks, NO_OBJECT_SCORE).float()
        high_res_multimasks = F.interpolate(low_res_multimasks, size=(self.image_size, self.image_size),
                                            mode="bilinear", align_corners=False)
        pointer_token = pointer_tokens[:, 0]
        if multimask_output:
            best = torch.argmax(ious, dim=-1)
            rows = torch.arange(batch, device=device)
            low_res_masks = low_res_multimasks[rows, best].unsqueeze(1)
            high_res_masks = high_res_multimasks[rows, best].unsqueeze(1)
            if pointer_tokens.shape[1] > 1:
                pointer_token = pointer_tokens[rows, best]
        else:
            low_res_masks, high_res_masks = low_res_multimasks, high_res_multimasks
        obj_ptr = self.object_pointer(self.obj_ptr_proj(pointer_token), is_present.float())
        return SamHeadsOutput(low_res_multimasks, high_res_multimasks, ious, low_res_masks, high_res_masks,
                              obj_ptr, object_score_logits)

    def object_pointer(self, pointer: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
        """Projected pointer (B, 256) and presence (B, 1) in {0, 1} -> pointer, no_obj_ptr where absent."""
        return presence * pointer + (1 - presence) * self.no_obj_ptr

    def use_mask_as_output(self, backbone_features: torch.Tensor, high_res_features: list,
                           mask_inputs: torch.Tensor) -> SamHeadsOutput:
        """A given mask (B, 1, S, S) as the frame's output (logits +-10), as Meta does on a frame prompted
        with a mask; the decoder runs only to make its object pointer."""
        scale, bias = 20.0, -10.0
        high_res_masks = mask_inputs.float() * scale + bias
        low_res_masks = F.interpolate(high_res_masks, size=(high_res_masks.shape[-2] // 4, high_res_masks.shape[-1] // 4),
                                      align_corners=False, mode="bilinear", antialias=True)
        ious = mask_inputs.new_ones(mask_inputs.shape[0], 1).float()
        decoded = self.forward_sam_heads(backbone_features, mask_inputs=self.mask_downsample(mask_inputs.float()),
                                         high_res_features=high_res_features)
        presence = torch.any(mask_inputs.flatten(1).float() > 0.0, dim=1)[..., None].float()
        object_score_logits = scale * presence + bias
        obj_ptr = self.object_pointer(decoded.obj_ptr, presence)
        return SamHeadsOutput(low_res_masks, high_res_masks, ious, low_res_masks, high_res_masks, obj_ptr,
                              object_score_logits)
