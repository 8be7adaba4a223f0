"""DINOv2 (Meta, 2023): the ViT-S/14, B/14, L/14 and g/14 feature encoders, and loading Meta's
official ``dinov2_vit{s,b,l,g}14_pretrain.pth`` checkpoints.

GF-SAM matches DINOv2 patch features of references and targets; this module is the toolkit's own
implementation of Meta's ViT (the ``dinov2`` package and ``timm`` are not dependencies: timm needs
torchvision, which cannot be installed beside the CPU torch build).  It gives the same features as
Meta's code for the same weights (tests/sam/test_dinov2.py checks it to 1e-4), including the way
Meta resizes the learned 37 x 37 position embedding to the input's grid: bicubic, with a scale
factor of (grid + 0.1) / 37 rather than an output size (a historical kludge that changes the
values slightly, kept so that features match).

Inputs are B x 3 x H x W images normalised with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`,
H and W multiples of 14; the patch grid is H/14 x W/14.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, PathLike, guess_model_type, read_state_dict
from .dinov2_layers import LAYER_NORM_EPS, Block, PatchEmbed

__all__ = [
    "DINOV2_VARIANTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DINOv2",
    "Dinov2Spec",
    "build_dinov2",
    "dinov2_variant_of",
    "load_dinov2",
]

DINOV2_VARIANTS = ("vits14", "vitb14", "vitl14", "vitg14")

# Per-channel RGB mean and std on the 0-1 scale (divide 0-255 pixels by 255 first).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PATCH_SIZE = 14
PRETRAIN_SIZE = 518  # the official checkpoints' position embedding covers a 518 x 518 image (37 x 37)
POS_EMBED_OFFSET = 0.1  # Meta's interpolation kludge, see the module docstring


@dataclass(frozen=True)
class Dinov2Spec:
    """The shape of one variant."""

    name: str  # e.g. "ViT-S/14"
    embed_dim: int
    depth: int
    num_heads: int
    ffn: str  # "mlp" or "swiglu"


SPECS: Dict[str, Dinov2Spec] = {
    "vits14": Dinov2Spec("ViT-S/14", 384, 12, 6, "mlp"),
    "vitb14": Dinov2Spec("ViT-B/14", 768, 12, 12, "mlp"),
    "vitl14": Dinov2Spec("ViT-L/14", 1024, 24, 16, "mlp"),
    "vitg14": Dinov2Spec("ViT-g/14", 1536, 40, 24, "swiglu"),
}


class DINOv2(nn.Module):
    """Meta's DINOv2 ViT: image (B x 3 x H x W, normalised) -> tokens (B x 1 + H/14*W/14 x C).

    Parameters have Meta's names: ``cls_token`` (1 x 1 x C), ``pos_embed`` (1 x 1 + 37*37 x C),
    ``mask_token`` (1 x C, used only in training, kept so that official files load strictly),
    ``patch_embed.proj``, ``blocks.N.*`` and the final ``norm``.
    """

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        ffn: str = "mlp",
        patch_size: int = PATCH_SIZE,
        img_size: int = PRETRAIN_SIZE,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        # Meta's interpolation kludge (None: resize to the grid size exactly, as HuggingFace's
        # Dinov2Model does; features then differ from Meta's except on the 37 x 37 grid)
        self.pos_embed_offset: Optional[float] = POS_EMBED_OFFSET
        self.pos_grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid**2, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, ffn) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)

    # ---------------------------------------------------------------------------------------
    # tokens

    def grid_size(self, x: torch.Tensor) -> Tuple[int, int]:
        """The patch grid (rows, cols) of an image batch; raises ValueError unless H and W are
        multiples of the patch size."""
        p = self.patch_size
        height, width = (int(x.shape[-2]), int(x.shape[-1])) if x.dim() == 4 else (0, 0)
        if x.dim() != 4 or x.shape[1] != 3 or height % p or width % p or height == 0 or width == 0:
            raise ValueError(
                f"DINOv2 expects a B x 3 x H x W image batch with H and W positive multiples of "
                f"{p}, got shape {tuple(x.shape)}"
            )
        return height // p, width // p

    def pos_embed_for_grid(self, rows: int, cols: int) -> torch.Tensor:
        """The position embedding for a rows x cols patch grid: 1 x (1 + rows*cols) x C.

        The learned square grid is resized bicubically with Meta's scale factor
        (n + 0.1) / 37 per axis; the class token's entry is kept as it is.
        """
        if rows == self.pos_grid and cols == self.pos_grid:
            return self.pos_embed
        dtype = self.pos_embed.dtype
        table = self.pos_embed.float()
        square = table[:, 1:].reshape(1, self.pos_grid, self.pos_grid, -1).permute(0, 3, 1, 2)
        if self.pos_embed_offset is None:
            resized = F.interpolate(square, size=(rows, cols), mode="bicubic", align_corners=False)
        else:
            offset, n = self.pos_embed_offset, self.pos_grid
            scale = ((rows + offset) / n, (cols + offset) / n)
            resized = F.interpolate(square, scale_factor=scale, mode="bicubic", align_corners=False)
        if tuple(resized.shape[-2:]) != (rows, cols):  # pragma: no cover - floor() of the kludge
            raise RuntimeError(f"position embedding resized to {tuple(resized.shape[-2:])}, not {(rows, cols)}")
        patch_part = resized.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([table[:, :1], patch_part], dim=1).to(dtype)

    def prepare_tokens(self, x: torch.Tensor, pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Patch tokens with the class token in front and the position embedding added:
        B x 3 x H x W -> B x (1 + H/14*W/14) x C.  ``pos_embed`` overrides the interpolated one
        (the exporter passes a precomputed table for a fixed size)."""
        rows, cols = self.grid_size(x)
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        if pos_embed is None:
            pos_embed = self.pos_embed_for_grid(rows, cols)
        return tokens + pos_embed

    def run_blocks(self, x: torch.Tensor, pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The last block's output, before the final norm: B x (1 + N) x C."""
        tokens = self.prepare_tokens(x, pos_embed)
        for block in self.blocks:
            tokens = block(tokens)
        return tokens

    # ---------------------------------------------------------------------------------------
    # public outputs

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x C x H/14 x W/14: the last block's patch tokens BEFORE the final norm.

        This is what GF-SAM matches: ``forward_features(x)["x_prenorm"][:, 1:]`` of Meta's model,
        laid out as a feature map (row-major tokens, so ``[b, :, i, j]`` is patch row i, col j).
        """
        rows, cols = self.grid_size(x)
        tokens = self.run_blocks(x)[:, 1:]
        return tokens.transpose(1, 2).reshape(x.shape[0], self.embed_dim, rows, cols)

    def forward_features(self, x: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
        """Meta's output dict: ``x_norm_clstoken`` (B x C), ``x_norm_patchtokens`` (B x N x C),
        ``x_prenorm`` (B x 1+N x C, the last block's output) and ``masks`` (always None here)."""
        prenorm = self.run_blocks(x)
        normed = self.norm(prenorm)
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_patchtokens": normed[:, 1:],
            "x_prenorm": prenorm,
            "masks": None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised class token, B x C (Meta's ``forward`` with an identity head)."""
        return self.norm(self.run_blocks(x))[:, 0]


# -------------------------------------------------------------------------------------------
# building and loading


def _spec(variant: str) -> Dinov2Spec:
    if variant not in SPECS:
        raise ValueError(f"unknown DINOv2 variant {variant!r}; choose one of {', '.join(DINOV2_VARIANTS)}")
    return SPECS[variant]


def _make(variant: str) -> DINOv2:
    spec = _spec(variant)
    return DINOv2(spec.embed_dim, spec.depth, spec.num_heads, spec.ffn)


def _init_random(model: DINOv2) -> None:
    """Meta's initialisation (timm's ViT scheme), drawn from torch's global generator."""
    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    nn.init.normal_(model.cls_token, std=1e-6)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)


def build_dinov2(variant: str) -> DINOv2:
    """A DINOv2 ``variant`` ("vits14", "vitb14", "vitl14", "vitg14") with random weights, in eval
    mode (seed torch for reproducible weights)."""
    model = _make(variant)
    _init_random(model)
    return model.eval()


def dinov2_variant_of(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """The variant a Meta-named DINOv2 state dict is for (by width and depth), or None."""
    weight = state_dict.get("patch_embed.proj.weight")
    if weight is None or weight.dim() != 4:
        return None
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    for variant, spec in SPECS.items():
        if (spec.embed_dim, spec.depth) == (int(weight.shape[0]), depth):
            return variant
    return None


def _what_it_is(state_dict: Dict[str, torch.Tensor]) -> str:
    """A short description of a checkpoint that is not the requested DINOv2, for the message."""
    if any(k.startswith(("image_encoder.", "mask_decoder.", "prompt_encoder.", "sam_mask_decoder.")) for k in state_dict):
        sam_type = guess_model_type(state_dict)
        kind = f"SAM {sam_type}" if sam_type else "SAM"
        return f"it is a {kind} checkpoint, not a DINOv2 one"
    if any(k.startswith(("embeddings.", "dinov2.embeddings.")) for k in state_dict):
        return "it is a HuggingFace transformers Dinov2Model checkpoint; give Meta's original file"
    if "register_tokens" in state_dict:
        return "it is a DINOv2 checkpoint with register tokens (*_reg4_pretrain.pth), which is not supported"
    found = dinov2_variant_of(state_dict)
    if found is not None:
        return f"it is the DINOv2 {SPECS[found].name} checkpoint (variant {found!r})"
    return "it does not look like any DINOv2 checkpoint"


def _check_fits(model: DINOv2, state_dict: Dict[str, torch.Tensor], path: Path, variant: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        return
    if dinov2_variant_of(state_dict) == variant and "register_tokens" not in state_dict:
        bad = (missing + unexpected + mismatched)[:3]
        reason = f"its keys differ from the official layout ({', '.join(bad)}, ...)"
    else:
        reason = _what_it_is(state_dict)
    raise CheckpointError(f"{path} does not fit DINOv2 {SPECS[variant].name} ({variant!r}): {reason}")


def load_dinov2(variant: str, checkpoint: PathLike) -> DINOv2:
    """A DINOv2 ``variant`` with the weights of ``checkpoint`` (Meta's ``*_pretrain.pth`` layout),
    float32, in eval mode.  Raises :class:`~sam.checkpoint.CheckpointError` with a one-line message
    for a missing, truncated or unsafe file, or one that is another model or another variant."""
    _spec(variant)
    path = Path(checkpoint).expanduser()
    try:
        state_dict = read_state_dict(path, model_type=f"dinov2_{variant}")
    except CheckpointError as exc:  # the reader's wording speaks of SAM
        raise CheckpointError(str(exc).replace("a SAM checkpoint", "a DINOv2 checkpoint")) from None
    with torch.device("meta"):
        model = _make(variant)
    _check_fits(model, state_dict, path, variant)
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()

