"""The streaming SAM 2.1 video tracker: the same masks as Meta's SAM2VideoPredictor on DAVIS frames
(seeded random sam2.1_hiera_t weights), several objects, bad input, and a memory bank that stays
bounded however long the video.

The parity test runs at an input side of 512 by default to keep CPU time down (SAM 2.1's checkpoints
run at 1024; every step is the same at both sizes). PERSAM_SAM2_PARITY_SIZE=1024 and
PERSAM_SAM2_PARITY_FRAMES=8 run it as the fidelity bar states it.
"""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sam.sam2.video import VideoInputError, VideoTracker
from conftest import DAVIS

PARITY_SIZE = int(os.environ.get("PERSAM_SAM2_PARITY_SIZE", "512"))
PARITY_FRAMES = int(os.environ.get("PERSAM_SAM2_PARITY_FRAMES", "6"))
SEQUENCE = "car-shadow"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def tiny_model():
    """Seeded random sam2.1_hiera_t at an input side of 64 (a 4 x 4 feature grid): fast steps."""
    from sam2_testing import random_sam2

    model, _ = random_sam2("sam2.1_hiera_t", seed=1, image_size=64)
    return model


def _davis_frames(count):
    frames_dir = DAVIS / "JPEGImages" / "480p" / SEQUENCE
    first_mask = DAVIS / "Annotations" / "480p" / SEQUENCE / "00000.png"
    if not first_mask.exists():
        pytest.skip(f"DAVIS {SEQUENCE} is not in the shared data ({first_mask})")
    paths = sorted(frames_dir.glob("*.jpg"))[:count]
    return paths, np.array(Image.open(first_mask)) == 1


def _meta_predictions(variant, state, frame_paths, mask, tmp_path, image_size):
    """Meta's predictor on a folder of the frames: video-size logits and object-score logit per frame."""
    from sam2_testing import official_sam2_model

    predictor = official_sam2_model(variant, state, video=True, image_size=image_size)
    predictor.fill_hole_area = 0  # its hole filling is a CUDA extension; parity is with it off
    folder = tmp_path / "frames"
    folder.mkdir()
    for path in frame_paths:
        shutil.copy(path, folder / path.name)
    inference_state = predictor.init_state(str(folder))
    predictor.add_new_mask(inference_state, frame_idx=0, obj_id=1, mask=mask)
    logits, scores = [], []
    outputs = inference_state["output_dict_per_obj"][0]
    for frame_index, _, video_res_masks in predictor.propagate_in_video(inference_state):
        logits.append(video_res_masks[0, 0].float().numpy())
        out = outputs["cond_frame_outputs"].get(frame_index) or outputs["non_cond_frame_outputs"][frame_index]
        scores.append(float(out["object_score_logits"].item()))
    return logits, scores


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 1.0


def _ours(model, frame_paths, mask, video_length):
    tracker = VideoTracker(model, device="cpu", video_length=video_length, fill_hole_area=0)
    results = []
    for index, path in enumerate(frame_paths):
        frame = np.array(Image.open(path).convert("RGB"))
        if index == 0:
            results.append(tracker.start(frame, mask))
        else:
            results.append(tracker.track(index, frame)[1])
    return results, tracker


@pytest.mark.parametrize("image_size, seed, num_frames, object_seen", [
    (PARITY_SIZE, 0, PARITY_FRAMES, True),  # the fidelity bar (at 512 by default, see above)
    (128, 0, 20, True),  # past the memory window (6 frames) and the object-pointer window (15 frames)
    (128, 1, 8, False),  # this random model loses the object: the "no object" pointer and memory paths
])
def test_tracker_matches_meta_video_predictor(tmp_path, image_size, seed, num_frames, object_seen):
    from sam2_testing import import_official_sam2, random_sam2

    import_official_sam2()
    frame_paths, mask = _davis_frames(num_frames)
    model, state = random_sam2("sam2.1_hiera_t", seed=seed, image_size=image_size)
    expected_logits, expected_scores = _meta_predictions("sam2.1_hiera_t", state, frame_paths, mask, tmp_path, image_size)
    ours, _ = _ours(model, frame_paths, mask, video_length=len(frame_paths))
    assert len(ours) == len(expected_logits) == len(frame_paths)
    for index, (result, logits, score) in enumerate(zip(ours, expected_logits, expected_scores)):
        assert result.mask_logits.shape == mask.shape
        difference = np.abs(result.mask_logits - logits).max()
        assert difference < 1e-3, f"frame {index}: logits differ by {difference}"
        assert _iou(result.mask, logits > 0) >= 0.99, f"frame {index}: IoU {_iou(result.mask, logits > 0)}"
        assert abs(result.object_score - score) < 1e-3, f"frame {index}: object score {result.object_score} vs {score}"
    # the comparison means something: on tracked frames the object is seen with a real mask (neither empty
    # nor the whole frame), or, for the model that loses it, it is absent on every tracked frame
    tracked = ours[1:]
    if object_seen:
        assert all(r.present and 0 < r.mask.sum() < r.mask.size for r in tracked)
    else:
        assert not any(r.present or r.mask.any() for r in tracked)


