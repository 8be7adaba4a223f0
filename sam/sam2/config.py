"""The four SAM 2.1 sizes as typed configs, read off Meta's ``configs/sam2.1/sam2.1_hiera_*.yaml``.

Besides the trunk, the sizes share every setting: those of the config files, plus the post-processing
Meta's ``build_sam2`` / ``build_sam2_video_predictor`` switch on (the stability fallback for single
masks, binarised click masks for the memory, small holes filled). The tracker reads its flags here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from .hiera import HieraConfig

__all__ = ["SAM2_CONFIGS", "Sam2Config"]


@dataclass(frozen=True)
class Sam2Config:
    """One SAM 2.1 size: its trunk, and the settings its config file and Meta's builders give."""

    variant: str
    trunk: HieraConfig
    image_size: int = 1024
    backbone_stride: int = 16
    hidden_dim: int = 256
    memory_dim: int = 64
    fpn_top_down_levels: tuple = (2, 3)
    scalp: int = 1
    memory_attention_layers: int = 4
    num_maskmem: int = 7  # the prompted frame + 6 previous frames
    max_obj_ptrs_in_encoder: int = 16
    # memory and object-pointer settings of the config files
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    use_mask_input_as_output_without_sam: bool = True
    directly_add_no_mem_embed: bool = True
    multimask_output_in_sam: bool = True
    multimask_min_pt_num: int = 0
    multimask_max_pt_num: int = 1
    multimask_output_for_tracking: bool = True
    use_multimask_token_for_obj_ptr: bool = True
    add_tpos_enc_to_obj_ptrs: bool = True
    proj_tpos_enc_in_obj_ptrs: bool = True
    use_signed_tpos_enc_to_obj_ptrs: bool = True
    only_obj_ptrs_in_the_past_for_eval: bool = True
    memory_temporal_stride_for_eval: int = 1
    max_cond_frames_in_attn: int = -1
    non_overlap_masks_for_mem_enc: bool = False
    # post-processing Meta's builders switch on
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98
    binarize_mask_from_pts_for_mem_enc: bool = True
    fill_hole_area: int = 8


SAM2_CONFIGS: Dict[str, Sam2Config] = {
    "sam2.1_hiera_t": Sam2Config(
        "sam2.1_hiera_t",
        HieraConfig(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_attention_blocks=(5, 7, 9),
                    pos_embed_background_size=(7, 7)),
    ),
    "sam2.1_hiera_s": Sam2Config(
        "sam2.1_hiera_s",
        HieraConfig(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_attention_blocks=(7, 10, 13),
                    pos_embed_background_size=(7, 7)),
    ),
    "sam2.1_hiera_b+": Sam2Config(
        "sam2.1_hiera_b+",
        HieraConfig(embed_dim=112, num_heads=2),  # Meta's Hiera defaults otherwise
    ),
    "sam2.1_hiera_l": Sam2Config(
        "sam2.1_hiera_l",
        HieraConfig(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_attention_blocks=(23, 33, 43),
                    window_sizes=(8, 4, 16, 8), pos_embed_background_size=(7, 7)),
    ),
}
