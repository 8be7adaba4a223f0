"""Reading, converting and validating SAM checkpoints.

Accepted inputs:

* Meta's ``segment_anything`` checkpoints (``sam_vit_*.pth``) and MobileSAM's ``mobile_sam.pt``:
  plain state dicts written by ``torch.save``; a dict wrapping the state dict under ``"model"``
  or ``"state_dict"`` (training checkpoints) is unwrapped, and a DataParallel ``module.`` prefix
  is dropped.
* HuggingFace ``transformers`` SAM checkpoints (``model.safetensors`` or ``pytorch_model.bin``,
  or a directory holding one of them).  Their key names are translated back to Meta's
  (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).

Every failure is reported as a :class:`CheckpointError` with a message meant for the user, never
as a raw torch traceback.  Pickled files are read with ``torch.load(weights_only=True)``: a file
that would run code when unpickled (a pickle importing ``os.system``, say) is refused, and the
message says so, naming what it imports (read from the pickle's opcodes, never by running it:
:mod:`sam.checkpoint_safety`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from .checkpoint_safety import code_in_pickle

__all__ = [
    "CheckpointError",
    "checkpoint_file",
    "read_state_dict",
    "convert_hf_to_meta",
    "is_hf_state_dict",
    "guess_model_type",
    "load_into",
]

PathLike = Union[str, os.PathLike]

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# ViT-based SAM encoders: patch-embedding width and number of transformer blocks.
_VIT_SIGNATURES = {
    (768, 12): "vit_b",
    (1024, 24): "vit_l",
    (1280, 32): "vit_h",
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the requested model."""


# --------------------------------------------------------------------------------------------
# reading


def _download_hint(path: Path, model_type: Optional[str]) -> str:
    if model_type is None:
        try:
            from .download import MODELS

            model_type = next(
                (m.model_type for m in MODELS.values() if m.filename == path.name), None
            )
        except Exception:  # pragma: no cover - registry import problems must not mask the error
            model_type = None
    return f"persam download {model_type or 'MODEL'}"


def _short_reason(exc: BaseException) -> str:
    """A one-line summary of a loader exception (torch's messages are paragraphs)."""
    text = str(exc)
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\s*\n|$)", text, re.S)
    if m:
        text = m.group(1)
    text = " ".join(text.split())
    if "PytorchStreamReader failed" in text or "This is an internal miniz error" in text:
        text = text.split(". This is an internal miniz error")[0]
    if len(text) > 200:
        text = text[:197] + "..."
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _corrupt(path: Path, exc: BaseException, model_type: Optional[str]) -> CheckpointError:
    try:
        empty = path.stat().st_size == 0
    except OSError:
        empty = False
    reason = "the file is empty" if empty else _short_reason(exc)
    if _in_download_cache(path):  # our downloader wrote it: replacing it is the cure
        advice = f"delete it and download again with `{_download_hint(path, model_type)}`"
    else:  # the user's own file: say what is wrong, not what to do with their file
        advice = (
            f"it is not a SAM checkpoint that torch or safetensors can load; give a complete "
            f"checkpoint, or get one with `{_download_hint(path, model_type)}`"
        )
    return CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {reason}; {advice}")


def _in_download_cache(path: Path) -> bool:
    """True for a file of the download registry inside the default download cache."""
    try:
        from .download import MODELS, default_cache_dir

        if path.name not in {m.filename for m in MODELS.values()}:
            return False
        return path.resolve().parent == default_cache_dir().resolve()
    except Exception:  # pragma: no cover - registry import problems must not mask the error
        return False


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors files start with a little-endian u64 header length followed by '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8


def checkpoint_file(path: PathLike, *, model_type: Optional[str] = None) -> Path:
    """The file that holds the weights: ``path`` itself, or for a (HuggingFace) folder the
    ``model.safetensors`` or ``pytorch_model.bin`` inside it.

    Raises :class:`CheckpointError` when there is no such file or it cannot be read;
    ``model_type`` only improves the advice in the message.
    """
    return _resolve_file(Path(path).expanduser(), model_type)


def _resolve_file(path: Path, model_type: Optional[str]) -> Path:
    if not path.exists():
        raise CheckpointError(
            f"checkpoint not found: {path}; check the path, or download the model with "
            f"`{_download_hint(path, model_type)}`"
        )
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"cannot read checkpoint {path}: permission denied")
    if path.is_dir():
        for name in HF_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"{path} is a directory without a checkpoint: expected one of "
            f"{', '.join(HF_WEIGHT_FILES)} inside it"
        )
    return path


