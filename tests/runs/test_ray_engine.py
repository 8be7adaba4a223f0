"""`persam apply / segment --engine ray` (issue 12): the same outputs as the local engine, on Ray.

One module-scoped local Ray (``ray.init(num_cpus=2)``), three DreamBooth photos and a random
vit_t checkpoint: the Ray run (from a parquet SOURCE, interrupted after its first image, then
resumed) must leave masks, overlays and records bit-identical to the local engine's (timings
aside).  The SOURCE forms (text file, parquet, file:// URIs) are checked without Ray.  Tests
that need Ray or pyarrow skip when they are missing (``pip install 'persam[ray]'``).

Bit-identity by default (issue 23, item 2): on a CPU both engines segment each image alone on one
torch thread (persam.method.pipeline.each_on_one_thread), so the local run here takes 3 threads and
groups of 4 while the Ray workers hold 1 CPU and get batches of 2; segment_targets gives the same
bits whatever the thread count and the group, with the torch and the OpenVINO encoders.  A Ray
run with the default options, in a process of its own, writes the local engine's files and
nothing of Ray's on stderr (item 9); SIGTERM or Ctrl-C to it ends the Ray it started at once,
and a worker killed mid-run is replaced by the driver (item 16).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_testing import error_line, run_cli, strict_json
from persam.data.sources import expand_sources, image_sha256, image_stat, load_image, read_image_bytes
from persam.data.uri_sources import UriPath

DREAMBOOTH = Path(__file__).resolve().parents[3] / "shared" / "data" / "dreambooth"
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
    from persam.data.concept import save_concept
    from persam.runs.models import build_predictor
    from persam.method.pipeline import learn_concept
    from persam.runs.key import file_sha256

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


LOCAL_THREADS = 3  # the local runs' torch threads: not the 1 of a Ray worker holding one CPU


@contextlib.contextmanager
def torch_threads(count):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_out(photos, concept_file, random_vit_t_checkpoint, tmp_path_factory):
    """The local engine's outputs for the photos, on LOCAL_THREADS torch threads."""
    out = tmp_path_factory.mktemp("local")
    with torch_threads(LOCAL_THREADS):
        assert run_cli(["apply", concept_file, *photos, "--out", out, *model_args(random_vit_t_checkpoint)]) == 0
    return out


def same_outputs(out, expected):
    """Both folders hold the same files and records (timings aside), byte for byte."""
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in expected.iterdir())
    got, want = records(out), records(expected)
    assert list(got) == list(want)
    for name, record in want.items():
        assert same_record(got[name], record), name
        for file in record["outputs"].values():
            assert (out / file).read_bytes() == (expected / file).read_bytes(), file


