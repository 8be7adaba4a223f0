"""What `persam segment / apply / learn` show (issue 23, items 3 and 10): a "not found" photo's
overlay framed in red and marked, the photos where the object was not found named in the summary
line, similarity heat maps blended over the photo, per-image timings, what `learn` learned, and
the help texts.

The image encoder and the segmentation steps are stand-ins where the model's answer does not
matter (seeded features per image; the object is "found" as a disc in wide photos and not found
in square ones), so that the tests run in seconds; the not-found overlay is also checked end to
end with the random-weight vit_t model and `--min-similarity 1`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

import persam.method.multi
import persam.runs.local
import persam.data.sources
import persam.data.visualize
from cli_testing import memoized_encoder, model_args, ref_args, run_cli, write_cat_photos
from persam.data import visualize
from persam.data.io import load_image
from persam.method.pipeline import Segmentation
from sam.predictor import SamPredictor

RED = (255, 0, 0)


# --------------------------------------------------------------------------------------------
# stand-ins and photos


def disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2


def standin_segmentation(h, w):
    """Found (a disc, its points and box) in a wide photo; not found (no points: below the
    threshold) in any other."""
    if w <= h:
        return Segmentation(mask=np.zeros((h, w), bool), iou_score=0.0, peak_similarity=0.1, found=False,
                            points=np.zeros((0, 2), np.float32), labels=np.zeros(0, np.int64))
    mask = disc(h, w, w / 3, h / 2, h / 3)
    ys, xs = np.nonzero(mask)
    return Segmentation(mask=mask, iou_score=0.9, peak_similarity=0.8, found=True,
                        points=np.array([[xs.mean(), ys.mean()], [1.0, 1.0]], np.float32), labels=np.array([1, 0]),
                        box=np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32))


@pytest.fixture
def stand_ins(monkeypatch):
    """Seeded features instead of the encoder; the stand-in segmentation instead of PerSAM's steps.
    Yields a dict of per-size delays (seconds) the encoder stand-in sleeps for."""
    delays = {}

    def set_torch_image(self, resized_image, original_size):
        time.sleep(delays.get(("encode", tuple(original_size)), 0.0))
        seed = int(hashlib.sha1(resized_image.cpu().numpy().tobytes()).hexdigest()[:8], 16)
        features = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(seed))
        self.reset_image()
        self.set_embedding(features, original_size, tuple(resized_image.shape[-2:]))
        return self.features

    def segment_images(predictor, concept, images, min_similarity=None, keep_similarity=False, workers=1):
        return [standin_segmentation(*image.original_size) for image in images]

    def segment_objects(predictor, concept, image=None, max_objects=5, min_similarity=None, **kw):
        seg = standin_segmentation(*predictor.original_size)
        return [seg] if seg.found else []

    monkeypatch.setattr(SamPredictor, "set_torch_image", set_torch_image)
    monkeypatch.setattr(persam.runs.local, "segment_images", segment_images)
    monkeypatch.setattr(persam.method.multi, "segment_objects", segment_objects)
    return delays


@pytest.fixture(scope="module")
def cat(perseg_dir, tmp_path_factory):
    """ref.jpg / ref.png and targets/01.jpg, 02.jpg (128 px squares), and wide/03.png (160 x 96, a duck)."""
    root = tmp_path_factory.mktemp("cat")
    write_cat_photos(perseg_dir, root, 128)
    (root / "wide").mkdir()
    photo = Image.open(perseg_dir / "Images" / "duck_toy" / "00.jpg").convert("RGB").resize((160, 96))
    photo.save(root / "wide" / "03.png")
    return root


def summary_line(err: str) -> str:
    (line,) = [line for line in err.splitlines() if "segmented," in line]
    return line


# --------------------------------------------------------------------------------------------
# 3. not found: the overlay, the summary line


def test_not_found_overlay_is_framed_in_red_and_marked(cat, random_vit_t_checkpoint, tmp_path):
    """End to end with the model: --min-similarity 1 is never reached."""
    out = tmp_path / "out"
    with memoized_encoder():
        code = run_cli(["segment", *ref_args(cat), cat / "targets" / "01.jpg", "--out", out, "--min-similarity", "1",
                        "--overlay-format", "png", *model_args(random_vit_t_checkpoint)])
    assert code == 0
    record = json.loads((out / "results.json").read_text())["images"][0]
    assert record["found"] is False
    photo = load_image(cat / "targets" / "01.jpg")
    picture = load_image(out / "01_overlay.png")
    assert picture.shape == photo.shape and not np.array_equal(picture, photo)
    # a red frame on every side (the note sits in the top-left corner, over the frame)
    for edge in (picture[-1], picture[:, -1], picture[-2], picture[:, 0][64:]):
        assert (edge == RED).all()
    assert (picture[2:-2, 2:-2][40:] == photo[2:-2, 2:-2][40:]).all()  # the photo itself untouched below the note
    # the note: dark box with light text in the top-left corner
    corner = picture[4:12, 4:40].reshape(-1, 3)
    assert (corner.max(axis=1) == 0).mean() > 0.3 and corner[:, 0].max() > 200
    # the very picture of the shared drawing (persam.data.visualize), which persam track uses too
    assert np.array_equal(picture, visualize.mark_not_found(photo))


def test_found_overlay_has_no_red_frame_and_not_found_has(cat, random_vit_t_checkpoint, tmp_path, stand_ins):
    out = tmp_path / "out"
    assert run_cli(["segment", *ref_args(cat), cat / "wide" / "03.png", cat / "targets" / "02.jpg", "--out", out,
                    "--overlay-format", "png", *model_args(random_vit_t_checkpoint)]) == 0
    records = {r["name"]: r for r in json.loads((out / "results.json").read_text())["images"]}
    assert records["03"]["found"] is True and records["02"]["found"] is False
    found = load_image(out / "03_overlay.png")
    assert not (found[-1] == RED).all() and not (found[:, -1] == RED).all()
    not_found = load_image(out / "02_overlay.png")
    assert (not_found[-1] == RED).all() and (not_found[:, -1] == RED).all()


def test_multi_not_found_overlay_is_marked(cat, random_vit_t_checkpoint, tmp_path, stand_ins):
    out = tmp_path / "out"
    assert run_cli(["segment", *ref_args(cat), cat / "targets" / "02.jpg", "--out", out, "--multi",
                    "--overlay-format", "png", *model_args(random_vit_t_checkpoint)]) == 0
    photo = load_image(cat / "targets" / "02.jpg")
    assert np.array_equal(load_image(out / "02_overlay.png"), visualize.mark_not_found(photo))


def test_summary_line_names_the_photos_where_the_object_was_not_found(cat, random_vit_t_checkpoint, tmp_path,
                                                                     stand_ins, capsys):
    out = tmp_path / "out"
    assert run_cli(["segment", *ref_args(cat), cat / "wide" / "03.png", cat / "targets", "--out", out,
                    *model_args(random_vit_t_checkpoint)]) == 0
    line = summary_line(capsys.readouterr().err)
    assert "object found in 1" in line
    named = line.split("not found in", 1)[1]
    assert "01.jpg" in named and "02.jpg" in named and "03.png" not in named


def test_summary_line_with_many_not_found_gives_the_count_and_where_to_look(cat, random_vit_t_checkpoint, tmp_path,
                                                                         stand_ins, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    square = Image.open(cat / "targets" / "01.jpg")
    for k in range(7):
        square.rotate(90 * (k % 4)).save(photos / f"p{k}.png")  # square: not found
    Image.open(cat / "wide" / "03.png").save(photos / "wide.png")  # found
    out = tmp_path / "out"
    assert run_cli(["segment", *ref_args(cat), photos, "--out", out, *model_args(random_vit_t_checkpoint)]) == 0
    line = summary_line(capsys.readouterr().err)
    named = line.split("not found in", 1)[1]
    assert re.match(r"\s*7\b", named), line  # the count
    assert "p0.png" in named and "p6.png" not in named  # the first few, not all
    assert f"see {out / 'results.json'}" in named


# --------------------------------------------------------------------------------------------
# 3. heat maps over the photo


def _gray(rgb):
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _correlation(a, b):
    return float(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1])


def test_heatmap_over_a_photo_shows_it_and_keeps_the_colour_scale():
    h, w = 120, 200
    photo = np.full((h, w, 3), 60, np.uint8)
    photo[(np.arange(h) // 10) % 2 == 1] = 220  # bright and dark stripes across
    ramp = torch.linspace(-0.5, 0.9, w).repeat(h, 1)  # similarity rising left to right, along the stripes
    bare = visualize.heatmap(ramp)
    blended = visualize.heatmap(ramp, image=photo, scale=False)
    assert blended.shape == photo.shape and blended.dtype == np.uint8
    assert _correlation(_gray(blended), _gray(photo)) > 0.5 and abs(_correlation(_gray(bare), _gray(photo))) < 0.2
    # the colours keep their meaning: low similarity blue, high red, over the same photo pixels
    assert blended[10, 5, 2] > blended[10, 5, 0] and blended[10, -5, 0] > blended[10, -5, 2]
    # half photo (as gray), half colour map
    expected = np.clip(_gray(photo)[..., None] * 0.5 + bare.astype(np.float64) * 0.5, 0, 255)
    assert np.abs(blended.astype(np.float64) - expected).max() <= 1.0
    # the colour scale: a bar from blue to red with the map's range, in the bottom-left corner
    scaled = visualize.heatmap(ramp, image=photo)
    differ = np.nonzero((scaled != blended).any(axis=2))
    assert differ[0].min() > h / 2 and differ[1].max() < w / 2  # only in the corner
    ramps = []
    for y in range(differ[0].min(), differ[0].max() + 1):
        row = scaled[y, :differ[1].max() + 1].astype(int)
        coloured = row[row.max(axis=1) - row.min(axis=1) > 100]  # the bar's pixels (the text is white on black)
        if len(coloured) > 20:
            (r0, _, b0), (r1, _, b1) = coloured[0], coloured[-1]
            ramps.append(b0 > r0 + 100 and r1 > b1 + 100)
    assert ramps and all(ramps)  # blue ... red
    assert visualize.heatmap(ramp).shape == (h, w, 3)  # without a photo: the bare colour map, as before
    assert np.array_equal(visualize.heatmap(ramp), bare)


def test_saved_similarity_map_shows_the_photo(cat, random_vit_t_checkpoint, tmp_path, stand_ins):
    out = tmp_path / "out"
    assert run_cli(["segment", *ref_args(cat), cat / "targets" / "01.jpg", "--out", out, "--save-similarity",
                    *model_args(random_vit_t_checkpoint)]) == 0
    photo = load_image(cat / "targets" / "01.jpg")
    heat = np.asarray(Image.open(out / "01_similarity.png").convert("RGB"))
    assert heat.shape == photo.shape
    top = slice(0, heat.shape[0] * 3 // 4)  # above the colour scale
    assert _correlation(_gray(heat[top]), _gray(photo[top])) > 0.5
    assert heat.std(axis=2).mean() > 10  # in colour, not a gray photo


# --------------------------------------------------------------------------------------------
# 10. per-image timings


def test_timings_are_per_image_where_measured_per_image(cat, random_vit_t_checkpoint, tmp_path, stand_ins,
                                                        monkeypatch):
    """Loading, encoding (on a CPU) and drawing the outputs are measured per image: the slow photo
    (each step 150 ms longer) says so.  A time measured for the whole group is named in ``shared``
    (the same for every image of the group)."""
    slow = cat / "wide" / "03.png"
    stand_ins[("encode", (96, 160))] = 0.15
    real_load, real_overlay = persam.data.sources.load_image, persam.data.visualize.overlay

    def load_image_slowly(path, data=None):
        if str(path) == str(slow):
            time.sleep(0.15)
        return real_load(path, data)

    def overlay_slowly(image, *args, **kwargs):
        if image.shape[:2] == (96, 160):
            time.sleep(0.15)
        return real_overlay(image, *args, **kwargs)

    monkeypatch.setattr(persam.data.sources, "load_image", load_image_slowly)
    monkeypatch.setattr(persam.data.visualize, "overlay", overlay_slowly)
    for extra in ([], ["--multi"]):
        out = tmp_path / f"out{len(extra)}"
        # the slow photo first: whatever the first image of a run costs more falls on it
        assert run_cli(["segment", *ref_args(cat), slow, cat / "targets" / "01.jpg", "--out", out, "--batch-size", "2",
                        *extra, *model_args(random_vit_t_checkpoint)]) == 0
        records = {r["name"]: r for r in json.loads((out / "results.json").read_text())["images"]}
        fast, slow_one = records["01"]["timings"], records["03"]["timings"]
        for key in ("load_s", "encode_s", "outputs_s"):
            assert slow_one[key] >= fast[key] + 0.1, (key, fast, slow_one)
        assert fast["shared"] == slow_one["shared"] and set(fast["shared"]) <= {"segment_s"}  # on a CPU
        for timings in (fast, slow_one):
            assert timings["group_size"] == 2
            assert all(timings[k] >= 0 for k in ("load_s", "encode_s", "segment_s", "outputs_s"))
        if "segment_s" in fast["shared"]:
            assert fast["segment_s"] == slow_one["segment_s"]  # the group's time, per image


def test_times_measured_for_the_group_are_marked_shared(cat, random_vit_t_checkpoint, stand_ins):
    """As on a GPU, where a group is encoded in one call: the encoder's time is the group's, and
    each record says so (``shared``, ``group_size``); the times measured per image stay apart."""
    from persam.runs.models import build_predictor
    from persam.method.pipeline import Concept
    from persam.runs.local import encode_loaded, segment_loaded_images
    from persam.runs.records import RunOptions, Target

    predictor = build_predictor("vit_t", random_vit_t_checkpoint, "cpu", "fp32", "torch")
    vector = torch.nn.functional.normalize(torch.ones(256), dim=0)
    concept = Concept("persam", vector, vector[None].clone())
    paths = [cat / "targets" / "01.jpg", cat / "wide" / "03.png"]
    images = [load_image(p) for p in paths]
    embeddings, seconds, shared = encode_loaded(predictor, images)
    assert not shared and len(seconds) == 2  # on a CPU: one encoder call per image, each timed
    timings = [{"load_s": 0.01, "encode_s": 0.5}, {"load_s": 0.03, "encode_s": 0.5}]  # one call of 1 s for both
    results = segment_loaded_images(predictor, concept, [Target(p, p.stem) for p in paths], images, RunOptions(),
                                    embeddings, timings, shared=["encode_s"])
    records = [r.record["timings"] for r in results]
    for record, given in zip(records, timings):
        assert record["group_size"] == 2 and "encode_s" in record["shared"] and "load_s" not in record["shared"]
        assert record["load_s"] == given["load_s"] and record["encode_s"] == 0.5 and record["outputs_s"] >= 0


# --------------------------------------------------------------------------------------------
# 10. what learn learned


def test_learn_says_what_it_learned(cat, random_vit_t_checkpoint, tmp_path, stand_ins, capsys):
    concept = tmp_path / "tabby.concept"
    assert run_cli(["learn", *ref_args(cat), "--ref-image", cat / "targets" / "01.jpg", "--ref-mask", cat / "ref.png",
                    "--out", concept, *model_args(random_vit_t_checkpoint)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(concept)  # stdout: the concept file, for scripts
    text = captured.err
    assert "persam" in text and "vit_t" in text and "tabby" in text
    assert re.search(r"ref\.jpg.*mask.*ref\.png", text) and re.search(r"01\.jpg.*mask.*ref\.png", text)
    assert "2 reference" in text

    assert run_cli(["learn", *ref_args(cat), "--finetune", "--steps", "2", "--out", concept,
                    *model_args(random_vit_t_checkpoint)]) == 0
    text = capsys.readouterr().err
    assert "persam_f" in text and "2 steps" in text


# --------------------------------------------------------------------------------------------
# 10. help texts


def help_text(capsys, command):
    assert run_cli([command, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())


def model_help(capsys, command):
    match = re.search(r"--model \{[a-z0-9_.+,]+\} (.*?) --checkpoint", help_text(capsys, command))
    assert match, command
    return match.group(1)


def test_help_says_where_the_concepts_model_is_the_default(capsys):
    for command in ("segment", "learn", "app"):
        assert "concept" not in model_help(capsys, command) and "default vit_t" in model_help(capsys, command)
    assert "the concept's" in model_help(capsys, "apply")
    assert "with --concept: the concept's" in model_help(capsys, "track")


def test_precision_help_does_not_read_as_a_bf16_default(capsys):
    for command in ("segment", "learn", "apply", "app", "track"):
        text = help_text(capsys, command)
        assert "bf16 on CPU" not in text
        match = re.search(r"--precision \{fp32,bf16,fp16\} (.*?) --backend", text)
        assert match and "fp32 (default)" in match.group(1) and "fp16: GPU only" in match.group(1), match
