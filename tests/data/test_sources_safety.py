"""Expanding SOURCEs can neither hang nor surprise (issue 23, items 8, 12 and 16).

A ``**`` pattern over symbolic-link loops ends and finds each image once; a FIFO is skipped with
a note instead of blocking its reader; the listing of one SOURCE is bounded; a target that does
not exist is bad input, refused before the model loads; a folder says what it skipped (other
formats, subfolders).  What could hang on a broken expansion runs in a subprocess with a timeout.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persam.data import listing, sources
from persam.errors import InputError
from persam.data.io import load_image
from persam.data.listing import ExpansionLimits, Note
from persam.data.sources import expand_sources, expand_targets

from cli_testing import error_line, model_args, run_cli

REPO = Path(__file__).resolve().parents[2]
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")


def _photo(path: Path, seed: int = 0, fmt: str = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _in_subprocess(code: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run Python `code` in a child process (so that a hang fails the test instead of stalling it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                        os.environ.get("PYTHONPATH", "")])}
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s: the expansion or the read does not end")


@pytest.fixture
def looped_tree(tmp_path):
    """g/a.jpg, g/d/x.jpg and g/d/build/{A,B} -> .. (two sibling loops), as in the issue."""
    _photo(tmp_path / "g" / "a.jpg", 1)
    _photo(tmp_path / "g" / "d" / "x.jpg", 2)
    (tmp_path / "g" / "d" / "build").mkdir()
    os.symlink("..", tmp_path / "g" / "d" / "build" / "A")
    os.symlink("..", tmp_path / "g" / "d" / "build" / "B")
    return tmp_path


# --------------------------------------------------------------------------------------------
# symbolic-link loops


def test_glob_over_symlink_loops_ends_and_lists_each_image_once(looped_tree):
    uri = f"file://{looped_tree}/g/**/*.jpg"  # a file:// URI goes through the same walk
    run = _in_subprocess(f"""
        import json
        from persam.data.sources import expand_sources
        patterns = ["g/**/*.jpg", "g/**", "g/*/**/*.jpg", {uri!r}]
        print(json.dumps({{p: [str(x) for x in expand_sources([p])[0]] for p in patterns}}))
    """, looped_tree)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert found["g/**/*.jpg"] == ["g/a.jpg", "g/d/x.jpg"]
    assert found["g/**"] == ["g/a.jpg", "g/d/x.jpg"]
    assert found["g/*/**/*.jpg"] == ["g/d/x.jpg"]
    assert found[uri] == [f"file://{looped_tree}/g/a.jpg", f"file://{looped_tree}/g/d/x.jpg"]


def test_glob_keeps_globs_meaning(tmp_path, monkeypatch):
    """The walker answers as glob.glob would on a tree without loops: hidden names only where the
    pattern spells the dot, * within one name, ** across folders, [...] sets."""
    import glob

    for rel in ("p/a.jpg", "p/b.png", "p/.h.jpg", "p/.hid/c.jpg", "p/s/d.jpg", "p/s/t/e.JPG", "p/x[1]/f.jpg",
                "p/s/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    for pattern in ("p/*", "p/**", "p/**/*.jpg", "p/*/*", "p/.*", "p/**/.hid/*", "p/[ab].*", "p/[!a]*",
                    "p/x[[]1]/*", "p/s/**/*.[jJ][pP][gG]", "*/s/*"):
        want = sorted(Path(q) for q in glob.glob(pattern, recursive=True)
                      if os.path.isfile(q) and Path(q).suffix.lower() in listing.IMAGE_EXTENSIONS)
        assert expand_targets([pattern])[0] == want, pattern


# --------------------------------------------------------------------------------------------
# what is not a regular file


@needs_fifo
def test_fifo_is_skipped_with_a_note_and_never_read(tmp_path):
    _photo(tmp_path / "photos" / "a.jpg")
    os.mkfifo(tmp_path / "photos" / "pipe.jpg")
    os.mkfifo(tmp_path / "named.jpg")
    run = _in_subprocess("""
        import json
        from persam.errors import InputError
        from persam.data.sources import expand_sources, load_image, read_image_bytes
        out = {}
        for spec in ("named.jpg", "photos", "photos/*.jpg"):
            paths, messages = expand_sources([spec])
            out[spec] = [[str(p) for p in paths], [[type(m).__name__ == "Note", m] for m in messages]]
        for name, read in (("read", read_image_bytes), ("load", load_image)):
            try:
                read(__import__("pathlib").Path("named.jpg"))
            except InputError as exc:
                out[name] = str(exc)
        print(json.dumps(out))
    """, tmp_path)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["named.jpg"] == [[], [[True, "skipping named.jpg: not a regular file (a FIFO)"]]]
    skipped = "1 entry that is not a regular file (a FIFO, socket, device or link to nothing)"
    assert out["photos"] == [["photos/a.jpg"], [[True, f"folder photos: skipped {skipped}"]]]
    assert out["photos/*.jpg"] == [["photos/a.jpg"], [[True, f"pattern photos/*.jpg: skipped {skipped}"]]]
    assert out["read"] == out["load"] == "image named.jpg: not a regular file (a FIFO)"


@needs_fifo
def test_cli_over_symlink_loops_and_a_fifo_ends(looped_tree, random_vit_t_checkpoint):
    """`persam segment REF 'g/**/*.jpg' FIFO`: both images once, a note for the FIFO, exit 0."""
    ref = _photo(looped_tree / "ref.png", 3)
    mask = np.zeros((24, 32), np.uint8)
    mask[6:18, 8:24] = 255
    Image.fromarray(mask).save(looped_tree / "mask.png")
    os.mkfifo(looped_tree / "pipe.jpg")
    run = _in_subprocess(f"""
        import sys
        from persam.cli import commands as cli
        sys.exit(cli.main(["segment", "--ref-image", {str(ref)!r}, "--ref-mask", "mask.png", "g/**/*.jpg",
                           "pipe.jpg", "--out", "out", *{[str(a) for a in model_args(random_vit_t_checkpoint)]!r}]))
    """, looped_tree, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "persam: note: skipping pipe.jpg: not a regular file (a FIFO)" in run.stderr.splitlines()
    images = json.loads((looped_tree / "out" / "results.json").read_text())["images"]
    assert sorted((r["image"], r["status"]) for r in images) == [("g/a.jpg", "ok"), ("g/d/x.jpg", "ok")]


# --------------------------------------------------------------------------------------------
# the bound


def test_expansion_bound_names_the_pattern(looped_tree, monkeypatch):
    monkeypatch.chdir(looped_tree)
    with pytest.raises(InputError) as refused:
        expand_sources(["g/**/*.jpg"], ExpansionLimits(max_entries=3))
    assert str(refused.value) == ("target g/**/*.jpg: stopped listing it after 3 files and folders (the limit "
                                  "against endless listings); give a narrower folder or pattern, or a text file "
                                  "of the image paths")
    with pytest.raises(InputError, match=r"^target g: stopped listing it after 0 s "):
        expand_targets(["g"], ExpansionLimits(max_seconds=0))
    # a text file's entries share its bound, and the message names the text file
    (looped_tree / "list.txt").write_text("g/a.jpg\ng/**/*.jpg\n")
    with pytest.raises(InputError, match=r"^target g/\*\*/\*.jpg \(listed in list.txt\): stopped listing it after 2 "):
        expand_sources(["list.txt"], ExpansionLimits(max_entries=2))
    assert expand_sources(["g/**/*.jpg"], ExpansionLimits(max_entries=100))[0] == [Path("g/a.jpg"), Path("g/d/x.jpg")]


def test_cli_says_when_the_bound_stops_a_pattern(looped_tree, monkeypatch, capsys):
    monkeypatch.chdir(looped_tree)
    monkeypatch.setattr(sources, "ExpansionLimits", functools.partial(ExpansionLimits, max_entries=3))
    code = run_cli(["segment", "--ref-image", _photo(looped_tree / "ref.jpg"), "--ref-point", "5,5", "g/**/*.jpg",
                    "--out", "out", "--checkpoint", looped_tree / "no-such.pt"])
    assert code == 2
    assert error_line(capsys).startswith("persam: error: target g/**/*.jpg: stopped listing it after 3 files")
    assert not (looped_tree / "out").exists()


# --------------------------------------------------------------------------------------------
# targets that do not exist


def test_missing_targets_are_refused_naming_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _photo(tmp_path / "a.jpg")
    with pytest.raises(InputError) as refused:
        expand_sources(["a.jpg", "typo.jpg"])
    assert str(refused.value) == "target typo.jpg: no such file or folder"
    with pytest.raises(InputError) as refused:
        expand_sources(["typo.jpg", "nofolder/", "a.jpg", "x/y.png"])
    assert str(refused.value) == "target typo.jpg: no such file or folder (and 2 more: nofolder, x/y.png)"
    os.symlink("nowhere.jpg", tmp_path / "dangling.jpg")
    with pytest.raises(InputError, match="^target dangling.jpg: no such file or folder$"):
        expand_sources(["dangling.jpg"])
    # a pattern that matches nothing stays a warning; the page's expand_targets keeps missing paths
    assert expand_sources(["a.jpg", "none*.jpg"]) == ([Path("a.jpg")], ["pattern none*.jpg matches no images"])
    assert expand_targets(["typo.jpg"]) == ([Path("typo.jpg")], [])


# --------------------------------------------------------------------------------------------
# what a folder skipped


def test_folder_note_counts_other_formats_and_subfolders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _photo(tmp_path / "photos" / "a.jpg", 1)
    _photo(tmp_path / "photos" / "b.gif", 2, fmt="GIF")
    _photo(tmp_path / "photos" / "sub" / "c.jpg", 3)
    _photo(tmp_path / "photos" / "more" / "d.jpg", 4)
    for name in ("notes.txt", "raw.heic", "scan.heic", ".DS_Store"):
        (tmp_path / "photos" / name).write_bytes(b"x")
    paths, messages = expand_sources(["photos"])
    assert paths == [Path("photos/a.jpg"), Path("photos/b.gif")]  # a GIF is read (its first frame)
    assert messages == ["folder photos: skipped 3 files not in an image format (.heic 2, .txt 1); 2 subfolders, "
                        "not searched (give 'photos/**/*' to include them)"]
    assert all(isinstance(m, Note) for m in messages)
    assert expand_sources(["photos/**/*"])[0] == [Path("photos/a.jpg"), Path("photos/b.gif"),
                                                  Path("photos/more/d.jpg"), Path("photos/sub/c.jpg")]
    gif = load_image(tmp_path / "photos" / "b.gif")
    assert gif.shape == (24, 32, 3) and gif.dtype == np.uint8
    # a folder of folders: the warning first (what the page shows), then the note
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "inner").mkdir()
    paths, messages = expand_sources(["only"])
    assert paths == [] and messages[0].startswith("folder only holds no images (.jpg, ")
    assert messages[1] == "folder only: skipped 1 subfolder, not searched (give 'only/**/*' to include them)"


def test_cli_prints_the_folder_note_before_any_model_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "empty-cache"))  # no checkpoint: refused after the note
    _photo(tmp_path / "photos" / "a.jpg")
    _photo(tmp_path / "photos" / "sub" / "b.jpg")
    code = run_cli(["segment", "--ref-image", _photo(tmp_path / "ref.jpg"), "--ref-point", "5,5", "photos",
                    "--out", "out"])
    assert code == 2
    err = capsys.readouterr().err.splitlines()
    assert ("persam: note: folder photos: skipped 1 subfolder, not searched (give 'photos/**/*' to include them)"
            in err)
    assert not (tmp_path / "out").exists()
