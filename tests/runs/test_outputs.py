"""Outputs are never overwritten, mixed or lost (issue 8, section 2).

`persam segment / apply` write into an output folder that is shared with the user and with
other runs: these tests check that the user's files are never replaced, that results made with
other settings are never taken as done, that two runs cannot write one folder at once, that
outputs never collide, that the reference image is not segmented as a target, that files get
ordinary permissions and that results.json is strict JSON.

As in test_cli.py, the CLI runs in-process with a random-weight vit_t checkpoint and the image
encoder is memoised per image content; every test uses one or two small target images.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from persam.errors import InputError
from persam.data.io import atomic_save_png, atomic_write_bytes, atomic_write_text
from persam.runs.folder import plan_targets
from persam.runs.lock import LOCK_FILE, output_lock
from persam.runs.records import RunOptions, output_files

from cli_testing import error_line, memoized_encoder, model_args, ref_args, run_cli, strict_json, write_cat_photos

SIDE = 128


# --------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module", autouse=True)
def memo_encoder():
    """Encode each distinct image once for the whole module."""
    with memoized_encoder():
        yield


@pytest.fixture(scope="module")
def checkpoint(random_vit_t_checkpoint):
    return random_vit_t_checkpoint


@pytest.fixture(scope="module")
def data(perseg_dir, tmp_path_factory):
    """ref.jpg / ref.png (cat 00), targets/01.jpg and targets/02.jpg, downscaled."""
    root = tmp_path_factory.mktemp("data")
    write_cat_photos(perseg_dir, root, SIDE)
    return root


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------
# 1. the user's files in --out are never replaced


def test_users_files_in_out_are_never_replaced(data, checkpoint, tmp_path, capsys):
    target = data / "targets" / "01.jpg"

    photos = tmp_path / "photos"  # a folder of the user's PNG photos given as --out
    photos.mkdir()
    Image.open(target).save(photos / "01.png")
    before = (photos / "01.png").read_bytes()
    assert run_cli(["segment", *ref_args(data), target, "--out", photos, *model_args(checkpoint)]) == 2
    line = error_line(capsys)
    assert str(photos / "01.png") in line and "not written by persam" in line
    assert (photos / "01.png").read_bytes() == before
    assert listing(photos) == ["01.png"]  # no results.json, no lock left

    # targets inside --out: a second run would segment its own masks
    shutil.copy(target, photos / "a.jpg")
    assert run_cli(["segment", *ref_args(data), photos / "a.jpg", "--out", photos, *model_args(checkpoint)]) == 2
    line = error_line(capsys)
    assert "a.jpg" in line and "inside the output folder" in line
    assert listing(photos) == ["01.png", "a.jpg"]

    # a results.json that is not persam's, and a reference_mask.png of the user's (click reference)
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text('{"mine": true}\n')
    assert run_cli(["segment", *ref_args(data), target, "--out", other, *model_args(checkpoint)]) == 2
    assert "results.json" in error_line(capsys)
    assert (other / "results.json").read_text() == '{"mine": true}\n'
    (other / "results.json").unlink()
    Image.new("L", (SIDE, SIDE)).save(other / "reference_mask.png")
    assert run_cli(["segment", "--ref-image", data / "ref.jpg", "--ref-point", "64,64", target, "--out", other,
                    *model_args(checkpoint)]) == 2
    assert "reference_mask.png" in error_line(capsys)
    assert listing(other) == ["reference_mask.png"]


def test_a_file_written_just_before_a_run_was_killed_is_ours(data, checkpoint, tmp_path, monkeypatch, capsys):
    """results.json lists an output before it is written: a run stopped between writing the files
    of an image and recording it leaves files that the next run may replace."""
    import persam.runs.folder

    out = tmp_path / "out"
    argv = ["segment", *ref_args(data), data / "targets" / "01.jpg", "--out", out, *model_args(checkpoint)]
    real = persam.runs.folder.write_result

    def killed_after_writing(*args, **kwargs):
        real(*args, **kwargs)  # outputs written...
        raise KeyboardInterrupt  # ...but the record never saved

    monkeypatch.setattr(persam.runs.folder, "write_result", killed_after_writing)
    assert run_cli(argv) == 130
    results = strict_json(out / "results.json")
    assert results["images"] == [] and {"01.png", "01_overlay.jpg"} <= set(results["files"])
    assert (out / "01.png").is_file()
    monkeypatch.undo()
    capsys.readouterr()

    assert run_cli(argv) == 0
    results = strict_json(out / "results.json")
    assert [(r["name"], r["status"]) for r in results["images"]] == [("01", "ok")]
    assert LOCK_FILE not in listing(out)


# --------------------------------------------------------------------------------------------
# 2. a resume never keeps masks made with other settings


def test_changed_settings_are_refused_and_redone_with_overwrite(data, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    target = data / "targets" / "01.jpg"
    argv = ["segment", *ref_args(data), target, "--out", out, *model_args(checkpoint)]
    assert run_cli(argv) == 0
    first = strict_json(out / "results.json")
    assert first["images"][0]["key"] == first["key"] and len(first["key"]) == 16
    made_with = first["made_with"]
    assert made_with["method"] == "persam" and len(made_with["checkpoint_sha256"]) == 64
    assert len(made_with["reference_images"][0]) == 64 and len(made_with["reference_masks"][0]) == 64
    mask_before = (out / "01.png").stat().st_mtime_ns

    other_mask = tmp_path / "ref_other.png"
    mask = np.asarray(Image.open(data / "ref.png")).copy()
    mask[0, 0] = 255 - mask[0, 0]
    Image.fromarray(mask).save(other_mask)
    other_checkpoint = tmp_path / "other.pt"
    other_checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")
    changes = {
        "finetune": ["--finetune", "--steps", "1"],
        "min_similarity": ["--min-similarity", "0.1"],
        "multi": ["--multi"],
        "reference_masks": ["--ref-image", data / "ref.jpg", "--ref-mask", other_mask],
        "checkpoint_sha256": ["--checkpoint", other_checkpoint],
    }
    for setting, extra in changes.items():
        reference = [] if setting == "reference_masks" else ref_args(data)  # another reference replaces it
        capsys.readouterr()
        assert run_cli(["segment", *reference, target, "--out", out, *model_args(checkpoint), *extra]) == 2, setting
        line = error_line(capsys)
        assert "--overwrite" in line and setting in line and "01.jpg" in line, line
    assert (out / "01.png").stat().st_mtime_ns == mask_before
    assert strict_json(out / "results.json")["key"] == first["key"]

    assert run_cli(argv) == 0  # the same settings: done
    assert "already done" in capsys.readouterr().err
    assert run_cli([*argv, "--finetune", "--steps", "1", "--overwrite"]) == 0
    redone = strict_json(out / "results.json")
    assert redone["key"] != first["key"] and redone["made_with"]["method"] == "persam_f"
    assert redone["made_with"]["finetune"] == {"steps": 1, "resolution": "native"}
    assert [(r["status"], r["key"]) for r in redone["images"]] == [("ok", redone["key"])]
    assert "other_keys" not in redone and redone["summary"]["other_settings"] == 0

    # another image with other settings into the same folder: the earlier record is kept, and said so
    capsys.readouterr()
    assert run_cli(["segment", *ref_args(data), data / "targets" / "02.jpg", "--out", out,
                    *model_args(checkpoint)]) == 0
    assert "other settings" in capsys.readouterr().err
    mixed = strict_json(out / "results.json")
    keys = {r["name"]: r["key"] for r in mixed["images"]}
    assert keys == {"02": mixed["key"], "01": redone["key"]}
    assert mixed["other_keys"] == {redone["key"]: redone["made_with"]} and mixed["summary"]["other_settings"] == 1


def test_apply_keys_on_the_concept_content(data, checkpoint, tmp_path, capsys):
    from persam.data.concept import save_concept
    from persam.method.pipeline import Concept
    from persam.runs.key import file_sha256

    sha = file_sha256(checkpoint)
    concepts = []
    for seed in (0, 1):
        vector = torch.nn.functional.normalize(torch.randn(256, generator=torch.Generator().manual_seed(seed)), dim=0)
        path = tmp_path / f"concept{seed}.pt"
        save_concept(Concept("persam", vector, vector[None].clone()), path, model_type="vit_t", checkpoint_sha256=sha)
        concepts.append(path)
    out = tmp_path / "out"
    target = data / "targets" / "01.jpg"
    assert run_cli(["apply", concepts[0], target, "--out", out, *model_args(checkpoint)]) == 0
    assert strict_json(out / "results.json")["made_with"]["concept_sha256"] == file_sha256(concepts[0])
    capsys.readouterr()
    assert run_cli(["apply", concepts[1], target, "--out", out, *model_args(checkpoint)]) == 2
    line = error_line(capsys)
    assert "concept_sha256" in line and "--overwrite" in line


# --------------------------------------------------------------------------------------------
# 3. one run at a time


HOLD_LOCK = """
import sys
from persam.runs.lock import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_a_second_run_into_a_locked_folder_is_refused_and_a_killed_one_does_not_block(
        data, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["segment", *ref_args(data), data / "targets" / "01.jpg", "--out", out, *model_args(checkpoint)]
        assert run_cli(argv) == 2
        line = error_line(capsys)
        assert f"another persam run (pid {holder.pid}) is writing to {out}" in line
        assert listing(out) == [LOCK_FILE]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: the lock file stays, its lock goes with the process
        holder.wait(timeout=60)
    assert listing(out) == [LOCK_FILE]
    assert run_cli(argv) == 0
    assert listing(out) == ["01.png", "01_overlay.jpg", "results.json"]


def test_lock_is_exclusive_between_threads(tmp_path):
    entered, release = threading.Event(), threading.Event()

    def hold():
        with output_lock(tmp_path):
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert entered.wait(30)
        with pytest.raises(InputError, match=f"another persam run \\(pid {os.getpid()}\\) is writing to"):
            with output_lock(tmp_path):
                pass
    finally:
        release.set()
        thread.join(30)
    with output_lock(tmp_path):  # free again
        assert (tmp_path / LOCK_FILE).is_file()
    assert not (tmp_path / LOCK_FILE).exists()


# --------------------------------------------------------------------------------------------
# 4. outputs never collide


def test_output_names_never_collide(tmp_path):
    names = ["reference_mask.jpg", "x.jpg", "x_overlay.jpg", "X_Similarity.jpg", "x_overlay_image.jpg",
             "results.jpg", "a.jpg", "a.png"]
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
    paths = [tmp_path / n for n in names]
    options = RunOptions(overlay_format="png", save_similarity=True, extra_outputs=("reference_mask.png",))
    targets = plan_targets(paths, tmp_path / "out", options)
    files = [f.casefold() for t in targets for f in output_files(t.name, options).values()]
    assert len(files) == len(set(files)) == 3 * len(names)
    assert not {"reference_mask.png", "results.json"} & set(files)
    assert len({t.name.casefold() for t in targets}) == len(targets)


def test_target_named_like_another_targets_overlay(data, checkpoint, tmp_path):
    folder = tmp_path / "targets"
    folder.mkdir()
    shutil.copy(data / "targets" / "01.jpg", folder / "x.jpg")
    shutil.copy(data / "targets" / "01.jpg", folder / "x_overlay.jpg")  # same pixels: encoded once
    out = tmp_path / "out"
    assert run_cli(["segment", *ref_args(data), folder, "--out", out, "--overlay-format", "png",
                    *model_args(checkpoint)]) == 0
    records = {r["name"]: r for r in strict_json(out / "results.json")["images"]}
    assert records["x"]["outputs"] == {"mask": "x.png", "overlay": "x_overlay.png"}
    assert records["x_overlay_image"]["outputs"] == {"mask": "x_overlay_image.png",
                                                     "overlay": "x_overlay_image_overlay.png"}
    assert Image.open(out / "x_overlay.png").mode == "RGB"  # x's overlay, not replaced by a mask
    assert Image.open(out / "x_overlay_image.png").mode == "L"


# --------------------------------------------------------------------------------------------
# 5. the reference image is not a target


def test_reference_image_among_targets_is_skipped(data, checkpoint, tmp_path, capsys):
    twin = tmp_path / "twin.jpg"
    shutil.copy(data / "ref.jpg", twin)  # the same content under another name
    out = tmp_path / "out"
    old_umask = os.umask(0o022)
    try:
        code = run_cli(["segment", *ref_args(data), data / "ref.jpg", twin, data / "targets" / "01.jpg",
                        "--out", out, *model_args(checkpoint)])
    finally:
        os.umask(old_umask)
    assert code == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "reference image" in line]
    assert len(notes) == 2 and "ref.jpg" in notes[0] and "twin.jpg" in notes[1]
    records = {r["name"]: r for r in strict_json(out / "results.json")["images"]}
    for name in ("ref", "twin"):
        assert records[name]["status"] == "skipped" and records[name]["reason"] == "reference image"
    assert records["01"]["status"] == "ok"
    assert listing(out) == ["01.png", "01_overlay.jpg", "results.json"]
    for name in listing(out):  # 6. ordinary permissions
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


