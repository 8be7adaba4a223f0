"""`--format coco` (issue 12): a COCO instances JSON that pycocotools reads, equal to the PNG masks.

The file's content is checked, not the model: the image encoder and the segmentation steps are
replaced by stand-ins that find discs (a random-weight model finds nothing), so the tests run in
seconds.  They skip when pycocotools is missing (``pip install 'persam[coco]'``).
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import persam.method.multi
import persam.runs.local
from cli_testing import error_line, run_cli
from persam.data.coco import CocoImage, coco_dataset, write_coco
from persam.data.concept import load_concept, save_concept
from persam.data.io import load_label_map, load_mask
from persam.method.pipeline import Concept, Segmentation
from sam.predictor import SamPredictor

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402


# --------------------------------------------------------------------------------------------
# stand-ins and fixtures


def disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2


def found_segmentation(mask, score):
    ys, xs = np.nonzero(mask)
    return Segmentation(mask=mask, iou_score=score, peak_similarity=0.7, found=True,
                        points=np.array([[xs.mean(), ys.mean()]], np.float32), labels=np.array([1]),
                        box=np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32))


@pytest.fixture(autouse=True)
def stand_ins(monkeypatch):
    """No encoder (seeded features per image), and segmentation steps that find discs: one in
    wide images, none in square ones; with --multi two overlapping discs."""

    def set_torch_image(self, resized_image, original_size):
        seed = int(hashlib.sha1(resized_image.cpu().numpy().tobytes()).hexdigest()[:8], 16)
        features = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(seed))
        self.reset_image()
        self.set_embedding(features, original_size, tuple(resized_image.shape[-2:]))
        return self.features

    def segment_one(h, w):
        if w == h:
            return Segmentation(mask=np.zeros((h, w), bool), iou_score=0.1, peak_similarity=0.2, found=False,
                                points=np.array([[1.0, 1.0]], np.float32), labels=np.array([1]))
        return found_segmentation(disc(h, w, w / 3, h / 2, h / 3), 0.875)

    def segment_images(predictor, concept, images, min_similarity=None, keep_similarity=False, workers=1):
        return [segment_one(*image.original_size) for image in images]

    def segment_objects(predictor, concept, image=None, max_objects=5, min_similarity=None, **kw):
        h, w = predictor.original_size
        return [found_segmentation(disc(h, w, w / 3, h / 2, h / 3), 0.9),
                found_segmentation(disc(h, w, w / 2, h / 2, h / 3), 0.6)]  # overlaps the first

    monkeypatch.setattr(SamPredictor, "set_torch_image", set_torch_image)
    monkeypatch.setattr(persam.runs.local, "segment_images", segment_images)
    monkeypatch.setattr(persam.method.multi, "segment_objects", segment_objects)


@pytest.fixture
def targets(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(folder / "square.png")
    return folder


@pytest.fixture
def concept_file(tmp_path, random_vit_t_checkpoint):
    from persam.runs.key import file_sha256

    vector = torch.nn.functional.normalize(torch.randn(256, generator=torch.Generator().manual_seed(1)), dim=0)
    concept = Concept("persam", vector, vector[None].clone())
    path = tmp_path / "teapot.concept"  # no name inside: the category is the file's stem
    save_concept(concept, path, model_type="vit_t", checkpoint_sha256=file_sha256(random_vit_t_checkpoint))
    return path


def model_args(checkpoint):
    return ["--model", "vit_t", "--checkpoint", str(checkpoint), "--backend", "torch", "-q"]


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


# --------------------------------------------------------------------------------------------
# segment / apply --format coco


def test_apply_format_coco_decodes_to_the_png_masks(concept_file, targets, random_vit_t_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["apply", concept_file, targets, "--out", out, "--format", "coco", *model_args(random_vit_t_checkpoint)]
    assert run_cli(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert "coco.json" in results["files"] and results["concept_name"] == "teapot"
    text = (out / "coco.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"coco.json holds {c}"))  # strict JSON

    coco = COCO(str(out / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["teapot"]
    records = {r["name"]: r for r in results["images"]}
    images = {img["persam_name"]: img for img in coco.loadImgs(coco.getImgIds())}
    assert set(images) == {"square", "wide"}
    assert (images["wide"]["width"], images["wide"]["height"]) == (96, 64)
    assert images["wide"]["file_name"] == records["wide"]["image"]
    assert coco.getAnnIds(imgIds=[images["square"]["id"]]) == []  # not found: no annotation
    (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=[images["wide"]["id"]]))
    png = load_mask(out / "wide.png")
    assert png.any() and np.array_equal(coco.annToMask(ann).astype(bool), png)
    assert ann["area"] == int(png.sum()) and ann["bbox"] == tight_box(png)
    assert ann["score"] == records["wide"]["iou_score"] == 0.875 and ann["iscrowd"] == 0

    # a re-run with everything done writes the same file
    assert run_cli(argv) == 0
    assert (out / "coco.json").read_text() == text


def test_segment_multi_format_coco_one_annotation_per_object(targets, random_vit_t_checkpoint, tmp_path):
    ref = tmp_path / "ref.png"
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 24:72] = 255
    Image.fromarray(mask).save(ref)
    out = tmp_path / "out"
    assert run_cli(["segment", "--ref-image", targets / "wide.png", "--ref-mask", ref, targets / "square.png",
                    "--out", out, "--multi", "--format", "coco", "--name", "blob",
                    *model_args(random_vit_t_checkpoint)]) == 0
    coco = COCO(str(out / "coco.json"))
    assert [c["name"] for c in coco.dataset["categories"]] == ["blob"]
    labels = load_label_map(out / "square.png")
    anns = coco.loadAnns(coco.getAnnIds())
    assert [a["score"] for a in anns] == [0.9, 0.6]
    for k, ann in enumerate(anns, start=1):  # object k = the label PNG's pixels of label k
        assert np.array_equal(coco.annToMask(ann).astype(bool), labels == k)
        assert ann["area"] == int((labels == k).sum())
    assert set(np.unique(labels)) == {0, 1, 2}


def test_segment_category_is_the_reference_folder_when_its_name_is_a_number(targets, random_vit_t_checkpoint,
                                                                           tmp_path):
    """PerSeg's layout, Images/teapot/00.jpg: the category is teapot, not 00 (issue 23, item 10)."""
    (tmp_path / "teapot").mkdir()
    Image.open(targets / "wide.png").save(tmp_path / "teapot" / "00.png")
    ref = tmp_path / "ref.png"
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 24:72] = 255
    Image.fromarray(mask).save(ref)
    out = tmp_path / "out"
    assert run_cli(["segment", "--ref-image", tmp_path / "teapot" / "00.png", "--ref-mask", ref, targets / "square.png",
                    "--out", out, "--format", "coco", *model_args(random_vit_t_checkpoint)]) == 0
    assert [c["name"] for c in COCO(str(out / "coco.json")).dataset["categories"]] == ["teapot"]
    assert json.loads((out / "results.json").read_text())["concept_name"] == "teapot"
    from persam.data.coco import reference_category

    assert reference_category("photos/red_mug.jpg") == "red_mug"  # a name: kept
    assert reference_category("Images/cat/00.jpg") == "cat"
    assert reference_category("dog/0001-2.png") == "dog"