def persam_process(argv, env=None, **kwargs):
    """`persam ARGV` in a process of its own (its stdout and stderr piped, text)."""
    return subprocess.Popen([sys.executable, "-m", "persam", *map(str, argv)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


RAY_LINE = re.compile(
    r"^(\x1b\[[0-9;]*m)*\(.*?(raylet\)|gcs_server\)|pid=\d+)"  # a Ray process's output, forwarded
    r"|^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\]"  # Ray's C++ log
    r"|^\d{4}-\d\d-\d\d [\d:,]+\s+(DEBUG|INFO|WARNING|ERROR|CRITICAL) "  # Ray's Python log
    r"|^\*\*\* \w+ received"  # its fatal-signal handler
    r"|Ray\w*Warning"  # a Python warning of Ray's
)


def ray_lines(stderr):
    """The lines of stderr in one of Ray's formats."""
    return [line for line in stderr.splitlines() if RAY_LINE.search(line)]


def descendants(pid):
    """{pid: command line} of the processes under `pid` (Linux /proc), alive now."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append((int(entry.name), cmdline))
    found, todo = {}, [pid]
    while todo:
        for child, cmdline in children.get(todo.pop(), []):
            found[child] = cmdline
            todo.append(child)
    return found


def alive(pids):
    """Those of `pids` that still run (neither gone nor a zombie)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            running.append(pid)
    return running


# --------------------------------------------------------------------------------------------
# the Ray engine


def test_ray_run_interrupted_and_resumed_equals_the_local_run(ray_cluster, photos, concept_file, local_out,
                                                              random_vit_t_checkpoint, tmp_path, monkeypatch, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from persam.runs.folder import OutputFolder

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


# --------------------------------------------------------------------------------------------
# the same bits whatever the engine (issue 23, item 2), Ray quiet (item 9), Ray ended (item 16)


def has_backend(name):
    from sam.backends import is_installed

    return name == "torch" or is_installed(name)


@pytest.mark.parametrize("backend,multi", [("torch", False), ("torch", True), ("openvino", False)])
def test_segment_targets_gives_the_same_bits_whatever_the_threads_and_the_group(
        backend, multi, photos, concept_file, random_vit_t_checkpoint, tmp_path, monkeypatch):
    """What both engines run per group of images: each image's record and files are the same with
    3 torch threads and a group of 3 (the local engine), 1 thread and groups of 1 and 2 (Ray
    workers with one CPU), 2 threads and groups of 1.  Before, a thread count or a group changed
    the embeddings and logits by float rounding, and so the points, scores and overlays."""
    if not has_backend(backend):
        pytest.skip(f"{backend} is not installed")
    from persam.data.concept import load_concept
    from persam.runs.models import build_predictor
    from persam.runs.local import segment_targets
    from persam.runs.records import RunOptions, Target

    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "cache"))  # the OpenVINO export goes here
    concept = load_concept(concept_file)
    options = RunOptions(multi=multi, save_similarity=True)
    targets = [Target(p, f"{p.parent.name}_{p.stem}") for p in photos]

    def results(threads, groups):
        with torch_threads(threads):
            predictor = build_predictor("vit_t", random_vit_t_checkpoint, "cpu", "fp32", backend)
            found = []
            for group in groups:
                found += segment_targets(predictor, concept, [targets[i] for i in group], options)
        assert predictor.backend == backend
        return [({k: v for k, v in r.record.items() if k != "timings"}, r.outputs) for r in found]

    local = results(3, [range(3)])
    assert all(record["status"] == "ok" for record, _ in local)
    assert results(1, [range(1), range(1, 3)]) == local
    assert results(2, [range(1), range(1, 2), range(2, 3)]) == local


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_ray_with_default_options_writes_the_local_files_and_none_of_ray_logs(
        backend, photos, concept_file, random_vit_t_checkpoint, tmp_path, monkeypatch, capsys):
    """`persam apply --engine ray --workers 2` and the local engine, with the default options
    otherwise (the encoder backend: the test suite's torch, and "auto": OpenVINO where installed),
    write the same bytes; the Ray run, starting its own Ray, prints on stderr what the local run
    prints, nothing of Ray's (before: a token-authentication WARNING, an ``E ... core_worker``
    line on actor restarts, Ray Data's progress-bar WARNING and its INFO line at the end)."""
    pytest.importorskip("ray.data")
    pytest.importorskip("pyarrow")
    if backend == "auto":
        if not (has_backend("openvino") or has_backend("onnxruntime")):
            pytest.skip("auto is torch here: the torch case covers it")
        monkeypatch.delenv("PERSAM_BACKEND", raising=False)
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "cache"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, started for the run
    common = ["--model", "vit_t", "--checkpoint", random_vit_t_checkpoint, "-q"]
    local, ray = tmp_path / "local", tmp_path / "ray"
    from persam.runs.models import build_predictor

    build_predictor("vit_t", random_vit_t_checkpoint, "cpu", "fp32", "auto").prepare()  # the export, if any, built
    capsys.readouterr()
    with torch_threads(LOCAL_THREADS):
        assert run_cli(["apply", concept_file, *photos, "--out", local, *common]) == 0
    local_stderr = capsys.readouterr().err
    process = persam_process(["apply", concept_file, *photos, "--out", ray, "--engine", "ray", "--workers", "2",
                              *common], env=env)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert ray_lines(stderr) == []
    assert stderr.replace(str(ray), str(local)).splitlines() == local_stderr.splitlines()
    same_outputs(ray, local)


@pytest.fixture
def slow_run(concept_file, random_vit_t_checkpoint):
    """start(out): `persam apply` of six photos on Ray, one per worker call, in a process of its
    own (a Ray of its own); returned once the first image is recorded (that Ray is then running),
    with the photos."""
    pytest.importorskip("ray.data")
    pytest.importorskip("pyarrow")
    if not Path("/proc/self/stat").is_file():
        pytest.skip("needs Linux /proc to list the processes Ray started")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    many = sorted(DREAMBOOTH.glob("dog*/*.jpg"))[:6]

    def start(out):
        process = persam_process(["apply", concept_file, *many, "--out", out, "--engine", "ray", "--batch-size", "1",
                                  "--model", "vit_t", "--checkpoint", random_vit_t_checkpoint, "-q"], env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if records(out):
                    return process, many
            except (OSError, ValueError, KeyError):  # not written yet
                pass
            time.sleep(0.2)
        process.kill()
        pytest.fail(f"no image recorded within 300 s: {process.communicate()[1][-2000:]}")

    return start


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_stopped_ray_run_ends_the_ray_it_started(stop, slow_run, tmp_path):
    """SIGTERM (before: Ray's core worker aborted the driver with a stack trace, exit -6, the
    last batch unrecorded) and Ctrl-C stop a Ray run as Ctrl-C does: exit 130, what was received
    recorded, and no process of the Ray it started left a few seconds later."""
    out = tmp_path / "out"
    process, _ = slow_run(out)
    started = descendants(process.pid)
    assert any("raylet" in cmdline for cmdline in started.values()), started
    os.kill(process.pid, getattr(signal, stop))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "persam: interrupted" and ray_lines(stderr) == []
    assert all(r["status"] == "ok" for r in records(out).values())
    deadline = time.monotonic() + 10
    while alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(started) == [], {pid: started[pid] for pid in alive(started)}


def test_a_ray_worker_killed_mid_run_is_replaced(slow_run, tmp_path):
    """Ray restarts no worker (its restarts print an error line on every run, and would restart a
    worker that dies on an image forever): the driver sends the images it has not received to
    new workers, and the run ends well."""
    out = tmp_path / "out"
    process, many = slow_run(out)
    workers = [pid for pid, cmdline in descendants(process.pid).items() if "MapWorker" in cmdline]
    assert workers, descendants(process.pid)
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert re.search(r"^persam: warning: a Ray worker died .* go to new workers", stderr, re.M), stderr
    found = records(out)
    assert len(found) == len(many) and all(r["status"] == "ok" for r in found.values())


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


def test_workers_get_the_backend_the_driver_resolves(monkeypatch):
    """"auto" is resolved on the driver (as the local engine resolves it), so that a worker on a
    node with other packages does not pick another encoder (and other bits) silently."""
    from persam.cli.engine import _worker_backend
    from persam.errors import InputError
    from sam.backends import resolve_backend

    monkeypatch.delenv("PERSAM_BACKEND", raising=False)
    assert _worker_backend("auto", "cpu", "fp32") == resolve_backend("auto", "cpu", "fp32") != "auto"
    assert _worker_backend("auto", "cuda", "fp32") == "torch"  # GPU workers
    monkeypatch.setenv("PERSAM_BACKEND", "torch")
    assert _worker_backend("auto", "cpu", "fp32") == "torch"
    with pytest.raises(InputError, match="--backend openvino"):
        _worker_backend("openvino", "cuda", "fp32")


# --------------------------------------------------------------------------------------------
# SOURCEs (no Ray): text files, parquet files, file:// URIs


def test_text_file_source_relative_paths_comments_and_globs(photos, tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    shutil.copy(photos[0], folder / "a.jpg")
    (folder / "list.txt").write_text(f"# my photos\n\na.jpg\n{photos[1]}\n{photos[0].parent}/0[12].jpg\n")
    paths, warnings = expand_sources([str(folder / "list.txt")])
    assert paths == [folder / "a.jpg", photos[1], photos[0]]  # no duplicates
    assert warnings == []
    # a listed image that does not exist is bad input, named with its list (issue 23, item 8)
    (folder / "typo.txt").write_text(f"a.jpg\n{folder / 'missing.jpg'}\n")
    from persam.errors import InputError

    with pytest.raises(InputError) as refused:
        expand_sources([str(folder / "typo.txt")])
    assert str(refused.value) == f"target {folder / 'missing.jpg'} (listed in {folder / 'typo.txt'}): no such file or folder"
    (folder / "empty.txt").write_text("# nothing\n")
    assert expand_sources([str(folder / "empty.txt")]) == ([], [f"{folder / 'empty.txt'} lists no images"])


def test_parquet_source_columns(photos, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from persam.errors import InputError

    pq.write_table(pa.table({"image": [photos[0].name], "n": [1]}), tmp_path / "rel.parquet")
    shutil.copy(photos[0], tmp_path / photos[0].name)
    assert expand_sources([str(tmp_path / "rel.parquet")])[0] == [tmp_path / photos[0].name]  # beside the file
    pq.write_table(pa.table({"a": ["x"], "b": ["y"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="no path column"):
        expand_sources([str(tmp_path / "bad.parquet")])


def test_file_uris_read_through_pyarrow(photos, tmp_path):
    pytest.importorskip("pyarrow")
    from persam.runs.engine_ray import read_files

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
