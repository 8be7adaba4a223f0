"""`persam segment / learn / apply --method gfsam` as a user types them (issue 25), on random vit_t
SAM weights and a random DINOv2 ViT-S/14 in Meta's layout.

For speed the tests give GF-SAM 8 prompt points (the hidden --max-points) and a 10 x 10 DINOv2
grid (dinov2_side 140, patched into the command's settings), and encode each distinct SAM input
once (memoized_encoder); what is asserted is the command's behaviour, not the method's values
(tests/method/test_gfsam_*.py hold those).
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from cli_testing import error_line, memoized_encoder, run_cli, strict_json, write_cat_photos
from sam_testing import random_state_dict

SIDE = 96  # the test photos' side


@pytest.fixture(scope="module")
def dinov2_checkpoint(tmp_path_factory):
    from sam.dinov2 import build_dinov2

    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(random_state_dict(build_dinov2("vits14"), seed=4), path)
    return path


@pytest.fixture(scope="module")
def data(perseg_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_cat_photos(perseg_dir, root, SIDE)
    return root


@pytest.fixture(autouse=True)
def small_gfsam(monkeypatch):
    """A 10 x 10 DINOv2 grid in every GF-SAM run of these tests; each SAM input encoded once."""
    from persam.cli import gfsam_command

    original = gfsam_command.gfsam_settings
    monkeypatch.setattr(gfsam_command, "gfsam_settings",
                        lambda args, recorded=None: replace(original(args, recorded), dinov2_side=140))
    with memoized_encoder():
        yield


def gfsam_args(random_vit_t_checkpoint, dinov2_checkpoint):
    return ["--dinov2", "vits14", "--dinov2-checkpoint", dinov2_checkpoint, "--max-points", "8",
            "--model", "vit_t", "--checkpoint", random_vit_t_checkpoint, "-q"]


def reference(data):
    return ["--ref-image", data / "ref.jpg", "--ref-mask", data / "ref.png"]


def test_segment_writes_the_union_masks_and_records(data, random_vit_t_checkpoint, dinov2_checkpoint, tmp_path):
    out = tmp_path / "out"
    argv = ["segment", "--method", "gfsam", *reference(data), data / "targets", "--out", out,
            *gfsam_args(random_vit_t_checkpoint, dinov2_checkpoint)]
    assert run_cli(argv) == 0
    results = strict_json(out / "results.json")
    assert results["method"] == "gfsam" and results["dinov2"] == "vits14"
    assert results["made_with"]["dinov2_sha256"] and results["made_with"]["gfsam"]["max_points"] == 8
    for record in results["images"]:
        mask = np.asarray(Image.open(out / record["outputs"]["mask"]))
        assert mask.shape == (SIDE, SIDE)
        assert record["found"] == bool(mask.any())
        assert record["score"] == record["iou_score"] == record["peak_similarity"]
        assert (out / record["outputs"]["overlay"]).is_file()
        if record["found"]:
            x0, y0, x1, y1 = record["boxes"][0]
            ys, xs = np.nonzero(mask)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())
    # a re-run skips the done photos; another DINOv2 setting is another run, refused without --overwrite
    assert run_cli(argv) == 0
    assert run_cli([*argv[:-1], "9"]) == 2


def test_min_similarity_above_every_score_answers_not_found(data, random_vit_t_checkpoint, dinov2_checkpoint,
                                                            tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(["segment", "--method", "gfsam", *reference(data), data / "targets" / "01.jpg", "--out", out,
                    "--min-similarity", "1", *gfsam_args(random_vit_t_checkpoint, dinov2_checkpoint)]) == 0
    record = strict_json(out / "results.json")["images"][0]
    assert record["found"] is False and record["score"] < 1
    assert not np.asarray(Image.open(out / "01.png")).any()
    assert "not found in 1: 01.jpg" in capsys.readouterr().err


def test_learn_apply_multi_and_coco(data, random_vit_t_checkpoint, dinov2_checkpoint, tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    from persam.data.concept import load_concept

    concept = tmp_path / "cat.concept"
    assert run_cli(["learn", "--method", "gfsam", *reference(data), *reference(data), "--out", concept,
                    *gfsam_args(random_vit_t_checkpoint, dinov2_checkpoint)]) == 0
    learned = load_concept(concept)
    assert learned.method == "gfsam" and len(learned.references) == 2 and learned.dinov2_variant == "vits14"
    assert learned.model_type == "vit_t" and len(learned.checkpoint_sha256) == 64
    assert learned.references[0].grid == (10, 10) and learned.settings["max_points"] == 8

    out = tmp_path / "out"
    assert run_cli(["apply", concept, data / "targets", "--out", out, "--multi", "--max-objects", "3",
                    "--format", "coco", *gfsam_args(random_vit_t_checkpoint, dinov2_checkpoint)]) == 0
    results = strict_json(out / "results.json")
    coco = COCO(str(out / "coco.json"))
    found_any = False
    for record in results["images"]:
        labels = np.asarray(Image.open(out / record["outputs"]["mask"]))
        objects = record["objects"]
        assert 1 <= len(objects) <= 3 if record["found"] else objects == []
        found_any = found_any or record["found"]
        assert sorted(set(np.unique(labels)) - {0}) == list(range(1, len(objects) + 1))
        areas = [o["area"] for o in objects]
        assert areas == sorted(areas, reverse=True)  # largest instance first
        for k, obj in enumerate(objects, start=1):
            assert obj["found"] and obj["score"] == obj["iou_score"] and obj["box"] is not None
            assert (labels == k).sum() <= obj["area"]  # an earlier instance keeps the pixels they share
        image_id = next(i["id"] for i in coco.dataset["images"] if i["persam_name"] == record["name"])
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(annotations) == len(objects)
        for k, annotation in enumerate(annotations, start=1):
            assert np.array_equal(coco.annToMask(annotation).astype(bool), labels == k)
    assert found_any  # the checks above saw objects


def test_concept_refused_with_another_dinov2_checkpoint(data, random_vit_t_checkpoint, dinov2_checkpoint, tmp_path,
                                                        capsys):
    from sam.dinov2 import build_dinov2

    concept = tmp_path / "cat.concept"
    assert run_cli(["learn", "--method", "gfsam", *reference(data), "--out", concept,
                    *gfsam_args(random_vit_t_checkpoint, dinov2_checkpoint)]) == 0
    other = tmp_path / "other_vits14.pth"
    torch.save(random_state_dict(build_dinov2("vits14"), seed=5), other)
    capsys.readouterr()
    args = gfsam_args(random_vit_t_checkpoint, other)
    assert run_cli(["apply", concept, data / "targets", "--out", tmp_path / "out", *args]) == 2
    line = error_line(capsys)
    assert str(concept) in line and "DINOv2 vits14" in line and "learn it again" in line
    assert not (tmp_path / "out").exists()


def test_missing_or_unfit_dinov2_checkpoint_is_one_line(data, random_vit_t_checkpoint, dinov2_checkpoint, tmp_path,
                                                        capsys, monkeypatch):
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "cache"))
    argv = ["segment", "--method", "gfsam", *reference(data), data / "targets", "--out", tmp_path / "out",
            "--model", "vit_t", "--checkpoint", random_vit_t_checkpoint, "-q"]
    assert run_cli(argv) == 2
    line = error_line(capsys)
    assert "persam download dinov2_vitl14" in line and "--dinov2-checkpoint" in line
    assert run_cli([*argv, "--dinov2-checkpoint", tmp_path / "nothing.pth"]) == 2
    assert "--dinov2-checkpoint" in error_line(capsys) and not (tmp_path / "out").exists()
    # a ViT-S/14 file given as the default ViT-L/14: refused when it loads, before --out is made
    assert run_cli([*argv, "--dinov2-checkpoint", dinov2_checkpoint]) == 2
    line = error_line(capsys)
    assert str(dinov2_checkpoint) in line and "vits14" in line and not (tmp_path / "out").exists()


def test_empty_reference_mask_is_one_line(data, random_vit_t_checkpoint, dinov2_checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((SIDE, SIDE), np.uint8)).save(empty)
    assert run_cli(["segment", "--method", "gfsam", "--ref-image", data / "ref.jpg", "--ref-mask", empty,
                    data / "targets", "--out", tmp_path / "out",
                    *gfsam_args(random_vit_t_checkpoint, dinov2_checkpoint)]) == 2
    line = error_line(capsys)
    assert str(empty) in line and "empty" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, says", [(["--finetune"], "--finetune"), (["--save-similarity"], "--save-similarity")])
def test_flags_of_other_methods_are_refused(data, random_vit_t_checkpoint, dinov2_checkpoint, tmp_path, capsys,
                                            extra, says):
    assert run_cli(["segment", "--method", "gfsam", *reference(data), data / "targets", "--out", tmp_path / "out",
                    *extra, *gfsam_args(random_vit_t_checkpoint, dinov2_checkpoint)]) == 2
    assert says in error_line(capsys)


def test_dinov2_flags_without_gfsam_are_refused(data, random_vit_t_checkpoint, tmp_path, capsys):
    assert run_cli(["segment", *reference(data), data / "targets", "--out", tmp_path / "out", "--dinov2", "vits14",
                    "--model", "vit_t", "--checkpoint", random_vit_t_checkpoint]) == 2
    assert "--method gfsam" in error_line(capsys)


def test_model_choices_are_sams_and_download_lists_families(capsys):
    from persam.cli.commands import build_parser

    assert run_cli(["segment", "--model", "dinov2_vits14", "--ref-image", "x.jpg", "y", "--out", "o"]) == 2
    assert "invalid choice" in error_line(capsys)
    help_text = build_parser()._subparsers._group_actions[0].choices["download"].format_help()
    assert "DINOv2" in " ".join(help_text.split()) and "dinov2_vitl14" in help_text
    segment_help = build_parser()._subparsers._group_actions[0].choices["segment"].format_help()
    assert "--dinov2-checkpoint" in segment_help and "--max-points" not in segment_help
