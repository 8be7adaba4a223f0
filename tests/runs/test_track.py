"""`persam track` (persam.runs.track) end to end, on videos built with OpenCV from the shared car-shadow frames.

The CLI is called in-process (persam.cli.commands.main) with MobileSAM (vit_t) checkpoints of random weights.
vit_t takes seconds per frame on a CPU whatever the frame size (the encoder input is always 1024),
so one run covers all 40 frames (`tracked`, shared by the tests that need the whole sequence) and
the other runs use a few frames.  The image encoder's output is memoised per image content for the
module (the same features as encoding again): every `set_torch_image` call is still counted, and a
frame seen by an earlier run costs only the decoder.
"""

from __future__ import annotations

import hashlib
import json
import math

import cv2
import numpy as np
import pytest
import torch

from cli_testing import error_line, model_args, run_cli, strict_json
from conftest import DAVIS
from persam.data.io import load_image, load_label_map, load_mask
from sam.predictor import SamPredictor

SEQ = "car-shadow"
FRAMES = DAVIS / "JPEGImages" / "480p" / SEQ
ANNOTATIONS = DAVIS / "Annotations" / "480p" / SEQ
SMALL = (214, 120)  # width, height of the downscaled clips


# --------------------------------------------------------------------------------------------
# the encoder: memoised per content, every call counted


class Encoder:
    def __init__(self):
        self.cache = {}
        self.calls = []  # content digest per set_torch_image call
        self.interrupt_at = None  # raise KeyboardInterrupt at this call number (1-based)

    def take(self):
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture(scope="module", autouse=True)
def encoder():
    state = Encoder()
    original = SamPredictor.set_torch_image

    def set_torch_image(self, resized_image, original_size):
        weights = next(self.model.image_encoder.parameters()).detach().cpu().numpy().tobytes()
        digest = hashlib.sha1(resized_image.cpu().numpy().tobytes()).hexdigest()
        key = (digest, tuple(original_size), hashlib.sha1(weights).hexdigest(), self.precision)
        state.calls.append(digest)
        if state.interrupt_at is not None and len(state.calls) >= state.interrupt_at:
            state.interrupt_at = None
            raise KeyboardInterrupt
        if key not in state.cache:
            original(self, resized_image, original_size)
            state.cache[key] = self.features.clone()
            return self.features
        self.set_embedding(state.cache[key].clone(), original_size, tuple(resized_image.shape[-2:]))
        return self.features

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SamPredictor, "set_torch_image", set_torch_image)
        yield state


# --------------------------------------------------------------------------------------------
# data


