"""`persam track --method gfsam` and `persam track --concept GFSAM.concept` (issue 25): GF-SAM on each
frame on its own, in persam.runs.track's frame loop (persam.runs.track_gfsam).

On five small frames (PerSeg cats and DAVIS car-shadow, 96 x 96) in a lossless video, random vit_t SAM weights and a random
DINOv2 ViT-S/14; as tests/cli/test_gfsam_cli.py, GF-SAM gets 8 prompt points and a 10 x 10 DINOv2 grid
(patched into the command's settings) and each SAM input is encoded once (memoized_encoder).  What is
asserted: every written mask is GFSAM.segment's union on the same decoded frame, the records say what
was found, an interrupted run resumes with the same masks, and several objects are refused in one line.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from cli_testing import error_line, memoized_encoder, run_cli, strict_json
from conftest import DAVIS, PERSEG
from persam.data.io import load_image, load_mask
from sam_testing import random_state_dict

CAR = sorted((DAVIS / "JPEGImages" / "480p" / "car-shadow").glob("*.jpg"))
SIZE = (96, 96)  # width, height of the clip
# the clip: PerSeg cats 00, 01, car-shadow 0, cat 02, car-shadow 10 (with these random weights GF-SAM
# finds the cat in the cat frames, and answers "not found" on car-shadow 0)
CLIP = (("cat", 0), ("cat", 1), ("car", 0), ("cat", 2), ("car", 10))
COUNT = len(CLIP)
SETTINGS = dict(max_points=8, dinov2_side=140)  # as patched into the runs below


@contextlib.contextmanager
def small_gfsam_runs():
    """A 10 x 10 DINOv2 grid in the GF-SAM runs of the command; each SAM input encoded once."""
    from persam.cli import gfsam_command

    original = gfsam_command.gfsam_settings
    with pytest.MonkeyPatch.context() as mp, memoized_encoder():
        mp.setattr(gfsam_command, "gfsam_settings",
                   lambda args, recorded=None: replace(original(args, recorded), dinov2_side=140))
        yield


@pytest.fixture(autouse=True)
def small_gfsam():
    with small_gfsam_runs():
        yield


@pytest.fixture(scope="module")
def dinov2_checkpoint(tmp_path_factory):
    from sam.dinov2 import build_dinov2

    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(random_state_dict(build_dinov2("vits14"), seed=4), path)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(video path, its decoded frames, reference image path, reference mask path): frame 0 and its mask
    are also written as PNGs (the reference of --ref-image / learn)."""
    if not CAR or not (PERSEG / "Images" / "cat").is_dir():
        pytest.skip(f"shared data not found at {DAVIS} / {PERSEG}")
    root = tmp_path_factory.mktemp("clip")
    photos = [load_image(PERSEG / "Images" / "cat" / f"{i:02d}.jpg") if kind == "cat" else load_image(CAR[i])
              for kind, i in CLIP]
    frames = [cv2.resize(photo, SIZE, interpolation=cv2.INTER_AREA) for photo in photos]
    video = root / "clip.mkv"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 24.0, SIZE)
    assert writer.isOpened()
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    capture, decoded = cv2.VideoCapture(str(video)), []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        decoded.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    assert len(decoded) == COUNT and all(np.array_equal(a, b) for a, b in zip(decoded, frames))
    Image.fromarray(decoded[0]).save(root / "ref.png")
    mask = load_mask(PERSEG / "Annotations" / "cat" / "00.png").astype(np.uint8) * 255
    mask = cv2.resize(mask, SIZE, interpolation=cv2.INTER_NEAREST)
    Image.fromarray(mask).save(root / "ref_mask.png")
    return video, decoded, root / "ref.png", root / "ref_mask.png"


def gfsam_args(sam_checkpoint, dinov2_checkpoint):
    return ["--dinov2", "vits14", "--dinov2-checkpoint", dinov2_checkpoint, "--max-points", "8",
            "--model", "vit_t", "--checkpoint", sam_checkpoint, "-q"]


@pytest.fixture(scope="module")
def expected(clip, random_vit_t_checkpoint, dinov2_checkpoint):
    """GFSAM.segment on every decoded frame, the concept learned from frame 0 and its mask."""
    from persam.method.gfsam import GFSAM, GFSAMSettings
    from persam.runs.models import build_dinov2_features, build_predictor

    _, frames, _, mask_path = clip
    predictor = build_predictor("vit_t", random_vit_t_checkpoint, "cpu", "fp32", "torch")
    dinov2 = build_dinov2_features("vits14", dinov2_checkpoint, "cpu", "fp32", "torch")
    gfsam = GFSAM(predictor, dinov2, GFSAMSettings(**SETTINGS))
    with memoized_encoder():
        concept = gfsam.learn(frames[0], load_mask(mask_path))
        return [gfsam.segment(frame, concept) for frame in frames]


