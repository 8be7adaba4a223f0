"""A Segment Anything (SAM) core: encoders ViT-B/L/H and TinyViT, prompt encoder,
two-way mask decoder with PerSAM's hooks, predictor and checkpoint loading; and the DINOv2
feature encoders GF-SAM matches (sam/dinov2.py)."""

from .build import MODEL_TYPES, build_sam, build_sam_model
from .dinov2 import DINOV2_VARIANTS, DINOv2, build_dinov2, load_dinov2
from .predictor import Prediction, SamPredictor
from .sam import Sam

__all__ = ["MODEL_TYPES", "Prediction", "Sam", "SamPredictor", "build_sam", "build_sam_model",
           "DINOV2_VARIANTS", "DINOv2", "build_dinov2", "load_dinov2"]
