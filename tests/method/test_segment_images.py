"""Segmenting several images together: each decoder call of the method made once for all of them.

- `SamPredictor.predict_each` decodes prompt set i against image i: the values `predict` gives
  with image i set, for images of different sizes, with points, boxes, mask prompts and
  PerSAM's hooks.
- `persam.method.pipeline.segment_images` gives each image the segmentation it gets alone (masks,
  points, boxes equal; logits and scores to float rounding), for PerSAM and PerSAM-F, with
  images below `min_similarity` and images whose refinement has no box in the same batch.
- `segment_images(..., workers=W)` splits the images over W threads (torch's threads shared out)
  and gives the segmentations of one worker, in order, torch's thread count restored after, an
  error in a worker raised to the caller; `decode_workers` takes one per thread on a CPU.
- `persam segment --batch-size B` writes the masks of `--batch-size 1`, and the local engine
  takes the option.
- `sam.common.matmul` (the decoder's attention products) equals torch.matmul, whatever the
  operands' strides, and keeps autograd working.
"""

import json

import numpy as np
import pytest
import torch

from cli_testing import model_args, ref_args, run_cli, write_cat_photos
from persam.data.io import load_image, load_mask
from persam.method.pipeline import _worker_groups, decode_workers, learn_concept, locate, segment, segment_images
from sam.common import matmul
from sam.predictor import SamPredictor
from sam_testing import random_sam

CLASSES = ("cat", "colorful_sneaker", "duck_toy")


@pytest.fixture(scope="module")
def predictor():
    return SamPredictor(random_sam("vit_b", img_size=256)[0], backend="torch")


@pytest.fixture(scope="module")
def photos(perseg_dir):
    """Shared PerSeg photos, downscaled and cropped to different sizes (square, wide, tall)."""
    crops = [(slice(None), slice(None)), (slice(0, 300), slice(None)), (slice(None), slice(40, 260))]
    out = []
    for k, cls in enumerate(CLASSES):
        for i in range(3):
            image = load_image(perseg_dir / "Images" / cls / f"{i:02d}.jpg")[::8, ::8]
            out.append(np.ascontiguousarray(image[crops[(k + i) % 3]]))
    return out


@pytest.fixture(scope="module")
def reference(perseg_dir):
    image = np.ascontiguousarray(load_image(perseg_dir / "Images" / "cat" / "00.jpg")[::8, ::8])
    mask = np.ascontiguousarray(load_mask(perseg_dir / "Annotations" / "cat" / "00.png")[::8, ::8])
    return image, mask


