"""Tests for sam.download and the `persam download` command, against a local HTTP server."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sam.download import (
    MODELS,
    DownloadError,
    ModelFile,
    UnverifiedCheckpointWarning,
    cached_checkpoint,
    default_cache_dir,
    download_checkpoint,
    verify_checkpoint,
)

DATA = os.urandom(300 * 1024 + 123)
SHA = hashlib.sha256(DATA).hexdigest()
FILENAME = "test_model.pth"


# --------------------------------------------------------------------------------------------
# a tiny HTTP server: serves DATA at /file, optionally honouring Range, optionally cut short


class FileServer:
    def __init__(self, data=DATA, honor_range=True, send_only=None):
        self.data = data
        self.honor_range = honor_range
        self.send_only = send_only  # bytes actually written (Content-Length still claims all)
        self.log = []  # one dict per request: path, range, status, sent
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output quiet
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                entry = {"path": self.path, "range": rng, "status": None, "sent": 0}
                server.log.append(entry)
                if self.path != "/file":
                    entry["status"] = 404
                    self.send_error(404, "Not Found")
                    return
                data = server.data
                start, status = 0, 200
                if rng and server.honor_range:
                    m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                    if m:
                        start = int(m.group(1))
                        if start >= len(data):
                            entry["status"] = 416
                            self.send_response(416)
                            self.send_header("Content-Range", f"bytes */{len(data)}")
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                            return
                        status = 206
                body = data[start:]
                entry["status"] = status
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header(
                        "Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"
                    )
                self.end_headers()
                if server.send_only is not None:
                    body = body[: server.send_only]
                entry["sent"] = len(body)
                try:
                    self.wfile.write(body)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.closed = False
        self.thread.start()

    @property
    def url(self):
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/file"

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def make_server():
    servers = []

    def make(**kw):
        s = FileServer(**kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture
def entry(monkeypatch, server):
    """Point the registry's vit_b entry at the local server."""
    e = ModelFile("vit_b", FILENAME, server.url, len(DATA), SHA)
    monkeypatch.setitem(MODELS, "vit_b", e)
    return e


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, tmp_path):
    """Never let a test write into the real ~/.cache/persam."""
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "default-cache"))


# --------------------------------------------------------------------------------------------
# registry


def test_registry_has_the_official_checkpoints():
    assert {"vit_b", "vit_l", "vit_h", "vit_t"} <= set(MODELS)  # other families: their own tests
    assert MODELS["vit_h"].filename == "sam_vit_h_4b8939.pth"
    assert MODELS["vit_h"].size == 2564550879
    assert MODELS["vit_l"].filename == "sam_vit_l_0b3195.pth"
    assert MODELS["vit_l"].size is None
    assert MODELS["vit_b"].filename == "sam_vit_b_01ec64.pth"
    assert MODELS["vit_b"].size == 375042383
    assert MODELS["vit_t"].filename == "mobile_sam.pt"
    assert MODELS["vit_t"].size == 40728226
    assert MODELS["vit_t"].sha256 == "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"
    for name, e in MODELS.items():
        assert e.model_type == name
        assert e.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", e.sha256)  # None: no digest known
        assert e.url.startswith("https://") and e.url.endswith(e.filename)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PERSAM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "persam"