def test_a_coco_json_of_the_users_is_not_replaced(concept_file, targets, random_vit_t_checkpoint, tmp_path,
                                                  capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "coco.json").write_text("{}\n")
    assert run_cli(["apply", concept_file, targets / "wide.png", "--out", out, "--format", "coco",
                    *model_args(random_vit_t_checkpoint)]) == 2
    assert "coco.json" in error_line(capsys) and (out / "coco.json").read_text() == "{}\n"


def test_format_coco_without_pycocotools_says_how_to_install_it(concept_file, targets, random_vit_t_checkpoint,
                                                               tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    assert run_cli(["apply", concept_file, targets, "--out", tmp_path / "out", "--format", "coco",
                    *model_args(random_vit_t_checkpoint)]) == 2
    assert "pip install 'persam[coco]'" in error_line(capsys)


def test_learn_name_is_kept_in_the_concept(targets, random_vit_t_checkpoint, tmp_path):
    ref = tmp_path / "ref.png"
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 24:72] = 255
    Image.fromarray(mask).save(ref)
    for extra, name in (([], "mug"), (["--name", "red mug"], "red mug")):
        path = tmp_path / "mug.concept"
        assert run_cli(["learn", "--ref-image", targets / "wide.png", "--ref-mask", ref, "--out", path, *extra,
                        *model_args(random_vit_t_checkpoint)]) == 0
        assert load_concept(path).name == name


# --------------------------------------------------------------------------------------------
# the function `persam track` calls: frames as images


def test_coco_of_frames_with_track_ids(tmp_path):
    h, w = 48, 80
    first, second = disc(h, w, 20, 24, 10), disc(h, w, 50, 24, 12)
    frames = [CocoImage("00000.jpg", w, h, [(first, 0.9, {"track_id": 1}), (second, float("nan"), {"track_id": 2})],
                        {"frame_index": 0}),
              CocoImage("00001.jpg", w, h, [(np.zeros((h, w), bool), 0.5, {"track_id": 1})], {"frame_index": 1})]
    write_coco(tmp_path / "coco.json", coco_dataset(frames, "dog"))
    coco = COCO(str(tmp_path / "coco.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    assert [(a["image_id"], a["track_id"], a["score"]) for a in anns] == [(1, 1, 0.9), (1, 2, None)]  # empty: none
    assert np.array_equal(coco.annToMask(anns[0]).astype(bool), first)
    assert np.array_equal(mask_utils.decode(anns[1]["segmentation"]).astype(bool), second)
    assert coco.imgs[2]["frame_index"] == 1 and coco.getAnnIds(imgIds=[2]) == []


def test_track_format_coco(random_vit_t_checkpoint, tmp_path):
    """`persam track --format coco`: one image per processed frame, the reference frame's object
    (its mask is the reference mask) decoded back equal to its mask PNG."""
    pytest.importorskip("persam.runs.track")
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), np.uint8)).save(frames / f"f{i}.png")
    ref = tmp_path / "ref.png"
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 24:72] = 255
    Image.fromarray(mask).save(ref)
    out = tmp_path / "out"
    code = run_cli(["track", frames, "--ref-mask", ref, "--out", out, "--format", "coco", "--fps", "5",
                    *model_args(random_vit_t_checkpoint)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert "coco.json" in results["files"]
    coco = COCO(str(out / "coco.json"))
    assert [img["file_name"] for img in coco.dataset["images"]] == [str(frames / f"f{i}.png") for i in range(3)]
    assert coco.dataset["categories"][0]["name"] == "frames"
    by_frame = {r["index"]: r for r in results["frames"]}
    for image in coco.dataset["images"]:
        png = load_mask(out / by_frame[image["frame_index"]]["mask"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        decoded = np.zeros_like(png)
        for ann in anns:
            assert ann["track_id"] == 1
            decoded |= coco.annToMask(ann).astype(bool)
        assert np.array_equal(decoded, png)
    assert coco.getAnnIds(imgIds=[1]) and np.array_equal(coco.annToMask(coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]),
                                                         mask > 0)
