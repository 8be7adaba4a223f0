"""PerSAM's two decoder hooks: off gives plain SAM, on follows PERSAM_METHOD.md step 3 exactly."""

import math

import torch

from sam.mask_decoder import MaskDecoder
from sam.transformer import TwoWayTransformer
from sam_testing import random_state_dict


def _decoder(seed=0):
    decoder = MaskDecoder(
        transformer_dim=256,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048),
    ).eval()
    decoder.load_state_dict(random_state_dict(decoder, seed))
    return decoder


def _inputs(batch=2, grid=16, tokens=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 256, grid, grid, generator=g)
    pe = torch.randn(1, 256, grid, grid, generator=g)
    sparse = torch.randn(batch, tokens, 256, generator=g)
    dense = torch.randn(batch, 256, grid, grid, generator=g) * 0.1
    return image, pe, sparse, dense


def _attention(layer, q, k, v, bias=None):
    """Attention written out: softmax(q k^T / sqrt(d)) (then + bias, softmax again) times v."""
    heads = layer.num_heads

    def split(x):
        b, n, c = x.shape
        return x.reshape(b, n, heads, c // heads).transpose(1, 2)

    q, k, v = split(layer.q_proj(q)), split(layer.k_proj(k)), split(layer.v_proj(v))
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    if bias is not None:
        attn = torch.softmax(attn + bias, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(q.shape[0], -1, layer.internal_dim)
    return layer.out_proj(out)


def _reference_transformer(t, image, pe, tokens, attn_sim, target):
    """The reference implementation's semantics, with its in-place `+=` aliasing reproduced on purpose."""
    keys = image.flatten(2).permute(0, 2, 1)
    key_pe = pe.flatten(2).permute(0, 2, 1)
    point_embedding = tokens.clone()
    queries = point_embedding  # alias, as in the reference
    for layer in t.layers:
        if target is not None:
            queries += target  # in place: the first time this also changes point_embedding
        query_pe = point_embedding
        if layer.skip_first_layer_pe:
            queries = _attention(layer.self_attn, queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + _attention(layer.self_attn, q, q, queries)
        queries = layer.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = layer.norm2(queries + _attention(layer.cross_attn_token_to_image, q, k, keys, attn_sim))
        queries = layer.norm3(queries + layer.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = layer.norm4(keys + _attention(layer.cross_attn_image_to_token, k, q, queries))
    q = queries + point_embedding
    if target is not None:
        q += target
    queries = t.norm_final_attn(queries + _attention(t.final_attn_token_to_image, q, keys + key_pe, keys))
    return queries, keys


def test_hooks_off_is_plain_sam_and_none_equals_omitted():
    decoder = _decoder()
    image, pe, sparse, dense = _inputs()
    with torch.no_grad():
        plain = decoder(image, pe, sparse, dense, multimask_output=True)
        explicit_none = decoder(image, pe, sparse, dense, True, attention_similarity=None, target_embedding=None)
    assert torch.equal(plain[0], explicit_none[0]) and torch.equal(plain[1], explicit_none[1])


def test_transformer_matches_step_by_step_reference_semantics():
    decoder = _decoder(seed=3)
    t = decoder.transformer
    image, pe, sparse, dense = _inputs(batch=2, seed=4)
    tokens = torch.cat([torch.randn(2, 5, 256), sparse], dim=1)
    src = image + dense
    attn_sim = torch.sigmoid(torch.randn(2, 16 * 16))
    target = torch.randn(1, 256)
    for sim, emb in [(None, None), (attn_sim, None), (None, target), (attn_sim, target)]:
        with torch.no_grad():
            ours_q, ours_k = t(src, pe.expand(2, -1, -1, -1), tokens, sim, emb)
            bias = None if sim is None else sim.reshape(2, 1, 1, -1)
            ref_q, ref_k = _reference_transformer(t, src, pe.expand(2, -1, -1, -1), tokens, bias, emb)
        assert (ours_q - ref_q).abs().max() < 1e-4
        assert (ours_k - ref_k).abs().max() < 1e-4


def test_hooks_change_the_output_and_batch_independently():
    decoder = _decoder(seed=5)
    image, pe, sparse, dense = _inputs(batch=2, seed=6)
    sim = torch.sigmoid(torch.randn(2, 256) * 3)
    emb = torch.randn(2, 256)
    with torch.no_grad():
        plain, _ = decoder(image, pe, sparse, dense, False)
        guided, _ = decoder(image, pe, sparse, dense, False, attention_similarity=sim, target_embedding=emb)
        single, _ = decoder(image, pe, sparse[1:], dense[1:], False, attention_similarity=sim[1:], target_embedding=emb[1:])
    assert (plain - guided).abs().max() > 1e-3
    assert (guided[1:] - single).abs().max() < 1e-4
