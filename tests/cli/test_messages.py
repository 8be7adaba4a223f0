"""Clear answers to odd arguments (issue 8, section 3).

Every refusal is one ``persam: error:`` line that names the flag or the file and what is wrong,
with exit code 2 and no traceback.  The CLI is called in-process through ``persam.cli.commands.main``;
nothing here runs the image encoder (the one test that builds a model interrupts it first).
"""

from __future__ import annotations

import shutil
import socket
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DAVIS
from persam.cli import commands as cli
from persam.data.concept import save_concept
from persam.method.pipeline import Concept
from sam.download import MODELS, ModelFile
from sam.predictor import SamPredictor

SEQ = "car-shadow"


# --------------------------------------------------------------------------------------------
# helpers and fixtures


def run(argv):
    return cli.main([str(a) for a in argv])


def error_line(capsys) -> str:
    """The one `persam: error:` line of stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("persam: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def files(tmp_path):
    """ref.png (64x48) with mask.png, a target image, and an existing plain file."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    (tmp_path / "targets").mkdir()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "targets" / "t.png")
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path


def ref(files):
    return ["--ref-image", files / "ref.png", "--ref-mask", files / "mask.png"]


def model(checkpoint):
    return ["--model", "vit_t", "--checkpoint", checkpoint, "-q"]


@pytest.fixture
def concept_file(tmp_path):
    concept = Concept(method="persam_f", target_vector=torch.randn(256), target_embedding=torch.randn(1, 256),
                      scale_weights=torch.tensor([0.3, 0.3, 0.4]), settings={"k": 1}, model_type="vit_t")
    return save_concept(concept, tmp_path / "concept.pt")


# --------------------------------------------------------------------------------------------
# 1. --min-similarity


@pytest.mark.parametrize("value", ["2", "-1.5", "nan", "NaN", "inf", "-inf", "abc", "1e9"])
def test_min_similarity_out_of_range(files, value, capsys):
    assert run(["segment", *ref(files), files / "targets", "--out", files / "o", "--min-similarity", value]) == 2
    line = error_line(capsys)
    assert "--min-similarity" in line and "between -1 and 1" in line and repr(value) in line


@pytest.mark.parametrize("value", ["-1", "-0.25", "0", "1", "-.5"])
def test_min_similarity_in_range_is_accepted(files, value, capsys):
    # accepted by the parser: the run goes on to the next check (--out is a file)
    assert run(["segment", *ref(files), files / "targets", "--out", files / "a_file", "--min-similarity", value]) == 2
    assert "is a file, not a folder" in error_line(capsys)


# --------------------------------------------------------------------------------------------
# 2. --ref-point / --ref-box with a leading minus


@pytest.mark.parametrize("form", ["space", "equals"])
def test_negative_ref_point_parses_and_is_outside(files, form, capsys):
    point = ["--ref-point", "-3,30"] if form == "space" else ["--ref-point=-3,30"]
    assert run(["learn", "--ref-image", files / "ref.png", *point, "--out", files / "c.pt"]) == 2
    line = error_line(capsys)
    assert line == f"persam: error: reference click (-3, 30) is outside image {files / 'ref.png'} (64x48)"


def test_negative_ref_box_parses_and_is_outside(files, capsys):
    assert run(["learn", "--ref-image", files / "ref.png", "--ref-box", "-5,0,30,30", "--out", files / "c.pt"]) == 2
    line = error_line(capsys)
    assert line == f"persam: error: reference box corner (-5, 0) is outside image {files / 'ref.png'} (64x48)"


def test_negative_ref_point_among_several(files, capsys):
    assert run(["segment", "--ref-image", files / "ref.png", "--ref-point", "10,10", "--ref-point", "-1,-2",
                files / "targets", "--out", files / "o"]) == 2
    assert "reference click (-1, -2) is outside image" in error_line(capsys)


def test_malformed_negative_ref_point_is_a_usage_error(files, capsys):
    assert run(["learn", "--ref-image", files / "ref.png", "--ref-point", "-3", "--out", files / "c.pt"]) == 2
    line = error_line(capsys)
    assert "--ref-point" in line and "expected X,Y" in line


# --------------------------------------------------------------------------------------------
# 3. --out is a file


def test_segment_out_is_a_file(files, capsys):
    out = files / "a_file"
    assert run(["segment", *ref(files), files / "targets", "--out", out]) == 2
    assert error_line(capsys) == f"persam: error: --out {out} is a file, not a folder"
    assert out.read_text() == "not a folder"


def test_apply_out_is_a_file(files, concept_file, capsys):
    out = files / "a_file"
    assert run(["apply", concept_file, files / "targets", "--out", out]) == 2
    assert error_line(capsys) == f"persam: error: --out {out} is a file, not a folder"


def test_apply_mistyped_target_is_refused_before_the_model(files, concept_file, capsys):
    """A target that does not exist: exit 2 naming it before the checkpoint is loaded (this one
    would not load) and before --out is made (issue 23, item 8)."""
    unloadable = files / "cut.pt"
    unloadable.write_bytes(b"not a checkpoint")
    out = files / "out"
    typo = files / "targets" / "typo.png"
    assert run(["apply", concept_file, files / "targets" / "t.png", typo, "--out", out, *model(unloadable)]) == 2
    assert error_line(capsys) == f"persam: error: target {typo}: no such file or folder"
    assert not out.exists()


