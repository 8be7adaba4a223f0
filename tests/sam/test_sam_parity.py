"""Our SAM gives Meta's outputs for the same weights (segment-anything==1.0 as reference)."""

import numpy as np
import pytest
import torch
from PIL import Image

from sam.predictor import SamPredictor
from sam.transforms import preprocess_shape, resize_longest_side
from conftest import DAVIS, SHARED_DATA
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


def _shared_photos():
    """Every shared photo (PerSeg, DreamBooth, DAVIS frames), one per distinct size and aspect."""
    return sorted(p for pattern in ("**/*.jpg", "**/*.jpeg") for p in SHARED_DATA.glob(pattern))


def _crops(image):
    """The photo, and crops of it that make other sizes and aspect ratios (portrait, wide, odd sides)."""
    h, w = image.shape[:2]
    return [image, image[: max(1, h * 2 // 3), : max(1, w // 3)], image[: max(1, h // 5), :], image[:301, :1001]]


def test_resize_equals_official_pil_path_on_every_shared_photo(official_sam):
    from segment_anything.utils.transforms import ResizeLongestSide

    photos = _shared_photos()
    if not photos:
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    official = ResizeLongestSide(1024)
    sizes, compared = set(), 0
    for path in photos:
        image = np.array(Image.open(path).convert("RGB"))
        if image.shape in sizes:  # the same size resizes the same way: one photo per size
            continue
        sizes.add(image.shape)
        for crop in _crops(image):
            expected = official.apply_image(crop)
            ours = resize_longest_side(crop, 1024)
            assert ours.shape == expected.shape and ours.dtype == np.uint8, path
            differing = int((ours != expected).sum())
            assert differing == 0, f"{path} {crop.shape}: {differing} values differ from SAM's resize"
            compared += 1
    assert (480, 854, 3) in sizes and (2048, 2048, 3) in sizes and compared >= 4 * len(sizes)


def test_reference_mask_is_resized_like_the_image(perseg_dir):
    from persam.data.io import load_mask
    from persam.method.target import mask_in_input_frame

    mask = load_mask(perseg_dir / "Annotations" / "colorful_sneaker" / "01.png")
    for crop in [mask, mask[:700, :1500], mask[:1900, :500]]:
        framed = mask_in_input_frame(crop).numpy()[0, 0]
        as_picture = np.where(crop, 255, 0).astype(np.uint8)
        h, w = preprocess_shape(*crop.shape, 1024)
        expected = np.asarray(Image.fromarray(as_picture).resize((w, h), Image.Resampling.BILINEAR)) / 255.0
        assert framed.shape == (1024, 1024)
        np.testing.assert_array_equal(framed[:h, :w], expected.astype(np.float32))
        assert not framed[h:, :].any() and not framed[:, w:].any()


@pytest.fixture(scope="module")
def two_block_vit(official_sam):
    """Ours and Meta's SAM with a two-block ViT-B encoder (one windowed, one global block) at 1024
    input, same random weights: the full preprocessing at the real size, at a fraction of the cost."""
    import sam.build as build

    config = build.ViTConfig(768, 2, 12, (1,))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(build.VIT_CONFIGS, "vit_b", config)
        import sam_testing

        mp.setitem(sam_testing.VIT_CONFIGS, "vit_b", config)
        ours, state = random_sam("vit_b", seed=7)
        official = official_sam_model(official_sam, "vit_b", state)
    return SamPredictor(ours), official_sam.SamPredictor(official)


def test_set_image_equals_official_set_image_on_real_photos(two_block_vit, perseg_dir):
    ours, official = two_block_vit
    davis_frame = np.array(Image.open(DAVIS / "JPEGImages" / "480p" / "car-shadow" / "00000.jpg").convert("RGB"))
    sneaker = np.array(Image.open(perseg_dir / "Images" / "colorful_sneaker" / "02.jpg").convert("RGB"))
    cat = np.array(Image.open(perseg_dir / "Images" / "cat" / "00.jpg").convert("RGB"))
    photos = {
        "davis 854x480 (upscaled)": davis_frame,
        "sneaker 2048x2048 (downscaled)": sneaker,
        "sneaker portrait crop 700x1500": sneaker[:1500, :700],
        "cat wide crop 1001x301": cat[:301, :1001],
        "davis crop 333x479 (odd sides)": davis_frame[:479, 100:433],
    }
    for name, image in photos.items():
        ours_features = ours.set_image(image)
        official.set_image(image)
        assert ours.input_size == tuple(official.input_size), name
        difference = (ours_features - official.features).abs().max().item()
        assert difference <= 1e-4, f"{name}: embeddings differ by {difference:.2e}"


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
    official.set_image(image)  # its own preprocessing: Pillow through torchvision's resize
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
