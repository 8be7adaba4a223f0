"""Re-detection with `--tracker sam2`: an object that leaves the video for several frames and comes back is
absent while gone and found again after it returns; a concept starts SAM 2 on the first frame where the
object is present.

The video: a car-shadow frame as the background, a PerSeg cat pasted on it in some frames (moving a pixel
a frame) and not in others.  SAM 2 is real (sam2.1_hiera_t, seeded random weights at an input side of
128); the random weights chosen lose the object on every tracked frame (its object score < 0), which is
what makes re-detection necessary here.  Random SAM weights cannot recognise anything, so the concept's
judgment (ConceptFinder.find) is replaced by background subtraction: found where the frame differs from
the background.  What is tested is the tracker's logic: when the concept looks, the re-seeding, the
counting of lost frames, and the command's wiring.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cli_testing import run_cli
from conftest import DAVIS, SHARED_DATA
from persam.method.pipeline import Segmentation
from persam.method.video_sam2 import ConceptFinder, ConceptVideoTracker
from sam.sam2.video import VideoTracker

SIZE = 128
SAM2_SEED = 1  # loses the object on every tracked frame of this video
CAT = SHARED_DATA / "perseg_subset"
GONE = range(4, 10)  # frames 4..9 without the cat


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def scene():
    frames = sorted((DAVIS / "JPEGImages" / "480p" / "car-shadow").glob("*.jpg"))
    cat_image, cat_mask = CAT / "Images" / "cat" / "00.jpg", CAT / "Annotations" / "cat" / "00.png"
    if not frames or not cat_image.exists():
        pytest.skip(f"shared data missing ({DAVIS} car-shadow, {cat_image})")
    background = np.array(Image.open(frames[0]).convert("RGB").resize((160, 96)))
    cat = np.array(Image.open(cat_image).convert("RGB").resize((40, 40)))
    mask = np.array(Image.open(cat_mask).convert("L").resize((40, 40), Image.NEAREST)) > 0
    return background, cat, mask


def video(scene, present):
    """[(frame, mask)] with the cat where present[i]."""
    background, cat, cat_mask = scene
    out = []
    for index, here in enumerate(present):
        frame, mask = background.copy(), np.zeros(background.shape[:2], dtype=bool)
        if here:
            x = 40 + index
            frame[30:70, x:x + 40][cat_mask] = cat[cat_mask]
            mask[30:70, x:x + 40] = cat_mask
        out.append((frame, mask))
    return out


class BackgroundFinder:
    """Stands in for the concept: finds the object where the frame differs from the background."""

    def __init__(self, background):
        self.background = background
        self.looked = []  # (frame id, object ids) per call

    def find(self, frame, object_ids):
        self.looked.append(list(object_ids))
        mask = np.any(frame != self.background, axis=2)
        found = int(mask.sum()) > 50
        result = Segmentation(mask if found else np.zeros_like(mask), 1.0, 1.0 if found else 0.0, found,
                              np.zeros((0, 2), np.float32), np.zeros(0, np.int64))
        return {i: result for i in object_ids}


@pytest.fixture(scope="module")
def sam2_model():
    from sam2_testing import random_sam2

    model, state = random_sam2("sam2.1_hiera_t", seed=SAM2_SEED, image_size=SIZE)
    return model, state


def _run(model, frames, redetect_after, finder, seed_first=True):
    tracker = ConceptVideoTracker(VideoTracker(model), [1], (lambda: finder) if finder else None, redetect_after)
    results = []
    for index, (frame, mask) in enumerate(frames):
        seeds = {1: mask} if index == 0 and seed_first else None
        results.append(tracker.step(index, frame, seeds).objects[1])
    return results


def test_found_again_after_it_returns_absent_while_gone(sam2_model, scene):
    present = [i not in GONE for i in range(14)]
    frames = video(scene, present)
    finder = BackgroundFinder(scene[0])
    tracks = _run(sam2_model[0], frames, 2, finder)
    assert tracks[0].found and tracks[0].source == "reference"
    assert not tracks[1].found and tracks[1].object_score < 0  # SAM 2 lost it: what re-detection is for
    assert not any(tracks[i].found for i in GONE)
    assert tracks[10].found and tracks[10].source == "found"  # back: found again on its first frame
    found_mask = tracks[10].box
    assert found_mask is not None and abs(found_mask[0] - (40 + 10 + 0)) < 8
    # the concept looks only after 2 lost frames: frames 3 (found), 6..10 (gone, then back), 13
    assert len(finder.looked) == sum(1 for t in tracks if t.peak_similarity is not None) == 7
    assert [i for i, t in enumerate(tracks) if t.found] == [0, 3, 10, 13]


def test_without_redetection_the_object_stays_lost(sam2_model, scene):
    frames = video(scene, [i not in GONE for i in range(14)])
    finder = BackgroundFinder(scene[0])
    tracks = _run(sam2_model[0], frames, None, finder)
    assert [i for i, t in enumerate(tracks) if t.found] == [0]
    assert finder.looked == []


def test_a_concept_starts_sam2_where_the_object_first_is(sam2_model, scene):
    frames = video(scene, [False, False, True, True])
    finder = BackgroundFinder(scene[0])
    tracks = _run(sam2_model[0], frames, 5, finder, seed_first=False)
    assert [t.source for t in tracks] == ["waiting", "waiting", "found", "tracked"]
    assert tracks[2].found and tracks[2].object_score > 0


def test_the_command_re_detects_from_a_mask_on_a_frame(sam2_model, scene, tmp_path, monkeypatch):
    from conftest import write_random_checkpoint

    frames = video(scene, [i not in GONE for i in range(14)])
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, (frame, _) in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index:05d}.png")
    Image.fromarray(frames[0][1].astype(np.uint8) * 255).save(tmp_path / "mask.png")
    torch.save({"model": sam2_model[1]}, tmp_path / "sam2.pt")
    sam_checkpoint = write_random_checkpoint(tmp_path / "vit_t.pt")
    stand_in = BackgroundFinder(scene[0])
    monkeypatch.setattr(ConceptFinder, "find", lambda self, frame, ids: stand_in.find(frame, ids))
    out = tmp_path / "out"
    argv = ["track", folder, "--tracker", "sam2", "--checkpoint", tmp_path / "sam2.pt", "--input-size", SIZE,
            "--ref-mask", tmp_path / "mask.png", "--sam-checkpoint", sam_checkpoint, "--redetect-after", 2,
            "--out", out, "-q"]
    assert run_cli(argv) == 0
    data = json.loads((out / "results.json").read_text())
    found = [r["index"] for r in data["frames"] if r["objects"][0]["found"]]
    assert found == [0, 3, 10, 13]
    assert data["frames"][10]["objects"][0]["source"] == "found"
    assert data["made_with"]["redetect_after"] == 2 and data["made_with"]["concept_model"] == "vit_t"
    assert data["summary"]["found"] == {"1": 4}


def test_the_command_starts_from_a_concept_where_the_object_first_is(sam2_model, scene, tmp_path, monkeypatch):
    from conftest import write_random_checkpoint
    from persam.data.concept import save_concept
    from persam.method.video import learn_concepts
    from persam.runs.key import file_sha256
    from sam.build import build_sam
    from sam.predictor import SamPredictor

    frames = video(scene, [False, False, True, True, True])
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, (frame, _) in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index:05d}.png")
    sam_checkpoint = write_random_checkpoint(tmp_path / "vit_t.pt")
    predictor = SamPredictor(build_sam("vit_t", sam_checkpoint))
    concept = learn_concepts(predictor, frames[2][0], {1: frames[2][1]})[1]
    save_concept(concept, tmp_path / "cat.concept", "vit_t", file_sha256(sam_checkpoint))
    torch.save({"model": sam2_model[1]}, tmp_path / "sam2.pt")
    stand_in = BackgroundFinder(scene[0])
    monkeypatch.setattr(ConceptFinder, "find", lambda self, frame, ids: stand_in.find(frame, ids))
    out = tmp_path / "out"
    argv = ["track", folder, "--tracker", "sam2", "--checkpoint", tmp_path / "sam2.pt", "--input-size", SIZE,
            "--concept", tmp_path / "cat.concept", "--sam-checkpoint", sam_checkpoint, "--out", out, "-q"]
    assert run_cli(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["objects"][0]["source"] for r in data["frames"]] == ["waiting", "waiting", "found", "tracked", "tracked"]
    assert [r["objects"][0]["found"] for r in data["frames"]] == [False, False, True, False, False]
    assert data["made_with"]["redetect_after"] == 10 and data["min_similarity"] == 0.6


def test_memory_stays_bounded_when_the_object_is_found_again_and_again(scene):
    """Re-seeded every other frame for 100 frames: the conditioning frames kept stay at the bound (16)."""
    from sam2_testing import random_sam2

    model, _ = random_sam2("sam2.1_hiera_t", seed=SAM2_SEED, image_size=64)
    frames = video(scene, [True] * 2)
    finder = BackgroundFinder(scene[0])
    tracker = ConceptVideoTracker(VideoTracker(model), [1], lambda: finder, redetect_after=1)
    held = []
    for index in range(100):
        frame, mask = frames[index % 2]
        tracker.step(index, frame, {1: mask} if index == 0 else None)
        held.append(len(tracker.video.held_tensors()))
    bank = tracker.video.banks[1]
    assert len(finder.looked) >= 45  # it was lost and found again about every other frame
    assert len(bank.conditioning) == 16
    assert max(held[75:]) == max(held[50:75]) and min(held[75:]) == min(held[50:75])  # no growth
