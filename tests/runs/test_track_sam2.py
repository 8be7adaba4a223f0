"""`persam track --tracker sam2` end to end: the masks of Meta's SAM2VideoPredictor on the first car-shadow
frames (seeded random sam2.1_hiera_t weights, hole filling off), resume with the same masks, --every with
a reference frame that is not processed, results.json, --format coco, and the flags refused in one line.

The model runs at an input side of 256 (PERSAM_SAM2_CLI_SIZE) to keep CPU time down: every step is the
same at 1024 (tests/sam/test_sam2_video.py checks the model at 512, and at 1024 on request).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cli_testing import error_line, run_cli
from conftest import DAVIS
from persam.data.io import load_mask

SEQ = "car-shadow"
FRAMES = DAVIS / "JPEGImages" / "480p" / SEQ
FIRST_MASK = DAVIS / "Annotations" / "480p" / SEQ / "00000.png"
SIZE = int(os.environ.get("PERSAM_SAM2_CLI_SIZE", "256"))
COUNT = 6


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """The first COUNT car-shadow frames as a folder, object 1's first-frame mask (0/255) and a random
    sam2.1_hiera_t checkpoint ({"model": state}, Meta's layout) with its weights."""
    from sam2_testing import random_sam2_state

    if not FIRST_MASK.exists():
        pytest.skip(f"DAVIS {SEQ} is not in the shared data ({FIRST_MASK})")
    root = tmp_path_factory.mktemp("sam2clip")
    frames = root / "frames"
    frames.mkdir()
    for path in sorted(FRAMES.glob("*.jpg"))[:COUNT]:
        shutil.copy(path, frames / path.name)
    mask = np.array(Image.open(FIRST_MASK)) == 1
    Image.fromarray(mask.astype(np.uint8) * 255).save(root / "first.png")
    state = random_sam2_state("sam2.1_hiera_t", seed=0)
    torch.save({"model": state}, root / "sam2_random.pt")
    return {"frames": frames, "mask": root / "first.png", "checkpoint": root / "sam2_random.pt", "state": state,
            "first": mask}


def _track(clip, out, *extra):
    return run_cli(["track", clip["frames"], "--tracker", "sam2", "--model", "sam2.1_hiera_t", "--checkpoint",
                    clip["checkpoint"], "--ref-mask", clip["mask"], "--out", out, "--input-size", SIZE,
                    "--fill-holes", 0, "-q", *extra])


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 1.0


@pytest.fixture(scope="module")
def meta_masks(clip, tmp_path_factory):
    """Meta's predictor on the same folder: init_state, add_new_mask on frame 0, propagate_in_video."""
    from sam2_testing import import_official_sam2, official_sam2_model

    import_official_sam2()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predictor = official_sam2_model("sam2.1_hiera_t", clip["state"], video=True, image_size=SIZE)
        predictor.fill_hole_area = 0
        state = predictor.init_state(str(clip["frames"]))
        predictor.add_new_mask(state, frame_idx=0, obj_id=1, mask=clip["first"])
        return {index: (logits[0, 0] > 0).numpy() for index, _, logits in predictor.propagate_in_video(state)}
    finally:
        torch.set_num_threads(threads)  # a module fixture: the tests after this module keep their threads


@pytest.fixture(scope="module")
def tracked(clip, meta_masks, tmp_path_factory):
    out = tmp_path_factory.mktemp("sam2run") / "out"
    assert _track(clip, out) == 0
    return out


def test_masks_equal_meta_video_predictor(tracked, meta_masks):
    assert sorted(meta_masks) == list(range(COUNT))
    seen = 0
    for index, expected in meta_masks.items():
        ours = load_mask(tracked / f"{index:05d}.png")
        assert ours.shape == expected.shape
        assert _iou(ours, expected) >= 0.99, f"frame {index}: IoU {_iou(ours, expected):.4f}"
        seen += bool(expected.any())
    assert seen >= COUNT - 1  # the comparison means something: this random model keeps the car


def test_results_json_says_what_sam2_did(tracked, clip):
    data = json.loads((tracked / "results.json").read_text())
    assert data["tracker"] == "sam2" and data["model_type"] == "sam2.1_hiera_t"
    assert data["made_with"]["tracker"] == "sam2" and data["made_with"]["fill_holes"] == 0
    assert len(data["frames"]) == COUNT
    first = data["frames"][0]
    assert first["reference"] and first["objects"][0]["source"] == "reference"
    for record in data["frames"][1:]:
        obj = record["objects"][0]
        assert obj["source"] == "tracked" and isinstance(obj["object_score"], float)
        mask = load_mask(tracked / record["mask"])
        assert obj["found"] == bool(mask.any()) == (obj["object_score"] > 0)
        if obj["found"]:
            ys, xs = np.nonzero(mask)
            assert obj["box"] == [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    assert (tracked / data["overlay"]["file"]).is_file()


def test_an_interrupted_run_resumes_with_the_same_masks(tracked, clip, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tracked, out)
    data = json.loads((out / "results.json").read_text())
    data["frames"] = data["frames"][:3]  # frames 3.. were never done
    (out / "results.json").write_text(json.dumps(data))
    for index in range(3, COUNT):
        (out / f"{index:05d}.png").unlink()
    before = {i: (out / f"{i:05d}.png").stat().st_mtime_ns for i in range(3)}
    assert _track(clip, out) == 0
    for index in range(COUNT):
        assert np.array_equal(load_mask(out / f"{index:05d}.png"), load_mask(tracked / f"{index:05d}.png")), index
    assert {i: (out / f"{i:05d}.png").stat().st_mtime_ns for i in range(3)} == before  # not rewritten


def test_every_other_frame_from_a_reference_frame_not_processed(clip, tmp_path):
    out = tmp_path / "out"
    assert _track(clip, out, "--every", 2, "--start", 1, "--redetect-after", 0, "--format", "coco") == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["index"] for r in data["frames"]] == [1, 3, 5]
    assert not any(r["reference"] for r in data["frames"])  # frame 0 went to SAM 2, unwritten
    assert not (out / "00000.png").exists()
    assert data["made_with"]["redetect_after"] is None
    coco = json.loads((out / "coco.json").read_text())
    assert len(coco["images"]) == 3


@pytest.mark.parametrize("extra, expected", [
    (["--tracker", "sam2", "--model", "vit_t"], "--tracker sam2 takes a SAM 2.1 --model"),
    (["--model", "sam2.1_hiera_t"], "is a SAM 2.1 model: use it with --tracker sam2"),
    (["--redetect-after", "3"], "--redetect-after is for --tracker sam2"),
    (["--tracker", "sam2", "--input-size", "100"], "multiple of 32"),
    (["--tracker", "sam2", "--precision", "fp16"], "fp16"),
])
def test_flags_of_the_other_tracker_are_refused_in_one_line(clip, tmp_path, capsys, extra, expected):
    argv = ["track", clip["frames"], "--ref-mask", clip["mask"], "--out", tmp_path / "out", "-q",
            "--checkpoint", clip["checkpoint"], *extra]
    assert run_cli(argv) == 2
    assert expected in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_concept_without_sam_checkpoint_is_refused(clip, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "empty-cache"))
    argv = ["track", clip["frames"], "--tracker", "sam2", "--checkpoint", clip["checkpoint"], "--ref-point", "300,300",
            "--out", tmp_path / "out", "-q"]
    assert run_cli(argv) == 2
    assert "SAM makes the mask from the clicks / box with SAM vit_t" in error_line(capsys)
