"""Window padding in the image encoders: projections on the grid's own tokens only.

SAM's ViT and TinyViT pad their token grid with zeros to a multiple of the window and attend
within windows; the padded tokens take part as keys. Our attention projects the grid's tokens
alone and writes a zero token's projection into the padding (sam.common.pad_grid). These tests
hold that to the plain order (pad, then project every token of every window) and check that
the padding is really left out of the projections.
"""

import pytest

import torch
import torch.nn.functional as F

from sam.common import pad_grid
from sam.image_encoder import Block
from sam.tiny_vit import Attention as TinyAttention


def test_pad_grid_keeps_the_grid_exactly_and_fills_the_padding():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 13, 6, generator=gen)
    value = torch.randn(6, generator=gen)
    padded = pad_grid(x, 7, value)
    assert padded.shape == (2, 14, 14, 6)
    assert torch.equal(padded[:, :10, :13], x)  # + 0 leaves every value as it was
    assert torch.equal(padded[:, 10:], value.expand(2, 4, 14, 6))
    assert torch.equal(padded[:, :, 13:], value.expand(2, 14, 1, 6))
    zeros = pad_grid(x, 7)
    assert torch.equal(zeros, F.pad(x, (0, 0, 0, 1, 0, 4)))
    whole = x[:, :7, :7]
    assert pad_grid(whole, 7, value) is whole  # nothing to pad


class _CountingLinear:
    """F.linear that records the shape of every input (q, k, v and output projections)."""

    def __init__(self, monkeypatch):
        self.shapes = []
        original = F.linear

        def counting(inp, weight, bias=None):
            self.shapes.append(tuple(inp.shape))
            return original(inp, weight, bias)

        monkeypatch.setattr(F, "linear", counting)


def _plain_vit_block(block: Block, x: torch.Tensor) -> torch.Tensor:
    """SAM's order: norm, pad the normed grid with zeros, windows, the attention module on each, crop."""
    ws = block.window_size
    B, H, W, C = x.shape
    y = F.pad(block.norm1(x), (0, 0, 0, -W % ws, 0, -H % ws))
    Hp, Wp = y.shape[1], y.shape[2]
    windows = y.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, C)
    out = block.attn(windows)  # qkv, attention, proj on every window, padding included
    out = out.view(B, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    x = x + out[:, :H, :W]
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (10, 23)])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_vit_windowed_block_equals_padding_then_projecting(grid, qkv_bias, monkeypatch):
    torch.manual_seed(1)
    block = Block(64, num_heads=4, qkv_bias=qkv_bias, window_size=14).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.2 * torch.randn_like(p))  # non-zero biases and relative-position tables
    x = torch.randn(2, *grid, 64)
    with torch.no_grad():
        want = _plain_vit_block(block, x)
        counting = _CountingLinear(monkeypatch)
        got = block(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # q, k, v and the output projection on the 2 x H x W grid tokens; then the MLP's two layers
    assert counting.shapes[:4] == [(2, *grid, 64)] * 3 + [(2, *grid, 64)]
    assert all(shape[:3] == (2, *grid) for shape in counting.shapes)


def test_tiny_vit_attention_projects_the_grid_tokens_only():
    torch.manual_seed(2)
    attn = TinyAttention(dim=40, num_heads=2, window_size=7).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(1, 10 * 12, 40)
    calls = []
    original = F.linear

    def counting_linear(inp, weight, bias=None):
        calls.append(tuple(inp.shape))
        return original(inp, weight, bias)

    with torch.no_grad():
        F.linear = counting_linear
        try:
            got = attn(x, (10, 12))
        finally:
            F.linear = original
        # the plain order: pad the raw tokens with zeros, then norm and project all 14 x 14
        padded = F.pad(x.view(1, 10, 12, 40), (0, 0, 0, 2, 0, 4))
        windows = padded.view(1, 2, 7, 2, 7, 40).permute(0, 1, 3, 2, 4, 5).reshape(4, 49, 40)
        qkv = attn.qkv(attn.norm(windows)).view(4, 49, 2, 60).permute(0, 2, 1, 3)
        q, k, v = qkv.split(20, dim=3)
        scores = q @ k.transpose(-2, -1) * attn.scale + attn.attention_bias()
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(4, 49, 40)
        out = out.view(1, 2, 2, 7, 7, 40).permute(0, 1, 3, 2, 4, 5).reshape(1, 14, 14, 40)
        want = attn.proj(out[:, :10, :12].reshape(1, 120, 40))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    token_projections = [shape for shape in calls if shape[:-1] == (1, 120)]
    assert len(token_projections) == 4  # q, k, v and the output projection, each on the 120 grid tokens
    assert not any(shape[:-1] == (1, 196) or shape[:-1] == (4, 49) for shape in calls)
