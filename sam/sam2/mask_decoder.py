"""SAM 2's mask decoder: SAM's two-way transformer and hypernetwork heads, plus

* high-resolution features: the stride-8 and stride-4 maps of the image encoder, projected by
  ``conv_s1`` / ``conv_s0``, are added inside the 4x upscaling of the image tokens;
* an object-score token and head: a logit saying whether the object is in the frame at all;
* the stability fallback: asked for one mask, the decoder takes the single-mask token's mask
  unless it is unstable (its area changes by more than 2 % between logit thresholds -0.05 and
  +0.05), and then the multimask output with the best predicted IoU;
* which token becomes the tracker's object pointer (``use_multimask_token_for_obj_ptr``).

Key names are Meta's (``sam_mask_decoder.*``). The transformer is :mod:`sam.transformer`'s, whose
maths are Meta's; only its MLPs are named as SAM 2 names them (``mlp.layers.0/1``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..common import LayerNorm2d
from ..transformer import TwoWayTransformer
from .layers import MLP

__all__ = ["Sam2MaskDecoder", "sam2_two_way_transformer"]


def sam2_two_way_transformer(depth: int = 2, embedding_dim: int = 256, num_heads: int = 8,
                             mlp_dim: int = 2048) -> TwoWayTransformer:
    """SAM's two-way transformer with each block's MLP keyed as SAM 2's (``layers.0`` / ``layers.1``)."""
    transformer = TwoWayTransformer(depth=depth, embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim)
    for block in transformer.layers:
        block.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, num_layers=2, activation=nn.ReLU)
    return transformer


class Sam2MaskDecoder(nn.Module):
    """(image embedding, prompt embeddings, high-res features) -> masks, IoU, object-pointer tokens, object scores."""

    def __init__(
        self,
        transformer: TwoWayTransformer,
        transformer_dim: int = 256,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = True,
        iou_prediction_use_sigmoid: bool = True,
        dynamic_multimask_via_stability: bool = True,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
        pred_obj_scores: bool = True,
        pred_obj_scores_mlp: bool = True,
        use_multimask_token_for_obj_ptr: bool = True,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth,
                                       sigmoid_output=iou_prediction_use_sigmoid)
        if pred_obj_scores:
            self.pred_obj_score_head = (MLP(transformer_dim, transformer_dim, 1, 3) if pred_obj_scores_mlp
                                        else nn.Linear(transformer_dim, 1))
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.stability_delta = dynamic_multimask_stability_delta
        self.stability_thresh = dynamic_multimask_stability_thresh

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: Optional[List[torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode B prompt sets.

        image_embeddings (1 or B, 256, h, w), repeated to B with `repeat_image`; image_pe (1, 256, h, w);
        sparse (B, N, 256); dense (B, 256, h, w); high_res_features [(B, 32, 4h, 4w), (B, 64, 2h, 2w)]
        (already projected by conv_s0 / conv_s1). Returns masks (B, M, 4h, 4w) logits, iou (B, M),
        object-pointer tokens (B, M or 1, 256) and object-score logits (B, 1); M = 3 with
        `multimask_output`, else 1 (the stability fallback applied in eval mode).
        """
        masks, iou_pred, mask_tokens_out, object_score_logits = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, repeat_image, high_res_features
        )
        if multimask_output:
            masks, iou_pred = masks[:, 1:], iou_pred[:, 1:]
        elif self.dynamic_multimask_via_stability and not self.training:
            masks, iou_pred = self.stable_single_mask(masks, iou_pred)
        else:
            masks, iou_pred = masks[:, 0:1], iou_pred[:, 0:1]
        if multimask_output and self.use_multimask_token_for_obj_ptr:
            pointer_tokens = mask_tokens_out[:, 1:]
        else:
            pointer_tokens = mask_tokens_out[:, 0:1]  # the single-mask token
        return masks, iou_pred, pointer_tokens, object_score_logits

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        repeat_image: bool,
        high_res_features: Optional[List[torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All four masks (B, 4, 4h, 4w), iou (B, 4), mask tokens (B, 4, 256), object scores (B, 1)."""
        batch = sparse_prompt_embeddings.shape[0]
        heads = [self.obj_score_token.weight] if self.pred_obj_scores else []
        output_tokens = torch.cat(heads + [self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        first = 1 if self.pred_obj_scores else 0  # index of the IoU token

        if repeat_image:
            src = torch.repeat_interleave(image_embeddings, batch, dim=0)
        elif image_embeddings.shape[0] != batch:
            raise ValueError(f"Sam2MaskDecoder: {image_embeddings.shape[0]} image embeddings for {batch} prompt sets")
        else:
            src = image_embeddings
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, batch, dim=0)
        _, channels, height, width = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, first, :]
        mask_tokens_out = hs[:, first + 1 : first + 1 + self.num_mask_tokens, :]

        src = src.transpose(1, 2).reshape(batch, channels, height, width)
        upscale1, norm1, act1, upscale2, act2 = self.output_upscaling
        if self.use_high_res_features:
            feat_s0, feat_s1 = high_res_features
            upscaled = act1(norm1(upscale1(src) + feat_s1))
            upscaled = act2(upscale2(upscaled) + feat_s0)
        else:
            upscaled = act2(upscale2(act1(norm1(upscale1(src)))))

        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, index, :]) for index, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, 4, 32)
        _, up_channels, up_height, up_width = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(batch, up_channels, up_height * up_width)).reshape(batch, -1, up_height, up_width)

        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(hs[:, 0, :])
        else:  # the object is taken to be present: sigmoid(10) ~ 1
            object_score_logits = 10.0 * iou_pred.new_ones(iou_pred.shape[0], 1)
        return masks, iou_pred, mask_tokens_out, object_score_logits

    def stability_scores(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """(B, M, H, W) logits -> (B, M): area above +delta over area above -delta (1 where both are empty)."""
        flat = mask_logits.flatten(-2)
        inner = torch.sum(flat > self.stability_delta, dim=-1).float()
        outer = torch.sum(flat > -self.stability_delta, dim=-1).float()
        return torch.where(outer > 0, inner / outer, 1.0)

    def stable_single_mask(self, all_masks: torch.Tensor, all_iou: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The single-mask output (B, 1, H, W) and its IoU (B, 1), or the best multimask one where it is unstable."""
        multimask_iou = all_iou[:, 1:]
        best = torch.argmax(multimask_iou, dim=-1)
        rows = torch.arange(multimask_iou.shape[0], device=all_iou.device)
        best_masks = all_masks[:, 1:][rows, best].unsqueeze(1)
        best_iou = multimask_iou[rows, best].unsqueeze(1)
        single_masks, single_iou = all_masks[:, 0:1], all_iou[:, 0:1]
        is_stable = self.stability_scores(single_masks) >= self.stability_thresh
        masks = torch.where(is_stable[..., None, None].expand_as(single_masks), single_masks, best_masks)
        iou = torch.where(is_stable.expand_as(single_iou), single_iou, best_iou)
        return masks, iou
