"""Model resolution and predictor building, shared by the ``persam`` commands and the benchmarks.

No command-line code here: :func:`resolve_checkpoint` finds the checkpoint file of a model
type (never downloads), :func:`build_predictor` checks that the device exists and builds the
:class:`~sam.predictor.SamPredictor`.  Both raise :class:`~persam.errors.InputError` with one-line
messages (a :class:`~persam.errors.SettingError` names the setting, e.g. device, in the library's
terms: the command line words it as its flag), and report what the user should know (a
hand-placed checkpoint, a faster encoder backend to install) as one line each to their ``log``
callback (stderr by default), as :mod:`sam.backends` does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from sam.download import MODELS

from persam.errors import InputError, SettingError
from persam.runs.defaults import DEFAULT_BACKEND, DEFAULT_DEVICE, DEFAULT_DINOV2, DEFAULT_MODEL, DEFAULT_PRECISION

DEVICES = ("cpu", "cuda", "mps")


Log = Callable[[str], None]


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build and how: the model type, its checkpoint (None: the cached download),
    the device, the image encoder's precision and who runs the encoder (sam.backends)."""

    model_type: str = DEFAULT_MODEL
    checkpoint: Optional[Union[str, Path]] = None
    device: str = DEFAULT_DEVICE
    precision: str = DEFAULT_PRECISION
    backend: str = DEFAULT_BACKEND


@dataclass(frozen=True)
class Dinov2Spec:
    """GF-SAM's feature model: the DINOv2 variant (sam.dinov2.DINOV2_VARIANTS) and its checkpoint
    (None: the cached download of ``dinov2_<variant>``); device, precision and backend are the
    ModelSpec's."""

    variant: str = DEFAULT_DINOV2
    checkpoint: Optional[Union[str, Path]] = None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_checkpoint(model_type: str, checkpoint: Optional[Union[str, Path]], log: Optional[Log] = _stderr) -> Path:
    """The checkpoint file to load; never downloads.

    `checkpoint` when given: a file, or a HuggingFace folder, for which the weights file inside it
    (model.safetensors or pytorch_model.bin) is returned, so that its sha256 can be taken. Else the
    cached download (sam.download.cached_checkpoint): one whose sha256 is not the official file's
    was placed there by hand and is used, with one warning line naming it and its sha256 to `log`
    (None: an UnverifiedCheckpointWarning instead).
    """
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise InputError(f"checkpoint {path}: file not found")
        if path.is_dir():
            from sam.checkpoint import CheckpointError, checkpoint_file

            try:
                return checkpoint_file(path, model_type=model_type)
            except CheckpointError as exc:
                raise InputError(str(exc)) from None
        return path
    if model_type not in MODELS:
        raise InputError(f"unknown model {model_type!r}: one of {', '.join(sorted(MODELS))}")
    from sam.download import DownloadError, cached_checkpoint, default_cache_dir

    from persam.runs.key import file_sha256  # remembered per process: the run's key reads it too

    warn = None if log is None else (lambda message: log(f"persam: warning: {message}"))
    try:
        path = cached_checkpoint(model_type, sha256_of=file_sha256, warn=warn)
    except DownloadError as exc:
        raise InputError(str(exc)) from None
    except OSError as exc:
        raise InputError(f"checkpoint {exc.filename or default_cache_dir()}: cannot be read "
                         f"({exc.strerror or exc})") from None
    if path is None:
        path = default_cache_dir() / MODELS[model_type].filename
        raise SettingError(
            f"no checkpoint for {model_type}: {path} not found; run `persam download {model_type}` "
            f"or pass {{checkpoint}} PATH", "checkpoint"
        )
    return path


