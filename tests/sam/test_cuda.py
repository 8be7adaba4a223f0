"""The CUDA paths against the CPU (skipped without a GPU): fp32 embeddings and decoder logits,
batched encoding, PerSAM on several photos at once, and the reduced precisions.

Synthetic photos (seeded noise with drawn shapes), so that the module runs where ../shared is
absent (the lent GPU machine; scripts/gpu_check.sh runs it there). PERSAM_TEST_DEVICE=cpu runs
the same checks with the CPU as both sides, to test the tests without a GPU.
"""

import os

import cv2
import numpy as np
import pytest
import torch

from sam.predictor import SamPredictor
from sam_testing import random_sam

DEVICE = torch.device(os.environ.get("PERSAM_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")


def photo(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    cv2.circle(image, (width // 3, height // 2), min(height, width) // 5, (220, 120, 40), -1)
    cv2.rectangle(image, (width // 2, height // 5), (width - 20, height // 2), (40, 200, 90), -1)
    return image


def disc_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    cv2.circle(mask, (width // 3, height // 2), min(height, width) // 5, 1, -1)
    return mask.astype(bool)


@pytest.fixture(scope="module")
def models():
    """vit_t with seeded random weights, on the CPU and on DEVICE (the same values)."""
    cpu_model, state = random_sam("vit_t", seed=3)
    device_model, _ = random_sam("vit_t", seed=3)
    return cpu_model, device_model.to(DEVICE)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm())


def test_fp32_embedding_and_decoder_logits_match_the_cpu(models):
    cpu = SamPredictor(models[0], backend="torch")
    gpu = SamPredictor(models[1], backend="torch")
    image = photo(480, 640, 0)
    cpu.set_image(image)
    gpu.set_image(image)
    assert gpu.features.device.type == DEVICE.type
    assert relative_error(gpu.features, cpu.features) < 1e-3  # cuDNN may use TF32 in convolutions
    point, label = np.array([[210.0, 240.0]]), np.array([1])
    expected = cpu.predict(point, label, multimask_output=True)
    got = gpu.predict(point, label, multimask_output=True)
    scale = np.abs(expected.low_res_logits).max()
    assert np.abs(got.low_res_logits - expected.low_res_logits).max() < 1e-2 * scale
    np.testing.assert_allclose(got.iou_scores, expected.iou_scores, atol=1e-3)
    assert got.masks.shape == expected.masks.shape == (3, 480, 640)


def test_batched_encoding_matches_one_image_per_call(models):
    gpu = SamPredictor(models[1], backend="torch")
    images = [photo(480, 640, 1), photo(600, 400, 2), photo(512, 512, 3)]
    batched = gpu.encode_images(images, batch_size=3)
    for image, embedding in zip(images, batched):
        alone = gpu.set_image(image)
        assert embedding.original_size == image.shape[:2]
        assert relative_error(embedding.features, alone) < 1e-4


def test_persam_on_several_photos_matches_the_cpu(models):
    from persam.method.pipeline import learn_concept, segment_images

    reference = photo(480, 640, 4)
    targets = [photo(480, 640, 5), photo(600, 400, 6)]
    results = {}
    for name, model in (("cpu", models[0]), ("device", models[1])):
        predictor = SamPredictor(model, backend="torch")
        concept = learn_concept(predictor, [(reference, disc_mask(480, 640))])
        results[name] = segment_images(predictor, concept, predictor.encode_images(targets, batch_size=2))
    for expected, got, target in zip(results["cpu"], results["device"], targets):
        assert got.mask.shape == target.shape[:2]
        assert got.peak_similarity == pytest.approx(expected.peak_similarity, abs=1e-3)
        union = np.logical_or(got.mask, expected.mask).sum()
        assert union == 0 or np.logical_and(got.mask, expected.mask).sum() / union >= 0.99


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_embeddings_stay_near_fp32(models, precision):
    if DEVICE.type == "cpu" and precision == "fp16":
        pytest.skip("fp16 runs on a GPU only")
    image = photo(480, 640, 7)
    reference = SamPredictor(models[1], backend="torch").set_image(image).clone()
    reduced = SamPredictor(models[1], precision=precision, backend="torch").set_image(image)
    assert reduced.dtype == torch.float32 and torch.isfinite(reduced).all()
    assert relative_error(reduced, reference) < 5e-2
