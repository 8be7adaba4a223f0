"""Our DINOv2 (sam/dinov2.py) against Meta's `dinov2` package and HuggingFace's Dinov2Model.

Meta's code is taken from the official source snapshots (/work/.mirror: GF-SAM's copy of the
`dinov2` package, which GF-SAM runs, and Meta's own repository), extracted to a temporary folder
at test time; without them those tests skip.  xFormers is absent, so Meta's code takes its plain
torch path, as on any CPU.
"""

from __future__ import annotations

import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from sam.checkpoint import CheckpointError
from sam.dinov2 import DINOV2_VARIANTS, SPECS, DINOv2, build_dinov2, dinov2_variant_of, load_dinov2

MIRRORS = Path("/work/.mirror")
REFERENCES = {"gfsam": MIRRORS / "ANDYZAQ+GF-SAM" / "repo", "meta": MIRRORS / "facebookresearch+dinov2" / "repo"}
META_ARCH = {"vits14": "vit_small", "vitb14": "vit_base", "vitl14": "vit_large", "vitg14": "vit_giant2"}


def _extract_dinov2(git_dir: Path, dest: Path) -> None:
    """`git archive` of the repository's dinov2/ folder into dest (the snapshot may lack other blobs)."""
    archive = subprocess.run(
        ["git", "-C", str(git_dir), "archive", "HEAD", "dinov2"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def meta_vits(request, tmp_path_factory):
    """Meta's `dinov2.models.vision_transformer` module, from one of the source snapshots."""
    git_dir = REFERENCES[request.param]
    if not git_dir.exists():
        pytest.skip(f"reference source {git_dir} is not available")
    dest = tmp_path_factory.mktemp(f"dinov2_{request.param}")
    try:
        _extract_dinov2(git_dir, dest)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"could not extract dinov2/ from {git_dir}: {exc}")
    saved = {k: v for k, v in sys.modules.items() if k == "dinov2" or k.startswith("dinov2.")}
    for key in saved:
        del sys.modules[key]
    sys.path.insert(0, str(dest))
    try:
        from dinov2.models import vision_transformer

        yield vision_transformer
    finally:
        sys.path.remove(str(dest))
        for key in [k for k in sys.modules if k == "dinov2" or k.startswith("dinov2.")]:
            del sys.modules[key]
        sys.modules.update(saved)


def meta_model(vits, variant: str, **overrides):
    """Meta's model for `variant`, built as its torch hub entry builds it."""
    kwargs = dict(img_size=518, patch_size=14, init_values=1.0, block_chunks=0,
                  ffn_layer="swiglufused" if variant == "vitg14" else "mlp")
    kwargs.update(overrides)
    return getattr(vits, META_ARCH[variant])(**kwargs)


def meta_model_holding(vits, variant: str, state: dict):
    """Meta's `variant` (as `meta_model` builds it, with as many blocks as `state` has) holding
    `state`, in eval mode; built on the meta device, which skips Meta's slow initialisation."""
    spec = SPECS[variant]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    with torch.device("meta"):
        model = vits.DinoVisionTransformer(
            img_size=518, patch_size=14, embed_dim=spec.embed_dim, depth=depth, num_heads=spec.num_heads,
            mlp_ratio=4, block_fn=partial(vits.Block, attn_class=vits.MemEffAttention), init_values=1.0,
            block_chunks=0, ffn_layer="swiglufused" if spec.ffn == "swiglu" else "mlp", drop_path_uniform=True,
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def random_dinov2(variant: str, seed: int, depth: int = 0) -> DINOv2:
    """`variant`'s widths and heads with `depth` blocks (0: the variant's own), random weights;
    built on the meta device and filled once (the default init of 22 M+ weights is slow on CPU)."""
    spec = SPECS[variant]
    with torch.device("meta"):
        model = DINOv2(spec.embed_dim, depth or spec.depth, spec.num_heads, spec.ffn)
    return randomized(model.to_empty(device="cpu"), seed)


def randomized(model: DINOv2, seed: int) -> DINOv2:
    """Random weights of a sensible scale in every tensor, so that each part of the model matters:
    norms around 1, layer scales between 0.2 and 1, a position embedding as large as the patches'."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("gamma"):
                tensor.copy_(0.2 + 0.8 * torch.rand(tensor.shape, generator=generator))
            elif "norm" in name and name.endswith("weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            elif name in ("pos_embed", "cls_token"):
                tensor.copy_(0.5 * noise)
            elif name.endswith("weight") and tensor.dim() > 1:
                tensor.copy_(noise / tensor[0].numel() ** 0.5)
            else:
                tensor.copy_(0.05 * noise)
    return model.eval()


# --------------------------------------------------------------------------------------------
# (a) the state dict is Meta's


@pytest.mark.parametrize("variant", DINOV2_VARIANTS)
def test_state_dict_keys_and_shapes_equal_metas(meta_vits, variant):
    with torch.device("meta"):
        official = meta_model(meta_vits, variant, drop_path_uniform=True)  # no .item() on meta tensors
        ours = DINOv2(SPECS[variant].embed_dim, SPECS[variant].depth, SPECS[variant].num_heads, SPECS[variant].ffn)
    theirs = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs
    assert dinov2_variant_of(ours.state_dict()) == variant


# --------------------------------------------------------------------------------------------
# (b) features equal Meta's


def _compare_with_meta(meta_vits, variant: str, sizes, seed: int, depth: int = 0) -> None:
    """Features of ours and Meta's on the same random weights, for each of `sizes`."""
    ours = random_dinov2(variant, seed, depth)
    official = meta_model_holding(meta_vits, variant, ours.state_dict())
    for height, width in sizes:
        batch = 1 if height * width > 100_000 else 2
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed + height))
        with torch.no_grad():
            expected = official.forward_features(x)
            got = ours.forward_features(x)
            features = ours.patch_features(x)
            (meta_map,) = official.get_intermediate_layers(x, n=1, reshape=True, norm=False)
        for key in ("x_prenorm", "x_norm_clstoken", "x_norm_patchtokens"):
            error = (got[key] - expected[key]).abs().max().item()
            assert error <= 1e-4, f"{variant} {height}x{width} {key}: max error {error}"
        assert features.shape == (batch, SPECS[variant].embed_dim, height // 14, width // 14)
        assert (features - meta_map).abs().max().item() <= 1e-4
        # the layout: feature map [b, :, i, j] is token 1 + i * cols + j of x_prenorm
        cols = width // 14
        assert torch.equal(features[-1, :, 2, 3], got["x_prenorm"][-1, 1 + 2 * cols + 3])


def test_vits14_features_equal_metas_on_square_and_non_square_inputs(meta_vits):
    # 518 x 518 is the checkpoint's own 37 x 37 grid (no interpolation); 224 x 308 (16 x 22) and
    # 308 x 224 resize it with Meta's (n + 0.1) / 37 scale factor, on each axis separately.
    # Two blocks: every block is built alike, and the CPU time of the full depth buys nothing.
    _compare_with_meta(meta_vits, "vits14", [(518, 518), (224, 308), (308, 224)], seed=3, depth=2)


def test_full_depth_vits14_and_vitb14_equal_metas(meta_vits):
    # all 12 blocks on a small input (5 x 7 patches); ViT-B/14's widths and heads at 224 x 308
    _compare_with_meta(meta_vits, "vits14", [(70, 98)], seed=4)
    _compare_with_meta(meta_vits, "vitb14", [(224, 308)], seed=5, depth=2)


def test_swiglu_block_equals_metas(meta_vits):
    """ViT-g/14's feed-forward (SwiGLU) on a narrow two-block model: g/14 itself is 1.1 B weights."""
    ours = randomized(DINOv2(embed_dim=96, depth=2, num_heads=4, ffn="swiglu"), seed=6)
    official = meta_vits.DinoVisionTransformer(
        img_size=518, patch_size=14, embed_dim=96, depth=2, num_heads=4, init_values=1.0,
        ffn_layer="swiglufused", block_chunks=0,
    ).eval()
    official.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 126, 196, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        error = (ours.forward_features(x)["x_prenorm"] - official.forward_features(x)["x_prenorm"]).abs().max()
    assert ours.blocks[0].mlp.w12.weight.shape == (2 * 256, 96)  # (int(384 * 2/3) + 7) // 8 * 8
    assert error.item() <= 1e-4


def test_interpolation_kludge_changes_values():
    """The +0.1 of Meta's scale factor matters: resizing to the grid size exactly gives other values."""
    model = random_dinov2("vits14", seed=7, depth=1)
    kludge = model.pos_embed_for_grid(16, 22)
    model.pos_embed_offset = None
    exact = model.pos_embed_for_grid(16, 22)
    assert kludge.shape == exact.shape == (1, 1 + 16 * 22, 384)
    assert (kludge - exact).abs().max().item() > 1e-3
    assert torch.equal(model.pos_embed_for_grid(37, 37), model.pos_embed)


def test_build_dinov2_gives_random_weights_in_eval_mode():
    torch.manual_seed(0)
    model = build_dinov2("vits14")
    assert not model.training and model.pos_embed.shape == (1, 1 + 37 * 37, 384)
    assert 0.015 < model.pos_embed.std().item() < 0.025  # Meta's init: truncated normal, std 0.02
    assert torch.equal(model.blocks[0].ls1.gamma, torch.ones(384))


def test_bad_input_shape_is_one_clear_error():
    model = DINOv2(embed_dim=24, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"multiples of 14, got shape \(1, 3, 100, 112\)"):
        model.patch_features(torch.zeros(1, 3, 100, 112))
    with pytest.raises(ValueError, match=r"got shape \(3, 28, 28\)"):
        model.patch_features(torch.zeros(3, 28, 28))
    with pytest.raises(ValueError, match="choose one of vits14, vitb14, vitl14, vitg14"):
        build_dinov2("vit_s")


# --------------------------------------------------------------------------------------------
# (c) HuggingFace transformers' Dinov2Model (a reference that needs no source snapshot)


def _to_hf(state: dict, hf_keys) -> dict:
    """Meta's DINOv2 names -> transformers' (5.x: q_proj / k_proj / v_proj / o_proj, gate_proj /
    up_proj / down_proj; 4.x: attention.attention.query ..., weights_in / weights_out)."""
    v5 = any(".attention.q_proj." in k for k in hf_keys)
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": state["mask_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    for part in ("weight", "bias"):
        out[f"embeddings.patch_embeddings.projection.{part}"] = state[f"patch_embed.proj.{part}"]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for n in range(depth):
        meta, hf = f"blocks.{n}.", f"encoder.layer.{n}."
        out[hf + "layer_scale1.lambda1"] = state[meta + "ls1.gamma"]
        out[hf + "layer_scale2.lambda1"] = state[meta + "ls2.gamma"]
        attn_names = ("q_proj", "k_proj", "v_proj", "o_proj") if v5 else (
            "attention.query", "attention.key", "attention.value", "output.dense")
        for part in ("weight", "bias"):
            for norm in ("norm1", "norm2"):
                out[f"{hf}{norm}.{part}"] = state[f"{meta}{norm}.{part}"]
            for name, chunk in zip(attn_names[:3], state[f"{meta}attn.qkv.{part}"].chunk(3)):
                out[f"{hf}attention.{name}.{part}"] = chunk
            out[f"{hf}attention.{attn_names[3]}.{part}"] = state[f"{meta}attn.proj.{part}"]
            if f"{meta}mlp.fc1.{part}" in state:
                out[f"{hf}mlp.fc1.{part}"] = state[f"{meta}mlp.fc1.{part}"]
                out[f"{hf}mlp.fc2.{part}"] = state[f"{meta}mlp.fc2.{part}"]
            elif v5:
                gate, up = state[f"{meta}mlp.w12.{part}"].chunk(2)
                out[f"{hf}mlp.gate_proj.{part}"], out[f"{hf}mlp.up_proj.{part}"] = gate, up
                out[f"{hf}mlp.down_proj.{part}"] = state[f"{meta}mlp.w3.{part}"]
            else:
                out[f"{hf}mlp.weights_in.{part}"] = state[f"{meta}mlp.w12.{part}"]
                out[f"{hf}mlp.weights_out.{part}"] = state[f"{meta}mlp.w3.{part}"]
    return out


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_features_equal_huggingface_dinov2(ffn, monkeypatch):
    # Other tests put a torchvision stub (no __spec__) in sys.modules for Meta's code; transformers asks
    # importlib whether torchvision is installed, which a stub without a spec breaks: hide the stubs here.
    for name in [n for n, m in sys.modules.items() if n.split(".")[0] == "torchvision" and m.__spec__ is None]:
        monkeypatch.delitem(sys.modules, name)
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (the `test` extra has it)")
    ours = randomized(DINOv2(embed_dim=96, depth=2, num_heads=4, ffn=ffn), seed=8)
    config = transformers.Dinov2Config(
        hidden_size=96, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, image_size=518,
        patch_size=14, layerscale_value=1.0, use_swiglu_ffn=ffn == "swiglu", layer_norm_eps=1e-6,
    )
    hf = transformers.Dinov2Model(config).eval()
    hf.load_state_dict(_to_hf(ours.state_dict(), hf.state_dict().keys()), strict=True)
    for height, width, offset in [(518, 518, 0.1), (224, 308, None)]:
        # HuggingFace resizes the position table to the grid size exactly, without Meta's +0.1;
        # off the 37 x 37 grid it matches our model with that kludge switched off
        ours.pos_embed_offset = offset
        x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(height))
        with torch.no_grad():
            out = hf(pixel_values=x, output_hidden_states=True)
            got = ours.forward_features(x)
        assert (got["x_prenorm"] - out.hidden_states[-1]).abs().max().item() <= 1e-4
        assert (got["x_norm_patchtokens"] - out.last_hidden_state[:, 1:]).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------------------------