def test_out_below_a_file(files, capsys):
    out = files / "a_file" / "sub"
    assert run(["segment", *ref(files), files / "targets", "--out", out]) == 2
    assert error_line(capsys) == f"persam: error: --out {out}: {files / 'a_file'} is a file, not a folder"


# --------------------------------------------------------------------------------------------
# 4. truncated concept


def test_truncated_concept(files, concept_file, capsys):
    data = concept_file.read_bytes()
    bad = files / "bad.pt"
    for n in sorted({0, 1, 10, 100, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 22, len(data) - 1}):
        bad.write_bytes(data[:n])
        assert run(["apply", bad, files / "targets", "--out", files / "o"]) == 2, n
        line = error_line(capsys)
        assert line.startswith(f"persam: error: concept {bad}: "), line
        assert "truncated or not a concept file" in line, line
        assert "miniz" not in line and len(line) < 300, line


def test_not_a_concept_file(files, capsys):
    bad = files / "notes.pt"
    bad.write_text("hello, this is text")
    assert run(["apply", bad, files / "targets", "--out", files / "o"]) == 2
    assert "truncated or not a concept file" in error_line(capsys)


# --------------------------------------------------------------------------------------------
# 5. a checkpoint that is not ours is not told "delete it"


def _truncated_checkpoint(source, dest):
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(source.read_bytes()[:5000])
    return dest


def test_users_corrupt_checkpoint_is_not_told_to_delete_it(files, random_vit_t_checkpoint, capsys):
    bad = _truncated_checkpoint(random_vit_t_checkpoint, files / "mine" / "weights.pt")
    assert run(["learn", *ref(files), "--out", files / "c.pt", *model(bad)]) == 2
    line = error_line(capsys)
    assert f"{bad} is not a readable checkpoint (truncated or corrupt?)" in line
    assert "delete" not in line
    assert "persam download vit_t" in line
    assert bad.exists()


def test_corrupt_file_in_our_cache_is_downloaded_again(files, random_vit_t_checkpoint, monkeypatch, capsys):
    cache = files / "cache"
    monkeypatch.setenv("PERSAM_CACHE", str(cache))
    bad = _truncated_checkpoint(random_vit_t_checkpoint, cache / MODELS["vit_t"].filename)
    assert run(["learn", *ref(files), "--out", files / "c.pt", "--model", "vit_t", "-q"]) == 2
    line = error_line(capsys)
    assert f"{bad} is not a readable checkpoint" in line
    assert "delete it and download again with `persam download vit_t`" in line


# --------------------------------------------------------------------------------------------
# 6, 7, 10. persam eval


@pytest.fixture
def davis_pred(tmp_path):
    """A copy of the ground truth of SEQ's first 4 frames, as predictions."""
    if not (DAVIS / "JPEGImages").is_dir():
        pytest.skip(f"shared data not found at {DAVIS}")
    pred = tmp_path / "pred"
    (pred / SEQ).mkdir(parents=True)
    for k in range(4):
        shutil.copy(DAVIS / "Annotations" / "480p" / SEQ / f"{k:05d}.png", pred / SEQ / f"{k:05d}.png")
    return pred


def eval_davis(pred, out, *extra):
    return run(["eval", "davis", "--data", DAVIS, "--pred", pred, "--out", out, "--sequences", SEQ,
                "--max-frames", "4", "-q", *extra])


def test_davis_pred_copy_is_accepted(davis_pred, tmp_path):
    assert eval_davis(davis_pred, tmp_path / "out") == 0


def test_davis_missing_split_names_the_flag(davis_pred, tmp_path, capsys):
    assert eval_davis(davis_pred, tmp_path / "out", "--split", "test") == 2
    line = error_line(capsys)
    assert "--split test" in line and "--split all" in line and "test.txt" in line
    assert "split=None" not in line


def test_davis_split_all(davis_pred, tmp_path):
    assert eval_davis(davis_pred, tmp_path / "out", "--split", "all") == 0


def test_davis_library_split_message_is_neutral(tmp_path):
    from eval.datasets import DavisDataset, SplitFileError

    if not (DAVIS / "JPEGImages").is_dir():
        pytest.skip(f"shared data not found at {DAVIS}")
    with pytest.raises(SplitFileError, match=r"split=None takes every sequence folder"):
        DavisDataset(DAVIS, split="test")


def test_davis_prediction_of_the_wrong_size(davis_pred, tmp_path, capsys):
    path = davis_pred / SEQ / "00002.png"
    img = Image.open(path)
    img.resize((100, 80), Image.NEAREST).save(path)
    assert eval_davis(davis_pred, tmp_path / "out") == 2
    gt = DAVIS / "Annotations" / "480p" / SEQ / "00002.png"
    assert error_line(capsys) == f"persam: error: prediction {path} is 100x80 but its ground truth {gt} is 854x480"