def test_predict_each_gives_each_images_own_prediction(predictor, photos):
    embeddings = predictor.encode_images(photos[:4])
    rng = np.random.default_rng(0)
    points = np.stack([rng.uniform(0, [e.original_size[1], e.original_size[0]], (2, 2)) for e in embeddings])
    labels = np.array([[1, 0]] * 4)
    boxes = np.stack([[5, 5, e.original_size[1] - 10, e.original_size[0] - 20] for e in embeddings]).astype(np.float32)
    masks = rng.normal(size=(4, 1, 64, 64)).astype(np.float32)
    attention = torch.rand(4, 16 * 16)
    target = torch.randn(1, 256)
    cases = [dict(multimask_output=True), dict(boxes=boxes, mask_input=masks, multimask_output=True, best_only=True),
             dict(multimask_output=False, attention_similarity=attention, target_embedding=target)]
    for kwargs in cases:
        together = predictor.predict_each(embeddings, points, labels, **kwargs)
        assert together.masks is None and together.logits is None
        for i, embedding in enumerate(embeddings):
            predictor.set_embedding(*embedding)
            alone = predictor.predict(
                points[i], labels[i], box=None if "boxes" not in kwargs else boxes[i],
                mask_input=None if "mask_input" not in kwargs else masks[i],
                multimask_output=kwargs["multimask_output"], full_size=False, best_only=kwargs.get("best_only", False),
                attention_similarity=None if "attention_similarity" not in kwargs else attention[i],
                target_embedding=kwargs.get("target_embedding"))
            np.testing.assert_allclose(together.low_res_logits[i], alone.low_res_logits, rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(together.iou_scores[i], alone.iou_scores, rtol=1e-5, atol=1e-5)


def test_predict_each_alone_is_predict_bit_for_bit(predictor, photos):
    embedding = predictor.encode_images(photos[1:2])[0]
    predictor.set_embedding(*embedding)
    points, labels = np.array([[30.0, 40.0]]), np.array([1])
    alone = predictor.predict(points, labels, multimask_output=True, full_size=False)
    together = predictor.predict_each([embedding], points[None], labels[None], multimask_output=True)
    np.testing.assert_array_equal(together.low_res_logits[0], alone.low_res_logits)
    np.testing.assert_array_equal(together.iou_scores[0], alone.iou_scores)


def test_predict_each_refuses_prompts_that_do_not_match_the_images(predictor, photos):
    embeddings = predictor.encode_images(photos[:2])
    with pytest.raises(ValueError, match="B x N x 2 points .* B = 2 images"):
        predictor.predict_each(embeddings, np.zeros((3, 1, 2)), np.ones((3, 1)))
    with pytest.raises(ValueError, match="B x 4 boxes for B = 2"):
        predictor.predict_each(embeddings, np.zeros((2, 1, 2)), np.ones((2, 1)), boxes=np.zeros((1, 4)))


@pytest.mark.parametrize("method", ["persam", "persam_f"])
def test_segment_images_gives_each_image_its_own_segmentation(predictor, photos, reference, method):
    concept = learn_concept(predictor, [reference], method=method)
    embeddings = predictor.encode_images(photos)
    peaks = sorted(float(locate(predictor, concept, e).max()) for e in embeddings)
    min_similarity = peaks[2]  # the two least similar images are not searched
    for threshold in (None, min_similarity):
        together = segment_images(predictor, concept, embeddings, min_similarity=threshold, keep_similarity=True)
        assert len(together) == len(embeddings)
        found = boxes = 0
        for embedding, seg in zip(embeddings, together):
            predictor.set_embedding(*embedding)
            alone = segment(predictor, concept, None, min_similarity=threshold, keep_similarity=True)
            np.testing.assert_array_equal(seg.mask, alone.mask)
            assert seg.found == alone.found and seg.peak_similarity == alone.peak_similarity
            np.testing.assert_array_equal(seg.points, alone.points)
            np.testing.assert_array_equal(seg.labels, alone.labels)
            assert (seg.box is None) == (alone.box is None)
            if seg.box is not None:
                np.testing.assert_array_equal(seg.box, alone.box)
            assert seg.iou_score == pytest.approx(alone.iou_score, abs=1e-5)
            if alone.low_res_logits is not None:
                np.testing.assert_allclose(seg.low_res_logits, alone.low_res_logits, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(seg.similarity, alone.similarity, rtol=0, atol=0)
            assert seg.mask.shape == embedding.original_size
            found += seg.found
            boxes += seg.box is not None
        if threshold is not None:
            assert sum(not s.found and s.points.size == 0 for s in together) == 2
        assert found and boxes  # some masks are not empty, and their box refinement ran in the batch
    # the images below the threshold are left out of the decoder calls, the rest still decoded together
    assert sum(s.points.size == 0 for s in segment_images(predictor, concept, embeddings, min_similarity=peaks[-1] + 1)) \
        == len(embeddings)


@pytest.mark.parametrize("method", ["persam", "persam_f"])
def test_segment_images_in_worker_threads_gives_the_segmentations_of_one_worker(predictor, photos, reference, method):
    concept = learn_concept(predictor, [reference], method=method)
    embeddings = predictor.encode_images(photos[:7])
    predictor.set_embedding(*embeddings[0])
    current = predictor.features
    threads = torch.get_num_threads()
    for workers in (2, 3, 9):
        # torch's CPU kernels may depend on the thread count (they do on some CPUs), so the
        # workers are compared with one worker on the thread count each of them gets
        threads_each = max(1, threads // len(_worker_groups(len(embeddings), workers)))
        torch.set_num_threads(threads_each)
        try:
            one = segment_images(predictor, concept, embeddings, keep_similarity=True)
        finally:
            torch.set_num_threads(threads)
        split = segment_images(predictor, concept, embeddings, keep_similarity=True, workers=workers)
        assert torch.get_num_threads() == threads
        assert predictor.features is current  # the workers decode with predictors of their own
        assert len(split) == len(one)
        for a, b in zip(split, one):  # in order, each image's own
            np.testing.assert_array_equal(a.mask, b.mask)
            np.testing.assert_array_equal(a.points, b.points)
            assert a.found == b.found and a.peak_similarity == b.peak_similarity
            assert (a.box is None) == (b.box is None)
            if a.box is not None:
                np.testing.assert_array_equal(a.box, b.box)
            assert a.iou_score == pytest.approx(b.iou_score, abs=1e-5)
            np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(a.similarity, b.similarity, rtol=0, atol=0)
    assert sum(s.found for s in one) > 0


def test_worker_threads_raise_errors_and_restore_torch_threads(predictor, photos, reference, monkeypatch):
    import persam.method.pipeline as pipeline

    concept = learn_concept(predictor, [reference])
    embeddings = predictor.encode_images(photos[:4])
    threads = torch.get_num_threads()
    seen = []
    real = pipeline.segment_images_at

    def failing(pred, concept, images, *args, **kwargs):
        seen.append((pred, torch.get_num_threads()))
        if len(seen) == 2:
            raise RuntimeError("worker failed")
        return real(pred, concept, images, *args, **kwargs)

    monkeypatch.setattr(pipeline, "segment_images_at", failing)
    with pytest.raises(RuntimeError, match="worker failed"):
        segment_images(predictor, concept, embeddings, workers=2)
    assert torch.get_num_threads() == threads
    assert len(seen) == 2 and all(pred is not predictor for pred, _ in seen)
    assert all(count == max(1, threads // 2) for _, count in seen)  # torch's threads shared out


def test_worker_groups_and_decode_workers(predictor):
    assert _worker_groups(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert _worker_groups(2, 5) == [range(0, 1), range(1, 2)]
    assert _worker_groups(5, 1) == [range(0, 5)] and _worker_groups(0, 2) == [range(0, 0)]
    with pytest.raises(ValueError, match="workers must be at least 1"):
        _worker_groups(3, 0)
    assert decode_workers(predictor, 4) == min(4, torch.get_num_threads())
    assert decode_workers(predictor, 1) == 1


def test_segment_images_handles_an_image_whose_refinement_has_no_box(predictor, photos, reference, monkeypatch):
    """An empty mask has no box: that image keeps its choice while the others take the box refinement."""
    import persam.method.refine as refine

    concept = learn_concept(predictor, [reference])
    embeddings = predictor.encode_images(photos[:3])
    real_box = refine.mask_box
    empty_for = embeddings[1].original_size

    def no_box_for_the_second(mask):
        return None if mask.shape == empty_for else real_box(mask)

    monkeypatch.setattr(refine, "mask_box", no_box_for_the_second)
    calls = []
    real_predict_each = SamPredictor.predict_each
    monkeypatch.setattr(SamPredictor, "predict_each",
                        lambda self, images, *a, **k: calls.append(len(images)) or real_predict_each(self, images, *a, **k))
    together = segment_images(predictor, concept, embeddings)
    assert calls == [3, 3, 2]  # guided, refinement 1 for all three, the box refinement for two
    for embedding, seg in zip(embeddings, together):
        predictor.set_embedding(*embedding)
        np.testing.assert_array_equal(seg.mask, segment(predictor, concept).mask)


def test_segment_command_with_batches_writes_the_masks_of_one_at_a_time(perseg_dir, random_vit_t_checkpoint,
                                                                         tmp_path):
    from PIL import Image

    write_cat_photos(perseg_dir, tmp_path, 200)
    for name, cls in (("03", "duck_toy"), ("04", "colorful_sneaker")):  # other sizes, other content
        Image.open(perseg_dir / "Images" / cls / "01.jpg").convert("RGB").resize((180, 220)).save(
            tmp_path / "targets" / f"{name}.jpg")
    outputs = {}
    for batch in (1, 3):
        out = tmp_path / f"out{batch}"
        assert run_cli(["segment", *ref_args(tmp_path), tmp_path / "targets", "--out", out, "--batch-size", batch,
                        *model_args(random_vit_t_checkpoint)]) == 0
        records = json.loads((out / "results.json").read_text())["images"]
        assert sorted(r["name"] for r in records if r["status"] == "ok") == ["01", "02", "03", "04"]
        outputs[batch] = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert outputs[1].keys() == outputs[3].keys() and len(outputs[1]) == 4
    for name in outputs[1]:
        assert outputs[1][name] == outputs[3][name], name


def test_matmul_equals_torch_matmul_for_any_strides():
    torch.manual_seed(0)
    a = torch.randn(2, 300, 64)
    b = torch.randn(2, 64, 40)
    variants_b = [b, b.transpose(1, 2).contiguous().transpose(1, 2), torch.randn(2, 64, 80)[:, :, ::2]]
    variants_a = [a, a.transpose(1, 2).contiguous().transpose(1, 2)]
    with torch.inference_mode():
        for x in variants_a:
            for y in variants_b:
                expected = torch.matmul(x.double(), y.double()).float()
                torch.testing.assert_close(matmul(x, y), expected, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(matmul(x[:1], y[:1]), expected[:1], rtol=1e-4, atol=1e-4)
    x = a.clone().requires_grad_(True)
    out = matmul(x, b)
    assert out.requires_grad
    out.sum().backward()
    torch.testing.assert_close(x.grad, b.sum(-1)[:, None, :].expand_as(a))