def test_verify_checkpoint(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(DATA)
    assert verify_checkpoint(p, SHA)
    assert verify_checkpoint(str(p), SHA.upper())
    assert not verify_checkpoint(p, "0" * 64)
    assert not verify_checkpoint(tmp_path / "missing", SHA)


# --------------------------------------------------------------------------------------------
# downloads


def test_fresh_download(tmp_path, server, entry):
    path = download_checkpoint("vit_b", cache_dir=tmp_path, progress=False)
    assert path == tmp_path / FILENAME
    assert path.read_bytes() == DATA
    assert not (tmp_path / (FILENAME + ".part")).exists()
    assert [(r["range"], r["status"], r["sent"]) for r in server.log] == [(None, 200, len(DATA))]


def test_progress_bar_does_not_break(tmp_path, server, entry, capsys):
    download_checkpoint("vit_b", cache_dir=tmp_path, progress=True)
    assert (tmp_path / FILENAME).read_bytes() == DATA


def test_sha256_mismatch_refused(tmp_path, server, monkeypatch):
    monkeypatch.setitem(MODELS, "vit_b", ModelFile("vit_b", FILENAME, server.url, len(DATA), "ab" * 32))
    with pytest.raises(DownloadError) as ei:
        download_checkpoint("vit_b", cache_dir=tmp_path, progress=False)
    msg = str(ei.value)
    assert "sha256" in msg and SHA in msg and "ab" * 32 in msg
    assert server.url in msg
    assert "run `persam download vit_b` again" in msg
    assert not (tmp_path / FILENAME).exists()
    assert not (tmp_path / (FILENAME + ".part")).exists()


def test_resume_from_partial(tmp_path, server, entry):
    have = 100 * 1024
    (tmp_path / (FILENAME + ".part")).write_bytes(DATA[:have])
    path = download_checkpoint("vit_b", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == DATA
    assert len(server.log) == 1
    req = server.log[0]
    assert req["range"] == f"bytes={have}-"
    assert req["status"] == 206
    assert req["sent"] == len(DATA) - have  # only the rest was transferred
    assert not (tmp_path / (FILENAME + ".part")).exists()


def test_server_ignoring_range_restarts_from_zero(tmp_path, make_server, monkeypatch):
    server = make_server(honor_range=False)
    monkeypatch.setitem(MODELS, "vit_b", ModelFile("vit_b", FILENAME, server.url, len(DATA), SHA))
    # garbage in the partial file: it must be discarded, not kept in front of the new bytes
    (tmp_path / (FILENAME + ".part")).write_bytes(b"x" * 5000)
    path = download_checkpoint("vit_b", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == DATA
    assert [(r["range"], r["status"], r["sent"]) for r in server.log] == [
        ("bytes=5000-", 200, len(DATA))
    ]


def test_complete_part_file_is_used_without_network(tmp_path, server, entry):
    (tmp_path / (FILENAME + ".part")).write_bytes(DATA)
    path = download_checkpoint("vit_b", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == DATA
    assert server.log == []


def test_oversized_part_file_is_discarded(tmp_path, server, entry):
    (tmp_path / (FILENAME + ".part")).write_bytes(DATA + b"junk")
    path = download_checkpoint("vit_b", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == DATA
    assert [(r["range"], r["status"]) for r in server.log] == [(None, 200)]


def test_416_restarts_from_zero(tmp_path, server, monkeypatch):
    # registry size unknown: a part file longer than the served file gets a 416 reply
    monkeypatch.setitem(MODELS, "vit_b", ModelFile("vit_b", FILENAME, server.url, None, SHA))
    (tmp_path / (FILENAME + ".part")).write_bytes(DATA + b"junk")
    path = download_checkpoint("vit_b", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == DATA
    assert [(r["range"], r["status"]) for r in server.log] == [
        (f"bytes={len(DATA) + 4}-", 416),
        (None, 200),
    ]


def test_cached_file_reused_without_any_request(tmp_path, server, entry):
    download_checkpoint("vit_b", cache_dir=tmp_path, progress=False)
    server.log.clear()
    server.close()  # nothing is listening any more
    path = download_checkpoint("vit_b", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == DATA
    assert server.log == []


def _unverified_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught if issubclass(w.category, UnverifiedCheckpointWarning)]


def _names_file_and_sha(message, path, data):
    sha = hashlib.sha256(data).hexdigest()
    assert str(path) in message and sha in message and "\n" not in message
    return True


@pytest.mark.parametrize("online", [True, False])
def test_hand_placed_file_is_used_with_one_warning(tmp_path, server, entry, online):
    """A file at the final name that is not the registry's was placed by hand (the downloader renames
    only verified files into place): used as it is, never replaced, with one warning naming it and its
    sha256, online or not."""
    placed = b"\0" * len(DATA)  # same size, other bytes: not a download of ours
    (tmp_path / FILENAME).write_bytes(placed)
    if not online:
        server.close()
    path, messages = _unverified_warnings(lambda: download_checkpoint("vit_b", cache_dir=tmp_path, progress=False))
    assert path == tmp_path / FILENAME and path.read_bytes() == placed
    assert server.log == []  # nothing downloaded, nothing replaced
    assert len(messages) == 1 and _names_file_and_sha(messages[0], path, placed)
    assert SHA in messages[0]  # and the official one, to compare
    # the same rule without downloading (what the persam commands use)
    found, again = _unverified_warnings(lambda: cached_checkpoint("vit_b", cache_dir=tmp_path))
    assert found == path and again == messages


def test_verified_file_gives_no_warning(tmp_path, server, entry):
    download_checkpoint("vit_b", cache_dir=tmp_path, progress=False)
    path, messages = _unverified_warnings(lambda: download_checkpoint("vit_b", cache_dir=tmp_path, progress=False))
    assert path.read_bytes() == DATA and messages == []
    assert _unverified_warnings(lambda: cached_checkpoint("vit_b", cache_dir=tmp_path)) == (path, [])
    assert cached_checkpoint("vit_b", cache_dir=tmp_path / "empty") is None


@pytest.mark.parametrize("state", ["nothing", "partial", "hand-placed", "directory"])
def test_offline_error_never_asks_for_what_is_already_there(tmp_path, make_server, entry, state):
    """Offline, download_checkpoint either returns the file in the cache or fails with a message whose
    "save it as PATH" names a path that is free (never the file that is already there)."""
    final = tmp_path / FILENAME
    if state == "partial":
        (tmp_path / (FILENAME + ".part")).write_bytes(DATA[:1000])
    elif state == "hand-placed":
        final.write_bytes(b"not the official bytes")
    elif state == "directory":
        final.mkdir()
    dead = make_server()
    dead.close()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnverifiedCheckpointWarning)
            path = download_checkpoint("vit_b", cache_dir=tmp_path, url=dead.url, progress=False)
    except DownloadError as exc:
        message = str(exc)
        assert state != "hand-placed", message
        assert str(final) in message  # the error names the place
        for asked in re.findall(r"save it as (\S+)", message):
            assert not Path(asked).exists(), message
        if state == "directory":
            assert "in the way" in message and "save it as" not in message
        else:
            assert dead.url in message
    else:
        assert state == "hand-placed" and path == final


def test_cli_download_warns_once_about_a_hand_placed_file(tmp_path, server, entry, capsys):
    from persam.cli.commands import main

    placed = b"my own weights"
    (tmp_path / FILENAME).write_bytes(placed)
    assert main(["download", "vit_b", "--cache-dir", str(tmp_path), "-q"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / FILENAME) and server.log == []
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("persam: warning: ")
    assert _names_file_and_sha(lines[0], tmp_path / FILENAME, placed)


def test_commands_use_a_hand_placed_cached_checkpoint_with_the_same_warning(
    tmp_path, monkeypatch, random_vit_t_checkpoint, perseg_dir, capsys
):
    """`persam learn` without --checkpoint takes the cached file; one that is not the official one
    (here: seeded random weights) is used, with the API's warning as one line."""
    from cli_testing import ref_args, run_cli, write_cat_photos

    cache = tmp_path / "cache"
    cache.mkdir()
    placed = cache / MODELS["vit_t"].filename
    placed.write_bytes(random_vit_t_checkpoint.read_bytes())
    monkeypatch.setenv("PERSAM_CACHE", str(cache))
    _, api = _unverified_warnings(lambda: cached_checkpoint("vit_t"))  # download_checkpoint's rule and words
    data = tmp_path / "data"
    data.mkdir()
    write_cat_photos(perseg_dir, data, 256)
    concept = tmp_path / "cat.pt"
    capsys.readouterr()
    assert run_cli(["learn", *ref_args(data), "--out", concept, "--model", "vit_t", "-q"]) == 0
    assert concept.is_file()
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == [f"persam: warning: {api[0]}"]
    assert _names_file_and_sha(warned[0], placed, placed.read_bytes())


def test_truncated_transfer_refused_then_resumed(tmp_path, make_server, monkeypatch):
    """The server claims the full length but closes the connection half-way."""
    half = len(DATA) // 2
    bad = make_server(send_only=half)
    monkeypatch.setitem(MODELS, "vit_b", ModelFile("vit_b", FILENAME, bad.url, len(DATA), SHA))
    with pytest.raises(DownloadError) as ei:
        download_checkpoint("vit_b", cache_dir=tmp_path, progress=False)
    msg = str(ei.value)
    assert "cut short" in msg and f"{half} of {len(DATA)} bytes" in msg
    assert bad.url in msg and "persam download vit_b" in msg
    assert not (tmp_path / FILENAME).exists()
    part = tmp_path / (FILENAME + ".part")
    assert part.read_bytes() == DATA[:half]  # kept, to be resumed

    good = make_server()
    path = download_checkpoint("vit_b", cache_dir=tmp_path, url=good.url, progress=False)
    assert path.read_bytes() == DATA
    assert [(r["range"], r["sent"]) for r in good.log] == [(f"bytes={half}-", len(DATA) - half)]


def test_short_file_on_server_refused(tmp_path, make_server, monkeypatch):
    """The server sends a complete response, but of a file shorter than the registry's size."""
    short = make_server(data=DATA[:1000])
    monkeypatch.setitem(MODELS, "vit_b", ModelFile("vit_b", FILENAME, short.url, len(DATA), SHA))
    with pytest.raises(DownloadError) as ei:
        download_checkpoint("vit_b", cache_dir=tmp_path, progress=False)
    msg = str(ei.value)
    assert "wrong size" in msg and f"got 1000 bytes, expected {len(DATA)}" in msg
    assert "run `persam download vit_b` again" in msg
    assert not (tmp_path / FILENAME).exists()
    assert not (tmp_path / (FILENAME + ".part")).exists()


def test_unknown_size_still_checks_sha(tmp_path, make_server, monkeypatch):
    short = make_server(data=DATA[:1000])
    monkeypatch.setitem(MODELS, "vit_l", ModelFile("vit_l", FILENAME, short.url, None, SHA))
    with pytest.raises(DownloadError, match="sha256"):
        download_checkpoint("vit_l", cache_dir=tmp_path, progress=False)
    assert not (tmp_path / FILENAME).exists()


def test_http_error_names_url(tmp_path, server, entry):
    url = server.url.replace("/file", "/missing")
    with pytest.raises(DownloadError) as ei:
        download_checkpoint("vit_b", cache_dir=tmp_path, url=url, progress=False)
    assert url in str(ei.value) and "404" in str(ei.value)
    assert not (tmp_path / FILENAME).exists()


def test_connection_refused_names_url(tmp_path, make_server, entry):
    dead = make_server()
    url = dead.url
    dead.close()
    with pytest.raises(DownloadError) as ei:
        download_checkpoint("vit_b", cache_dir=tmp_path, url=url, progress=False)
    assert url in str(ei.value)


def test_unknown_model_type(tmp_path):
    with pytest.raises(ValueError, match="vit_b"):
        download_checkpoint("vit_x", cache_dir=tmp_path)


def test_persam_cache_honoured(tmp_path, server, entry, monkeypatch):
    cache = tmp_path / "env-cache"
    monkeypatch.setenv("PERSAM_CACHE", str(cache))
    path = download_checkpoint("vit_b", progress=False)
    assert path == cache / FILENAME and path.read_bytes() == DATA


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_download(tmp_path, server, entry, capsys):
    from persam.cli.commands import main

    rc = main(["download", "vit_b", "--cache-dir", str(tmp_path), "-q"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.strip() == str(tmp_path / FILENAME)
    assert (tmp_path / FILENAME).read_bytes() == DATA


def test_cli_download_uses_persam_cache(tmp_path, server, entry, monkeypatch, capsys):
    from persam.cli.commands import main

    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "envc"))
    assert main(["download", "vit_b", "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "envc" / FILENAME)


def test_cli_download_url_override(tmp_path, make_server, entry, capsys):
    from persam.cli.commands import main

    other = make_server()
    assert main(["download", "vit_b", "--cache-dir", str(tmp_path), "--url", other.url, "-q"]) == 0
    assert len(other.log) == 1


def test_cli_download_error_is_one_line(tmp_path, server, monkeypatch, capsys):
    from persam.cli.commands import main

    monkeypatch.setitem(MODELS, "vit_b", ModelFile("vit_b", FILENAME, server.url, len(DATA), "0" * 64))
    rc = main(["download", "vit_b", "--cache-dir", str(tmp_path), "-q"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("persam: error: ")
    assert "sha256" in lines[0] and "Traceback" not in err


def test_cli_bad_model_name(capsys):
    from persam.cli.commands import main

    assert main(["download", "vit_q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("persam: error: ") and "vit_q" in err[0]


def test_cli_no_command(capsys):
    from persam.cli.commands import main

    assert main([]) == 2


def test_cli_all(tmp_path, server, monkeypatch, capsys):
    from persam.cli.commands import main

    for name in list(MODELS):
        monkeypatch.setitem(
            MODELS, name, ModelFile(name, f"{name}.pth", server.url, len(DATA), SHA)
        )
    assert main(["download", "all", "--cache-dir", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out.split()
    assert sorted(out) == sorted(str(tmp_path / f"{n}.pth") for n in MODELS)
    assert main(["download", "all", "--url", server.url]) == 2


def test_python_dash_m_persam():
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, "-m", "persam", "download", "--help"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "MODEL" in res.stdout and "--cache-dir" in res.stdout


# --------------------------------------------------------------------------------------------
# DINOv2 entries (family "dinov2")


def test_registry_has_metas_dinov2_backbones():
    dinov2 = {name: e for name, e in MODELS.items() if e.family == "dinov2"}
    assert set(dinov2) == {"dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14"}
    for name, e in dinov2.items():
        assert e.filename == f"{name}_pretrain.pth"
        assert e.url == f"https://dl.fbaipublicfiles.com/dinov2/{name}/{name}_pretrain.pth"
    assert MODELS["dinov2_vits14"].size == 88283115
    assert MODELS["dinov2_vits14"].sha256 == "b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9"
    assert MODELS["dinov2_vitg14"].sha256 is None  # no trusted digest: downloaded unverified
    assert all(e.family == "sam" for name, e in MODELS.items() if name.startswith("vit_"))


def test_cli_downloads_a_dinov2_backbone(tmp_path, server, monkeypatch, capsys):
    from persam.cli.commands import main

    official = MODELS["dinov2_vits14"]
    local = ModelFile(official.model_type, official.filename, server.url, len(DATA), SHA, family="dinov2")
    monkeypatch.setitem(MODELS, "dinov2_vits14", local)
    assert main(["download", "dinov2_vits14", "--cache-dir", str(tmp_path), "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "dinov2_vits14_pretrain.pth")
    assert (tmp_path / "dinov2_vits14_pretrain.pth").read_bytes() == DATA
    assert cached_checkpoint("dinov2_vits14", tmp_path) == tmp_path / "dinov2_vits14_pretrain.pth"


# --------------------------------------------------------------------------------------------
# entries without a known sha256 (DINOv2 ViT-g/14, SAM 2.1): checked by loading into the model


def test_unverified_download_that_does_not_load_is_refused(tmp_path, make_server, monkeypatch, capsys):
    from persam.cli.commands import main

    junk = make_server(data=DATA)
    official = MODELS["dinov2_vitg14"]
    assert official.sha256 is None
    monkeypatch.setitem(MODELS, "dinov2_vitg14", ModelFile(
        official.model_type, official.filename, junk.url, None, None, family="dinov2"))
    assert main(["download", "dinov2_vitg14", "--cache-dir", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"download of {junk.url} is not a dinov2_vitg14 checkpoint" in err
    assert "the partial file was deleted" in err
    assert list(tmp_path.iterdir()) == []


def test_unverified_download_that_loads_is_kept_with_its_sha256(tmp_path, make_server, monkeypatch, capsys):
    import io

    import torch

    from persam.cli.commands import main
    from sam.dinov2 import build_dinov2

    buffer = io.BytesIO()
    torch.save(build_dinov2("vits14").state_dict(), buffer)
    weights = buffer.getvalue()
    server = make_server(data=weights)
    official = MODELS["dinov2_vits14"]
    monkeypatch.setitem(MODELS, "dinov2_vits14", ModelFile(
        official.model_type, official.filename, server.url, None, None, family="dinov2"))
    assert main(["download", "dinov2_vits14", "--cache-dir", str(tmp_path), "-q"]) == 0
    final = tmp_path / official.filename
    captured = capsys.readouterr()
    assert captured.out.strip() == str(final)
    assert final.read_bytes() == weights
    warning = captured.err.strip()
    assert len(warning.splitlines()) == 1 and "checked by loading it into the model" in warning
    assert hashlib.sha256(weights).hexdigest() in warning


def test_a_sam2_file_is_not_taken_for_a_dinov2_backbone(tmp_path):
    import torch

    from sam.checkpoint import CheckpointError
    from sam.checkpoint_fit import check_checkpoint_fits
    from sam.dinov2 import build_dinov2

    path = tmp_path / "weights.pth"
    torch.save(build_dinov2("vits14").state_dict(), path)
    check_checkpoint_fits("dinov2_vits14", path)
    with pytest.raises(CheckpointError, match="vitb14|ViT-B|fit"):
        check_checkpoint_fits("dinov2_vitb14", path)
    with pytest.raises(CheckpointError):
        check_checkpoint_fits("sam2.1_hiera_t", path)
