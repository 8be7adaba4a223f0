"""SAM 2.1's image step on OpenVINO and ONNX Runtime (sam.sam2.encoder_backends, `persam track --tracker sam2
--backend openvino|onnxruntime`): the same features and masks as torch (seeded random sam2.1_hiera_t at an input
side of 128), the export cached by checkpoint sha256."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cli_testing import error_line, run_cli
from conftest import DAVIS
from persam.data.io import load_mask

BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(importlib.util.find_spec(name) is None,
                                                       reason=f"{name} is not installed"))
            for name in ("openvino", "onnxruntime")]
SEQ = "car-shadow"
SIZE = 128


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (conftest.one_torch_thread)."""


@pytest.mark.parametrize("backend", BACKENDS)
def test_features_and_tracking_equal_torch(backend, tmp_path):
    from sam2_testing import random_sam2
    from sam.sam2.encoder_backends import use_backend
    from sam.sam2.video import VideoTracker

    frames = sorted((DAVIS / "JPEGImages" / "480p" / SEQ).glob("*.jpg"))[:4]
    first = DAVIS / "Annotations" / "480p" / SEQ / "00000.png"
    if not first.exists():
        pytest.skip(f"DAVIS {SEQ} is not in the shared data")
    mask = np.array(Image.open(first)) == 1
    plain, _ = random_sam2("sam2.1_hiera_t", seed=0, image_size=SIZE)
    fast, _ = random_sam2("sam2.1_hiera_t", seed=0, image_size=SIZE)
    use_backend(fast, backend, cache_dir=tmp_path, threads=1, log=None)
    assert fast.forward_image.build_seconds > 0
    image = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected, got = plain.forward_image(image), fast.forward_image(image)
    for a, b in zip(expected["backbone_fpn"] + expected["vision_pos_enc"], got["backbone_fpn"] + got["vision_pos_enc"]):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())
    trackers = [VideoTracker(plain, fill_hole_area=0), VideoTracker(fast, fill_hole_area=0)]
    for index, path in enumerate(frames):
        frame = np.array(Image.open(path).convert("RGB"))
        a, b = (t.step(index, frame, {1: mask} if index == 0 else None)[1] for t in trackers)
        assert np.abs(a.mask_logits - b.mask_logits).max() < 1e-3, index
        assert abs(a.object_score - b.object_score) < 1e-3
    again, _ = random_sam2("sam2.1_hiera_t", seed=0, image_size=SIZE)  # the same weights: the cached export
    use_backend(again, backend, cache_dir=tmp_path, threads=1, log=None)
    assert again.forward_image.build_seconds == 0.0
    assert again.forward_image.cache_path == fast.forward_image.cache_path
    other, _ = random_sam2("sam2.1_hiera_t", seed=1, image_size=SIZE)  # other weights: another export
    use_backend(other, backend, cache_dir=tmp_path, threads=1, log=None)
    assert other.forward_image.build_seconds > 0
    assert other.forward_image.cache_path != fast.forward_image.cache_path


def _track_argv(tmp_path, monkeypatch, count: int) -> list:
    """`persam track` of the first `count` car-shadow frames with SAM 2.1 (seeded random hiera_t, input side
    SIZE) from object 1's first mask, the export cache in tmp_path; --backend and --out are the test's."""
    from sam2_testing import random_sam2_state

    frames = tmp_path / "frames"
    frames.mkdir()
    for path in sorted((DAVIS / "JPEGImages" / "480p" / SEQ).glob("*.jpg"))[:count]:
        shutil.copy(path, frames / path.name)
    first = np.array(Image.open(DAVIS / "Annotations" / "480p" / SEQ / "00000.png")) == 1
    Image.fromarray(first.astype(np.uint8) * 255).save(tmp_path / "first.png")
    torch.save({"model": random_sam2_state("sam2.1_hiera_t", seed=0)}, tmp_path / "sam2.pt")
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "cache"))
    return ["track", frames, "--tracker", "sam2", "--checkpoint", tmp_path / "sam2.pt", "--ref-mask",
            tmp_path / "first.png", "--input-size", SIZE, "--fill-holes", 0, "-q"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_command_takes_the_backend(backend, tmp_path, monkeypatch, capsys):
    argv = _track_argv(tmp_path, monkeypatch, count=3)
    outs = {}
    for name in ("torch", backend):
        outs[name] = tmp_path / name
        assert run_cli([*argv, "--backend", name, "--out", outs[name]]) == 0
    assert len(list((tmp_path / "cache" / "compiled").iterdir())) == 1  # the export, kept for the next run
    for index in range(3):
        a, b = (load_mask(outs[k] / f"{index:05d}.png") for k in ("torch", backend))
        assert np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1) >= 0.99


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
def test_a_backend_refused_when_the_model_is_built_leaves_no_output(tmp_path, monkeypatch, capsys):
    # The pair is refused only once the folder is taken (when the model is built): the run gives its
    # one line and takes back its results.json, so the folder it made goes too, and a corrected run works.
    out = tmp_path / "new" / "out"
    argv = [*_track_argv(tmp_path, monkeypatch, count=1), "--out", out]
    assert run_cli([*argv, "--backend", "onnxruntime", "--precision", "bf16"]) == 2
    assert "onnxruntime" in error_line(capsys)
    assert not (tmp_path / "new").exists()
    assert run_cli([*argv, "--backend", "onnxruntime"]) == 0
    assert (out / "00000.png").is_file() and (out / "results.json").is_file()
