"""`persam eval perseg` and `persam eval davis` end to end with a random TinyViT checkpoint."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import DAVIS, PERSEG
from persam.cli.eval_commands import main

CLASSES = ["cat", "colorful_sneaker", "duck_toy"]
SEQ = "car-shadow"


@pytest.fixture(scope="module")
def checkpoint(random_vit_t_checkpoint):
    return random_vit_t_checkpoint


def _model_args(checkpoint):
    return ["--model", "vit_t", "--checkpoint", str(checkpoint), "-q"]


def _scores(out):
    return json.loads((out / "scores.json").read_text())


# --------------------------------------------------------------------------- PerSeg


@pytest.fixture(scope="module")
def perseg_run(checkpoint, tmp_path_factory):
    if not PERSEG.is_dir():
        pytest.skip(f"shared data not found at {PERSEG}")
    out = tmp_path_factory.mktemp("perseg")
    assert main(["perseg", "--data", str(PERSEG), "--out", str(out), *_model_args(checkpoint)]) == 0
    return out


def test_perseg_outputs(perseg_run):
    out = perseg_run
    for c in CLASSES:
        names = sorted(p.name for p in (out / "pred" / c).glob("*.png"))
        assert names == ["01.png", "02.png"]  # the reference 00 is not predicted
        img = Image.open(out / "pred" / c / "01.png")
        assert img.mode == "P" and img.size == Image.open(PERSEG / "Images" / c / "01.jpg").size
        assert set(np.unique(np.asarray(img)).tolist()) <= {0, 1}
    scores = _scores(out)
    assert set(scores["classes"]) == set(CLASSES)
    assert scores["method"] == "persam" and scores["model"] == "vit_t"
    for s in scores["classes"].values():
        assert s["n_images"] == 2 and 0 <= s["iou"] <= 1 and 0 <= s["biou"] <= 1
    assert scores["miou"] == pytest.approx(np.mean([s["iou"] for s in scores["classes"].values()]))
    assert scores["timing"]["per_image"]["count"] == 6 and scores["timing"]["per_image"]["mean_s"] > 0
    csv_lines = (out / "scores.csv").read_text().splitlines()
    assert csv_lines[0].startswith("class,") and len(csv_lines) == 1 + 3 + 1
    assert Image.open(out / "scores.png").format == "PNG"


def test_perseg_resume_and_pred_rescore(perseg_run, tmp_path, capsys):
    out = perseg_run
    first = _scores(out)
    # resume: everything exists already, nothing is recomputed, same scores
    assert main(["perseg", "--data", str(PERSEG), "--out", str(out), "--checkpoint", "/nonexistent.pt",
                 "--model", "vit_t", "-q"]) == 2  # the checkpoint is still checked
    rescore = tmp_path / "rescore"
    assert main(["perseg", "--data", str(PERSEG), "--pred", str(out / "pred"), "--out", str(rescore), "-q"]) == 0
    again = _scores(rescore)
    assert again["classes"] == first["classes"] and again["images"] == first["images"]
    assert again["miou"] == first["miou"] and again["mbiou"] == first["mbiou"]
    assert again["timing"] is None
    assert "mean" in capsys.readouterr().out


def test_perseg_resume_skips_done_images(perseg_run, checkpoint, tmp_path):
    import shutil

    out = tmp_path / "resume"
    shutil.copytree(perseg_run, out)  # the predictions and eval.json, which says how they were made
    assert main(["perseg", "--data", str(PERSEG), "--out", str(out), "--classes", "cat,duck_toy",
                 *_model_args(checkpoint)]) == 0
    scores = _scores(out)
    assert scores["timing"]["skipped_images"] == 4 and scores["timing"]["per_image"]["count"] == 0
    assert list(scores["classes"]) == ["cat", "duck_toy"]


def test_perseg_ground_truth_scores_one(tmp_path):
    if not PERSEG.is_dir():
        pytest.skip(f"shared data not found at {PERSEG}")
    assert main(["perseg", "--data", str(PERSEG), "--pred", str(PERSEG / "Annotations"), "--out", str(tmp_path), "-q"]) == 0
    scores = _scores(tmp_path)
    assert scores["miou"] == 1.0 and scores["mbiou"] == 1.0


def test_perseg_missing_prediction_is_an_error(tmp_path, capsys):
    if not PERSEG.is_dir():
        pytest.skip(f"shared data not found at {PERSEG}")
    (tmp_path / "pred" / "cat").mkdir(parents=True)
    assert main(["perseg", "--data", str(PERSEG), "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "o"),
                 "--classes", "cat", "-q"]) == 2
    assert "missing predictions" in capsys.readouterr().err


# --------------------------------------------------------------------------- DAVIS


@pytest.fixture(scope="module")
def davis_run(checkpoint, tmp_path_factory):
    if not (DAVIS / "JPEGImages").is_dir():
        pytest.skip(f"shared data not found at {DAVIS}")
    out = tmp_path_factory.mktemp("davis")
    assert main(["davis", "--data", str(DAVIS), "--out", str(out), "--sequences", SEQ, "--max-frames", "4",
                 *_model_args(checkpoint)]) == 0
    return out


def test_davis_outputs(davis_run):
    out = davis_run
    names = sorted(p.name for p in (out / "pred" / SEQ).glob("*.png"))
    assert names == ["00000.png", "00001.png", "00002.png", "00003.png"]
    for name in names:
        img = Image.open(out / "pred" / SEQ / name)
        assert img.mode == "P" and img.size == (854, 480)
        assert set(np.unique(np.asarray(img)).tolist()) <= {0, 1}
    first = np.asarray(Image.open(out / "pred" / SEQ / "00000.png"))
    assert np.array_equal(first, np.asarray(Image.open(DAVIS / "Annotations" / "480p" / SEQ / "00000.png")))
    scores = _scores(out)
    seq = scores["sequences"][SEQ]
    assert len(seq["objects"]["1"]["J"]) == 2  # frames 1 and 2: first and last excluded
    for metric in ("J", "F"):
        assert set(scores["summary"][metric]) == {"mean", "recall", "decay"}
        assert 0 <= scores["summary"][metric]["mean"] <= 1
    assert scores["summary"]["J&F"] == pytest.approx((scores["summary"]["J"]["mean"] + scores["summary"]["F"]["mean"]) / 2)
    assert scores["timing"]["per_frame"]["count"] == 3 and scores["timing"]["per_frame"]["mean_s"] > 0
    assert (out / "scores.csv").read_text().startswith("sequence,object,J&F")
    assert Image.open(out / "scores.png").format == "PNG"


def test_davis_resume_and_pred_rescore(davis_run, checkpoint, tmp_path):
    out = davis_run
    first = _scores(out)
    assert main(["davis", "--data", str(DAVIS), "--out", str(out), "--sequences", SEQ, "--max-frames", "4",
                 *_model_args(checkpoint)]) == 0
    resumed = _scores(out)
    assert resumed["timing"]["skipped_sequences"] == [SEQ]
    assert resumed["sequences"] == first["sequences"]
    rescore = tmp_path / "rescore"
    assert main(["davis", "--data", str(DAVIS), "--pred", str(out / "pred"), "--out", str(rescore),
                 "--max-frames", "4", "-q"]) == 0
    again = _scores(rescore)
    assert again["sequences"] == first["sequences"] and again["summary"] == first["summary"]


def test_davis_ground_truth_scores_one(tmp_path):
    if not (DAVIS / "JPEGImages").is_dir():
        pytest.skip(f"shared data not found at {DAVIS}")
    assert main(["davis", "--data", str(DAVIS), "--pred", str(DAVIS / "Annotations" / "480p"),
                 "--out", str(tmp_path), "-q"]) == 0
    summary = _scores(tmp_path)["summary"]
    assert summary["J"]["mean"] == 1.0 and summary["F"]["mean"] == 1.0 and summary["J&F"] == 1.0
    assert summary["J"]["recall"] == 1.0 and summary["J"]["decay"] == 0.0