# --------------------------------------------------------------------------------------------
# 6. ordinary file permissions


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_permissions(tmp_path, umask, mode):
    from persam.data.concept import save_concept
    from persam.method.pipeline import Concept

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_text(tmp_path / "a.bin", "replaced")  # a replaced file too
        atomic_save_png(tmp_path / "m.png", np.zeros((4, 4), bool))
        vector = torch.nn.functional.normalize(torch.ones(8), dim=0)
        save_concept(Concept("persam", vector, vector[None].clone()), tmp_path / "c.pt")
    finally:
        os.umask(old)
    for name in ("a.bin", "m.png", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert listing(tmp_path) == ["a.bin", "c.pt", "m.png"]


# --------------------------------------------------------------------------------------------
# 7. strict JSON, tiny images


def test_tiny_targets_give_strict_json_and_no_warning(data, checkpoint, tmp_path, capsys):
    folder = tmp_path / "tiny"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)).save(folder / "one.png")
    Image.fromarray(np.full((3, 2, 3), 90, np.uint8)).save(folder / "flat.png")  # 2 x 3, a constant map
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = run_cli(["segment", *ref_args(data), folder, "--out", out, *model_args(checkpoint)])
    assert code == 0
    assert not [w for w in caught if "torch" in str(w.filename) or "persam" in str(w.filename)], \
        [str(w.message) for w in caught]
    assert "Warning" not in capsys.readouterr().err
    results = strict_json(out / "results.json")
    records = {r["name"]: r for r in results["images"]}
    assert records["one"]["size"] == [1, 1] and records["flat"]["size"] == [2, 3]
    for record in records.values():
        assert record["status"] == "ok" and isinstance(record["iou_score"], float)
        assert np.asarray(Image.open(out / record["outputs"]["mask"])).shape == tuple(record["size"][::-1])


