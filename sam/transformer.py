"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Two PerSAM hooks, both off by default (then this is exactly SAM):

- ``attention_similarity`` (B x L_image, or L_image): in the token-to-image
  cross-attention of every two-way block the attention becomes
  softmax(softmax(q k^T / sqrt(d)) + a), a broadcast over heads and tokens
  (target-guided attention, PERSAM_METHOD.md step 3).
- ``target_embedding`` (B x C, or 1 x C): target-semantic prompting. With P
  the input tokens and E the target embedding, the reference implementation
  adds E in place, which also shifts the tokens' positional term. Its
  semantics, written out explicitly here:

      query_pe   = P + E                      (positional term of every block)
      queries_0  = P + E                      (input of the first block)
      queries_i  = block_i output + E         (input of each later block)
      final q    = queries + query_pe + E     (final token-to-image attention)
"""

import math
from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock


class TwoWayTransformer(nn.Module):
    """Image B x C x h x w and tokens B x N x C -> (tokens B x N x C, image tokens B x hw x C)."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        attention_similarity: Optional[torch.Tensor] = None,
        target_embedding: Optional[torch.Tensor] = None,
        image_pe_tokens: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """image_embedding, image_pe: B x C x h x w; point_embedding: B x N x C.

        image_pe_tokens: image_pe as contiguous 1 x hw x C tokens when the caller has it
        (PromptEncoder.get_dense_pe_tokens caches it); computed here otherwise.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        # The positional term in both layouts: the transposed view matches the keys of the first
        # block (a view of the B x C x h x w input), the contiguous copy the keys after each block's
        # norm. Adding tensors of one layout is a plain pass; mixing them was a strided one, ten
        # times slower. The sums are the same numbers either way.
        key_pe_view = image_pe.flatten(2).transpose(1, 2)
        key_pe_tokens = image_pe_tokens if image_pe_tokens is not None else key_pe_view.contiguous()
        key_pe_tokens = key_pe_tokens.expand(key_pe_view.shape)

        def key_pe_like(keys: torch.Tensor) -> torch.Tensor:
            return key_pe_tokens if keys.is_contiguous() else key_pe_view

        attention_bias = None
        if attention_similarity is not None:
            attention_bias = attention_similarity.reshape(-1, 1, 1, keys.shape[1]).to(keys.dtype)

        query_pe = point_embedding
        if target_embedding is not None:
            target = target_embedding.reshape(-1, 1, point_embedding.shape[-1]).to(point_embedding.dtype)
            query_pe = point_embedding + target
        queries = query_pe
        for index, layer in enumerate(self.layers):
            if target_embedding is not None and index > 0:
                queries = queries + target
            queries, keys = layer(queries, keys, query_pe, key_pe_like(keys), attention_bias)

        q = queries + query_pe
        if target_embedding is not None:
            q = q + target
        attn_out = self.final_attn_token_to_image(q=q, k=keys + key_pe_like(keys), v=keys)
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token-to-image attention, token MLP, image-to-token attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        attention_bias: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """queries: B x N x C, keys: B x L x C; attention_bias: B x 1 x 1 x L or None."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe  # keys change only at the end of the block: one sum serves both attentions
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys, attention_bias=attention_bias))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys


class Attention(nn.Module):
    """Multi-head attention whose projections may shrink the width by `downsample_rate`."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide the internal width ({self.internal_dim})")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """B x N x C -> B x heads x N x C/heads."""
        batch, tokens, channels = x.shape
        return x.reshape(batch, tokens, self.num_heads, channels // self.num_heads).transpose(1, 2)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """q: B x Nq x C, k and v: B x Nk x C -> B x Nq x C.

        attention_bias (B x 1 x 1 x Nk) is added to the softmax-normalised
        attention, which is then normalised again (PerSAM's target guidance).
        """
        q = self._split_heads(self.q_proj(q))
        k = self._split_heads(self.k_proj(k))
        v = self._split_heads(self.v_proj(v))
        if attention_bias is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
            attn = torch.softmax(attn + attention_bias, dim=-1)
            out = attn @ v
        batch, _, tokens, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, self.internal_dim))
