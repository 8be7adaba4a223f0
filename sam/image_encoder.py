"""The ViT image encoder of SAM (ViT-B, ViT-L, ViT-H).

A plain ViT with 16 x 16 patches, windowed attention in most blocks, global
attention in a few, decomposed relative position biases, and a convolutional
neck that maps the tokens to a 256-channel 64 x 64 embedding.
"""

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock, grid_to_windows, pad_grid, windows_to_grid


class ImageEncoderViT(nn.Module):
    """Image (B x 3 x S x S, normalised and padded) -> embedding (B x out_chans x S/16 x S/16)."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: Tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed: Optional[nn.Parameter] = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # B x h x w x C
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


class PatchEmbed(nn.Module):
    """Non-overlapping patches: B x 3 x H x W -> B x H/p x W/p x C."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block; attends within windows, or globally when window_size is 0."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_rel_pos: bool = True,
        window_size: int = 0,
        input_size: Tuple[int, int] = (64, 64),
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        attn_size = input_size if window_size == 0 else (window_size, window_size)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos, input_size=attn_size)
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x H x W x C -> B x H x W x C."""
        shortcut = x
        x = self.norm1(x)
        x = self.attn.in_windows(x, self.window_size) if self.window_size > 0 else self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head self-attention with decomposed relative position biases."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        input_size: Tuple[int, int] = (14, 14),
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x H x W x C -> B x H x W x C."""
        batch, height, width, dim = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each B x heads x L x head_dim
        out = self._attend(q, k, v, (height, width))
        out = out.transpose(1, 2).reshape(batch, height, width, dim)
        return self.proj(out)

    def in_windows(self, x: torch.Tensor, window_size: int) -> torch.Tensor:
        """Attention within window_size x window_size windows: x B x H x W x C -> B x H x W x C.

        The same as SAM's window attention: the grid zero-padded to a multiple of the window,
        `forward` on each window (padded tokens take part as keys), the windows put back and
        the padding cropped. Here q, k and v are projected on the H x W tokens alone, a zero
        token's projection (the bias) is written into the padding, and each goes to its
        windows and heads in one copy; the output projection runs on the H x W tokens left
        after the crop.
        """
        weights = self.qkv.weight.chunk(3)  # rows [q | k | v], each heads x head_dim
        biases = self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None,) * 3
        q, k, v = (
            grid_to_windows(pad_grid(F.linear(x, w, b), window_size, b), window_size, self.num_heads)
            for w, b in zip(weights, biases)
        )  # each windows x heads x N x head_dim
        out = self._attend(q, k, v, (window_size, window_size))
        return self.proj(windows_to_grid(out, (x.shape[1], x.shape[2]), window_size))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """q, k, v: B x heads x (h * w) x head_dim on an h x w grid -> the same shape."""
        if self.use_rel_pos:
            rel_h, rel_w = relative_position_terms(q, self.rel_pos_h, self.rel_pos_w, size, size)
            return attention_with_decomposed_bias(q, k, v, rel_h, rel_w, self.scale)
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)


def relative_positions(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Embeddings of every query-key offset along one axis: q_size x k_size x head_dim.

    `rel_pos` holds one embedding per offset (2 * size - 1 of them); it is
    linearly resized when the axis has another length than it was trained for.
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.t()[None], size=max_rel_dist, mode="linear")
        rel_pos = resized[0].t()
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    offsets = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[offsets.long()]


def relative_position_terms(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: Tuple[int, int],
    k_size: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two factors of the decomposed relative position bias.

    q: B x heads x (qh * qw) x d (unscaled queries).
    Returns rel_h: B x heads x (qh * qw) x kh and rel_w: B x heads x (qh * qw) x kw;
    the bias between query i and key (y, x) is rel_h[i, y] + rel_w[i, x].
    """
    qh, qw = q_size
    kh, kw = k_size
    table_h = relative_positions(qh, kh, rel_pos_h).to(q.dtype)
    table_w = relative_positions(qw, kw, rel_pos_w).to(q.dtype)
    grid_q = q.reshape(*q.shape[:2], qh, qw, q.shape[-1])
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, table_h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, table_w)
    return rel_h.flatten(2, 3), rel_w.flatten(2, 3)


def attention_with_decomposed_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """softmax(scale * q k^T + bias) v with bias[i, (y, x)] = rel_h[i, y] + rel_w[i, x].

    The bias is built from its two factors and given to the fused attention
    kernel as an additive mask (flash attention on CPU, memory-efficient
    attention on GPU), so the scores and probabilities are never
    materialised. The bias itself is built in blocks of windows, heads and
    queries of at most `max_bias_elements(q.device)` elements, small enough
    on CPU for the allocator to reuse memory instead of mapping (and
    page-faulting) fresh pages on every call.
    q, k, v: B x heads x L x d; returns B x heads x L x d.
    """
    batch, heads, length = q.shape[:3]
    per_query = rel_h.shape[-1] * rel_w.shape[-1]
    budget = max_bias_elements(q.device)
    if batch * heads * length * per_query <= budget:
        return _biased_attention(q, k, v, rel_h, rel_w, scale)
    out = q.new_empty(batch, heads, length, v.shape[-1])
    if heads * length * per_query <= budget:  # whole windows at a time
        for b in _blocks(batch, budget // (heads * length * per_query)):
            out[b] = _biased_attention(q[b], k[b], v[b], rel_h[b], rel_w[b], scale)
        return out
    head_step = budget // (length * per_query)  # else some heads of one window, or some queries of one head
    query_step = length if head_step else budget // per_query
    for b in range(batch):
        for h in _blocks(heads, head_step or 1):
            keys, values = k[b:b + 1, h], v[b:b + 1, h]
            for i in _blocks(length, query_step):
                out[b:b + 1, h, i] = _biased_attention(
                    q[b:b + 1, h, i], keys, values, rel_h[b:b + 1, h, i], rel_w[b:b + 1, h, i], scale
                )
    return out


def max_bias_elements(device: torch.device) -> int:
    """Most elements of the additive bias built at once by attention_with_decomposed_bias.

    On CPU 4 Mi (16 MB in fp32): glibc serves blocks up to 32 MB from its heap and
    maps larger ones afresh on every allocation, so building a global-attention bias
    of ViT-B (12 x 4096 x 4096) in one piece spends most of its time in page faults,
    which blocks reused from the heap do not. On GPU the caching allocator has no
    such cost: 256 Mi.
    """
    return 1 << 22 if device.type == "cpu" else 1 << 28


def _blocks(total: int, step: int):
    """Slices covering range(total) in near-equal blocks of at most `step` (>= 1)."""
    count = -(-total // max(1, step))
    size = -(-total // count)
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def _biased_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float
) -> torch.Tensor:
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
