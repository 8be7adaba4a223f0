"""DINOv2 features through the compiled encoder backends (sam/dinov2_backends.py): OpenVINO and
ONNX Runtime agree with torch fp32 (<= 1e-4, on a narrow two-block DINOv2 with random weights of
sensible scale, at a non-square and a square size, batch 1 and 2), one export per input size,
cached by the weights' sha256 and size.  Tests of a runtime that is not installed skip; every
export goes to a temporary cache folder.
"""

import pytest
import torch

from sam import backends
from sam.dinov2 import DINOv2
from sam.dinov2_backends import PatchFeaturesAtSize, dinov2_kind, make_dinov2_encoder
from sam.export import cache_key

COMPILED = [b for b in ("openvino", "onnxruntime") if backends.is_installed(b)]


def tiny_dinov2(seed: int = 0) -> DINOv2:
    """48 channels, 3 heads, 2 blocks, random weights: layer scales, norms and the position table matter."""
    generator = torch.Generator().manual_seed(seed)
    model = DINOv2(embed_dim=48, depth=2, num_heads=3)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
                tensor.copy_(1.0 + 0.2 * noise)
            elif name.endswith("weight") and tensor.dim() > 1:
                tensor.copy_(noise / tensor[0].numel() ** 0.5)
            else:
                tensor.copy_(0.3 * noise)
    return model.eval()


def test_export_graph_equals_patch_features():
    model = tiny_dinov2()
    x = torch.randn(2, 3, 70, 98)
    with torch.no_grad():
        assert torch.equal(PatchFeaturesAtSize(model, 70, 98)(x), model.patch_features(x))
    assert dinov2_kind(model) == "dinov2-48x2"


def test_cache_key_of_a_non_square_size_and_sam_keys_unchanged():
    assert cache_key("dinov2_vits14", "ab" * 32, "fp32", (518, 728), "openvino").startswith(
        "dinov2_vits14-abababababababab-fp32-518x728-openvino-v")
    assert "-fp32-1024-openvino-v" in cache_key("vit_b", "ab" * 32, "fp32", 1024, "openvino")


def test_torch_backend_is_patch_features():
    model = tiny_dinov2()
    runner = make_dinov2_encoder(model, "torch")
    x = torch.randn(1, 3, 42, 56)
    with torch.no_grad():
        assert torch.equal(runner(x), model.patch_features(x))


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_compiled_backend_equals_torch(backend, tmp_path):
    if backend not in COMPILED:
        pytest.skip(f"{backend} is not installed")
    model = tiny_dinov2(seed=1)
    messages = []
    runner = make_dinov2_encoder(model, backend, "fp32", cache_dir=tmp_path, log=messages.append)
    for height, width, batch in [(70, 98, 1), (70, 98, 2), (56, 56, 1)]:
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height + batch))
        with torch.no_grad():
            expected = model.patch_features(x)
        got = runner(x)
        assert got.shape == expected.shape == (batch, 48, height // 14, width // 14)
        error = (got - expected).abs().max().item()
        assert error <= 1e-4, f"{backend} {batch}x{height}x{width}: max error {error}"
    folders = sorted(p.name for p in (tmp_path / "compiled").iterdir())
    assert len(folders) == 2  # one export per size, shared by batch sizes
    assert any("-70x98-" in name for name in folders) and any("-56x56-" in name for name in folders)
    assert runner.build_seconds > 0

    again = make_dinov2_encoder(model, backend, "fp32", cache_dir=tmp_path, log=messages.append)
    x = torch.randn(1, 3, 70, 98)
    with torch.no_grad():
        assert (again(x) - model.patch_features(x)).abs().max().item() <= 1e-4
    assert again.build_seconds == 0.0  # loaded from the cache
    assert sum("building" in m for m in messages) == 2


def test_bad_size_is_the_same_error_on_every_backend(tmp_path):
    for backend in ["torch"] + COMPILED:
        runner = make_dinov2_encoder(tiny_dinov2(), backend, cache_dir=tmp_path, log=None)
        with pytest.raises(ValueError, match="multiples of 14"):
            runner(torch.zeros(1, 3, 50, 56))