def test_results_json_never_holds_nan(tmp_path):
    from persam.runs.folder import OutputFolder
    from persam.runs.records import Target

    folder = OutputFolder(tmp_path, RunOptions(min_similarity=float("nan")))
    folder.targets = [Target(tmp_path / "x.jpg", "x")]
    folder.records = {"x": {"name": "x", "key": folder.key, "status": "ok", "iou_score": float("nan"),
                            "boxes": [[float("inf"), 1.0, 2.0, float("-inf")]], "peak": np.float32("nan")}}
    folder.save()
    results = strict_json(tmp_path / "results.json")
    assert results["images"][0]["iou_score"] is None and results["images"][0]["peak"] is None
    assert results["images"][0]["boxes"] == [[None, 1.0, 2.0, None]]
    assert results["made_with"]["min_similarity"] is None


def test_attention_of_a_constant_map_is_finite():
    from persam.method.guide import attention_similarity

    for similarity in (torch.ones(1, 1), torch.full((3, 2), 0.5), torch.zeros(64, 64)):
        attention = attention_similarity(similarity, (1024, 1024), 64, 1024)
        assert torch.isfinite(attention).all()


# --------------------------------------------------------------------------------------------
# 8. start-up: a full disk, a refused run, this run's counts (issue 23, item 16)


