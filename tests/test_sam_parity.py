"""Our SAM gives Meta's outputs for the same weights (segment-anything==1.0 as reference)."""

import numpy as np
import pytest
import torch
from PIL import Image

from sam.predictor import SamPredictor
from sam.transforms import preprocess_shape, resize_longest_side
from sam_testing import official_sam_model, random_sam


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_image_encoder_matches_official(official_sam, model_type):
    # 256 px: a 16 x 16 grid, so windowed blocks pad 16 -> 28 (four windows) and global blocks
    # attend over all 256 tokens, with relative positions in both.
    ours, state = random_sam(model_type, img_size=256, seed=1)
    official = official_sam_model(official_sam, model_type, state, img_size=256)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours_out = ours.image_encoder(x)
        official_out = official.image_encoder(x)
    assert ours_out.shape == (1, 256, 16, 16)
    assert (ours_out - official_out).abs().max().item() <= 1e-4


def test_resize_matches_pillow(perseg_dir):
    image = np.array(Image.open(perseg_dir / "Images" / "cat" / "00.jpg").convert("RGB"))
    for crop in [image, image[:480, :854], image[:300, :1001]]:
        h, w = crop.shape[:2]
        new_h, new_w = preprocess_shape(h, w, 1024)
        expected = np.asarray(Image.fromarray(crop).resize((new_w, new_h), Image.BILINEAR), dtype=np.int32)
        ours = resize_longest_side(torch.from_numpy(crop).permute(2, 0, 1)).permute(1, 2, 0).numpy().astype(np.int32)
        assert ours.shape == expected.shape
        diff = np.abs(ours - expected)
        assert diff.max() <= 1
        assert (diff > 0).mean() < 0.05


@pytest.fixture(scope="module")
def predictors(official_sam, perseg_dir):
    """Both predictors at full size (1024) on one real PerSeg photo, same random ViT-B weights."""
    image = np.array(Image.open(perseg_dir / "Images" / "colorful_sneaker" / "01.jpg").convert("RGB"))
    image = image[: image.shape[0] * 3 // 4]  # not square: exercises padding and cropping
    ours_model, state = random_sam("vit_b", seed=3)
    official_model = official_sam_model(official_sam, "vit_b", state)
    ours = SamPredictor(ours_model)
    ours.set_image(image)
    official = official_sam.SamPredictor(official_model)
    resized = resize_longest_side(torch.from_numpy(image).permute(2, 0, 1))[None]
    official.set_torch_image(resized, image.shape[:2])
    return ours, official, image


def _compare(ours_pred, official_out):
    official_logits, official_iou, official_low_res = official_out
    np.testing.assert_allclose(ours_pred.low_res_logits, official_low_res, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours_pred.iou_scores, official_iou, atol=1e-4, rtol=0)
    official_masks = official_logits > 0
    assert ours_pred.masks.shape == official_masks.shape
    assert (ours_pred.masks != official_masks).mean() <= 1e-3


def test_embeddings_match(predictors):
    ours, official, _ = predictors
    assert (ours.features - official.features).abs().max().item() <= 1e-4


@pytest.mark.parametrize("multimask", [True, False])
def test_predict_points_box_and_mask_prompt(predictors, multimask):
    ours, official, image = predictors
    h, w = image.shape[:2]
    points = np.array([[w * 0.5, h * 0.4], [w * 0.2, h * 0.8]])
    labels = np.array([1, 0])
    box = np.array([w * 0.1, h * 0.2, w * 0.7, h * 0.9])

    first = ours.predict(points, labels, multimask_output=multimask)
    _compare(first, official.predict(points, labels, multimask_output=multimask, return_logits=True))

    with_box = ours.predict(points, labels, box=box, multimask_output=multimask)
    _compare(with_box, official.predict(points, labels, box=box, multimask_output=multimask, return_logits=True))

    mask_prompt = first.low_res_logits[np.argmax(first.iou_scores)][None]
    refined = ours.predict(points, labels, box=box, mask_input=mask_prompt, multimask_output=multimask)
    expected = official.predict(
        points, labels, box=box, mask_input=mask_prompt, multimask_output=multimask, return_logits=True
    )
    _compare(refined, expected)
    assert refined.logits.shape == (3 if multimask else 1, h, w)
    np.testing.assert_allclose(refined.logits, expected[0], atol=1e-3, rtol=0)


def test_batched_boxes_match_official_and_single_calls(predictors):
    ours, official, image = predictors
    h, w = image.shape[:2]
    boxes = np.array([[0, 0, w / 2, h / 2], [w / 3, h / 4, w - 1, h - 1], [10, 20, 200, 300]], dtype=np.float32)
    batched = ours.predict(box=boxes, multimask_output=True)
    assert batched.masks.shape == (3, 3, h, w)
    official_boxes = official.transform.apply_boxes_torch(torch.from_numpy(boxes), image.shape[:2])
    official_masks, official_iou, official_low = official.predict_torch(None, None, official_boxes, multimask_output=True)
    assert np.abs(batched.low_res_logits - official_low.numpy()).max() <= 1e-4
    assert np.abs(batched.iou_scores - official_iou.numpy()).max() <= 1e-4
    assert (batched.masks != official_masks.numpy()).mean() <= 1e-3
    for i, box in enumerate(boxes):
        single = ours.predict(box=box, multimask_output=True)
        np.testing.assert_allclose(single.low_res_logits, batched.low_res_logits[i], atol=1e-4, rtol=0)


def test_batched_points(predictors):
    ours, _, image = predictors
    h, w = image.shape[:2]
    points = np.array([[[w * 0.3, h * 0.3]], [[w * 0.6, h * 0.7]]])
    labels = np.ones((2, 1))
    batched = ours.predict(points, labels, multimask_output=False)
    assert batched.masks.shape == (2, 1, h, w) and batched.masks.dtype == bool
    for i in range(2):
        single = ours.predict(points[i], labels[i], multimask_output=False)
        np.testing.assert_allclose(single.low_res_logits, batched.low_res_logits[i], atol=1e-4, rtol=0)


def test_predictor_accepts_tensors_and_rejects_bad_images():
    model, _ = random_sam("vit_b", img_size=256, seed=5)
    predictor = SamPredictor(model)
    image = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    from_numpy = predictor.set_image(image).clone()
    from_tensor = predictor.set_image(torch.from_numpy(image))
    assert torch.equal(from_numpy, from_tensor)
    assert predictor.original_size == (100, 150) and predictor.input_size == (171, 256)
    pred = predictor.predict(np.array([[10, 10]]), np.array([1]))
    assert pred.masks.shape == (3, 100, 150) and pred.logits.shape == (3, 100, 150)
    assert pred.low_res_logits.shape == (3, 64, 64)
    with pytest.raises(ValueError, match="H x W x 3"):
        predictor.set_image(image[..., 0])
    with pytest.raises(ValueError, match="uint8"):
        predictor.set_image(image.astype(np.float32))
    with pytest.raises(RuntimeError, match="set_image"):
        SamPredictor(model).predict(np.array([[1, 1]]), np.array([1]))
