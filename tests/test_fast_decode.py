"""The decoder side's fast paths give the very numbers of the paths they replace.

- PerSAM's refinements decode at the decoder's resolution and bring only the chosen mask to
  the image size (persam.refine.best_upscaled), instead of all three candidates: same masks,
  logits, boxes and scores on the shared photos, pixel for pixel.
- The dense positional encoding is cached (and its token-major copy handed to the decoder):
  the same values as computing it afresh, recomputed when the frequencies change.
"""

import numpy as np
import pytest
import torch

from persam.guide import attention_similarity, guided_prediction
from persam.io import load_image, load_mask
from persam.locate import select_points, similarity_grid, similarity_map
from persam.pipeline import learn_concept
from persam.refine import best_mask, best_upscaled, keep_non_empty, mask_box, mixed_mask, refine_with_box, refine_with_mask
from sam.predictor import SamPredictor
from sam_testing import random_sam


@pytest.fixture(scope="module")
def predictor():
    return SamPredictor(random_sam("vit_b", img_size=256)[0], backend="torch")


def _full_size_refine(predictor, points, labels, previous, with_box):
    """The refinement as it was: all three candidates brought to full size, then the best."""
    box = mask_box(previous.mask) if with_box else None
    if with_box and box is None:
        return previous
    prediction = predictor.predict(point_coords=points, point_labels=labels, box=box,
                                   mask_input=previous.low_res_logits[None], multimask_output=True)
    return keep_non_empty(best_mask(prediction), previous)


def _same_choice(fast, full):
    np.testing.assert_array_equal(fast.mask, full.mask)
    np.testing.assert_array_equal(fast.logits, full.logits)
    np.testing.assert_array_equal(fast.low_res_logits, full.low_res_logits)
    assert fast.iou_score == full.iou_score


def test_refinements_on_low_res_logits_give_the_full_size_masks(predictor, perseg_dir):
    compared = boxes = 0
    for cls in ("cat", "colorful_sneaker", "duck_toy"):
        images = [np.ascontiguousarray(load_image(perseg_dir / "Images" / cls / f"{i:02d}.jpg")[::8, ::8])
                  for i in range(3)]
        mask = np.ascontiguousarray(load_mask(perseg_dir / "Annotations" / cls / "00.png")[::8, ::8])
        embeddings = predictor.encode_images(images)  # each photo encoded once
        for method in ("persam", "persam_f"):
            concept = learn_concept(predictor, [(images[0], mask)], method=method, encoded=[embeddings[0][:2]])
            for embedding in embeddings[1:]:
                predictor.set_embedding(*embedding)
                similarity = similarity_map(similarity_grid(predictor.features, concept.target_vector), predictor.upscale)
                if method == "persam":
                    points, labels = select_points(similarity, 1, 1)
                    attention = attention_similarity(similarity, predictor.input_size, predictor.features.shape[-1],
                                                     predictor.model.img_size)
                    first = best_mask(guided_prediction(predictor, points, labels, attention, concept.target_embedding))
                    steps = [(refine_with_mask, False), (refine_with_box, True)]
                else:
                    points, labels = select_points(similarity, 1, 0)
                    first = mixed_mask(predictor.predict(points, labels, multimask_output=True), concept.scale_weights)
                    steps = [(refine_with_box, True), (refine_with_box, True)]
                fast = full = first
                for refine, with_box in steps:
                    fast = refine(predictor, points, labels, fast)
                    full = _full_size_refine(predictor, points, labels, full, with_box)
                    _same_choice(fast, full)
                    compared += 1
                    boxes += int(with_box and mask_box(full.mask) is not None)
    assert compared == 24 and boxes >= 4  # the box refinement really ran on some photos


def test_best_upscaled_is_best_mask_of_the_full_size_prediction(predictor, perseg_dir):
    image = load_image(perseg_dir / "Images" / "cat" / "01.jpg")[::5, ::7]  # non-square, odd sizes
    predictor.set_image(np.ascontiguousarray(image))
    h, w = image.shape[:2]
    for points in ([[w * 0.5, h * 0.5]], [[w * 0.2, h * 0.7], [w * 0.9, h * 0.1]]):
        points = np.array(points, np.float32)
        labels = np.ones(len(points), np.int64)
        full = predictor.predict(points, labels, multimask_output=True)
        low = predictor.predict(points, labels, multimask_output=True, full_size=False)
        assert low.masks is None and low.logits is None
        _same_choice(best_upscaled(predictor, low), best_mask(full))


def test_dense_positional_encoding_is_cached_and_follows_its_frequencies(predictor):
    encoder = predictor.model.prompt_encoder
    fresh = encoder.pe_layer(encoder.image_embedding_size).unsqueeze(0)
    cached = encoder.get_dense_pe()
    assert encoder.get_dense_pe() is cached  # computed once
    torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
    tokens = encoder.get_dense_pe_tokens()
    assert tokens.is_contiguous() and tokens.shape == (1, fresh.shape[2] * fresh.shape[3], fresh.shape[1])
    torch.testing.assert_close(tokens, fresh.flatten(2).transpose(1, 2), rtol=0, atol=0)
    with torch.inference_mode():
        assert not encoder.get_dense_pe().is_inference()  # usable outside inference mode too

    matrix = encoder.pe_layer.positional_encoding_gaussian_matrix
    saved = matrix.clone()
    try:
        with torch.no_grad():
            matrix.mul_(2.0)
        changed = encoder.get_dense_pe()
        assert not torch.equal(changed, cached)
        torch.testing.assert_close(changed, encoder.pe_layer(encoder.image_embedding_size).unsqueeze(0), rtol=0, atol=0)
    finally:
        with torch.no_grad():
            matrix.copy_(saved)
    torch.testing.assert_close(encoder.get_dense_pe(), fresh, rtol=0, atol=0)


def test_decoder_with_and_without_cached_token_encoding_is_identical(predictor):
    model = predictor.model
    grid = predictor.features.shape[-1] if predictor.is_image_set else 16
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(2, 256, grid, grid, generator=generator)
    sparse = torch.randn(2, 3, 256, generator=generator)
    dense = torch.randn(2, 256, grid, grid, generator=generator)
    pe = model.prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        a = model.mask_decoder(embedding, pe, sparse, dense, True,
                               image_pe_tokens=model.prompt_encoder.get_dense_pe_tokens())
        b = model.mask_decoder(embedding, pe.clone(), sparse, dense, True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