# (d) checkpoints


def test_load_roundtrip_gives_the_same_features(tmp_path):
    model = random_dinov2("vits14", seed=9)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(model.state_dict(), path)
    loaded = load_dinov2("vits14", path)
    x = torch.randn(1, 3, 70, 98)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded.patch_features(x), model.patch_features(x))


def test_sam_checkpoint_given_as_dinov2_is_one_line(tmp_path):
    from conftest import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "mobile_sam.pt", "vit_t")
    with pytest.raises(CheckpointError) as info:
        load_dinov2("vits14", path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "SAM vit_t checkpoint, not a DINOv2 one" in message


def test_wrong_variant_names_the_variant_the_file_is(tmp_path):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(random_dinov2("vits14", seed=0).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_dinov2("vitb14", path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "does not fit DINOv2 ViT-B/14 ('vitb14')" in message
    assert "DINOv2 ViT-S/14 checkpoint (variant 'vits14')" in message


def test_truncated_checkpoint_is_one_line(tmp_path):
    full = tmp_path / "full.pth"
    torch.save(random_dinov2("vits14", seed=0, depth=1).state_dict(), full)
    cut = tmp_path / "dinov2_vits14_pretrain.pth"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        load_dinov2("vits14", cut)
    message = str(info.value)
    assert "\n" not in message and str(cut) in message
    assert "truncated or corrupt" in message and "SAM" not in message


def test_modified_checkpoint_names_the_odd_keys(tmp_path):
    state = random_dinov2("vits14", seed=0).state_dict()
    state["head.weight"] = torch.zeros(10, 384)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"its keys differ from the official layout \(head.weight"):
        load_dinov2("vits14", path)


def test_register_token_checkpoint_is_named(tmp_path):
    state = random_dinov2("vits14", seed=0, depth=1).state_dict()
    state["register_tokens"] = torch.zeros(1, 4, 384)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"with register tokens \(\*_reg4_pretrain.pth\), which is not supported"):
        load_dinov2("vits14", path)