def test_perseg_prediction_of_the_wrong_size(perseg_dir, tmp_path, capsys):
    pred = tmp_path / "pred"
    shutil.copytree(perseg_dir / "Annotations" / "cat", pred / "cat")
    path = pred / "cat" / "01.png"
    img = Image.open(path)
    gt_size = img.size
    img.resize((100, 80), Image.NEAREST).save(path)
    assert run(["eval", "perseg", "--data", perseg_dir, "--pred", pred, "--out", tmp_path / "o",
                "--classes", "cat", "-q"]) == 2
    gt = perseg_dir / "Annotations" / "cat" / "01.png"
    assert error_line(capsys) == (
        f"persam: error: prediction {path} is 100x80 but its ground truth {gt} is {gt_size[0]}x{gt_size[1]}"
    )


def test_davis_prediction_with_an_unknown_object_id(davis_pred, tmp_path, capsys):
    path = davis_pred / SEQ / "00001.png"
    img = Image.open(path)
    labels = np.asarray(img).copy()
    labels[:5, :5] = 3
    out = Image.fromarray(labels.astype(np.uint8), mode="P")
    out.putpalette(img.getpalette())
    out.save(path)
    assert eval_davis(davis_pred, tmp_path / "out") == 2
    line = error_line(capsys)
    assert line.startswith(f"persam: error: prediction {path} has object id 3 that is not in the ground truth "
                           f"of sequence {SEQ} (ids 1 in ")


# --------------------------------------------------------------------------------------------
# 8. EXIF orientation


def test_mask_fitting_the_unrotated_image_mentions_exif(tmp_path, capsys):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8))  # 40x30
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90: loaded as 30x40
    image.save(tmp_path / "photo.jpg", exif=exif)
    mask = np.zeros((30, 40), np.uint8)  # drawn on the stored (un-rotated) pixels
    mask[5:20, 5:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert run(["learn", "--ref-image", tmp_path / "photo.jpg", "--ref-mask", tmp_path / "mask.png",
                "--out", tmp_path / "c.pt"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"persam: error: mask {tmp_path / 'mask.png'} is 40x30 but its image "
                           f"{tmp_path / 'photo.jpg'} is 30x40: the image has an EXIF orientation (6, rotate 90)")
    assert "un-rotated pixels" in line


def test_mask_of_another_size_names_the_image(files, capsys):
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(files / "small.png")
    assert run(["learn", "--ref-image", files / "ref.png", "--ref-mask", files / "small.png",
                "--out", files / "c.pt"]) == 2
    assert error_line(capsys) == (
        f"persam: error: mask {files / 'small.png'} is 10x10 but its image {files / 'ref.png'} is 64x48"
    )


# --------------------------------------------------------------------------------------------
# 9. precision in CLI terms


def test_emulated_bf16_warning_speaks_in_flags(files, random_vit_t_checkpoint, monkeypatch, capsys):
    import sam.predictor

    monkeypatch.setattr(sam.predictor, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="precision='fp32'"):  # the library's own warning
        SamPredictor(SimpleNamespace(device=torch.device("cpu")), precision="bf16")

    def interrupt(self, image):
        raise KeyboardInterrupt

    monkeypatch.setattr(SamPredictor, "set_image", interrupt)  # stop once the predictor is built
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = run(["learn", *ref(files), "--out", files / "c.pt", *model(random_vit_t_checkpoint),
                    "--precision", "bf16"])
    assert code == 130
    err = capsys.readouterr().err
    assert ("persam: warning: --precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 is "
            "emulated and runs several times slower than fp32 here; use --precision fp32") in err.splitlines()
    assert "precision='fp32'" not in err
    assert not [w for w in caught if "native bf16" in str(w.message)]


def test_fp16_on_cpu_names_the_flags(files, capsys):
    assert run(["learn", *ref(files), "--out", files / "c.pt", "--precision", "fp16"]) == 2
    assert error_line(capsys) == (
        "persam: error: --precision fp16 is not supported with --device cpu; use --precision bf16 or fp32"
    )


# --------------------------------------------------------------------------------------------
# 11. exit codes documented


def test_exit_codes_in_help_and_docstring(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out
    for code in ("0 ", "1 ", "2 ", "130 "):
        assert f"\n  {code}" in out
    for code in ("0    success", "1    the run finished", "2    bad input", "130  interrupted"):
        assert code in cli.__doc__


# --------------------------------------------------------------------------------------------
# download without network


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_unreachable_says_where_to_put_the_file(tmp_path, monkeypatch, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/mobile_sam.pt"
    monkeypatch.setitem(MODELS, "vit_t", ModelFile("vit_t", "mobile_sam.pt", url, 10, None))
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "cache"))
    assert run(["download", "vit_t", "-q"]) == 2
    line = error_line(capsys)
    assert f"could not download {url}" in line
    assert f"save it as {tmp_path / 'cache' / 'mobile_sam.pt'}" in line
    assert "--checkpoint" in line


def test_download_help_says_where_to_put_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "cache"))
    assert run(["download", "--help"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cache" / "mobile_sam.pt") in out
    assert "$PERSAM_CACHE" in out and "~/.cache/persam" in out and "--checkpoint" in out
