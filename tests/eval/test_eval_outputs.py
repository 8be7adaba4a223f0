"""`persam eval` keeps the output-folder promises of segment / apply / track (issue 23, items 1, 4,
15 and 16): predictions made with other settings are refused unless --overwrite, the user's
files in --out are never replaced, the default model is vit_t, a refused run leaves no folder."""

import json
import shutil

import pytest

from conftest import DAVIS, PERSEG, write_random_checkpoint
from persam.cli.eval_commands import main

SEQ = "car-shadow"


def _files(folder):
    """Every file under `folder`: relative path -> (bytes, mtime_ns)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _json(path):
    return json.loads(path.read_text())


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("persam: error:"), err
    return err[0]


def _eval(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def perseg_cat(random_vit_t_checkpoint, tmp_path_factory):
    """A PerSeg run on the class cat (2 test images) with the default model."""
    if not PERSEG.is_dir():
        pytest.skip(f"shared data not found at {PERSEG}")
    out = tmp_path_factory.mktemp("perseg_cat") / "E"
    assert _eval("perseg", "--data", PERSEG, "--out", out, "--classes", "cat",
                 "--checkpoint", random_vit_t_checkpoint, "-q") == 0  # no --model
    return out


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """A second vit_t checkpoint: other seeded random weights."""
    return write_random_checkpoint(tmp_path_factory.mktemp("other_checkpoint") / "other.pt", seed=1)


@pytest.fixture(scope="module")
def davis_small(random_vit_t_checkpoint, tmp_path_factory):
    """A DAVIS run on car-shadow, 3 frames."""
    if not (DAVIS / "JPEGImages").is_dir():
        pytest.skip(f"shared data not found at {DAVIS}")
    out = tmp_path_factory.mktemp("davis_small") / "D"
    assert _eval("davis", "--data", DAVIS, "--out", out, "--sequences", SEQ, "--max-frames", 3,
                 "--model", "vit_t", "--checkpoint", random_vit_t_checkpoint, "-q") == 0
    return out


# --------------------------------------------------------------------------- the default model


def test_the_default_model_is_vit_t(perseg_cat, tmp_path, monkeypatch, capsys):
    import inspect

    from eval.run_davis import run_davis
    from eval.run_perseg import run_perseg

    scores, record = _json(perseg_cat / "scores.json"), _json(perseg_cat / "eval.json")
    assert scores["model"] == "vit_t" and record["made_with"]["model_type"] == "vit_t"
    for runner in (run_perseg, run_davis):
        assert inspect.signature(runner).parameters["model_type"].default == "vit_t"
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "empty_cache"))  # no checkpoint cached
    assert _eval("perseg", "--data", PERSEG, "--out", tmp_path / "out", "-q") == 2
    line = _one_error_line(capsys)
    assert "no checkpoint for vit_t" in line and "vit_h" not in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- other settings (item 1)


def test_perseg_other_method_is_refused_and_overwrite_redoes_it(perseg_cat, random_vit_t_checkpoint, tmp_path, capsys):
    out = tmp_path / "E"
    shutil.copytree(perseg_cat, out)
    first = _json(out / "eval.json")
    assert first["made_with"]["method"] == "persam" and first["made_with"]["finetune"] is None
    assert {"pred/cat/01.png", "pred/cat/02.png", "scores.csv", "scores.json", "scores.png"} <= set(first["files"])
    before = _files(out)
    args = ["perseg", "--data", PERSEG, "--out", out, "--classes", "cat", "--checkpoint", random_vit_t_checkpoint,
            "--method", "persam_f", "-q"]
    capsys.readouterr()

    assert _eval(*args) == 2
    line = _one_error_line(capsys)
    assert str(out) in line and "other settings" in line and "method" in line and "--overwrite" in line
    assert _files(out) == before  # nothing rewritten

    (out / "pred" / "cat" / "mine.png").write_bytes(b"the user's")  # not persam's: kept by --overwrite
    assert _eval(*args, "--overwrite") == 0
    record, scores = _json(out / "eval.json"), _json(out / "scores.json")
    assert record["key"] != first["key"] and record["key"] == scores["key"]
    assert record["made_with"]["method"] == "persam_f" and record["made_with"]["finetune"]["steps"] == 1000
    assert scores["method"] == "persam_f" and scores["made_with"] == record["made_with"]
    assert scores["timing"]["per_image"]["count"] == 2 and scores["timing"]["skipped_images"] == 0  # redone
    for name in ("01.png", "02.png"):
        assert _files(out)[f"pred/cat/{name}"][1] != before[f"pred/cat/{name}"][1]
    assert (out / "pred" / "cat" / "mine.png").read_bytes() == b"the user's"
    assert "pred/cat/mine.png" not in record["files"]

    capsys.readouterr()  # and now the first settings are the other ones
    assert _eval("perseg", "--data", PERSEG, "--out", out, "--classes", "cat",
                 "--checkpoint", random_vit_t_checkpoint, "-q") == 2
    assert "method" in _one_error_line(capsys)


def test_perseg_another_checkpoint_or_class_set_is_refused(perseg_cat, other_checkpoint, random_vit_t_checkpoint,
                                                            tmp_path, capsys):
    out = tmp_path / "E"
    shutil.copytree(perseg_cat, out)
    before = _files(out)
    capsys.readouterr()
    assert _eval("perseg", "--data", PERSEG, "--out", out, "--classes", "cat", "--checkpoint", other_checkpoint,
                 "-q") == 2
    assert "checkpoint_sha256" in _one_error_line(capsys)
    assert _eval("perseg", "--data", PERSEG, "--out", out, "--classes", "duck_toy", "--precision", "bf16",
                 "--checkpoint", random_vit_t_checkpoint, "-q") == 2  # other classes too: one key per folder
    assert "precision" in _one_error_line(capsys)
    assert _files(out) == before


def test_perseg_same_settings_resume(perseg_cat, random_vit_t_checkpoint, tmp_path):
    out = tmp_path / "E"
    shutil.copytree(perseg_cat, out)
    before = _files(out)
    assert _eval("perseg", "--data", PERSEG, "--out", out, "--classes", "cat", "--model", "vit_t",
                 "--checkpoint", random_vit_t_checkpoint, "-q") == 0
    scores = _json(out / "scores.json")
    assert scores["timing"]["skipped_images"] == 2 and scores["timing"]["per_image"]["count"] == 0
    for name in ("pred/cat/01.png", "pred/cat/02.png"):
        assert _files(out)[name] == before[name]


def test_perseg_predictions_without_a_record_are_not_reused(perseg_cat, random_vit_t_checkpoint, tmp_path, capsys):
    """Predictions whose settings nobody recorded (an older persam, or the user's) are not scored as
    this run's, nor replaced."""
    out = tmp_path / "E"
    shutil.copytree(perseg_cat / "pred", out / "pred")
    before = _files(out)
    capsys.readouterr()
    assert _eval("perseg", "--data", PERSEG, "--out", out, "--classes", "cat",
                 "--checkpoint", random_vit_t_checkpoint, "-q") == 2
    line = _one_error_line(capsys)
    assert str(out / "pred" / "cat" / "01.png") in line and "not written by persam" in line
    assert _files(out) == before


def test_davis_other_settings_are_refused_and_overwrite_redoes_them(davis_small, random_vit_t_checkpoint, tmp_path,
                                                                     capsys):
    out = tmp_path / "D"
    shutil.copytree(davis_small, out)
    first = _json(out / "eval.json")
    assert first["made_with"]["max_frames"] == 3 and first["made_with"]["use_previous_box"] is True
    assert first["made_with"]["resolution"] == "480p" and first["made_with"]["benchmark"] == "davis"
    before = _files(out)
    base = ["davis", "--data", DAVIS, "--out", out, "--sequences", SEQ, "--model", "vit_t",
            "--checkpoint", random_vit_t_checkpoint, "-q"]
    capsys.readouterr()

    assert _eval(*base, "--max-frames", 3, "--no-previous-box") == 2
    line = _one_error_line(capsys)
    assert str(out) in line and "use_previous_box" in line and "--overwrite" in line
    assert _eval(*base, "--max-frames", 4) == 2
    assert "max_frames" in _one_error_line(capsys)
    assert _files(out) == before

    assert _eval(*base, "--max-frames", 3, "--no-previous-box", "--overwrite") == 0
    record, scores = _json(out / "eval.json"), _json(out / "scores.json")
    assert record["key"] != first["key"] and record["made_with"]["use_previous_box"] is False
    assert scores["use_previous_box"] is False and scores["made_with"] == record["made_with"]
    assert scores["timing"]["skipped_sequences"] == [] and scores["timing"]["per_frame"]["count"] == 2
    for name in ("00001.png", "00002.png"):
        assert _files(out)[f"pred/{SEQ}/{name}"][1] != before[f"pred/{SEQ}/{name}"][1]


# --------------------------------------------------------------------------- the user's files (item 15)


@pytest.mark.parametrize("name", ["scores.csv", "scores.png", "scores.json"])
def test_the_users_score_files_are_not_replaced(name, tmp_path, capsys):
    if not PERSEG.is_dir():
        pytest.skip(f"shared data not found at {PERSEG}")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"the user's")
    assert _eval("perseg", "--data", PERSEG, "--pred", PERSEG / "Annotations", "--out", out, "-q") == 2
    line = _one_error_line(capsys)
    assert str(out / name) in line and "not written by persam" in line
    assert _files(out).keys() == {name} and (out / name).read_bytes() == b"the user's"