def write_video(path, frames, fps=24.0, fourcc="mp4v"):
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened(), f"OpenCV cannot write {fourcc} to {path}"
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def read_video(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, fps


def small(image):
    return cv2.resize(image, SMALL, interpolation=cv2.INTER_AREA)


def small_labels(labels):
    return cv2.resize(labels.astype(np.uint8), SMALL, interpolation=cv2.INTER_NEAREST)


@pytest.fixture(scope="module")
def car():
    """The 40 car-shadow frames (854 x 480, as the DAVIS runner loads them) and the first annotation."""
    if not FRAMES.is_dir():
        pytest.skip(f"shared data not found at {DAVIS}")
    paths = sorted(FRAMES.glob("*.jpg"))
    assert len(paths) == 40
    return [load_image(p) for p in paths], ANNOTATIONS / "00000.png"


@pytest.fixture(scope="module")
def lossless_video(car, tmp_path_factory):
    """car-shadow as a lossless FFV1 .mkv: its decoded frames are the DAVIS runner's, bit for bit."""
    frames, _ = car
    path = write_video(tmp_path_factory.mktemp("video") / "car-shadow.mkv", frames, fourcc="FFV1")
    decoded, _ = read_video(path)
    assert len(decoded) == 40 and all(np.array_equal(a, b) for a, b in zip(decoded, frames))
    return path


def overlay_frames(out):
    frames, fps = read_video(out / "overlay.mp4")
    return frames, fps


def video_stream(path):
    """(codec, pixel format, (width, height), frames) of a video's first stream, as FFmpeg (PyAV) reads it."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        context = stream.codec_context
        frames = sum(1 for _ in container.decode(stream))
        return context.name, context.pix_fmt, (context.width, context.height), frames


def mp4_boxes(path):
    """The top-level boxes of an MP4 file, in order."""
    data, boxes, at = path.read_bytes(), [], 0
    while at + 8 <= len(data):
        size = int.from_bytes(data[at:at + 4], "big")
        boxes.append(data[at + 4:at + 8].decode("latin-1"))
        if size == 1:
            size = int.from_bytes(data[at + 8:at + 16], "big")
        if size < 8:
            break
        at += size
    return boxes


@pytest.fixture(scope="module")
def tracked(lossless_video, car, random_vit_t_checkpoint, encoder, tmp_path_factory):
    """One run over all 40 frames, the reference the first annotation (on frame 0)."""
    _, annotation = car
    out = tmp_path_factory.mktemp("tracked")
    encoder.take()
    code = run_cli(["track", lossless_video, "--ref-mask", annotation, "--out", out,
                    *model_args(random_vit_t_checkpoint)])
    return code, out, encoder.take()


# --------------------------------------------------------------------------------------------
# one object, 40 frames


def test_one_object_forty_frames(tracked, car):
    code, out, _ = tracked
    frames, annotation = car
    assert code == 0
    masks = sorted(p.name for p in out.glob("*.png"))
    assert masks == [f"{i:05d}.png" for i in range(40)]
    for name in masks:
        assert load_mask(out / name).shape == (480, 854)
    assert np.array_equal(load_mask(out / "00000.png"), load_label_map(annotation) == 1)  # the reference itself
    video, fps = overlay_frames(out)
    assert len(video) == 40 and video[0].shape == (480, 854, 3) and fps == pytest.approx(24.0)
    # frame 0 tinted with object 1's colour (DAVIS palette 1: dark red) inside the mask
    inside = load_label_map(annotation) == 1
    expected = frames[0][inside] * 0.5 + np.array([128, 0, 0]) * 0.5
    assert np.abs(video[0][inside].astype(float) - expected).mean() < 12
    assert sorted(p.name for p in out.iterdir()) == masks + ["overlay.mp4", "results.json"]  # no temp files left
    # what browsers play: H.264 in 4:2:0, the index (moov) before the data so that it plays while it loads
    assert video_stream(out / "overlay.mp4") == ("h264", "yuv420p", (854, 480), 40)
    boxes = mp4_boxes(out / "overlay.mp4")
    assert boxes[0] == "ftyp" and boxes.index("moov") < boxes.index("mdat")

    results = strict_json(out / "results.json")
    assert results["format"] == "persam-track" and results["objects"] == [1]
    assert results["frame_count"] == 40 and results["size"] == [854, 480] and results["stopped"] is None
    assert [r["index"] for r in results["frames"]] == list(range(40))
    assert set(results["files"]) == set(masks) | {"overlay.mp4", "results.json"}
    assert results["overlay"] == {"file": "overlay.mp4", "codec": "h264", "size": [854, 480], "frames": list(range(40))}
    for record in results["frames"]:
        assert record["mask"] == f"{record['index']:05d}.png"
        assert record["time_s"] >= record["encode_s"] > 0
        (obj,) = record["objects"]
        assert set(obj) >= {"id", "found", "peak_similarity", "iou_score", "box"}
        assert math.isfinite(obj["peak_similarity"])
        assert (obj["iou_score"] is None) == record["reference"] == (record["index"] == 0)
        assert (obj["box"] is not None) == obj["found"] == load_mask(out / record["mask"]).any()
    assert results["summary"]["frames"] == 40 and results["summary"]["this_run"]["frames"] == 40


def test_each_frame_encoded_exactly_once(tracked):
    _, _, calls = tracked
    # frame 0 once (learning; its output is the reference mask), every later frame once
    assert len(calls) == 40 and len(set(calls)) == 40


def test_same_masks_as_the_davis_runner(tracked, random_vit_t_checkpoint, encoder, tmp_path):
    from eval.datasets import DavisDataset
    from eval.run_davis import predict_davis
    from persam.runs.models import build_predictor

    _, out, _ = tracked
    predictor = build_predictor("vit_t", random_vit_t_checkpoint, "cpu", "fp32")
    predict_davis(predictor, DavisDataset(DAVIS), [SEQ], tmp_path, "persam", progress=False)
    for i in range(40):
        davis = load_label_map(tmp_path / SEQ / f"{i:05d}.png")
        assert np.array_equal(load_label_map(out / f"{i:05d}.png"), davis), f"frame {i}"


def test_a_folder_of_frames_is_the_same_video(tracked, car, random_vit_t_checkpoint, tmp_path):
    _, out, _ = tracked
    _, annotation = car
    code = run_cli(["track", FRAMES, "--ref-mask", annotation, "--end", 3, "--out", tmp_path,
                    *model_args(random_vit_t_checkpoint)])
    assert code == 0
    for i in range(3):
        assert np.array_equal(load_mask(tmp_path / f"{i:05d}.png"), load_mask(out / f"{i:05d}.png"))
    assert strict_json(tmp_path / "results.json")["fps"] == 24.0


def test_reference_on_a_later_frame_or_an_image(lossless_video, car, random_vit_t_checkpoint, encoder, tmp_path):
    frames, _ = car
    args = [*model_args(random_vit_t_checkpoint), "--end", 6]
    encoder.take()
    out = tmp_path / "frame3"
    assert run_cli(["track", lossless_video, "--ref-frame", 3, "--ref-mask", ANNOTATIONS / "00003.png", "--out", out,
                    *args]) == 0
    calls = encoder.take()
    assert len(calls) == 6 and len(set(calls)) == 6  # frame 3 encoded once: to learn; its output is the reference
    records = strict_json(out / "results.json")["frames"]
    assert [r["reference"] for r in records] == [False, False, False, True, False, False]
    assert np.array_equal(load_mask(out / "00003.png"), load_label_map(ANNOTATIONS / "00003.png") == 1)

    cv2.imwrite(str(tmp_path / "ref.png"), cv2.cvtColor(frames[0], cv2.COLOR_RGB2BGR))
    out = tmp_path / "image"
    assert run_cli(["track", lossless_video, "--ref-image", tmp_path / "ref.png", "--ref-mask", ANNOTATIONS / "00000.png",
                    "--out", out, *args]) == 0
    assert len(encoder.take()) == 7  # the reference image, then every frame (frame 0 too: it is not the reference)
    records = strict_json(out / "results.json")["frames"]
    assert len(records) == 6 and not any(r["reference"] for r in records)
    assert all(r["objects"][0]["iou_score"] is not None for r in records)


def test_done_run_is_skipped_and_other_settings_refused(tracked, car, random_vit_t_checkpoint, encoder, capsys):
    _, out, _ = tracked
    _, annotation = car
    video = strict_json(out / "results.json")["video"]
    argv = ["track", video, "--ref-mask", annotation, "--out", out, *model_args(random_vit_t_checkpoint)]
    before = (out / "00039.png").stat().st_mtime_ns
    capsys.readouterr()
    encoder.take()
    assert run_cli(argv) == 0
    assert "already done" in capsys.readouterr().err
    assert encoder.take() == [] and (out / "00039.png").stat().st_mtime_ns == before
    assert run_cli(argv + ["--every", 2]) == 2
    line = error_line(capsys)
    assert "other settings (different every)" in line and "--overwrite" in line
    assert encoder.take() == []


# --------------------------------------------------------------------------------------------
# resume, --every, a truncated file


def test_interrupted_run_resumes_at_the_first_missing_frame(tracked, lossless_video, car, random_vit_t_checkpoint,
                                                            encoder, tmp_path, capsys):
    _, full, _ = tracked
    _, annotation = car
    argv = ["track", lossless_video, "--ref-mask", annotation, "--end", 8, "--out", tmp_path,
            *model_args(random_vit_t_checkpoint)]
    encoder.take()
    encoder.interrupt_at = 5  # the encode of frame 4 (frame 0 is encoded for learning)
    assert run_cli(argv) == 130
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"{i:05d}.png" for i in range(4)]
    assert not (tmp_path / "overlay.mp4").exists() and not list(tmp_path.glob(".*.mp4"))
    assert [r["index"] for r in strict_json(tmp_path / "results.json")["frames"]] == [0, 1, 2, 3]
    encoder.take()
    capsys.readouterr()
    assert run_cli(argv) == 0
    assert "resuming at frame 4" in capsys.readouterr().err
    assert len(encoder.take()) == 5  # frame 0 to learn again, frames 4..7
    for i in range(8):  # as the uninterrupted run: frame 4 is prompted with frame 3's box from its mask
        assert np.array_equal(load_mask(tmp_path / f"{i:05d}.png"), load_mask(full / f"{i:05d}.png")), f"frame {i}"
    video, _ = overlay_frames(tmp_path)
    assert len(video) == 8


def test_every_fifth_frame(tracked, lossless_video, car, random_vit_t_checkpoint, encoder, tmp_path):
    _, annotation = car
    ys, xs = np.nonzero(load_label_map(annotation) == 1)
    box = f"{xs.min()},{ys.min()},{xs.max()},{ys.max()}"
    encoder.take()
    assert run_cli(["track", lossless_video, "--ref-box", box, "--every", 5, "--out", tmp_path,
                    *model_args(random_vit_t_checkpoint)]) == 0
    calls = encoder.take()
    assert len(calls) == 8 and len(set(calls)) == 8  # frame 0 once, for SAM's reference mask and learning
    assert sorted(p.name for p in tmp_path.glob("0*.png")) == [f"{i:05d}.png" for i in range(0, 40, 5)]
    assert (tmp_path / "reference_mask.png").is_file()
    assert np.array_equal(load_mask(tmp_path / "00000.png"), load_mask(tmp_path / "reference_mask.png"))
    results = strict_json(tmp_path / "results.json")
    assert [r["index"] for r in results["frames"]] == list(range(0, 40, 5))
    video, fps = overlay_frames(tmp_path)
    assert len(video) == 8 and fps == pytest.approx(24 / 5)


def test_truncated_video_keeps_what_was_done(tracked, lossless_video, car, random_vit_t_checkpoint, encoder, tmp_path,
                                            capsys):
    _, annotation = car
    data = lossless_video.read_bytes()
    truncated = tmp_path / "truncated.mkv"
    truncated.write_bytes(data[: int(len(data) * 0.4)])
    readable = len(read_video(truncated)[0])
    assert 1 < readable < 40
    out = tmp_path / "out"
    argv = ["track", truncated, "--ref-mask", annotation, "--out", out, *model_args(random_vit_t_checkpoint)]
    capsys.readouterr()
    assert run_cli(argv) == 1
    err = capsys.readouterr().err
    assert f"stopped at frame {readable}" in err and str(truncated) in err
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:05d}.png" for i in range(readable)]
    results = strict_json(out / "results.json")
    assert results["stopped"]["frame"] == readable and "truncated" in results["stopped"]["reason"]
    assert len(overlay_frames(out)[0]) == readable
    encoder.take()
    assert run_cli(argv) == 1  # again: nothing to redo, the same answer
    assert f"stopped at frame {readable}" in capsys.readouterr().err and encoder.take() == []


# --------------------------------------------------------------------------------------------
# the overlay video: H.264, else VP9 in WebM; an older persam's mp4v written again


def odd_clip(car, folder, count=3):
    """The first `count` car-shadow frames at 213 x 119 (odd: H.264 and VP9 need even sides) as a folder of
    PNG frames (OpenCV's video writers make the sides even), and the first annotation's mask at that size."""
    frames, annotation = car
    size = (SMALL[0] - 1, SMALL[1] - 1)
    video = folder / "odd"
    video.mkdir()
    for i, frame in enumerate(frames[:count]):
        cv2.imwrite(str(video / f"{i:05d}.png"), cv2.cvtColor(cv2.resize(frame, size, interpolation=cv2.INTER_AREA),
                                                              cv2.COLOR_RGB2BGR))
    mask = folder / "odd_mask.png"
    cv2.imwrite(str(mask), cv2.resize((load_label_map(annotation) == 1).astype(np.uint8) * 255, size,
                                      interpolation=cv2.INTER_NEAREST))
    return video, mask


def test_overlay_is_webm_without_pyav_and_an_old_mp4v_one_is_made_again(car, random_vit_t_checkpoint, encoder,
                                                                      tmp_path, capsys, monkeypatch):
    import persam.data.video_writer

    video, mask = odd_clip(car, tmp_path)
    out = tmp_path / "out"
    argv = ["track", video, "--ref-mask", mask, "--out", out, *model_args(random_vit_t_checkpoint)]
    masks = [f"{i:05d}.png" for i in range(3)]
    capsys.readouterr()
    with monkeypatch.context() as patch:  # as where PyAV is not installed
        patch.setattr(persam.data.video_writer, "_pyav_h264", lambda: "PyAV (the av package) is not installed")
        assert run_cli(argv) == 0
    err = capsys.readouterr().err
    assert "the overlay video is overlay.webm (VP9" in err and "PyAV (the av package) is not installed" in err
    assert f"overlay {out / 'overlay.webm'}" in err  # the summary names the file written
    assert sorted(p.name for p in out.iterdir()) == masks + ["overlay.webm", "results.json"]
    results = strict_json(out / "results.json")
    assert results["overlay"] == {"file": "overlay.webm", "codec": "vp9", "size": [214, 120], "frames": [0, 1, 2]}
    assert set(results["files"]) == set(masks) | {"overlay.webm", "results.json"}
    assert video_stream(out / "overlay.webm") == ("vp9", "yuv420p", (214, 120), 3)  # one column and row more
    decoded, fps = read_video(out / "overlay.webm")
    assert len(decoded) == 3 and fps == pytest.approx(24.0)
    assert np.abs(decoded[0][:, 213].astype(float) - decoded[0][:, 212]).mean() < 8  # the added column: a copy

    # PyAV back: the WebM plays in browsers, so it is kept
    encoder.take()
    assert run_cli(argv) == 0
    assert "already done" in capsys.readouterr().err and encoder.take() == []
    assert strict_json(out / "results.json")["overlay"]["file"] == "overlay.webm"

    # a folder of an older persam: overlay.mp4 in mp4v, no codec recorded; it is made again in H.264 from the
    # masks, without the model, and the WebM (persam's) goes
    write_video(out / "overlay.mp4", [np.zeros((119, 213, 3), np.uint8)] * 3)
    assert video_stream(out / "overlay.mp4")[0] == "mpeg4"
    earlier = strict_json(out / "results.json")
    earlier["overlay"] = {"file": "overlay.mp4", "frames": [0, 1, 2]}
    earlier["files"] = sorted(set(earlier["files"]) | {"overlay.mp4"})
    (out / "results.json").write_text(json.dumps(earlier))
    assert run_cli(argv) == 0
    assert encoder.take() == []
    assert sorted(p.name for p in out.iterdir()) == masks + ["overlay.mp4", "results.json"]
    results = strict_json(out / "results.json")
    assert results["overlay"] == {"file": "overlay.mp4", "codec": "h264", "size": [214, 120], "frames": [0, 1, 2]}
    assert set(results["files"]) == set(masks) | {"overlay.mp4", "results.json"}
    assert video_stream(out / "overlay.mp4") == ("h264", "yuv420p", (214, 120), 3)
    h264, _ = read_video(out / "overlay.mp4")
    assert np.abs(h264[0].astype(float) - decoded[0]).mean() < 8  # the same picture


def test_no_frame_reached_writes_no_overlay(car, random_vit_t_checkpoint, encoder, tmp_path, capsys):
    frames, annotation = car
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames[:4]):
        cv2.imwrite(str(folder / f"{i:05d}.png"), cv2.cvtColor(small(frame), cv2.COLOR_RGB2BGR))
    (folder / "00002.png").write_bytes(b"not a png")
    mask = tmp_path / "mask.png"
    cv2.imwrite(str(mask), small_labels(load_label_map(annotation) == 1) * 255)
    out = tmp_path / "out"
    argv = ["track", folder, "--ref-mask", mask, "--start", 2, "--out", out, *model_args(random_vit_t_checkpoint)]
    encoder.take()
    capsys.readouterr()
    for _ in range(2):  # again: the same answer, nothing redone
        assert run_cli(argv) == 1
        assert "stopped at frame 2" in capsys.readouterr().err
        results = strict_json(out / "results.json")
        assert results["frames"] == [] and results["stopped"]["frame"] == 2
        assert results["overlay"] == {"file": None, "codec": None, "size": [214, 120], "frames": []}
        assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert encoder.take() == []


# --------------------------------------------------------------------------------------------
# two objects, an absent object


def test_two_objects_side_by_side(car, random_vit_t_checkpoint, encoder, tmp_path):
    frames, annotation = car
    mirrored = [np.ascontiguousarray(np.concatenate([small(f), small(f)[:, ::-1]], axis=1)) for f in frames[:6]]
    video = write_video(tmp_path / "two.mp4", mirrored)
    one = small_labels(load_label_map(annotation) == 1).astype(bool)
    labels = np.concatenate([one * 1, one[:, ::-1] * 2], axis=1).astype(np.uint8)
    from persam.data.io import atomic_save_png

    atomic_save_png(tmp_path / "labels.png", labels, palette="davis")
    out = tmp_path / "out"
    encoder.take()
    assert run_cli(["track", video, "--ref-labels", tmp_path / "labels.png", "--out", out,
                    *model_args(random_vit_t_checkpoint)]) == 0
    assert len(encoder.take()) == 6
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{i:05d}.png" for i in range(6)]
    for name in names:
        ids = load_label_map(out / name)
        assert ids.shape == (SMALL[1], 2 * SMALL[0]) and set(np.unique(ids).tolist()) <= {0, 1, 2}
    assert np.array_equal(load_label_map(out / "00000.png"), labels)  # palette ids as given
    results = strict_json(out / "results.json")
    assert results["objects"] == [1, 2] and results["palette_masks"] is True
    for record in results["frames"]:
        assert [o["id"] for o in record["objects"]] == [1, 2]
    assert len(overlay_frames(out)[0]) == 6


@pytest.fixture(scope="module")
def content_checkpoint(tmp_path_factory):
    """vit_t with PyTorch's own (seeded) random initialisation.  The seeded random state of
    `random_vit_t_checkpoint` gives features that do not depend on the image (every frame has
    peak similarity 1.0), so an absent object could not be told; these do."""
    from sam.build import build_sam_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("content") / "mobile_sam.pt"
    torch.save(build_sam_model("vit_t").state_dict(), path)
    return path


def test_absent_object_is_marked_not_found(car, content_checkpoint, encoder, tmp_path):
    frames, annotation = car
    clip = [small(f) for f in frames[:3]] + [np.zeros((SMALL[1], SMALL[0], 3), np.uint8)] * 3  # frames 3..5 blanked
    video = write_video(tmp_path / "absent.mp4", clip)
    decoded, _ = read_video(video)
    cv2.imwrite(str(tmp_path / "frame0.png"), cv2.cvtColor(decoded[0], cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "mask0.png"), small_labels(load_label_map(annotation) == 1) * 255)
    concept = tmp_path / "car.concept"
    assert run_cli(["learn", "--ref-image", tmp_path / "frame0.png", "--ref-mask", tmp_path / "mask0.png",
                    "--out", concept, *model_args(content_checkpoint)]) == 0
    out = tmp_path / "out"
    assert run_cli(["track", video, "--concept", concept, "--min-similarity", 0.95, "--out", out,
                    *model_args(content_checkpoint)]) == 0
    results = strict_json(out / "results.json")
    records = results["frames"]
    assert [r["index"] for r in records] == list(range(6)) and not any(r["reference"] for r in records)
    for record in records[:3]:
        assert record["objects"][0]["peak_similarity"] >= 0.95
    overlays, _ = overlay_frames(out)
    for record in records[3:]:
        (obj,) = record["objects"]
        assert obj["peak_similarity"] < 0.95
        assert obj["found"] is False and obj["iou_score"] is None and obj["box"] is None  # not decoded, not forced
        assert not load_mask(out / record["mask"]).any()
        left = overlays[record["index"]][10:-10, :2].astype(float).mean(axis=(0, 1))  # the red border
        assert left[0] > 150 and left[1] < 90 and left[2] < 90
    assert results["summary"]["not_found"]["1"] >= 3


# --------------------------------------------------------------------------------------------
# bad input: one line, exit code 2, nothing run


def test_bad_input(car, random_vit_t_checkpoint, encoder, tmp_path, capsys):
    frames, annotation = car
    video = write_video(tmp_path / "clip.mp4", [small(f) for f in frames[:2]])
    args = model_args(random_vit_t_checkpoint)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 100)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(video.read_bytes()[:-200])  # an mp4 cut before its index
    mask = tmp_path / "mask.png"
    cv2.imwrite(str(mask), small_labels(load_label_map(annotation) == 1) * 255)
    user = tmp_path / "user_out"
    user.mkdir()
    (user / "00000.png").write_bytes(b"the user's own file")
    encoder.take()
    cases = [
        (["track", junk, "--ref-mask", mask], "junk.mp4: cannot be opened"),
        (["track", cut, "--ref-mask", mask], "cut.mp4: cannot be opened"),
        (["track", tmp_path / "missing.mp4", "--ref-mask", mask], "missing.mp4: file not found"),
        (["track", video], "the object needs --concept"),
        (["track", video, "--ref-mask", annotation], "is 854x480 but frame 0 of"),
        (["track", video, "--ref-mask", mask, "--ref-frame", 5], "there is no frame 5"),
        (["track", video, "--ref-mask", mask, "--ref-box", "1,1,9,9"], "not --ref-mask and --ref-box"),
        (["track", video, "--concept", tmp_path / "c.concept", "--ref-mask", mask], "--concept is the whole reference"),
        (["track", video, "--ref-point", "500,10"], "outside frame 0"),
        (["track", video, "--ref-mask", mask, "--start", 2], "--start 2"),
        (["track", video, "--ref-mask", mask, "--every", 0], "--every"),
    ]
    for argv, expected in cases:
        out = tmp_path / "out"
        assert run_cli([*argv, "--out", out, *args]) == 2, argv
        line = error_line(capsys)
        assert expected in line, (argv, line)
    assert run_cli(["track", video, "--ref-mask", mask, "--out", user, *args]) == 2
    line = error_line(capsys)
    assert "00000.png was not written by persam" in line
    assert (user / "00000.png").read_bytes() == b"the user's own file"
    assert encoder.take() == []
