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
from typing import Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock, matmul


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
        output_tokens: Optional[Sequence[int]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """image_embedding, image_pe: B x C x h x w; point_embedding: B x N x C.

        image_pe_tokens: image_pe as contiguous 1 x hw x C tokens when the caller has it
        (PromptEncoder.get_dense_pe_tokens caches it); computed here otherwise.
        output_tokens: indices of the tokens whose final values are wanted: the final attention
        runs for those alone and the returned queries are B x len(output_tokens) x C, in that
        order; None: all N.

        The image tokens are kept contiguous, hw x C (a channels-last image_embedding is
        already so, anything else is copied once): sums and norms over tensors of one layout
        are plain passes, mixed layouts were strided ones, ten times slower.
        """
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        if image_pe_tokens is None:
            image_pe_tokens = image_pe.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe_tokens.expand(keys.shape)

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
            queries, keys = layer(queries, keys, query_pe, key_pe, attention_bias)

        kept = slice(None) if output_tokens is None else list(output_tokens)
        queries = queries[:, kept]
        q = queries + query_pe[:, kept]
        if target_embedding is not None:
            q = q + target
        attn_out = self.final_attn_token_to_image(q=q, k=keys + key_pe, v=keys)
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
        keys = self.norm4(self.cross_attn_image_to_token(q=k, k=q, v=queries, residual=keys))
        return queries, keys


class Attention(nn.Module):
    """Multi-head attention whose projections may shrink the width by `downsample_rate`.

    The decoder's cross-attentions are lopsided: a handful of prompt tokens against the
    h x w image tokens. There the projections of the image side (the costly part: L x C by
    C x C/r, twice) are folded into the few tokens' side, which gives the same attention
    with the products taken in another order:

      few queries (token-to-image), per head h with Q_h = q_proj(q)_h:
          scores_h = (Q_h W_k,h) k^T     (+ Q_h b_k,h: constant along the keys, the softmax drops it)
          out_h    = (softmax(scores_h) v) W_v,h^T + b_v,h     (softmax rows sum to 1)
      few keys (image-to-token), per head h with K_h, V_h the projected tokens:
          scores_h = q (W_q,h^T K_h^T) + b_q,h K_h^T
          out      = sum_h softmax(scores_h) (V_h W_o,h^T) + b_o

    Each is taken when heads x (the few tokens) < internal width, i.e. when it needs fewer
    multiply-adds than the projections it replaces (a third to a half of the decoder's work
    for SAM's prompts). The values agree with `attend_plain` to float rounding (~1e-6).
    """

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

    def _head_weights(self, linear: nn.Linear) -> Tuple[torch.Tensor, torch.Tensor]:
        """A projection to the internal width as heads x C/heads x C weights and heads x C/heads biases."""
        return (linear.weight.reshape(self.num_heads, -1, linear.weight.shape[-1]),
                linear.bias.reshape(self.num_heads, -1))

    def _folds_cheaper(self, few: int) -> bool:
        return self.num_heads * few < self.internal_dim

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_bias: Optional[torch.Tensor] = None,
        residual: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """q: B x Nq x C, k and v: B x Nk x C -> B x Nq x C.

        attention_bias (B x 1 x 1 x Nk) is added to the softmax-normalised
        attention, which is then normalised again (PerSAM's target guidance).
        residual (B x Nq x C), when given, is added to the output: residual + attention,
        inside the last product where the order of products allows (one pass fewer over
        the image tokens in the image-to-token attention).
        """
        queries, keys = q.shape[1], k.shape[1]
        if queries < keys and self._folds_cheaper(queries):
            return self.attend_few_queries(q, k, v, attention_bias, residual)
        if keys < queries and attention_bias is None and self._folds_cheaper(keys):
            return self.attend_few_keys(q, k, v, residual)
        return self.attend_plain(q, k, v, attention_bias, residual)

    def attend_plain(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_bias: Optional[torch.Tensor] = None,
        residual: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Project q, k and v, attend per head, project back (SAM's own order of products)."""
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
        out = self.out_proj(out.transpose(1, 2).reshape(batch, tokens, self.internal_dim))
        return out if residual is None else residual + out

    def attend_few_queries(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_bias: Optional[torch.Tensor] = None,
        residual: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """q: B x T x C (few), k and v: B x L x C -> B x T x C, with k and v never projected.

        The key bias adds a constant to each query's scores, which the softmax over the keys
        takes away: it is left out.
        """
        batch, tokens, _ = q.shape
        head_dim = self.internal_dim // self.num_heads
        k_weight, _ = self._head_weights(self.k_proj)
        v_weight, v_bias = self._head_weights(self.v_proj)
        queries = self._split_heads(self.q_proj(q)) / math.sqrt(head_dim)  # B x H x T x d
        folded = (queries @ k_weight).reshape(batch, -1, k.shape[-1])  # B x HT x C
        attn = torch.softmax(matmul(folded, k.transpose(1, 2)), dim=-1)  # B x HT x L
        if attention_bias is not None:
            attn = torch.softmax(attn + attention_bias.reshape(attention_bias.shape[0], 1, -1), dim=-1)
        mixed = matmul(attn, v).reshape(batch, self.num_heads, tokens, -1)  # B x H x T x C
        out = mixed @ v_weight.transpose(1, 2) + v_bias[:, None]  # B x H x T x d
        out = self.out_proj(out.transpose(1, 2).reshape(batch, tokens, self.internal_dim))
        return out if residual is None else residual + out

    def attend_few_keys(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """q: B x L x C, k and v: B x T x C (few) -> B x L x C, with q never projected.

        The softmax over the few keys runs on the scores laid out B x (heads x T) x L, along
        the long contiguous axis (over a short last axis it is many times slower). Each head's
        attention sums to 1, so the output bias rides in the product as b_o / heads per token.
        """
        batch, length, channels = q.shape
        head_dim = self.internal_dim // self.num_heads
        q_weight, q_bias = self._head_weights(self.q_proj)
        keys = self._split_heads(self.k_proj(k)) / math.sqrt(head_dim)  # B x H x T x d
        values = self._split_heads(self.v_proj(v))  # B x H x T x d
        folded = (keys @ q_weight).reshape(batch, -1, channels)  # B x HT x C
        offset = (keys @ q_bias[:, :, None]).reshape(batch, -1, 1)  # B x HT x 1, constant along L
        scores = matmul(folded, q.transpose(1, 2)) + offset  # B x HT x L
        attn = torch.softmax(scores.reshape(batch, self.num_heads, -1, length), dim=2)  # over the few keys
        out_weight = self.out_proj.weight.reshape(channels, self.num_heads, head_dim).permute(1, 2, 0)  # H x d x C
        projected = (values @ out_weight + self.out_proj.bias / self.num_heads).reshape(batch, -1, channels)
        attn = attn.reshape(batch, -1, length).transpose(1, 2)  # B x L x HT
        if residual is None:
            return attn @ projected  # B x L x C
        return torch.baddbmm(residual, attn, projected)  # residual + attn @ projected, as the product is written