def test_the_users_scores_are_refused_before_a_model_run(random_vit_t_checkpoint, tmp_path, capsys):
    if not PERSEG.is_dir():
        pytest.skip(f"shared data not found at {PERSEG}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.png").write_bytes(b"the user's chart")
    assert _eval("perseg", "--data", PERSEG, "--out", out, "--classes", "cat",
                 "--checkpoint", random_vit_t_checkpoint, "-q") == 2
    assert str(out / "scores.png") in _one_error_line(capsys)
    assert _files(out).keys() == {"scores.png"}  # no prediction made, nothing recorded


def test_davis_scores_the_users_scores_csv_is_not_replaced(tmp_path, capsys):
    if not (DAVIS / "JPEGImages").is_dir():
        pytest.skip(f"shared data not found at {DAVIS}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.csv").write_text("mine\n")
    assert _eval("davis", "--data", DAVIS, "--pred", DAVIS / "Annotations" / "480p", "--out", out,
                 "--max-frames", 3, "-q") == 2
    assert str(out / "scores.csv") in _one_error_line(capsys)
    assert _files(out).keys() == {"scores.csv"} and (out / "scores.csv").read_text() == "mine\n"


def test_scores_persam_wrote_are_rewritten(tmp_path):
    if not PERSEG.is_dir():
        pytest.skip(f"shared data not found at {PERSEG}")
    out = tmp_path / "out"
    for classes in ("cat", "cat,duck_toy"):
        assert _eval("perseg", "--data", PERSEG, "--pred", PERSEG / "Annotations", "--out", out,
                     "--classes", classes, "-q") == 0
    assert list(_json(out / "scores.json")["classes"]) == ["cat", "duck_toy"]
    assert sorted(_json(out / "eval.json")["files"]) == ["eval.json", "scores.csv", "scores.json", "scores.png"]