def build_predictor(model_type: str, checkpoint: Path, device: str, precision: str, backend: str = DEFAULT_BACKEND,
                    log: Optional[Log] = _stderr):
    """The SamPredictor for `model_type` / `checkpoint` on `device`, after checking that the device exists.

    `backend` runs the image encoder (sam.backends: auto, torch, openvino, onnxruntime); a compiled
    one is cached under the checkpoint's sha256. An unusable backend is refused before the model loads.
    When "auto" leaves the encoder on torch on a CPU where a faster backend could be installed
    (and torch was not asked for, by name or by $PERSAM_BACKEND), one line to `log` says how to get it.
    """
    import torch

    from sam.backends import BackendUnavailable, faster_backend_hint, resolve_backend
    from sam.build import build_sam
    from sam.predictor import SamPredictor

    if device == "cuda" and not torch.cuda.is_available():
        raise SettingError("{device} cuda: no CUDA GPU is available (use {device} cpu)", "device")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SettingError("{device} mps: Apple MPS is not available (use {device} cpu)", "device")
    try:
        resolved = resolve_backend(backend, device, precision)
    except (BackendUnavailable, ValueError) as exc:
        raise SettingError(f"{{backend}} {backend}: {exc}", "backend") from None
    hint = faster_backend_hint(backend, device, precision) if log is not None else None
    if hint is not None:
        log(f"persam: {hint}")
    model = build_sam(model_type, checkpoint, device=device)
    sha256 = None
    if resolved != "torch" and Path(checkpoint).is_file():
        from persam.runs.key import file_sha256  # remembered per process: the run's key reads it too

        sha256 = file_sha256(checkpoint)
    return SamPredictor(model, precision=precision, backend=backend, checkpoint_sha256=sha256)


# --------------------------------------------------------------------------------------------
# DINOv2, GF-SAM's feature model (persam.method.gfsam)


def resolve_dinov2_checkpoint(variant: Optional[str], checkpoint: Optional[Union[str, Path]],
                              log: Optional[Log] = _stderr) -> Path:
    """The DINOv2 checkpoint file of `variant` (None: DEFAULT_DINOV2): `checkpoint` when given, else
    the cached download of ``dinov2_<variant>``; never downloads.  SettingError (naming the dinov2 /
    dinov2_checkpoint settings) for an unknown variant or a missing file."""
    from sam.dinov2 import DINOV2_VARIANTS

    variant = variant or DEFAULT_DINOV2
    if variant not in DINOV2_VARIANTS:
        raise SettingError(f"{{dinov2}} {variant}: one of {', '.join(DINOV2_VARIANTS)}", "dinov2")
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise SettingError(f"{{dinov2_checkpoint}} {path}: file not found", "dinov2_checkpoint")
        return path
    name = f"dinov2_{variant}"
    if name not in MODELS:
        raise SettingError(f"GF-SAM needs a DINOv2 checkpoint: pass {{dinov2_checkpoint}} (Meta's "
                           f"{name}_pretrain.pth)", "dinov2_checkpoint")
    try:
        return resolve_checkpoint(name, None, log)
    except SettingError:  # its message names SAM's checkpoint setting
        raise SettingError(f"no DINOv2 checkpoint for {variant} (GF-SAM's feature model): run `persam download "
                           f"{name}` or pass {{dinov2_checkpoint}} PATH", "dinov2_checkpoint") from None


class Dinov2OnBackend:
    """A loaded DINOv2 whose ``patch_features`` run on another encoder backend
    (sam.dinov2_backends.make_dinov2_encoder): what persam.method.gfsam calls of a DINOv2 module
    (``patch_features``, ``parameters``, ``state_dict``), the features computed by the backend."""

    def __init__(self, model, features) -> None:
        self.model = model
        self.features = features

    def patch_features(self, pixels):
        return self.features(pixels)

    def parameters(self):
        return self.model.parameters()

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)


def build_dinov2_features(variant: str, checkpoint: Path, device: str = DEFAULT_DEVICE,
                          precision: str = DEFAULT_PRECISION, backend: str = DEFAULT_BACKEND,
                          log: Optional[Log] = _stderr):
    """DINOv2 `variant` with the weights of `checkpoint` on `device`, its patch features run by
    `backend` (the SAM encoder's choices; a compiled one is cached under the checkpoint's sha256).
    On torch in fp32 the model itself; else a :class:`Dinov2OnBackend`.  CheckpointError (a
    ValueError) with one line for a file that does not fit."""
    from sam.backends import BackendUnavailable, resolve_backend
    from sam.dinov2 import load_dinov2

    try:
        resolved = resolve_backend(backend, device, precision)
    except (BackendUnavailable, ValueError) as exc:
        raise SettingError(f"{{backend}} {backend}: {exc}", "backend") from None
    model = load_dinov2(variant, checkpoint).to(device)
    if resolved == "torch" and precision == "fp32":
        return model
    from sam.dinov2_backends import make_dinov2_encoder

    from persam.runs.key import file_sha256

    features = make_dinov2_encoder(model, resolved, precision, sha256=file_sha256(checkpoint), log=log)
    return Dinov2OnBackend(model, features)
