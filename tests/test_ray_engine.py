"""`persam apply / segment --engine ray` (issue 12): the same outputs as the local engine, on Ray.

One module-scoped local Ray (``ray.init(num_cpus=2)``), three DreamBooth photos and a random
vit_t checkpoint: the Ray run (from a parquet SOURCE, interrupted after its first image, then
resumed) must leave masks, overlays and records bit-identical to the local engine's (timings
aside).  The SOURCE forms (text file, parquet, file:// URIs) are checked without Ray.  Tests
that need Ray or pyarrow skip when they are missing (``pip install 'persam[ray]'``).

Bit-identity needs the same float arithmetic: the local run here uses one torch thread, as a
Ray worker holding one CPU does (torch's CPU kernels may sum in another order with more).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_testing import error_line, run_cli, strict_json
from persam.sources import UriPath, expand_sources, image_sha256, image_stat, load_image, read_image_bytes

DREAMBOOTH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth"
PHOTOS = [("dog", "01"), ("dog", "02"), ("cat2", "01")]  # two stems collide: dog_01, 02, cat2_01


# --------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def photos():
    paths = [DREAMBOOTH / subject / f"{stem}.jpg" for subject, stem in PHOTOS]
    if not all(p.is_file() for p in paths):
        pytest.skip(f"shared DreamBooth photos not found in {DREAMBOOTH}")
    return paths


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    pytest.importorskip("pyarrow")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def concept_file(photos, random_vit_t_checkpoint, tmp_path_factory):
    """A concept learned on dog/00.jpg with a centred box as its mask (the photos are unlabeled)."""
    from persam.concept import save_concept
    from persam.models import build_predictor
    from persam.pipeline import learn_concept
    from persam.run import file_sha256

    image = load_image(DREAMBOOTH / "dog" / "00.jpg")
    mask = np.zeros(image.shape[:2], bool)
    h, w = mask.shape
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
    predictor = build_predictor("vit_t", random_vit_t_checkpoint, "cpu", "fp32", "torch")
    concept = learn_concept(predictor, [(image, mask)])
    concept.name = "dog"
    path = tmp_path_factory.mktemp("concept") / "dog.concept"
    save_concept(concept, path, model_type="vit_t", checkpoint_sha256=file_sha256(random_vit_t_checkpoint))
    return path


def model_args(checkpoint):
    return ["--model", "vit_t", "--checkpoint", str(checkpoint), "--backend", "torch", "-q"]


def records(out):
    return {r["name"]: r for r in strict_json(out / "results.json")["images"]}


def same_record(a, b, ignore=("timings",)):
    return {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}


@pytest.fixture(scope="module")
def local_out(photos, concept_file, random_vit_t_checkpoint, tmp_path_factory):
    """The local engine's outputs for the photos, with one torch thread (as a 1-CPU Ray worker)."""
    out = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_cli(["apply", concept_file, *photos, "--out", out, *model_args(random_vit_t_checkpoint)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


# --------------------------------------------------------------------------------------------
# the Ray engine


def test_ray_run_interrupted_and_resumed_equals_the_local_run(ray_cluster, photos, concept_file, local_out,
                                                              random_vit_t_checkpoint, tmp_path, monkeypatch, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from persam.run import OutputFolder

    source = tmp_path / "photos.parquet"  # a parquet SOURCE: a path column (and another column)
    pq.write_table(pa.table({"subject": [s for s, _ in PHOTOS], "path": [str(p) for p in photos]}), source)
    out = tmp_path / "ray"
    argv = ["apply", concept_file, source, "--out", out, "--engine", "ray", "--workers", "1", "--batch-size", "2",
            *model_args(random_vit_t_checkpoint)]

    sent = []  # the images each run hands to Ray Data
    real_from_items = ray_cluster.data.from_items
    monkeypatch.setattr(ray_cluster.data, "from_items",
                        lambda items, **kw: sent.append([i["name"] for i in items]) or real_from_items(items, **kw))

    # 1. interrupted (Ctrl-C on the driver) once the first image has been written
    real_add = OutputFolder.add_result
    added = []

    def interrupt_after_first(self, target, result):
        if added:
            raise KeyboardInterrupt
        added.append(target.name)
        real_add(self, target, result)

    monkeypatch.setattr(OutputFolder, "add_result", interrupt_after_first)
    assert run_cli(argv) == 130
    assert "persam: interrupted" in capsys.readouterr().err
    first = records(out)
    assert list(first) == added and first[added[0]]["status"] == "ok"
    finished = out / first[added[0]]["outputs"]["mask"]
    finished_mtime = finished.stat().st_mtime_ns

    # 2. resumed: the finished image is not sent again, the others are
    monkeypatch.setattr(OutputFolder, "add_result", real_add)
    assert run_cli(argv) == 0
    assert sorted(sent[0]) == ["02", "cat2_01", "dog_01"]
    assert sorted(sent[1]) == sorted(set(sent[0]) - set(added))
    assert finished.stat().st_mtime_ns == finished_mtime
    resumed = records(out)
    assert resumed[added[0]]["status"] == "skipped" and resumed[added[0]]["reason"] == "already done"
    assert same_record(resumed[added[0]], first[added[0]], ignore=("status", "reason"))
    assert "persam: interrupted" not in capsys.readouterr().err

    # 3. what the two runs left is the local engine's, bit for bit (timings aside)
    local, ray = strict_json(local_out / "results.json"), strict_json(out / "results.json")
    assert [r["name"] for r in ray["images"]] == [r["name"] for r in local["images"]] == ["dog_01", "02", "cat2_01"]
    assert ray["key"] == local["key"] and ray["made_with"] == local["made_with"] and ray["files"] == local["files"]
    by_name = records(local_out)
    for record in ray["images"]:
        assert same_record(record, by_name[record["name"]], ignore=("timings", "status", "reason"))
        for name in record["outputs"].values():
            assert (out / name).read_bytes() == (local_out / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in local_out.iterdir())

    # 4. a third run (now the local engine) finds everything done: one folder, either engine
    sent.clear()
    assert run_cli(["apply", concept_file, source, "--out", out, *model_args(random_vit_t_checkpoint)]) == 0
    assert "all 3 image(s) already done" in capsys.readouterr().err and not sent


def test_ray_segment_with_a_text_file_source_and_coco(ray_cluster, photos, random_vit_t_checkpoint, tmp_path):
    """`segment` learns the concept on the driver and sends it to the workers; --format coco."""
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    ref = tmp_path / "ref.png"
    image = load_image(DREAMBOOTH / "dog" / "00.jpg")
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[100:-100, 100:-100] = 255
    Image.fromarray(mask).save(ref)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# one photo\n\n{photos[1]}\n")
    out = tmp_path / "out"
    assert run_cli(["segment", "--ref-image", DREAMBOOTH / "dog" / "00.jpg", "--ref-mask", ref, listing,
                    "--out", out, "--engine", "ray", "--workers", "2", "--format", "coco", "--name", "dog",
                    *model_args(random_vit_t_checkpoint)]) == 0
    results = strict_json(out / "results.json")
    assert [r["name"] for r in results["images"]] == ["02"] and results["images"][0]["status"] == "ok"
    coco = COCO(str(out / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["dog"]
    assert coco.imgs[1]["file_name"] == str(photos[1])


def test_engine_ray_without_ray_says_how_to_install_it(photos, concept_file, random_vit_t_checkpoint, tmp_path,
                                                       monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    out = tmp_path / "out"
    assert run_cli(["apply", concept_file, photos[0], "--out", out, "--engine", "ray",
                    *model_args(random_vit_t_checkpoint)]) == 2
    line = error_line(capsys)
    assert "--engine ray" in line and "pip install 'persam[ray]'" in line
    assert not out.exists() or not any(out.iterdir())  # nothing was run


def test_ray_options_need_engine_ray(photos, concept_file, random_vit_t_checkpoint, tmp_path, capsys):
    assert run_cli(["apply", concept_file, photos[0], "--out", tmp_path / "out", "--workers", "4",
                    *model_args(random_vit_t_checkpoint)]) == 2
    assert "--workers: only with --engine ray" in error_line(capsys)


# --------------------------------------------------------------------------------------------
# SOURCEs (no Ray): text files, parquet files, file:// URIs


def test_text_file_source_relative_paths_comments_and_globs(photos, tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    shutil.copy(photos[0], folder / "a.jpg")
    (folder / "list.txt").write_text(f"# my photos\n\na.jpg\n{photos[1]}\n{photos[0].parent}/0[12].jpg\n"
                                     f"{folder / 'missing.jpg'}\n")
    paths, warnings = expand_sources([str(folder / "list.txt")])
    assert paths == [folder / "a.jpg", photos[1], photos[0], folder / "missing.jpg"]  # no duplicates; missing kept
    assert warnings == []
    (folder / "empty.txt").write_text("# nothing\n")
    assert expand_sources([str(folder / "empty.txt")]) == ([], [f"{folder / 'empty.txt'} lists no images"])


def test_parquet_source_columns(photos, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from persam.io import InputError

    pq.write_table(pa.table({"image": [photos[0].name], "n": [1]}), tmp_path / "rel.parquet")
    shutil.copy(photos[0], tmp_path / photos[0].name)
    assert expand_sources([str(tmp_path / "rel.parquet")])[0] == [tmp_path / photos[0].name]  # beside the file
    pq.write_table(pa.table({"a": ["x"], "b": ["y"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="no path column"):
        expand_sources([str(tmp_path / "bad.parquet")])


def test_file_uris_read_through_pyarrow(photos, tmp_path):
    pytest.importorskip("pyarrow")
    from persam.engine_ray import read_files

    folder = photos[0].parent
    uri = f"file://{folder}"
    found, warnings = expand_sources([uri, f"{uri}/0[12].jpg"])
    locals_ = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")
    assert [str(p) for p in found] == [f"file://{p}" for p in locals_] and warnings == []
    one = found[1]
    assert isinstance(one, UriPath) and one.name == locals_[1].name and one.stem == locals_[1].stem
    assert one.parent.name == folder.name and folder.resolve() in one.parents
    assert read_image_bytes(one) == locals_[1].read_bytes()
    assert image_sha256(one) == image_sha256(locals_[1]) and image_stat(one) == image_stat(locals_[1])
    assert np.array_equal(load_image(one), load_image(locals_[1]))
    # the Ray read stage (a plain function): bytes, or the reason
    batch = read_files({"index": np.array([0, 1]), "name": np.array(["a", "b"]),
                        "path": np.array([str(one), f"{uri}/missing.jpg"])})
    assert batch["data"][0] == locals_[1].read_bytes() and batch["error"][0] == ""
    assert batch["data"][1] == b"" and "file not found" in batch["error"][1]
    assert expand_sources([f"{uri}/*.png"])[1] == [f"pattern {uri}/*.png matches no images"]
