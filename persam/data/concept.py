"""Saving and loading a learned concept: one file, written atomically.

The file is ``torch.save`` of a plain dict (tensors, strings, numbers and a
JSON string of the settings), so it loads with ``weights_only=True`` and no
code of ours runs while reading it. It records the SAM model type and the
checkpoint's SHA-256 it was learned with: target vectors only mean something
for the encoder that produced them, so loading can refuse a concept learned
with another model.
"""

import io
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from persam.errors import InputError
from persam.data.io import atomic_write_bytes
from persam.method.pipeline import METHODS, Concept

PathLike = Union[str, os.PathLike]

FORMAT = "persam-concept"
FORMAT_VERSION = 1

__all__ = ["FORMAT", "FORMAT_VERSION", "save_concept", "load_concept"]


def _tensor(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # clone: a view would drag its whole base storage into the file
    return None if x is None else x.detach().to("cpu", torch.float32).contiguous().clone()


def save_concept(
    concept: Concept,
    path: PathLike,
    model_type: Optional[str] = None,
    checkpoint_sha256: Optional[str] = None,
) -> Path:
    """Write `concept` to `path` atomically (temp file in the same folder, then rename), with the
    permissions of any new file (0644 under umask 022).

    `model_type` / `checkpoint_sha256`, when given, are recorded in place of
    the concept's own (which `learn_concept` leaves unset). Returns the path.
    """
    try:
        settings = json.dumps(dict(concept.settings), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"concept settings must be JSON-serialisable: {exc}") from None
    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "method": concept.method,
        "target_vector": _tensor(concept.target_vector),
        "target_embedding": _tensor(concept.target_embedding),
        "scale_weights": _tensor(concept.scale_weights),
        "settings_json": settings,
        "model_type": model_type if model_type is not None else concept.model_type,
        "checkpoint_sha256": checkpoint_sha256 if checkpoint_sha256 is not None else concept.checkpoint_sha256,
        "name": concept.name,
    }
    buffer = io.BytesIO()
    torch.save(record, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def _describe(model_type: Optional[str], sha: Optional[str]) -> str:
    text = model_type or "an unrecorded model"
    if sha:
        text += f" (sha {sha[:12]})"
    return text


def load_concept(
    path: PathLike,
    model_type: Optional[str] = None,
    checkpoint_sha256: Optional[str] = None,
) -> Concept:
    """Read a concept written by `save_concept`.

    Raises InputError naming the file when it is missing, unreadable, not a
    concept file, of a newer format, or inconsistent; and when `model_type`
    or `checkpoint_sha256` is given and differs from the one the concept was
    learned with (a concept that recorded none is accepted).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"concept {p}: file not found")
    if p.is_dir():
        raise InputError(f"concept {p}: is a folder, not a concept file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"concept {p}: cannot read ({exc.strerror or exc})") from None
    if not data:
        raise InputError(f"concept {p}: the file is empty (truncated or not a concept file)")
    try:
        record = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # truncated zip, pickle garbage, disallowed globals: torch's text is no help
        raise InputError(
            f"concept {p}: truncated or not a concept file ({len(data)} bytes that torch.load cannot read); "
            f"write it again with `persam learn`"
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InputError(f"concept {p}: not a concept file (no '{FORMAT}' record)")
    version = record.get("version")
    if not isinstance(version, int) or version < 1:
        raise InputError(f"concept {p}: invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise InputError(
            f"concept {p}: format version {version} is newer than this toolkit reads ({FORMAT_VERSION}); upgrade persam"
        )
    concept = _concept_from_record(record, p)

    # A concept only makes sense with the encoder that produced its features.
    stored_type, stored_sha = concept.model_type, concept.checkpoint_sha256
    type_differs = model_type is not None and stored_type is not None and model_type != stored_type
    sha_differs = (
        checkpoint_sha256 is not None and stored_sha is not None and checkpoint_sha256.lower() != stored_sha.lower()
    )
    if type_differs or sha_differs:
        raise InputError(
            f"concept {p} was learned with {_describe(stored_type, stored_sha)}, "
            f"not {_describe(model_type or stored_type, checkpoint_sha256)}: learn it again with this model"
        )
    return concept


def _concept_from_record(record: dict, p: Path) -> Concept:
    method = record.get("method")
    if method not in METHODS:
        raise InputError(f"concept {p}: unknown method {method!r} (expected one of {', '.join(METHODS)})")
    vector, embedding, weights = record.get("target_vector"), record.get("target_embedding"), record.get("scale_weights")
    if not isinstance(vector, torch.Tensor) or vector.dim() != 1 or vector.numel() == 0:
        raise InputError(f"concept {p}: target_vector must be a 1-D tensor")
    if not isinstance(embedding, torch.Tensor) or tuple(embedding.shape) != (1, vector.numel()):
        raise InputError(f"concept {p}: target_embedding must be a 1 x {vector.numel()} tensor")
    if method == "persam_f":
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (3,):
            raise InputError(f"concept {p}: a persam_f concept needs 3 scale weights")
    elif weights is not None and (not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (3,)):
        raise InputError(f"concept {p}: scale_weights must be 3 values")
    for name, tensor in (("target_vector", vector), ("target_embedding", embedding), ("scale_weights", weights)):
        if tensor is not None and not torch.isfinite(tensor).all():
            raise InputError(f"concept {p}: {name} holds NaN or infinite values")
    try:
        settings = json.loads(record.get("settings_json", "{}"))
    except (TypeError, ValueError):
        raise InputError(f"concept {p}: settings are not valid JSON") from None
    if not isinstance(settings, dict):
        raise InputError(f"concept {p}: settings must be a JSON object")
    model_type, sha, object_name = record.get("model_type"), record.get("checkpoint_sha256"), record.get("name")
    for name, value in (("model_type", model_type), ("checkpoint_sha256", sha), ("name", object_name)):
        if value is not None and not isinstance(value, str):
            raise InputError(f"concept {p}: {name} must be a string")
    return Concept(
        method=method,
        target_vector=vector.float(),
        target_embedding=embedding.float(),
        scale_weights=None if weights is None else weights.float(),
        settings=settings,
        model_type=model_type,
        checkpoint_sha256=sha,
        name=object_name,
    )
