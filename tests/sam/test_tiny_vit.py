"""Tests of the TinyViT (MobileSAM "vit_t") image encoder in sam/tiny_vit.py."""

import itertools
import json
import math
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F

from sam.tiny_vit import Attention, TinyViT, TinyViTBlock

KEYS_JSON = Path("/work/shared/reference/mobile_sam_vit_t_keys.json")
PREFIX = "image_encoder."


def _encoder_shapes() -> Dict[str, List[int]]:
    if not KEYS_JSON.exists():
        pytest.skip(f"{KEYS_JSON} not available")
    keys = json.loads(KEYS_JSON.read_text())
    return {k[len(PREFIX):]: v for k, v in keys.items() if k.startswith(PREFIX)}


def _random_value(name: str, shape: List[int], gen: torch.Generator) -> torch.Tensor:
    """Seeded value of a plausible scale for each kind of tensor (keeps activations finite)."""
    if name.endswith("num_batches_tracked"):
        return torch.tensor(0, dtype=torch.long)
    if name.endswith("running_var"):
        return 0.75 + 0.5 * torch.rand(shape, generator=gen)
    if name.endswith("attention_biases"):
        return 0.5 * torch.randn(shape, generator=gen)
    if len(shape) == 1:
        if name.endswith("weight"):  # BatchNorm / LayerNorm scale
            return 1.0 + 0.1 * torch.randn(shape, generator=gen)
        return 0.1 * torch.randn(shape, generator=gen)  # biases, running means
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def _random_state_dict(shapes: Dict[str, List[int]], seed: int = 0) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: _random_value(name, shape, gen) for name, shape in sorted(shapes.items())}


@pytest.fixture(scope="module")
def loaded_encoder() -> TinyViT:
    model = TinyViT()
    model.load_state_dict(_random_state_dict(_encoder_shapes()), strict=True)
    return model.eval()


def test_state_dict_matches_mobile_sam_checkpoint_layout(loaded_encoder: TinyViT) -> None:
    shapes = _encoder_shapes()
    assert len(shapes) == 302
    own = {k: list(v.shape) for k, v in loaded_encoder.state_dict().items()}
    assert set(own) == set(shapes)
    assert own == shapes
    # The bias index table is a buffer, but not part of the checkpoint.
    buffers = dict(loaded_encoder.named_buffers())
    assert "layers.1.blocks.0.attn.attention_bias_idxs" in buffers
    assert not any(k.endswith("attention_bias_idxs") for k in own)


def test_forward_1024_gives_64x64_embedding(loaded_encoder: TinyViT) -> None:
    assert loaded_encoder.img_size == 1024
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        y = loaded_encoder(x)
    assert y.shape == (1, 256, 64, 64)
    assert torch.isfinite(y).all()
    # The neck ends in LayerNorm2d: per-pixel channel statistics are set by its affine.
    assert y.std() > 0.1


def test_smaller_input_and_batch_consistency(loaded_encoder: TinyViT) -> None:
    # Grid sizes are derived from the input, so any side that is a multiple of 16 works.
    # 128 x 192 -> grids 32x48, 16x24, 8x12, 8x12: every attention stage pads its windows.
    x = torch.randn(2, 3, 128, 192, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        y = loaded_encoder(x)
        y0 = loaded_encoder(x[:1])
    assert y.shape == (2, 256, 8, 12)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:1], y0, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------
# Independent reference of the attention block
# ---------------------------------------------------------------------------


def _reference_bias_idxs(window_size: int) -> torch.Tensor:
    """Offset table built the way TinyViT/LeViT describe it: ids in order of first appearance."""
    points = list(itertools.product(range(window_size), range(window_size)))
    offsets: Dict[tuple, int] = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            offsets.setdefault(off, len(offsets))
            idxs.append(offsets[off])
    return torch.tensor(idxs).view(len(points), len(points))


def _reference_attention(attn: Attention, x: torch.Tensor, window_size: int) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v on one window's tokens, N x C -> N x C."""
    N, C = x.shape
    h = attn.num_heads
    d = C // h
    x = F.layer_norm(x, (C,), attn.norm.weight, attn.norm.bias, attn.norm.eps)
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # N x 3C, per head [q | k | v]
    bias_table = attn.attention_biases[:, _reference_bias_idxs(window_size)]  # h x N x N
    outs = []
    for head in range(h):
        chunk = qkv[:, head * 3 * d : (head + 1) * 3 * d]
        q, k, v = chunk[:, :d], chunk[:, d : 2 * d], chunk[:, 2 * d :]
        logits = (q @ k.T) * (d**-0.5) + bias_table[head]
        outs.append(torch.softmax(logits, dim=-1) @ v)
    return torch.cat(outs, dim=1) @ attn.proj.weight.T + attn.proj.bias


def _reference_conv_bn(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    c, bn = m.c, m.bn
    y = F.conv2d(x, c.weight, None, c.stride, c.padding, c.dilation, c.groups)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (y - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]


def _reference_block(block: TinyViTBlock, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """One TinyViT block on tokens 1 x (H * W) x C, one window at a time."""
    ws = block.window_size
    C = x.shape[-1]
    img = x[0].view(H, W, C)
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    padded = torch.zeros(Hp, Wp, C)
    padded[:H, :W] = img
    out = torch.zeros_like(padded)
    for i in range(0, Hp, ws):
        for j in range(0, Wp, ws):
            win = padded[i : i + ws, j : j + ws].reshape(ws * ws, C)
            out[i : i + ws, j : j + ws] = _reference_attention(block.attn, win, ws).view(ws, ws, C)
    img = img + out[:H, :W]

    conv = _reference_conv_bn(block.local_conv, img.permute(2, 0, 1)[None])  # 1 x C x H x W
    tokens = conv[0].permute(1, 2, 0).reshape(H * W, C)

    mlp = block.mlp
    y = F.layer_norm(tokens, (C,), mlp.norm.weight, mlp.norm.bias, mlp.norm.eps)
    y = F.gelu(y @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias
    return (tokens + y)[None]


def _randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    shapes = {k: list(v.shape) for k, v in module.state_dict().items()}
    module.load_state_dict(_random_state_dict(shapes, seed=seed), strict=True)
    # A few more-than-unit-scale logits so the softmax is not near-uniform.
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, Attention):
                m.qkv.weight.mul_(2.0)
                m.attention_biases.copy_(torch.randn(m.attention_biases.shape, generator=gen))


@pytest.mark.parametrize("window_size", [7, 14])
def test_attention_bias_index_matches_first_appearance_table(window_size: int) -> None:
    attn = Attention(dim=32, num_heads=2, window_size=window_size)
    assert torch.equal(attn.attention_bias_idxs, _reference_bias_idxs(window_size))


def test_attention_sdpa_matches_explicit_softmax() -> None:
    attn = Attention(dim=160, num_heads=5, window_size=14).eval()
    _randomize(attn, seed=3)
    x = torch.randn(3, 14 * 14, 160)
    with torch.no_grad():
        got = attn(x, (14, 14))  # each of the 3 images is one window
        want = torch.stack([_reference_attention(attn, x[b], 14) for b in range(3)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", [(7, 7), (10, 12), (16, 9)])
def test_block_matches_windowwise_reference(grid) -> None:
    H, W = grid
    block = TinyViTBlock(dim=64, num_heads=2, window_size=7).eval()
    _randomize(block, seed=4)
    x = torch.randn(1, H * W, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = block(x, (H, W))
        want = _reference_block(block, x, H, W)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
