"""`persam eval davis --tracker sam2`: the semi-supervised protocol with SAM 2.1, set up as Meta evaluates it
(tools/vos_inference.py: no post-processing, overlapping objects to the highest logit, the lowest id first).

A two-object DAVIS folder is made from the first car-shadow frames (the car's annotation split into a left
and a right object); the label maps written must be those of Meta's SAM2VideoPredictor built as
vos_inference builds it, on the same seeded random sam2.1_hiera_t weights (input side 128 for CPU time).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cli_testing import error_line, run_cli
from conftest import DAVIS
from persam.data.io import atomic_save_png, load_label_map

SEQ = "car-shadow"
COUNT = 4
SIZE = 128


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def davis_two_objects(tmp_path_factory):
    first = DAVIS / "Annotations" / "480p" / SEQ / "00000.png"
    if not first.exists():
        pytest.skip(f"DAVIS {SEQ} is not in the shared data ({first})")
    root = tmp_path_factory.mktemp("davis2")
    frames = root / "JPEGImages" / "480p" / SEQ
    frames.mkdir(parents=True)
    for path in sorted((DAVIS / "JPEGImages" / "480p" / SEQ).glob("*.jpg"))[:COUNT]:
        shutil.copy(path, frames / path.name)
    annotations = root / "Annotations" / "480p" / SEQ
    annotations.mkdir(parents=True)
    middle = None
    for index in range(COUNT):  # the car split at the middle of its first-frame extent: ids 1 and 2
        car = np.array(Image.open(DAVIS / "Annotations" / "480p" / SEQ / f"{index:05d}.png")) == 1
        if middle is None:
            columns = np.nonzero(car.any(axis=0))[0]
            middle = (columns[0] + columns[-1]) // 2
        split = np.zeros(car.shape, dtype=np.uint8)
        split[car] = 1
        split[:, middle:][car[:, middle:]] = 2
        atomic_save_png(annotations / f"{index:05d}.png", split, palette="davis")
        if index == 0:
            labels = split
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text(f"{SEQ}\n")
    from sam2_testing import random_sam2_state

    state = random_sam2_state("sam2.1_hiera_t", seed=0)
    torch.save({"model": state}, root / "sam2.pt")
    return root, labels, state


def _meta_vos_inference(state, frames_dir, labels):
    """Meta's predictor as tools/vos_inference.py builds and runs it for DAVIS-format outputs."""
    from sam2_testing import OFFICIAL_CONFIG_FILES, import_official_sam2, skipped_weight_init

    import_official_sam2()
    from sam2.build_sam import build_sam2_video_predictor

    with skipped_weight_init():
        predictor = build_sam2_video_predictor(
            OFFICIAL_CONFIG_FILES["sam2.1_hiera_t"], ckpt_path=None, device="cpu", apply_postprocessing=False,
            hydra_overrides_extra=[f"++model.image_size={SIZE}", "++model.non_overlap_masks=true"])
    predictor.load_state_dict(state, strict=True)
    predictor.eval()
    inference = predictor.init_state(str(frames_dir))
    for object_id in (1, 2):
        predictor.add_new_mask(inference, frame_idx=0, obj_id=object_id, mask=labels == object_id)
    label_maps = {}
    for index, object_ids, logits in predictor.propagate_in_video(inference):
        merged = np.zeros(labels.shape, dtype=np.uint8)
        for k in sorted(range(len(object_ids)), key=lambda k: object_ids[k], reverse=True):  # put_per_obj_mask
            merged[(logits[k, 0] > 0).numpy()] = object_ids[k]
        label_maps[index] = merged
    return label_maps


def test_eval_davis_sam2_writes_meta_vos_inference_label_maps(davis_two_objects, tmp_path, capsys):
    root, labels, state = davis_two_objects
    out = tmp_path / "out"
    argv = ["eval", "davis", "--data", root, "--out", out, "--tracker", "sam2", "--model", "sam2.1_hiera_t",
            "--checkpoint", root / "sam2.pt", "--input-size", SIZE, "-q"]
    assert run_cli(argv) == 0
    expected = _meta_vos_inference(state, root / "JPEGImages" / "480p" / SEQ, labels)
    both = 0
    for index in range(COUNT):
        ours = load_label_map(out / "pred" / SEQ / f"{index:05d}.png")
        agree = np.mean(ours == expected[index])
        assert agree >= 0.999, f"frame {index}: {agree:.5f} of the pixels agree"
        both += set(np.unique(ours)) >= {1, 2}
    assert both >= COUNT - 1  # the comparison means something: both objects are there
    scores = json.loads((out / "scores.json").read_text())
    assert scores["method"] == "sam2" and scores["made_with"]["tracker"] == "sam2"
    assert 0.0 <= scores["summary"]["J&F"] <= 1.0
    # a second run keeps the predictions (same settings); another input size is refused without --overwrite
    assert run_cli(argv) == 0
    assert run_cli(argv[:-3] + ["--input-size", 96, "-q"]) == 2
    assert "--overwrite" in error_line(capsys)


@pytest.mark.parametrize("extra, expected", [
    (["--tracker", "sam2", "--model", "vit_t"], "--tracker sam2 takes a SAM 2.1 --model"),
    (["--model", "sam2.1_hiera_t"], "is a SAM 2.1 model: use it with --tracker sam2"),
    (["--input-size", "128"], "--input-size is for --tracker sam2"),
])
def test_eval_davis_model_of_the_other_tracker_is_refused(davis_two_objects, tmp_path, capsys, extra, expected):
    root = davis_two_objects[0]
    assert run_cli(["eval", "davis", "--data", root, "--out", tmp_path / "out", "-q", *extra]) == 2
    assert expected in error_line(capsys)
