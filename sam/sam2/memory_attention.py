"""SAM 2.1's memory attention: the current frame's features attend to the memory bank.

Each of its layers runs self-attention over the frame's own tokens, then cross-attention from those
tokens to the memory (the memory encoder's features of earlier frames, 64 channels, followed by the
object-pointer tokens), then an MLP, each with a pre-norm and a residual. Both attentions rotate their
queries and keys with a 2D rotary position encoding (RoPE) over the 64 x 64 token grid; the memory's
frames each get the same rotation as the current frame's grid, and the object-pointer tokens at the end
of the memory are left unrotated. Module and parameter names are those of Meta's checkpoints
(``memory_attention.layers.N.self_attn.q_proj.weight`` ...), so their state dicts load as they are.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MemoryAttention", "MemoryAttentionLayer", "RotaryAttention", "attend_then_project_values",
           "axial_rotary_angles"]


def axial_rotary_angles(head_dim: int, side: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles of a side x side token grid (row-major): (side * side, head_dim // 2) float32.

    Each token's channels are rotated in pairs; the first half of the pairs turn with the token's column,
    the second half with its row, at frequencies theta ** (-4k / head_dim), k = 0 .. head_dim // 4 - 1.
    """
    if head_dim % 4:
        raise ValueError(f"2D rotary encoding needs a head size divisible by 4, got {head_dim}")
    frequencies = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    token = torch.arange(side * side, dtype=torch.float32)
    column = token % side
    row = torch.div(token, side, rounding_mode="floor")
    return torch.cat([torch.outer(column, frequencies), torch.outer(row, frequencies)], dim=-1)


