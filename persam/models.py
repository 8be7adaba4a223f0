"""Model resolution and predictor building, shared by the ``persam`` commands and the benchmarks.

No command-line code here: :func:`resolve_checkpoint` finds the checkpoint file of a model
type (never downloads), :func:`build_predictor` checks that the device exists and builds the
:class:`~sam.predictor.SamPredictor`.  Both raise :class:`~persam.io.InputError` with one-line
messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from sam.download import MODELS

from .io import InputError

DEVICES = ("cpu", "cuda", "mps")
DEFAULT_MODEL = "vit_t"  # fast on CPU; vit_h is the paper's model


def resolve_checkpoint(model_type: str, checkpoint: Optional[Union[str, Path]]) -> Path:
    """`checkpoint` (a file, or a HuggingFace folder) when given, else the cached download; never downloads."""
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise InputError(f"checkpoint {path}: file not found")
        return path
    if model_type not in MODELS:
        raise InputError(f"unknown model {model_type!r}: one of {', '.join(sorted(MODELS))}")
    from sam.download import default_cache_dir

    path = default_cache_dir() / MODELS[model_type].filename
    if not path.is_file():
        raise InputError(
            f"no checkpoint for {model_type}: {path} not found; run `persam download {model_type}` "
            f"or pass --checkpoint PATH"
        )
    return path


def build_predictor(model_type: str, checkpoint: Path, device: str, precision: str, backend: str = "auto"):
    """The SamPredictor for `model_type` / `checkpoint` on `device`, after checking that the device exists.

    `backend` runs the image encoder (sam.backends: auto, torch, openvino, onnxruntime); a compiled
    one is cached under the checkpoint's sha256. An unusable backend is refused before the model loads.
    """
    import torch

    from sam.backends import BackendUnavailable, resolve_backend
    from sam.build import build_sam
    from sam.predictor import SamPredictor

    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available (use --device cpu)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps: Apple MPS is not available (use --device cpu)")
    try:
        resolved = resolve_backend(backend, device, precision)
    except (BackendUnavailable, ValueError) as exc:
        raise InputError(f"--backend {backend}: {exc}") from None
    model = build_sam(model_type, checkpoint, device=device)
    sha256 = None
    if resolved != "torch" and Path(checkpoint).is_file():
        from .run import file_sha256  # remembered per process: the run's key reads it too

        sha256 = file_sha256(checkpoint)
    return SamPredictor(model, precision=precision, backend=backend, checkpoint_sha256=sha256)
