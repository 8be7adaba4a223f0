"""SAM 2.1's memory attention and memory encoder against Meta's modules (the `sam2` package), same
seeded random weights, and the hole filling post-processor."""

import numpy as np
import pytest
import torch

from sam.sam2.holes import fill_small_holes
from sam.sam2.memory_attention import MemoryAttention, attend_then_project_values, axial_rotary_angles
from sam.sam2.memory_encoder import MemoryEncoder
from sam.sam2.tracker import MemoryBank, MemoryEntry, TrackerSettings, select_conditioning_frames
from sam_testing import random_state_dict


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (conftest.one_torch_thread)."""


def _official_memory_attention():
    memory_attention = pytest.importorskip("sam2.modeling.memory_attention", reason="Meta's sam2 package is not installed")
    from sam2.modeling.sam.transformer import RoPEAttention

    def attention(**extra):
        return RoPEAttention(rope_theta=10000.0, feat_sizes=[64, 64], embedding_dim=256, num_heads=1,
                             downsample_rate=1, dropout=0.1, **extra)

    layer = memory_attention.MemoryAttentionLayer(
        activation="relu", cross_attention=attention(rope_k_repeat=True, kv_in_dim=64), d_model=256,
        dim_feedforward=2048, dropout=0.1, pos_enc_at_attn=False, pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False, self_attention=attention())
    return memory_attention.MemoryAttention(d_model=256, pos_enc_at_input=True, layer=layer, num_layers=4)


def _official_memory_encoder():
    memory_encoder = pytest.importorskip("sam2.modeling.memory_encoder", reason="Meta's sam2 package is not installed")
    from sam2.modeling.position_encoding import PositionEmbeddingSine

    return memory_encoder.MemoryEncoder(
        out_dim=64,
        mask_downsampler=memory_encoder.MaskDownSampler(kernel_size=3, stride=2, padding=1),
        fuser=memory_encoder.Fuser(memory_encoder.CXBlock(dim=256, kernel_size=7, padding=3,
                                                          layer_scale_init_value=1e-6, use_dwconv=True), num_layers=2),
        position_encoding=PositionEmbeddingSine(num_pos_feats=64, normalize=True, scale=None, temperature=10000),
    )


def test_rotary_angles_follow_columns_then_rows():
    angles = axial_rotary_angles(head_dim=8, side=3)
    assert angles.shape == (9, 4)
    # token 5 is row 1, column 2: the first two angles turn with the column, the last two with the row
    assert torch.allclose(angles[5], torch.tensor([2.0, 2.0 / 100, 1.0, 1.0 / 100]))


@pytest.mark.parametrize("side, memory_frames, pointer_tokens", [(16, 2, 8), (8, 1, 0)])
def test_memory_attention_matches_meta(side, memory_frames, pointer_tokens):
    official = _official_memory_attention().eval()
    ours = MemoryAttention().eval()
    state = random_state_dict(ours, seed=3)
    assert set(state) == set(official.state_dict())
    ours.load_state_dict(state)
    official.load_state_dict(state)
    generator = torch.Generator().manual_seed(0)
    tokens = side * side
    current = torch.randn(1, tokens, 256, generator=generator)
    current_pos = torch.randn(1, tokens, 256, generator=generator)
    memory = torch.randn(1, memory_frames * tokens + pointer_tokens, 64, generator=generator)
    memory_pos = torch.randn(1, memory_frames * tokens + pointer_tokens, 64, generator=generator)
    with torch.no_grad():
        expected = official(curr=current.transpose(0, 1), memory=memory.transpose(0, 1), curr_pos=current_pos.transpose(0, 1),
                            memory_pos=memory_pos.transpose(0, 1), num_obj_ptr_tokens=pointer_tokens).transpose(0, 1)
        got = ours(current, current_pos, memory, memory_pos, num_object_pointer_tokens=pointer_tokens)
    assert (got - expected).abs().max().item() < 1e-4
    # the object pointers are real keys: dropping them changes the output
    if pointer_tokens:
        with torch.no_grad():
            without = ours(current, current_pos, memory[:, :-pointer_tokens], memory_pos[:, :-pointer_tokens])
        assert (without - got).abs().max().item() > 1e-3


def test_memory_attention_refuses_keys_that_are_not_whole_frames():
    ours = MemoryAttention(num_layers=1).eval()
    with pytest.raises(ValueError, match="whole copies"):
        ours(torch.zeros(1, 16, 256), torch.zeros(1, 16, 256), torch.zeros(1, 20, 64), torch.zeros(1, 20, 64))


def test_memory_encoder_matches_meta():
    official = _official_memory_encoder().eval()
    ours = MemoryEncoder().eval()
    state = random_state_dict(ours, seed=5)
    assert set(state) == set(official.state_dict())
    ours.load_state_dict(state)
    official.load_state_dict(state)
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(1, 256, 16, 16, generator=generator)
    mask = torch.sigmoid(torch.randn(1, 1, 256, 256, generator=generator) * 4) * 20 - 10
    with torch.no_grad():
        expected = official(features, mask, skip_mask_sigmoid=True)
        got_features, got_pos = ours(features, mask)
    assert (got_features - expected["vision_features"]).abs().max().item() < 1e-4
    assert (got_pos - expected["vision_pos_enc"][0]).abs().max().item() < 1e-5
    assert got_features.shape == (1, 64, 16, 16)


def test_fill_small_holes_fills_only_small_background_islands():
    logits = np.full((1, 1, 20, 20), -5.0, dtype=np.float32)
    logits[0, 0, 2:12, 2:12] = 3.0
    logits[0, 0, 5:7, 5:7] = -2.0  # a 4-pixel hole inside the object
    logits[0, 0, 8:11, 8:11] = -2.0  # a 9-pixel hole
    filled = fill_small_holes(torch.from_numpy(logits), max_area=4).numpy()
    assert (filled[0, 0, 5:7, 5:7] == 0.1).all()
    assert (filled[0, 0, 8:11, 8:11] == -2.0).all()  # larger than max_area: kept
    assert (filled[0, 0, 15:, 15:] == -5.0).all()  # the background around the object is not a hole
    assert (filled[0, 0, 2:12, 2:5] == 3.0).all()
    unchanged = fill_small_holes(torch.from_numpy(logits), max_area=0)
    assert torch.equal(unchanged, torch.from_numpy(logits))


def _entry():
    return MemoryEntry(torch.zeros(1, 64, 2, 2, dtype=torch.bfloat16), torch.zeros(1, 256), torch.zeros(1, 1))


def test_memory_bank_stays_bounded_over_thousands_of_frames_with_reseeds():
    settings = TrackerSettings(max_conditioning_frames=4)
    bank = MemoryBank()
    sizes = []
    for position in range(3000):
        bank.add(position, _entry(), conditioning=position % 100 == 0)  # re-seeded every 100 frames
        bank.forget_before(position + 1, num_maskmem=7, settings=settings)
        sizes.append(len(bank.tensors()))
    assert sorted(bank.conditioning) == [2600, 2700, 2800, 2900]
    assert sorted(bank.recent) == list(range(2985, 3000))  # the object-pointer window
    with_memory = [p for p, e in bank.recent.items() if e.features is not None]
    assert sorted(with_memory) == list(range(2994, 3000))  # the last num_maskmem - 1 frames
    assert max(sizes[500:]) <= max(sizes[:500])


def test_conditioning_frame_choice_matches_meta():
    pytest.importorskip("sam2.modeling.sam2_utils", reason="Meta's sam2 package is not installed")
    from sam2.modeling.sam2_utils import select_closest_cond_frames

    generator = np.random.default_rng(0)
    for _ in range(50):
        frames = {int(t): object() for t in generator.choice(100, size=int(generator.integers(1, 9)), replace=False)}
        position, limit = int(generator.integers(0, 100)), int(generator.integers(2, 6))
        ours = select_conditioning_frames(position, frames, limit)
        theirs = select_closest_cond_frames(position, frames, limit)
        assert list(ours[0]) == list(theirs[0]) and set(ours[1]) == set(theirs[1])


@pytest.mark.parametrize("heads, rows_per_chunk", [(1, 128), (2, 5)])
def test_weighting_raw_values_then_projecting_equals_attention_over_projected_values(heads, rows_per_chunk):
    # The memory's values are 64 channels against 256 per head: weighting them first and projecting after
    # is the same attention with a quarter of the weighted-sum work (each row of weights sums to one).
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(2, heads, 37, 32, generator=generator)  # 37 rows: chunks with a remainder
    keys = torch.randn(2, heads, 53, 32, generator=generator) * 2
    raw_values = torch.randn(2, 53, 12, generator=generator)
    value_proj = torch.nn.Linear(12, heads * 32)
    with torch.no_grad():
        value_proj.bias.normal_(generator=generator)
        projected = value_proj(raw_values).reshape(2, 53, heads, 32).transpose(1, 2)
        expected = torch.nn.functional.scaled_dot_product_attention(queries, keys, projected)
        got = attend_then_project_values(queries, keys, raw_values, value_proj, rows_per_chunk=rows_per_chunk)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5


def test_cross_attention_takes_the_narrow_value_route_only_in_float32_on_a_cpu(monkeypatch):
    layer = MemoryAttention(num_layers=1).eval()
    calls = []
    import sam.sam2.memory_attention as module

    real = module.attend_then_project_values
    monkeypatch.setattr(module, "attend_then_project_values", lambda *a, **k: calls.append(1) or real(*a, **k))
    current, memory = torch.randn(1, 64, 256), torch.randn(1, 2 * 64 + 4, 64)
    with torch.no_grad():
        plain = layer(current, torch.randn_like(current), memory, torch.randn_like(memory), num_object_pointer_tokens=4)
        assert calls == [1]  # the cross-attention, not the self-attention (values as wide as a head)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(current, torch.randn_like(current), memory, torch.randn_like(memory), num_object_pointer_tokens=4)
    assert calls == [1] and torch.isfinite(plain).all()