def _load_raw(path: Path, model_type: Optional[str]) -> object:
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors is a dependency
            raise CheckpointError(
                f"{path} is a safetensors file but the `safetensors` package is not installed"
            ) from exc
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise _corrupt(path, exc, model_type) from None
    try:
        with warnings.catch_warnings():  # torch's advice on pickle protocols is not the user's business
            warnings.filterwarnings("ignore", message=r"Detected pickle protocol", category=UserWarning)
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:
        code = code_in_pickle(path, exc)
        if code:
            shown = ", ".join(code[:3]) + (", ..." if len(code) > 3 else "")
            raise CheckpointError(
                f"{path} was refused: it holds code that would run when it is loaded (it calls "
                f"{shown}), not only weights; checkpoints are loaded as weights only, for safety: "
                f"give a state dict saved with torch.save(model.state_dict(), PATH)"
            ) from None
        raise _corrupt(path, exc, model_type) from None


def _unwrap(obj: object, path: Path) -> Dict[str, torch.Tensor]:
    for _ in range(2):  # e.g. {"model": {...}} or {"state_dict": {...}}
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for wrapper in ("model", "state_dict"):
                if isinstance(obj.get(wrapper), dict):
                    obj = obj[wrapper]
                    break
            else:
                break
        else:
            break
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} does not contain a state dict (found {type(obj).__name__}); expected a "
            f"dict of tensors as written by torch.save(model.state_dict(), ...)"
        )
    if not obj:
        raise CheckpointError(f"{path} contains an empty state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        shown = ", ".join(repr(k) for k in bad[:5])
        raise CheckpointError(
            f"{path} does not contain a state dict: {len(bad)} entries are not named tensors "
            f"(e.g. {shown})"
        )
    sd: Dict[str, torch.Tensor] = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: PathLike, *, model_type: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Read a SAM checkpoint into a Meta-named state dict on the CPU.

    ``path`` may be a ``.pth``/``.pt`` (torch.save), a ``.safetensors`` / ``pytorch_model.bin``
    file in HuggingFace naming, or a directory containing ``model.safetensors`` or
    ``pytorch_model.bin``.  ``model_type`` only improves the advice in error messages.
    """
    path = Path(path).expanduser()
    file = _resolve_file(path, model_type)
    sd = _unwrap(_load_raw(file, model_type), file)
    if is_hf_state_dict(sd):
        sd = convert_hf_to_meta(sd, source=str(file))
    return sd


# --------------------------------------------------------------------------------------------
# HuggingFace naming -> Meta naming
#
# transformers renames Meta's modules as follows (see its convert_sam_to_hf.py); the rules below
# undo that, one component at a time:
#   image encoder   vision_encoder.*; blocks.N -> layers.N; blockwise norm1/2 -> layer_norm1/2;
#                   patch_embed.proj -> patch_embed.projection; neck.0..3 -> neck.conv1,
#                   neck.layer_norm1, neck.conv2, neck.layer_norm2.  qkv/proj/rel_pos_* and
#                   mlp.lin1/lin2 keep their names (qkv is NOT split).
#   prompt encoder  pe_layer.positional_encoding_gaussian_matrix -> shared_embedding /
#                   top-level shared_image_embedding .positional_embedding; point_embeddings.N
#                   -> point_embed.N; mask_downscaling.0/1/3/4/6 -> mask_embed.conv1/layer_norm1/
#                   conv2/layer_norm2/conv3; not_a_point_embed and no_mask_embed unchanged.
#   mask decoder    output_upscaling.0/1/3 -> upscale_conv1/upscale_layer_norm/upscale_conv2;
#                   two-way transformer norm1..4 -> layer_norm1..4, norm_final_attn ->
#                   layer_norm_final_attn; every MLP head (output_hypernetworks_mlps.N,
#                   iou_prediction_head) stores layers.0 as proj_in, the last layer as proj_out
#                   and the hidden ones, renumbered from 0, as layers.K.

_HF_POS_KEYS = (
    "shared_image_embedding.positional_embedding",
    "prompt_encoder.shared_embedding.positional_embedding",
)
_META_POS_KEY = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"

# Plain renames: (regex on the full key, replacement).  All rules are tried in order on each key.
_HF_RENAMES = [
    (r"^vision_encoder\.", "image_encoder."),
    (r"^image_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^image_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
    (r"^image_encoder\.layers\.(\d+)\.", r"image_encoder.blocks.\1."),
    (r"^image_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^image_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^image_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^image_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^prompt_encoder\.point_embed\.(\d+)\.", r"prompt_encoder.point_embeddings.\1."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    # "upsacle" is a misspelling found in early transformers versions
    (r"^mask_decoder\.(?:upscale|upsacle)_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
    (
        r"^mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.",
        r"mask_decoder.transformer.layers.\1.norm\2.",
    ),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
]
_HF_RENAMES_C = [(re.compile(p), r) for p, r in _HF_RENAMES]

# An MLP head of the mask decoder, in HF naming.
_HF_FFN = re.compile(
    r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\."
    r"(proj_in|proj_out|layers\.(\d+))\.(.+)$"
)

_HF_MARKERS = (
    "vision_encoder.",
    "shared_image_embedding.",
    "prompt_encoder.shared_embedding.",
    "prompt_encoder.point_embed.",
    "prompt_encoder.mask_embed.",
    "mask_decoder.upscale_conv1.",
)


def is_hf_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    """True when the keys use the HuggingFace ``transformers`` SAM naming."""
    return any(k.startswith(_HF_MARKERS) for k in state_dict)


def convert_hf_to_meta(
    state_dict: Dict[str, torch.Tensor], source: str = "checkpoint"
) -> Dict[str, torch.Tensor]:
    """Rename a HuggingFace ``SamModel`` state dict to Meta's ``segment_anything`` names.

    Keys that match no rule are kept unchanged (a later strict load reports them).
    """
    # number of hidden layers of each MLP head, to know where proj_out goes
    hidden = defaultdict(set)
    for key in state_dict:
        m = _HF_FFN.match(key)
        if m and m.group(3) is not None:
            hidden[m.group(1)].add(int(m.group(3)))

    out: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    for key, value in state_dict.items():
        if key in _HF_POS_KEYS:
            continue
        new = key
        m = _HF_FFN.match(key)
        if m:
            head, which, idx, rest = m.group(1), m.group(2), m.group(3), m.group(4)
            if which == "proj_in":
                meta_idx = 0
            elif which == "proj_out":
                meta_idx = len(hidden[head]) + 1
            else:
                meta_idx = int(idx) + 1
            new = f"{head}.layers.{meta_idx}.{rest}"
        else:
            for pattern, repl in _HF_RENAMES_C:
                new = pattern.sub(repl, new)
        if new in out:
            raise CheckpointError(
                f"{source}: HuggingFace keys {origin[new]!r} and {key!r} both map to {new!r}"
            )
        out[new] = value
        origin[new] = key

    for pos_key in _HF_POS_KEYS:  # the two are tied in transformers; either may be stored
        if pos_key in state_dict:
            out[_META_POS_KEY] = state_dict[pos_key]
            break
    return out


# --------------------------------------------------------------------------------------------
# model type


def guess_model_type(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """Tell ``vit_b`` / ``vit_l`` / ``vit_h`` / ``vit_t`` from the keys and shapes, or None."""
    if is_hf_state_dict(state_dict):
        state_dict = convert_hf_to_meta(state_dict)
    if any(k.startswith("image_encoder.layers.") for k in state_dict):
        return "vit_t"  # MobileSAM's TinyViT encoder
    w = state_dict.get("image_encoder.patch_embed.proj.weight")
    if w is None or w.dim() < 1:
        return None
    blocks = {
        int(m.group(1))
        for k in state_dict
        for m in [re.match(r"^image_encoder\.blocks\.(\d+)\.", k)]
        if m
    }
    return _VIT_SIGNATURES.get((int(w.shape[0]), len(blocks)))


# --------------------------------------------------------------------------------------------
# loading into a model

# Constant normalisation buffers: some implementations persist them, the official files do not.
_OPTIONAL_BUFFERS = ("pixel_mean", "pixel_std")


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _fmt_keys(keys, n=5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def load_into(model: torch.nn.Module, path: PathLike, model_type: str) -> None:
    """Read ``path`` and load it into ``model`` with ``strict=True``.

    When keys or shapes do not fit, raises a :class:`CheckpointError` naming the file, the
    requested model type, the missing / unexpected / mismatched keys (counts and the first five)
    and, when it can tell, the model type the checkpoint is for.
    """
    path = Path(path).expanduser()
    sd = read_state_dict(path, model_type=model_type)
    expected = model.state_dict()

    for name in _OPTIONAL_BUFFERS:
        if name in expected and name not in sd:
            sd[name] = expected[name]
        elif name in sd and name not in expected:
            del sd[name]

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k} (checkpoint {list(sd[k].shape)}, model {list(expected[k].shape)})"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"{path} does not fit model type {model_type!r}"]
        if missing:
            parts.append(f"{_count(missing, 'missing key')}: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"{_count(unexpected, 'unexpected key')}: {_fmt_keys(unexpected)}")
        if mismatched:
            parts.append(
                f"{_count(mismatched, 'key')} with mismatched shapes: {_fmt_keys(mismatched)}"
            )
        guess = guess_model_type(sd)
        if guess is not None and guess != model_type:
            parts.append(f"this checkpoint fits model type {guess!r}")
        elif guess == model_type:
            parts.append(
                f"the checkpoint looks like a {guess!r} checkpoint, but its keys differ from "
                f"this model's (a modified checkpoint, or a model that is not laid out like "
                f"the official one?)"
            )
        else:
            parts.append("the checkpoint does not look like any known SAM model")
        raise CheckpointError("; ".join(parts))

    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # e.g. dtype/device problems the checks above cannot see
        raise CheckpointError(
            f"{path} could not be loaded into model type {model_type!r}: {_short_reason(exc)}"
        ) from None