def test_an_eval_record_persam_did_not_write_is_refused(tmp_path, capsys):
    if not PERSEG.is_dir():
        pytest.skip(f"shared data not found at {PERSEG}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text('{"files": ["../elsewhere"]}')
    assert _eval("perseg", "--data", PERSEG, "--pred", PERSEG / "Annotations", "--out", out, "-q") == 2
    assert str(out / "eval.json") in _one_error_line(capsys)
    assert _files(out).keys() == {"eval.json"}


def test_one_run_at_a_time(tmp_path, capsys):
    from persam.runs.lock import output_lock

    if not PERSEG.is_dir():
        pytest.skip(f"shared data not found at {PERSEG}")
    out = tmp_path / "out"
    with output_lock(out):
        assert _eval("perseg", "--data", PERSEG, "--pred", PERSEG / "Annotations", "--out", out, "-q") == 2
        assert "another persam run" in _one_error_line(capsys)
        assert not (out / "scores.json").exists()


# --------------------------------------------------------------------------- refused runs (item 16)


def test_refused_runs_leave_no_new_folder(random_vit_t_checkpoint, tmp_path, capsys):
    if not PERSEG.is_dir():
        pytest.skip(f"shared data not found at {PERSEG}")
    (tmp_path / "empty_pred" / "cat").mkdir(parents=True)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    runs = {
        "missing predictions": ["--pred", tmp_path / "empty_pred", "--classes", "cat"],
        "no such --pred": ["--pred", tmp_path / "nowhere"],
        "no checkpoint": ["--checkpoint", tmp_path / "nowhere.pt"],
        "a checkpoint that does not load": ["--checkpoint", corrupt, "--classes", "cat"],
    }
    for why, args in runs.items():
        out = tmp_path / "new" / "deeper" / "out"
        assert _eval("perseg", "--data", PERSEG, "--out", out, *args, "-q") == 2, why
        _one_error_line(capsys)
        assert not (tmp_path / "new").exists(), why
    existing = tmp_path / "existing"
    existing.mkdir()
    assert _eval("perseg", "--data", PERSEG, "--out", existing, *runs["missing predictions"], "-q") == 2
    assert existing.is_dir() and not any(existing.iterdir())  # a folder that was there stays, empty
