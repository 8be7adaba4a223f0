"""A Segment Anything (SAM) core: encoders ViT-B/L/H and TinyViT, prompt encoder,
two-way mask decoder with PerSAM's hooks, predictor and checkpoint loading."""

from .build import MODEL_TYPES, build_sam, build_sam_model
from .predictor import Prediction, SamPredictor
from .sam import Sam

__all__ = ["MODEL_TYPES", "Prediction", "Sam", "SamPredictor", "build_sam", "build_sam_model"]
