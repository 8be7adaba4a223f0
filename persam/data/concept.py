"""Saving and loading a learned concept: one file, written atomically.

The file is ``torch.save`` of a plain dict (tensors, strings, numbers and a
JSON string of the settings), so it loads with ``weights_only=True`` and no
code of ours runs while reading it. It records the SAM model type and the
checkpoint's SHA-256 it was learned with: target vectors only mean something
for the encoder that produced them, so loading can refuse a concept learned
with another model.

A GF-SAM concept (persam.method.gfsam.GFSAMConcept, format version 2) holds
each reference's DINOv2 patch features, its patch grid and its mask and
complement sampled at the grid, with the DINOv2 variant and checkpoint sha256
besides SAM's: loading refuses it with another DINOv2 model or checkpoint.
"""

import io
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from persam.errors import InputError
from persam.data.io import atomic_write_bytes
from persam.method.gfsam import METHOD as GFSAM_METHOD
from persam.method.gfsam import GFSAMConcept, GFSAMReference
from persam.method.pipeline import METHODS, Concept

PathLike = Union[str, os.PathLike]

FORMAT = "persam-concept"
FORMAT_VERSION = 2  # the newest read: 1 PerSAM / PerSAM-F concepts (still written as 1), 2 GF-SAM's
GFSAM_VERSION = 2

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
    A GFSAMConcept is written with its references and DINOv2 model (format version 2).
    """
    if isinstance(concept, GFSAMConcept):
        return _save_gfsam(concept, path, model_type, checkpoint_sha256)
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
    dinov2_variant: Optional[str] = None,
    dinov2_sha256: Optional[str] = None,
) -> Union[Concept, GFSAMConcept]:
    """Read a concept written by `save_concept`: a Concept, or a GFSAMConcept (whose ``model_type``
    and ``checkpoint_sha256`` are the SAM it was saved with).

    Raises InputError naming the file when it is missing, unreadable, not a
    concept file, of a newer format, or inconsistent; and when `model_type`
    or `checkpoint_sha256` is given and differs from the one the concept was
    learned with (a concept that recorded none is accepted); likewise, for a
    GF-SAM concept, `dinov2_variant` and `dinov2_sha256`.
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
    if record.get("method") == GFSAM_METHOD:
        concept = _gfsam_from_record(record, p)
        _check_dinov2(concept, p, dinov2_variant, dinov2_sha256)
    else:
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


# --------------------------------------------------------------------------------------------
# GF-SAM concepts


def _save_gfsam(concept: GFSAMConcept, path: PathLike, model_type: Optional[str],
                checkpoint_sha256: Optional[str]) -> Path:
    try:
        settings = json.dumps(dict(concept.settings), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"concept settings must be JSON-serialisable: {exc}") from None
    references = [{"features": _tensor(r.features), "grid": [int(r.grid[0]), int(r.grid[1])],
                   "foreground": _tensor(r.foreground), "background": _tensor(r.background)}
                  for r in concept.references]
    record = {
        "format": FORMAT,
        "version": GFSAM_VERSION,
        "method": GFSAM_METHOD,
        "references": references,
        "dinov2_variant": concept.dinov2_variant,
        "dinov2_sha256": concept.dinov2_sha256,
        "settings_json": settings,
        "model_type": model_type if model_type is not None else getattr(concept, "model_type", None),
        "checkpoint_sha256": (checkpoint_sha256 if checkpoint_sha256 is not None
                              else getattr(concept, "checkpoint_sha256", None)),
        "name": concept.name,
    }
    buffer = io.BytesIO()
    torch.save(record, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def _gfsam_reference(entry, k: int, p: Path) -> GFSAMReference:
    """One reference of a GF-SAM concept record, checked: InputError naming the file and the reference."""
    where = f"concept {p}: reference {k}"
    if not isinstance(entry, dict):
        raise InputError(f"{where} is not a record")
    features, grid = entry.get("features"), entry.get("grid")
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.numel() == 0:
        raise InputError(f"{where}: features must be an N x C tensor")
    if (not isinstance(grid, (list, tuple)) or len(grid) != 2 or not all(isinstance(v, int) and v > 0 for v in grid)
            or grid[0] * grid[1] != features.shape[0]):
        raise InputError(f"{where}: grid must be two positive whole numbers whose product is the "
                         f"{features.shape[0]} feature rows")
    regions = []
    for name in ("foreground", "background"):
        region = entry.get(name)
        if not isinstance(region, torch.Tensor) or tuple(region.shape) != (features.shape[0],):
            raise InputError(f"{where}: {name} must hold {features.shape[0]} values")
        regions.append(region.float())
    for name, tensor in (("features", features), ("foreground", regions[0]), ("background", regions[1])):
        if not torch.isfinite(tensor).all():
            raise InputError(f"{where}: {name} holds NaN or infinite values")
    return GFSAMReference(features.float(), (grid[0], grid[1]), regions[0], regions[1])


def _gfsam_from_record(record: dict, p: Path) -> GFSAMConcept:
    from sam.dinov2 import DINOV2_VARIANTS

    entries = record.get("references")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"concept {p}: a gfsam concept needs at least one reference")
    references = [_gfsam_reference(entry, k, p) for k, entry in enumerate(entries, start=1)]
    if len({r.features.shape[1] for r in references}) > 1:
        raise InputError(f"concept {p}: the references' features have different widths")
    variant = record.get("dinov2_variant")
    if variant not in DINOV2_VARIANTS:
        raise InputError(f"concept {p}: unknown DINOv2 model {variant!r} (expected one of "
                         f"{', '.join(DINOV2_VARIANTS)})")
    try:
        settings = json.loads(record.get("settings_json", "{}"))
    except (TypeError, ValueError):
        raise InputError(f"concept {p}: settings are not valid JSON") from None
    if not isinstance(settings, dict):
        raise InputError(f"concept {p}: settings must be a JSON object")
    values = {name: record.get(name) for name in ("dinov2_sha256", "model_type", "checkpoint_sha256", "name")}
    for name, value in values.items():
        if value is not None and not isinstance(value, str):
            raise InputError(f"concept {p}: {name} must be a string")
    return GFSAMConcept(references, variant, values["dinov2_sha256"], settings, name=values["name"],
                        model_type=values["model_type"], checkpoint_sha256=values["checkpoint_sha256"])


def _check_dinov2(concept: GFSAMConcept, p: Path, variant: Optional[str], sha256: Optional[str]) -> None:
    """InputError when the concept was learned with another DINOv2 model or checkpoint than the given one."""
    stored_variant, stored_sha = concept.dinov2_variant, concept.dinov2_sha256
    variant_differs = variant is not None and variant != stored_variant
    sha_differs = sha256 is not None and stored_sha is not None and sha256.lower() != stored_sha.lower()
    if variant_differs or sha_differs:
        raise InputError(
            f"concept {p} was learned with DINOv2 {_describe(stored_variant, stored_sha)}, "
            f"not DINOv2 {_describe(variant or stored_variant, sha256)}: learn it again with this DINOv2 model"
        )