@pytest.fixture(scope="module")
def tracked(clip, random_vit_t_checkpoint, dinov2_checkpoint, tmp_path_factory):
    """`persam track --method gfsam --ref-mask` on frame 0 (the default reference frame): the output folder."""
    video, _, _, mask_path = clip
    out = tmp_path_factory.mktemp("tracked")
    with small_gfsam_runs():
        assert run_cli(["track", video, "--method", "gfsam", "--ref-mask", mask_path, "--out", out,
                        *gfsam_args(random_vit_t_checkpoint, dinov2_checkpoint)]) == 0
    return out


def test_ref_mask_run_writes_gfsam_union_per_frame(tracked, clip, expected, dinov2_checkpoint):
    from persam.runs.key import file_sha256

    _, frames, _, mask_path = clip
    assert sorted(p.name for p in tracked.glob("*.png")) == [f"{i:05d}.png" for i in range(COUNT)]
    assert np.array_equal(load_mask(tracked / "00000.png"), load_mask(mask_path))  # the reference itself
    # the comparisons below see frames found and not found
    assert any(found.mask.any() for found in expected[1:]) and not all(found.found for found in expected[1:])
    results = strict_json(tracked / "results.json")
    assert results["method"] == "gfsam" and results["dinov2"] == "vits14" and results["objects"] == [1]
    made_with = results["made_with"]
    assert made_with["method"] == "gfsam" and made_with["dinov2"] == "vits14"
    assert made_with["dinov2_sha256"] == file_sha256(dinov2_checkpoint) and made_with["use_previous_box"] is False
    assert made_with["gfsam"]["max_points"] == 8 and made_with["gfsam"]["dinov2_side"] == 140
    records = {r["index"]: r for r in results["frames"]}
    assert records[0]["reference"] is True and records[0]["objects"][0]["instances"] is None
    for i in range(1, COUNT):
        found = expected[i]
        mask = load_mask(tracked / f"{i:05d}.png")
        assert np.array_equal(mask, found.mask), f"frame {i}"
        (entry,) = records[i]["objects"]
        assert entry["found"] == bool(found.mask.any()) and records[i]["encode_s"] is None
        assert entry["score"] == entry["peak_similarity"] == entry["iou_score"] == round(found.score, 5)
        assert entry["instances"] == (len(found.instances) if found.found else 0) and entry["area"] == mask.sum()
        if entry["found"]:
            ys, xs = np.nonzero(mask)
            assert entry["box"] == [xs.min(), ys.min(), xs.max(), ys.max()]
    assert (tracked / "overlay.mp4").is_file() or (tracked / "overlay.webm").is_file()


def test_concept_run_gives_the_same_masks(tracked, clip, expected, random_vit_t_checkpoint, dinov2_checkpoint,
                                          tmp_path, capsys):
    video, _, ref_image, mask_path = clip
    concept = tmp_path / "cat.concept"
    args = gfsam_args(random_vit_t_checkpoint, dinov2_checkpoint)
    assert run_cli(["learn", "--method", "gfsam", "--ref-image", ref_image, "--ref-mask", mask_path, "--out", concept,
                    *args]) == 0
    out = tmp_path / "out"
    argv = ["track", video, "--concept", concept, "--out", out, *args]
    assert run_cli(argv) == 0
    results = strict_json(out / "results.json")
    assert results["method"] == "gfsam" and not any(r["reference"] for r in results["frames"])
    for i in range(COUNT):  # frame 0 too: a concept has no reference frame
        assert np.array_equal(load_mask(out / f"{i:05d}.png"), expected[i].mask), f"frame {i}"
    capsys.readouterr()
    assert run_cli(argv) == 0  # done: skipped
    assert "already done" in capsys.readouterr().err
    assert run_cli([*argv, "--method", "persam"]) == 2  # the concept decides the method
    assert "gfsam concept" in error_line(capsys)