def _lock_write_fails_with_enospc(monkeypatch):
    """Make writing the pid into the lock file fail as on a full disk (other writes go through)."""
    import errno

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell the lock file's descriptor")
    real_write = os.write

    def write(fd, data):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == LOCK_FILE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_full_disk_at_start_names_the_file_and_leaves_no_lock(data, checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    descriptors = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with monkeypatch.context() as mp:
        _lock_write_fails_with_enospc(mp)
        with pytest.raises(InputError) as refused:
            with output_lock(out):
                pass
        assert str(refused.value) == f"cannot write {out / LOCK_FILE}: No space left on device"
        assert run_cli(["segment", *ref_args(data), data / "targets" / "01.jpg", "--out", out,
                        *model_args(checkpoint)]) == 2
        assert error_line(capsys) == f"persam: error: cannot write {out / LOCK_FILE}: No space left on device"
    assert listing(out) == []  # no stale lock file
    assert len(os.listdir("/proc/self/fd")) == descriptors  # and no descriptor left open
    with output_lock(out):  # free for the next run
        pass


def test_refused_run_leaves_no_output_folder(data, tmp_path, capsys):
    """--out is made only when the run starts, and removed again when the run is refused before
    writing anything; a folder the user made stays."""
    empty = tmp_path / "no_photos"
    empty.mkdir()
    out = tmp_path / "new" / "deeper" / "out"
    assert run_cli(["segment", *ref_args(data), empty, "--out", out, *model_args(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "new").exists()
    assert "no target images found" in error_line(capsys)  # found before the checkpoint is looked for
    unloadable = tmp_path / "cut.pt"
    unloadable.write_bytes(b"not a checkpoint")
    assert run_cli(["segment", *ref_args(data), data / "targets" / "01.jpg", "--out", out,
                    *model_args(unloadable)]) == 2  # refused after --out was locked, when the model loads
    assert "cut.pt" in error_line(capsys)
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    assert run_cli(["segment", *ref_args(data), data / "targets" / "01.jpg", "--out", mine,
                    *model_args(unloadable)]) == 2
    assert mine.is_dir() and listing(mine) == []


def test_summary_counts_this_runs_images(data, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    assert run_cli(["segment", *ref_args(data), data / "targets" / "01.jpg", broken, "--out", out,
                    *model_args(checkpoint)]) == 1
    capsys.readouterr()
    # another image into the same folder: the earlier run's two records are kept, not counted
    assert run_cli(["segment", *ref_args(data), data / "targets" / "02.jpg", "--out", out,
                    *model_args(checkpoint)]) == 0  # the earlier run's failure is not this run's
    summary = [line for line in capsys.readouterr().err.splitlines() if " segmented, " in line]
    assert len(summary) == 1 and summary[0].startswith("1 segmented, 0 already done, 0 skipped, 0 failed, ")
    assert "results.json also keeps 2 record(s) of other images from earlier runs" in summary[0]
    assert strict_json(out / "results.json")["summary"]["images"] == 3  # the file itself keeps all three


def test_folder_errors_name_settings_and_the_command_line_words_them_as_flags(tmp_path):
    """The output folder speaks in the library's terms ("another out"); the CLI edge says --out."""
    from persam.cli.args import in_flags
    from persam.errors import SettingError
    from persam.runs.folder import OutputFolder

    (tmp_path / "results.json").write_text("not a results file")
    with pytest.raises(SettingError) as refused:
        OutputFolder(tmp_path, RunOptions())
    assert "use another out" in str(refused.value) and "--" not in str(refused.value)
    assert in_flags(refused.value).endswith("use another --out")
    assert str(tmp_path / "results.json") in in_flags(refused.value)