def test_memory_stays_bounded_over_a_long_stream(tiny_model):
    model = tiny_model
    generator = np.random.default_rng(0)
    frame = generator.integers(0, 255, size=(24, 32, 3), dtype=np.uint8)
    mask = np.zeros((24, 32), dtype=bool)
    mask[6:18, 8:24] = True
    tracker = VideoTracker(model)
    tracker.start(frame, mask)
    counts = []
    for index in range(1, 100):
        frame = np.roll(frame, 1, axis=1)
        tracker.track(index, frame)
        counts.append(len(tracker.held_tensors()))
    bank = tracker.banks[1]
    num_maskmem = tracker.tracker.num_maskmem
    held_memories = [e for e in list(bank.conditioning.values()) + list(bank.recent.values()) if e.features is not None]
    assert len(held_memories) <= num_maskmem  # the conditioning frame + the last num_maskmem - 1 frames
    assert len(bank.recent) <= tracker.tracker.settings.max_object_pointers - 1
    assert max(counts[30:]) == min(counts[30:])  # flat once the windows are full


def test_several_objects_and_a_reseed_keep_their_own_memory(tiny_model):
    model = tiny_model
    generator = np.random.default_rng(1)
    frames = [generator.integers(0, 255, size=(24, 32, 3), dtype=np.uint8) for _ in range(5)]
    left = np.zeros((24, 32), dtype=bool)
    left[4:20, 2:12] = True
    right = np.zeros((24, 32), dtype=bool)
    right[4:20, 20:30] = True
    tracker = VideoTracker(model, max_conditioning_frames=2)
    first = tracker.step(0, frames[0], {1: left})
    assert set(first) == {1} and _iou(first[1].mask, left) > 0.7  # a conditioning frame outputs its mask
    second = tracker.add_mask(1, frames[1], right, object_id=2)
    assert set(second) == {1, 2} and _iou(second[2].mask, right) > 0.7
    tracker.track(2, frames[2])
    tracker.add_mask(3, frames[3], left, object_id=2)  # re-seed object 2
    fourth = tracker.track(4, frames[4])
    assert set(fourth) == {1, 2}
    assert sorted(tracker.banks[1].conditioning) == [0] and sorted(tracker.banks[2].conditioning) == [1, 3]
    # alone, object 1 gets the same result: objects do not see each other's memory
    alone = VideoTracker(model)
    alone.start(frames[0], left)
    for index in range(1, 5):
        result = alone.track(index, frames[index])[1]
    assert np.allclose(result.mask_logits, fourth[1].mask_logits, atol=1e-5)


def test_bad_input_is_refused_with_one_clear_line(tiny_model):
    model = tiny_model
    frame = np.zeros((24, 32, 3), dtype=np.uint8)
    tracker = VideoTracker(model)
    with pytest.raises(VideoInputError, match="needs an object's mask"):
        tracker.track(0, frame)
    with pytest.raises(VideoInputError, match="mask is"):
        tracker.start(frame, np.ones((10, 10), dtype=bool))
    with pytest.raises(VideoInputError, match="RGB uint8"):
        tracker.start(frame.astype(np.float32), np.ones((24, 32), dtype=bool))
    tracker.start(frame, np.ones((24, 32), dtype=bool), frame_index=5)
    with pytest.raises(VideoInputError, match="in order"):
        tracker.track(5, frame)


def test_hole_filling_changes_only_small_background_islands(tiny_model):
    model = tiny_model
    frame = np.full((32, 32, 3), 128, dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=bool)
    mask[4:28, 4:28] = True
    mask[14:18, 14:18] = False  # 4 x 4 at the video size: about 2 x 2 of the 16 x 16 logits
    plain = VideoTracker(model, fill_hole_area=0).start(frame, mask)
    filled = VideoTracker(model, fill_hole_area=8).start(frame, mask)
    assert not plain.mask[15, 15] and filled.mask[15, 15]
    assert np.array_equal(plain.mask[:4], filled.mask[:4])
    assert torch.is_tensor(torch.from_numpy(filled.mask_logits))


def test_bf16_tracks_close_to_fp32_and_fp16_is_refused_on_a_cpu():
    """precision="bf16" runs the steps under bfloat16 autocast: the masks stay close to fp32's (not equal)."""
    from sam2_testing import random_sam2

    # Random weights magnify rounding; at 512 px the masks of seed 0 are real (about half the frame) and bf16's
    # stay within IoU 0.99 of fp32's (at 1024, 7 frames: 0.993 or more).
    model, _ = random_sam2("sam2.1_hiera_t", seed=0, image_size=512)
    paths, mask = _davis_frames(4)
    frames = [np.array(Image.open(p).convert("RGB")) for p in paths]

    def masks(precision):
        tracker = VideoTracker(model, "cpu", fill_hole_area=0, precision=precision)
        tracker.start(frames[0], mask)
        return [tracker.track(i, f)[1] for i, f in enumerate(frames[1:], start=1)]

    full, half = masks("fp32"), masks("bf16")
    for a, b in zip(full, half):
        assert a.mask.sum() > 1000  # a real mask, not an empty one that trivially agrees
        iou = np.logical_and(a.mask, b.mask).sum() / np.logical_or(a.mask, b.mask).sum()
        assert iou > 0.98 and (np.sign(a.object_score) == np.sign(b.object_score))
        assert not np.array_equal(a.mask_logits, b.mask_logits)  # bf16 really ran
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        VideoTracker(model, "cpu", precision="fp16")
