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
from persam.runs.defaults import DEFAULT_BACKEND, DEFAULT_DEVICE, DEFAULT_MODEL, DEFAULT_PRECISION

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
