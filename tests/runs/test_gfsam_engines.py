"""GF-SAM in the engines (issue 25): `persam segment --method gfsam --engine ray` writes the bytes the
local engine writes, its workers loading SAM and the DINOv2 themselves (the task is sent without the
model); and the engine's per-image work gives the same bits whatever torch's thread count.

Random vit_t SAM and DINOv2 ViT-S/14 weights, 8 prompt points, a 10 x 10 DINOv2 grid (its side is
in the task's settings, which reach the workers), two 96-pixel photos.
"""

from dataclasses import replace

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cli_testing import run_cli, strict_json, write_cat_photos
from sam_testing import random_state_dict


@pytest.fixture(scope="module")
def dinov2_checkpoint(tmp_path_factory):
    from sam.dinov2 import build_dinov2

    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(random_state_dict(build_dinov2("vits14"), seed=4), path)
    return path


@pytest.fixture(scope="module")
def data(perseg_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_cat_photos(perseg_dir, root, 96)
    return root


@pytest.fixture(autouse=True)
def small_grid(monkeypatch):
    from persam.cli import gfsam_command

    original = gfsam_command.gfsam_settings
    monkeypatch.setattr(gfsam_command, "gfsam_settings",
                        lambda args, recorded=None: replace(original(args, recorded), dinov2_side=140))


def segment_argv(data, out, checkpoint, dinov2_checkpoint):
    return ["segment", "--method", "gfsam", "--ref-image", data / "ref.jpg", "--ref-mask", data / "ref.png",
            data / "targets", "--out", out, "--multi", "--dinov2", "vits14", "--dinov2-checkpoint", dinov2_checkpoint,
            "--max-points", "8", "--model", "vit_t", "--checkpoint", checkpoint, "-q"]


def test_task_pickles_without_its_model(data, random_vit_t_checkpoint, dinov2_checkpoint):
    from persam.method.gfsam import GFSAMConcept, GFSAMReference, GFSAMSettings
    from persam.runs.gfsam_run import GFSAMTask
    from persam.runs.models import build_dinov2_features

    reference = GFSAMReference(torch.ones(4, 3), (2, 2), torch.ones(4), torch.zeros(4))
    dinov2 = build_dinov2_features("vits14", dinov2_checkpoint, backend="torch")
    task = GFSAMTask(GFSAMConcept([reference], "vits14"), GFSAMSettings(max_points=8), dinov2)
    sent = pickle.loads(pickle.dumps(task))
    assert sent.dinov2 is None and task.dinov2 is dinov2 and len(pickle.dumps(task)) < 10_000
    assert sent.settings == task.settings and sent.concept.dinov2_variant == "vits14"


def test_segment_targets_same_bits_whatever_the_threads(data, random_vit_t_checkpoint, dinov2_checkpoint):
    from persam.method.gfsam import GFSAM, GFSAMSettings
    from persam.runs.gfsam_run import GFSAMTask
    from persam.runs.local import segment_targets
    from persam.runs.models import build_dinov2_features, build_predictor
    from persam.runs.records import RunOptions, Target
    from persam.data.io import load_image, load_mask

    predictor = build_predictor("vit_t", random_vit_t_checkpoint, "cpu", "fp32", "torch", log=None)
    dinov2 = build_dinov2_features("vits14", dinov2_checkpoint, backend="torch")
    settings = GFSAMSettings(max_points=8, dinov2_side=140)
    image = load_image(data / "ref.jpg")
    concept = GFSAM(predictor, dinov2, settings).learn(image, load_mask(data / "ref.png", image.shape))
    task = GFSAMTask(concept, settings, dinov2)
    targets = [Target(data / "targets" / f"{n}.jpg", n) for n in ("01", "02")]
    options = RunOptions(multi=True, batch_size=2)
    threads = torch.get_num_threads()
    try:
        runs = []
        for count, groups in ((2, [targets]), (1, [targets[:1], targets[1:]])):
            torch.set_num_threads(count)
            runs.append([r for group in groups for r in segment_targets(predictor, task, group, options)])
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*runs):
        assert first.outputs == second.outputs
        drop = ("timings", "group_size")
        assert {k: v for k, v in first.record.items() if k not in drop} == \
               {k: v for k, v in second.record.items() if k not in drop}


def test_ray_engine_writes_the_local_bytes(data, random_vit_t_checkpoint, dinov2_checkpoint, tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    pytest.importorskip("pyarrow")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert run_cli(segment_argv(data, local, random_vit_t_checkpoint, dinov2_checkpoint)) == 0
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        assert run_cli([*segment_argv(data, on_ray, random_vit_t_checkpoint, dinov2_checkpoint),
                        "--engine", "ray", "--workers", "1", "--batch-size", "1"]) == 0
    finally:
        ray.shutdown()
    a, b = strict_json(local / "results.json"), strict_json(on_ray / "results.json")
    assert a["key"] == b["key"] and a["made_with"] == b["made_with"] and a["files"] == b["files"]
    for record in b["images"]:
        assert record["status"] == "ok"
        for name in record["outputs"].values():
            assert (on_ray / name).read_bytes() == (local / name).read_bytes(), name
    labels = [np.asarray(Image.open(local / r["outputs"]["mask"])) for r in a["images"]]
    assert any(label.any() for label in labels)


def test_instances_become_objects_largest_first_with_their_points_and_boxes():
    from persam.method.gfsam import GFSAMSegmentation
    from persam.method.gfsam_graph import CANDIDATE, KEPT
    from persam.runs.gfsam_run import as_segmentations

    small, large = np.zeros((20, 30), bool), np.zeros((20, 30), bool)
    small[2:5, 3:6] = True
    large[10:18, 12:28] = True
    points = np.array([[4, 3], [20, 14], [25, 12], [1, 1]], np.float32)
    found = GFSAMSegmentation(small | large, [small, large], 0.8, True, points,
                              np.array([KEPT, KEPT, KEPT, CANDIDATE]), np.array([0, 1, 1, 2]))
    objects = as_segmentations(found, multi=True, max_objects=5)
    assert [int(o.mask.sum()) for o in objects] == [int(large.sum()), int(small.sum())]
    assert objects[0].points.tolist() == [[20, 14], [25, 12]] and objects[1].points.tolist() == [[4, 3]]
    assert objects[0].box.tolist() == [12, 10, 27, 17] and objects[1].box.tolist() == [3, 2, 5, 4]
    assert all(o.found and o.iou_score == o.peak_similarity == 0.8 for o in objects)
    assert len(as_segmentations(found, multi=True, max_objects=1)) == 1
    union = as_segmentations(found, multi=False, max_objects=5)
    assert len(union) == 1 and np.array_equal(union[0].mask, small | large) and len(union[0].points) == 3
    absent = replace(found, mask=np.zeros_like(small), instances=[], found=False, score=0.1)
    for multi in (True, False):  # one object, not found, that carries the score into the record
        (nothing,) = as_segmentations(absent, multi=multi, max_objects=5)
        assert not nothing.found and not nothing.mask.any() and nothing.box is None and len(nothing.points) == 0
        assert nothing.peak_similarity == 0.1