def test_click_on_a_reference_image(clip, random_vit_t_checkpoint, dinov2_checkpoint, tmp_path, monkeypatch):
    """SAM makes the reference mask from a click on --ref-image (saved), GF-SAM learns from it; every frame
    is segmented (none is the reference).  Random SAM weights find nothing at a click, so SAM's answer
    is the PerSeg mask here (the click is checked to reach it)."""
    from persam.method import target
    from persam.method.gfsam import GFSAM, GFSAMSettings
    from persam.runs.models import build_dinov2_features, build_predictor

    video, frames, ref_image, mask_path = clip
    ys, xs = np.nonzero(load_mask(mask_path))
    point = f"{int(xs.mean())},{int(ys.mean())}"
    clicks = []

    def sam_mask(predictor, points=None, box=None):
        clicks.append((points, box))
        return load_mask(mask_path)

    monkeypatch.setattr(target, "reference_mask_from_prompts", sam_mask)
    out = tmp_path / "out"
    assert run_cli(["track", video, "--method", "gfsam", "--ref-image", ref_image, "--ref-point", point, "--out", out,
                    *gfsam_args(random_vit_t_checkpoint, dinov2_checkpoint)]) == 0
    assert len(clicks) == 1 and [list(p) for p in clicks[0][0]] == [[int(xs.mean()), int(ys.mean())]]
    made = load_mask(out / "reference_mask.png")
    assert np.array_equal(made, load_mask(mask_path))
    results = strict_json(out / "results.json")
    assert "reference_mask.png" in results["files"] and not any(r["reference"] for r in results["frames"])
    predictor = build_predictor("vit_t", random_vit_t_checkpoint, "cpu", "fp32", "torch")
    dinov2 = build_dinov2_features("vits14", dinov2_checkpoint, "cpu", "fp32", "torch")
    gfsam = GFSAM(predictor, dinov2, GFSAMSettings(**SETTINGS))
    concept = gfsam.learn(load_image(ref_image), made)
    for i, frame in enumerate(frames):
        assert np.array_equal(load_mask(out / f"{i:05d}.png"), gfsam.segment(frame, concept).mask), f"frame {i}"


def test_interrupted_run_resumes_with_the_same_masks(tracked, clip, random_vit_t_checkpoint, dinov2_checkpoint,
                                                     tmp_path, monkeypatch, capsys):
    from persam.method.video_gfsam import GFSAMFrameTracker

    video, _, _, mask_path = clip
    original, calls = GFSAMFrameTracker.track, []

    def track(self, frame):
        calls.append(1)
        if len(calls) == 3:  # frame 3 (frame 0 is the reference mask)
            raise KeyboardInterrupt
        return original(self, frame)

    monkeypatch.setattr(GFSAMFrameTracker, "track", track)
    argv = ["track", video, "--method", "gfsam", "--ref-mask", mask_path, "--out", tmp_path,
            *gfsam_args(random_vit_t_checkpoint, dinov2_checkpoint)]
    assert run_cli(argv) == 130
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"{i:05d}.png" for i in range(3)]
    capsys.readouterr()
    assert run_cli(argv) == 0
    assert "resuming at frame 3" in capsys.readouterr().err
    assert len(calls) == 3 + 2  # frames 3 and 4 only
    for i in range(COUNT):
        assert np.array_equal(load_mask(tmp_path / f"{i:05d}.png"), load_mask(tracked / f"{i:05d}.png")), f"frame {i}"
    assert [r["index"] for r in strict_json(tmp_path / "results.json")["frames"]] == list(range(COUNT))


@pytest.mark.parametrize("extra, says", [
    (["--ref-labels", "MASK"], "--ref-labels"),
    (["--ref-mask", "MASK", "--tracker", "sam2"], "--tracker sam2"),
    (["--ref-mask", "MASK", "--finetune"], "--finetune"),
])
def test_refused_in_one_line(clip, random_vit_t_checkpoint, dinov2_checkpoint, tmp_path, capsys, extra, says):
    video, _, _, mask_path = clip
    extra = [mask_path if a == "MASK" else a for a in extra]
    args = gfsam_args(random_vit_t_checkpoint, dinov2_checkpoint)
    if "--tracker" in extra:
        args = args[:args.index("--model")] + ["-q"]  # the SAM 2 tracker's own --model
    assert run_cli(["track", video, "--method", "gfsam", *extra, "--out", tmp_path / "out", *args]) == 2
    line = error_line(capsys)
    assert says in line and "gfsam" in line
    assert not (tmp_path / "out").exists()


def test_dinov2_flags_need_gfsam(clip, random_vit_t_checkpoint, dinov2_checkpoint, tmp_path, capsys):
    video, _, _, mask_path = clip
    assert run_cli(["track", video, "--ref-mask", mask_path, "--dinov2-checkpoint", dinov2_checkpoint,
                    "--out", tmp_path / "out", "--model", "vit_t", "--checkpoint", random_vit_t_checkpoint]) == 2
    assert "--method gfsam" in error_line(capsys)
