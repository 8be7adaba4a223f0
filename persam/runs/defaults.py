"""The one place for the defaults of every option (the command line's parsers take theirs from here).

Imports nothing, so that every module of the project can read them without an import circle.
"""

DEFAULT_MODEL = "vit_t"  # fast on CPU; vit_h is the paper's model
DEFAULT_DEVICE = "cpu"
DEFAULT_PRECISION = "fp32"  # one of sam.precision.PRECISIONS
DEFAULT_BACKEND = "auto"  # one of sam.backends.BACKEND_CHOICES
DEFAULT_BATCH_SIZE = 4  # `persam segment / apply --batch-size`: target images encoded together
DEFAULT_DINOV2 = "vitl14"  # GF-SAM's DINOv2: ViT-L/14, the model of its published numbers (main_eval.py)
