"""`persam eval fss` and `persam eval coco20i` as a user types them, on tiny datasets with random vit_t weights."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from eval.run_fewshot import run_fss
from persam.cli.eval_commands import main
from fewshot_testing import write_coco, write_fss, write_split

CLASSES = ["bus", "coin"]


@pytest.fixture(scope="module")
def fss(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fss")
    root = write_fss(tmp / "FSS-1000", CLASSES)
    return root, write_split(tmp / "two.txt", CLASSES)


def _model(checkpoint):
    return ["--model", "vit_t", "--checkpoint", str(checkpoint), "-q"]


def _scores(out):
    return json.loads((out / "scores.json").read_text())


@pytest.fixture(scope="module")
def fss_run(fss, random_vit_t_checkpoint, tmp_path_factory):
    root, split = fss
    out = tmp_path_factory.mktemp("fss_run") / "out"
    assert main(["fss", "--data", str(root), "--split", str(split), "--out", str(out), "--img-size", "64",
                 "--max-episodes", "1", *_model(random_vit_t_checkpoint)]) == 0
    return out


def test_fss_outputs(fss_run, capsys):
    out = fss_run
    names = sorted(p.name for p in (out / "pred" / "bus").glob("*.png"))
    assert names == ["1.png"]  # the first query
    img = Image.open(out / "pred" / "bus" / "1.png")
    assert img.mode == "P" and img.size == (64, 64) and set(np.unique(np.asarray(img))) <= {0, 1}
    scores = _scores(out)
    assert scores["method"] == "persam" and scores["shots"] == 1 and scores["size"] == 64
    assert list(scores["classes"]) == ["bus"] and scores["classes"]["bus"]["episodes"] == 1
    assert scores["miou"] == pytest.approx(scores["classes"]["bus"]["iou"]) and 0 <= scores["fb_iou"] <= 1
    ious = [e["iou"] for e in scores["episodes"]]
    assert len(ious) == 1 and all(0 <= v <= 1 for v in ious)
    assert scores["timing"]["per_episode"]["count"] == 1
    assert scores["made_with"]["benchmark"] == "fss1000" and scores["made_with"]["size"] == 64
    lines = (out / "scores.csv").read_text().splitlines()
    assert lines[0] == "class,episodes,iou" and lines[-2].startswith("mIoU,1,") and lines[-1].startswith("FB-IoU,1,")
    assert Image.open(out / "scores.png").format == "PNG"


def test_fss_resume_and_mixed_settings(fss, fss_run, random_vit_t_checkpoint, tmp_path, capsys):
    root, split = fss
    out = tmp_path / "out"
    shutil.copytree(fss_run, out)
    before = (out / "pred" / "bus" / "1.png").stat().st_mtime_ns
    args = ["fss", "--data", str(root), "--split", str(split), "--out", str(out), "--img-size", "64",
            *_model(random_vit_t_checkpoint)]
    assert main([*args, "--max-episodes", "2"]) == 0  # an interrupted run continues
    scores = _scores(out)
    assert scores["timing"]["skipped_episodes"] == 1 and scores["timing"]["per_episode"]["count"] == 1
    assert (out / "pred" / "bus" / "1.png").stat().st_mtime_ns == before
    assert sorted(p.name for p in (out / "pred" / "bus").iterdir()) == ["1.png", "10.png"]  # the official order
    assert main([*args, "--max-episodes", "2"]) == 0  # all done: nothing is run again, the same scores
    again = _scores(out)
    assert again["timing"]["skipped_episodes"] == 2 and again["timing"]["per_episode"]["count"] == 0
    assert again["classes"] == scores["classes"] and again["fb_iou"] == scores["fb_iou"]
    capsys.readouterr()
    assert main([*args, "--max-episodes", "2", "--shots", "5"]) == 2  # other supports: not mixed in
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "made with other settings" in err and "--overwrite" in err


def test_fss_ground_truth_scores_one(fss, tmp_path):
    root, split = fss
    out = tmp_path / "gt"
    assert main(["fss", "--data", str(root), "--split", str(split), "--pred", str(root / "data"), "--out", str(out),
                 "--img-size", "0", "-q"]) == 0
    scores = _scores(out)
    assert scores["miou"] == 1.0 and scores["fb_iou"] == 1.0 and len(scores["classes"]) == 2
    assert sum(s["episodes"] for s in scores["classes"].values()) == 20


def test_fss_missing_split_classes_refused_before_out(fss, tmp_path, capsys):
    root, _ = fss
    split = write_split(tmp_path / "more.txt", CLASSES + ["yak", "zither"])
    out = tmp_path / "never"
    assert main(["fss", "--data", str(root), "--split", str(split), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "2 of the 4 classes" in err and "yak, zither" in err
    assert not out.exists()


def test_fss_default_split_names_missing_classes(fss, tmp_path, capsys):
    root, _ = fss
    assert main(["fss", "--data", str(root), "--out", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "238 of the 240 classes" in err and "fss1000_test.txt" in err  # bus and coin are test classes


def test_gfsam_refused_in_one_line_when_unavailable(fss, random_vit_t_checkpoint, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("persam.method.gfsam") is not None:
        pytest.skip("persam.method.gfsam exists: --method gfsam runs")
    root, split = fss
    out = tmp_path / "g"
    assert main(["fss", "--data", str(root), "--split", str(split), "--out", str(out), "--method", "gfsam",
                 *_model(random_vit_t_checkpoint)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--method gfsam" in err and not out.exists()


def test_gfsam_runs_with_its_dinov2(fss, random_vit_t_checkpoint, tmp_path, capsys):
    pytest.importorskip("persam.method.gfsam", reason="GF-SAM is not in this persam")
    import torch

    from sam.dinov2 import build_dinov2
    from sam_testing import random_state_dict

    root, split = fss
    dino = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(random_state_dict(build_dinov2("vits14"), seed=4), dino)
    args = ["fss", "--data", str(root), "--split", str(split), "--method", "gfsam", "--dinov2", "vits14",
            "--img-size", "56", "--max-episodes", "1", *_model(random_vit_t_checkpoint)]
    assert main([*args, "--out", str(tmp_path / "none")]) == 2  # no DINOv2 checkpoint: one line, nothing run
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--dinov2-checkpoint" in err and not (tmp_path / "none").exists()
    # the run itself through the library: 8 prompt points instead of 128 keep SAM's decoder fast on a CPU
    from persam.method.gfsam import GFSAMSettings

    out = tmp_path / "g"
    scores = run_fss(str(root), str(out), split=str(split), method="gfsam", model_type="vit_t",
                     checkpoint=str(random_vit_t_checkpoint), size=56, max_episodes=1, dinov2="vits14",
                     dinov2_checkpoint=str(dino), gfsam_settings=GFSAMSettings(max_points=8), progress=False)
    assert _scores(out)["miou"] == scores["miou"] and 0 <= scores["fb_iou"] <= 1
    assert scores["method"] == "gfsam" and scores["dinov2"] == "vits14" and scores["episodes_evaluated"] == 1
    assert scores["made_with"]["dinov2"] == "vits14" and len(scores["made_with"]["dinov2_sha256"]) == 64
    assert scores["made_with"]["gfsam"]["max_points"] == 8
    assert Image.open(out / "pred" / "bus" / "1.png").size == (56, 56)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "COCO2014"
    write_coco(root, fold=1)
    return root


def test_coco20i_run_and_ground_truth(coco, random_vit_t_checkpoint, tmp_path):
    split = coco / "splits" / "val" / "fold1.pkl"
    out = tmp_path / "run"
    assert main(["coco20i", "--data", str(coco), "--fold", "1", "--split", str(split), "--out", str(out),
                 "--img-size", "48", "--max-episodes", "1", *_model(random_vit_t_checkpoint)]) == 0
    scores = _scores(out)
    preds = sorted(p.name for p in (out / "pred" / "fold1").glob("*.png"))
    assert len(preds) == 1 and preds[0].startswith("0000_COCO_val2014_")
    assert Image.open(out / "pred" / "fold1" / preds[0]).size == (48, 48)
    assert scores["fold"] == 1 and scores["episodes_evaluated"] == 1
    from eval.fewshot_data import COCO_CLASS_NAMES

    fold_names = {COCO_CLASS_NAMES[1 + 4 * v] for v in range(20)}  # bicycle, bus, traffic light, ...
    assert len(scores["classes"]) == 1 and set(scores["classes"]) <= fold_names
    # the ground truth as predictions (class masks 0/1 at the images' size) scores 1 over all 1000 episodes
    from eval.fewshot_data import COCO20i

    dataset = COCO20i(coco, 1, split)
    gt_dir = tmp_path / "gt"
    for e in dataset.episodes(1):
        path = gt_dir / f"{e.name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(dataset.mask(e.query, e).astype(np.uint8) * 255).save(path)
    assert main(["coco20i", "--data", str(coco), "--fold", "1", "--split", str(split), "--pred", str(gt_dir),
                 "--out", str(tmp_path / "scored"), "--img-size", "0", "-q"]) == 0
    gt_scores = _scores(tmp_path / "scored")
    assert gt_scores["miou"] == 1.0 and gt_scores["fb_iou"] == 1.0 and len(gt_scores["classes"]) == 20


def test_coco20i_fold_out_of_range_is_a_usage_error(coco, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["coco20i", "--data", str(coco), "--fold", "4", "--out", str(tmp_path / "o")])
    assert info.value.code == 2


def test_a_refused_reference_names_its_episode(tmp_path):
    from eval.fewshot_data import FSS1000
    from eval.run_fewshot import predict_episodes
    from persam.errors import InputError, SettingError

    root = write_fss(tmp_path / "FSS-1000", CLASSES)
    dataset = FSS1000(root, write_split(tmp_path / "two.txt", CLASSES))
    episodes = dataset.episodes(1)[:1]

    def refuse(supports, query):
        raise ValueError("the reference mask is empty: there is no target to learn")

    with pytest.raises(InputError, match=r"^episode 0 \(query .*bus/1\.jpg, supports \d+\.jpg\): the reference"):
        predict_episodes(refuse, dataset, episodes, tmp_path / "pred", 32, "FSS", progress=False)
    with pytest.raises(SettingError, match=r"empty at img-size 1: nothing to learn"):  # the shape vanishes
        predict_episodes(refuse, dataset, episodes, tmp_path / "pred", 1, "FSS", progress=False)
    support = episodes[0].supports[0]
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(support.with_suffix(".png"))
    with pytest.raises(InputError, match=rf"support {support} is empty: nothing to learn"):
        predict_episodes(refuse, dataset, episodes, tmp_path / "pred", 0, "FSS", progress=False)
    assert not (tmp_path / "pred").exists()