def _rotate_pairs(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (..., N, D) by unit complex numbers rotation (N, D // 2).

    Each pair (even, odd) is read as the complex number even + i odd and multiplied, as Meta's code does it.
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def attend_then_project_values(queries: torch.Tensor, keys: torch.Tensor, raw_values: torch.Tensor,
                               value_proj: nn.Linear, rows_per_chunk: int = 128) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) @ value_proj(raw_values), computed as value_proj(softmax(q k^T / sqrt(D)) @ raw_values).

    queries (B, H, N, D), keys (B, H, M, D), raw_values (B, M, Cv) -> (B, H, N, D). Equal in exact arithmetic,
    since each row of attention weights sums to one (the projection's bias passes through) and the projection is
    linear; cheaper where the values are narrower than a head (SAM 2.1's memory: 64 channels against 256), as
    the weighted sum then runs over Cv channels instead of D. Rows of queries go a chunk at a time, with their
    scores exponentiated in place, so the (chunk, M) score block is the only large buffer.
    """
    batch, heads, num_queries, head_dim = queries.shape
    scale = head_dim ** -0.5
    value_dim = raw_values.shape[-1]
    mixed = queries.new_empty(batch, heads, num_queries, value_dim)
    scores = queries.new_empty(min(rows_per_chunk, num_queries), keys.shape[-2])
    for b in range(batch):
        for h in range(heads):
            keys_t = keys[b, h].t().contiguous()
            for start in range(0, num_queries, rows_per_chunk):
                stop = min(start + rows_per_chunk, num_queries)
                block = torch.mm(queries[b, h, start:stop] * scale, keys_t, out=scores[: stop - start])
                block.sub_(block.amax(dim=-1, keepdim=True)).exp_()
                total = block.sum(dim=-1, keepdim=True)
                torch.mm(block, raw_values[b], out=mixed[b, h, start:stop]).div_(total)
    weight = value_proj.weight.reshape(heads, head_dim, value_dim)  # each head's rows of the projection
    bias = value_proj.bias.reshape(1, heads, 1, head_dim)
    return torch.einsum("bhnc,hdc->bhnd", mixed, weight) + bias


class RotaryAttention(nn.Module):
    """Multi-head attention with 2D rotary position encoding of queries and keys.

    Queries (B, N, embedding_dim) lie on a square grid of N tokens. Keys / values (B, M, kv_dim): with
    ``repeat_keys`` the first M - num_unrotated_keys keys are whole copies of that grid (one per memory
    frame) and rotate like it; without it they are the grid itself (self-attention).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int = 1,
        kv_in_dim: int | None = None,
        rope_theta: float = 10000.0,
        repeat_keys: bool = False,
    ) -> None:
        super().__init__()
        kv_dim = embedding_dim if kv_in_dim is None else kv_in_dim
        if embedding_dim % num_heads:
            raise ValueError(f"RotaryAttention: {num_heads} heads do not divide {embedding_dim} channels")
        self.num_heads = num_heads
        self.head_dim = embedding_dim // num_heads
        self.rope_theta = rope_theta
        self.repeat_keys = repeat_keys
        self.q_proj = nn.Linear(embedding_dim, embedding_dim)
        self.k_proj = nn.Linear(kv_dim, embedding_dim)
        self.v_proj = nn.Linear(kv_dim, embedding_dim)
        self.out_proj = nn.Linear(embedding_dim, embedding_dim)
        self._rotation_cache: Dict[Tuple[int, torch.device], torch.Tensor] = {}

    def _rotation(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Unit complex numbers (num_tokens, head_dim // 2) that rotate a square grid's channel pairs."""
        key = (num_tokens, device)
        if key not in self._rotation_cache:
            side = math.isqrt(num_tokens)
            if side * side != num_tokens:
                raise ValueError(f"RotaryAttention: {num_tokens} query tokens are not a square grid")
            angles = axial_rotary_angles(self.head_dim, side, self.rope_theta).to(device)
            self._rotation_cache[key] = torch.polar(torch.ones_like(angles), angles)
        return self._rotation_cache[key]

    def _values_before_projection(self, raw_values: torch.Tensor) -> bool:
        """Whether to weight the raw values and project after (attend_then_project_values).

        Where it pays, as measured on CPUs: values narrower than a head, in float32. Under bf16 autocast the fused
        attention kernel of the projected values runs on the CPU's bf16 units and beats the two matrix products;
        other devices keep the fused kernel too, where the rewrite has not been measured.
        """
        return (raw_values.shape[-1] < self.head_dim and raw_values.device.type == "cpu"
                and raw_values.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        return x.reshape(batch, tokens, self.num_heads, channels // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_unrotated_keys: int = 0) -> torch.Tensor:
        """q (B, N, C), k / v (B, M, kv_dim) -> (B, N, C)."""
        queries = self._split_heads(self.q_proj(q))
        keys = self._split_heads(self.k_proj(k))
        num_queries = queries.shape[-2]
        num_rotated = keys.shape[-2] - num_unrotated_keys
        if num_rotated != num_queries and not self.repeat_keys:
            raise ValueError("RotaryAttention: keys differ from the query grid but repeat_keys is off")
        if num_rotated % num_queries:
            raise ValueError(f"RotaryAttention: {num_rotated} rotated keys are not whole copies of {num_queries} queries")
        rotation = self._rotation(num_queries, queries.device)
        queries = _rotate_pairs(queries, rotation)
        if num_rotated > 0:
            frames = keys[:, :, :num_rotated].unflatten(2, (num_rotated // num_queries, num_queries))
            keys = torch.cat([_rotate_pairs(frames, rotation).flatten(2, 3), keys[:, :, num_rotated:]], dim=2)
        if self._values_before_projection(v):
            attended = attend_then_project_values(queries, keys, v, self.v_proj)
        else:
            attended = F.scaled_dot_product_attention(queries, keys, self._split_heads(self.v_proj(v)))
        batch, heads, tokens, head_dim = attended.shape
        return self.out_proj(attended.transpose(1, 2).reshape(batch, tokens, heads * head_dim))


class MemoryAttentionLayer(nn.Module):
    """Self-attention, cross-attention to the memory, MLP; each pre-normed with a residual.

    As SAM 2.1 is configured: no position encoding added for self-attention or at the cross-attention's
    queries, the memory's position encoding added to its keys, ReLU MLP.
    """

    def __init__(self, d_model: int = 256, memory_dim: int = 64, dim_feedforward: int = 2048,
                 num_heads: int = 1, rope_theta: float = 10000.0) -> None:
        super().__init__()
        self.self_attn = RotaryAttention(d_model, num_heads, rope_theta=rope_theta)
        self.cross_attn_image = RotaryAttention(d_model, num_heads, kv_in_dim=memory_dim,
                                                rope_theta=rope_theta, repeat_keys=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor,
                num_object_pointer_tokens: int = 0) -> torch.Tensor:
        """tokens (B, N, C), memory / memory_pos (B, M, memory_dim) -> (B, N, C)."""
        normed = self.norm1(tokens)
        tokens = tokens + self.self_attn(normed, normed, normed)
        normed = self.norm2(tokens)
        tokens = tokens + self.cross_attn_image(normed, memory + memory_pos, memory,
                                                num_unrotated_keys=num_object_pointer_tokens)
        normed = self.norm3(tokens)
        return tokens + self.linear2(F.relu(self.linear1(normed)))


class MemoryAttention(nn.Module):
    """A stack of memory attention layers and a final norm (SAM 2.1: 4 layers, 256 channels)."""

    def __init__(self, d_model: int = 256, memory_dim: int = 64, num_layers: int = 4,
                 dim_feedforward: int = 2048, num_heads: int = 1, rope_theta: float = 10000.0) -> None:
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(
            MemoryAttentionLayer(d_model, memory_dim, dim_feedforward, num_heads, rope_theta)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, current: torch.Tensor, current_pos: torch.Tensor, memory: torch.Tensor,
                memory_pos: torch.Tensor, num_object_pointer_tokens: int = 0) -> torch.Tensor:
        """Condition the current frame's tokens on the memory (batch first).

        current / current_pos: (B, N, C), the frame's N = H * W tokens in row-major order and their sine
        position encoding. memory / memory_pos: (B, M, memory_dim), whole frames of N tokens each, then
        ``num_object_pointer_tokens`` object-pointer tokens. Returns (B, N, C).
        """
        if current.shape[0] != memory.shape[0]:
            raise ValueError("MemoryAttention: the frame and its memory have different batch sizes")
        tokens = current + 0.1 * current_pos
        for layer in self.layers:
            tokens = layer(tokens, memory, memory_pos, num_object_pointer_tokens)
        return self.norm(tokens)
