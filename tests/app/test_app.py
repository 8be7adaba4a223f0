"""`persam app` without a browser: the HTTP API (FastAPI's TestClient) on a random vit_t model.

Bad input gives a 400 with one visible line (never a server path), a body of the wrong shape a
422 naming the field, unknown ids a 404, a bug a 500 while the server keeps serving; sessions
never see each other's images, are made only by a person's POST and are bounded without ever
dropping a working one; only the server's own Host names are served and foreign Origins may
change nothing; sizes are checked before anything is decoded or stored; changing the threshold
or the method decodes again without encoding; the zip holds what `persam apply` writes.  The
browser itself is tests/test_app_browser.py.
"""

import asyncio
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the app extra is not installed: pip install -e '.[app]'")
pytest.importorskip("multipart", reason="python-multipart (the app extra) is not installed")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

with warnings.catch_warnings():  # starlette's note about httpx's successor is not ours to fix
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from persam.app.cache import EmbeddingCache  # noqa: E402
from persam.app.cookie import COOKIE  # noqa: E402
from persam.app.guard import SECURITY_HEADERS, served_hosts  # noqa: E402
from persam.app.server import STATIC, create_app  # noqa: E402
from persam.app.session import Session  # noqa: E402
from persam.app.settings import AppConfig, SessionClosed, Settings  # noqa: E402
from persam.app.state import AppState  # noqa: E402
from persam.errors import InputError  # noqa: E402
from persam.runs.models import build_predictor  # noqa: E402
from conftest import REPO  # noqa: E402

PORT = 7811
ORIGIN = f"http://127.0.0.1:{PORT}"  # the server's own origin in these tests


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its pixels are missing): Pillow reads the size only."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 4)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def predictor(random_vit_t_checkpoint):
    return build_predictor("vit_t", random_vit_t_checkpoint, "cpu", "fp32", "torch")


@pytest.fixture(scope="module")
def app_state(predictor, random_vit_t_checkpoint):
    state = AppState(predictor, AppConfig("vit_t", random_vit_t_checkpoint, allow_folders=True, max_sessions=64))
    yield state
    state.close()


def _client(state, base_url: str = ORIGIN, **kwargs) -> TestClient:
    """A browser of the app served on 127.0.0.1:PORT, reaching it as `base_url`."""
    return TestClient(create_app(state, served_hosts("127.0.0.1", PORT)), base_url=base_url, **kwargs)


def _start_session(client, photos) -> dict:
    """A person starts a session: a target upload (a POST), which sets the cookie."""
    response = client.post("/api/targets", files={"files": ("01.jpg", photos["targets"][0], "image/jpeg")})
    assert response.status_code == 200 and COOKIE in response.cookies, response.text
    return response.json()["targets"][0]


@pytest.fixture(scope="module")
def photos(perseg_dir):
    return {
        "ref": (perseg_dir / "Images" / "cat" / "00.jpg").read_bytes(),
        "ref_mask": (perseg_dir / "Annotations" / "cat" / "00.png").read_bytes(),
        "targets": [(perseg_dir / "Images" / "cat" / f"0{k}.jpg").read_bytes() for k in (1, 2)],
        "folder": perseg_dir / "Images" / "duck_toy",
    }


@pytest.fixture(scope="module")
def session_a(app_state, photos):
    """One browser: a reference (encoded once), its mask, two targets."""
    client = _client(app_state)
    ref = client.post("/api/references", files={"file": ("00.jpg", photos["ref"], "image/jpeg")})
    assert ref.status_code == 200, ref.text
    targets = client.post("/api/targets", files=[("files", (f"0{k}.jpg", data, "image/jpeg"))
                                                 for k, data in zip((1, 2), photos["targets"])])
    assert targets.status_code == 200, targets.text
    return client, ref.json(), targets.json()["targets"]


def _error(response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    message = response.json()["error"]
    # A folder the user named may be echoed back; the server's own upload folders never are.
    server_side = message.replace(str(REPO.parent), "<user folder>")
    assert "\n" not in message and "/tmp" not in server_side and "persam-app-" not in message, message
    return message


# --------------------------------------------------------------------------------------------
# the page


def test_page_is_served_with_only_local_assets(app_state):
    client = _client(app_state)
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("/static/app.js", "/static/style.css"):
        assert client.get(name).status_code == 200
    for path in STATIC.iterdir():  # no font, script, style or picture from the web
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"https?://|//fonts\.|@import|cdn", text, re.IGNORECASE), path.name
    for element_id in ("ref-file", "ref-canvas", "target-files", "run", "gallery", "download-zip", "message",
                       "concept-file", "download-concept", "min-similarity", "method", "multi", "undo", "clear"):
        assert f'id="{element_id}"' in page.text


def test_state_makes_no_session_and_the_first_post_does(app_state, photos):
    client = _client(app_state)
    before = set(app_state.session_ids())
    response = client.get("/api/state")
    assert response.status_code == 200
    assert COOKIE not in response.cookies and set(app_state.session_ids()) == before  # looking makes nothing
    body = response.json()
    assert body["references"] == [] and body["targets"] == [] and body["concept"] is None
    assert body["session"] is False and body["expired"] is None
    assert body["app"]["model_type"] == "vit_t"
    for name in SECURITY_HEADERS:
        assert name.lower() in {k.lower() for k in response.headers}
    # a POST that fails and leaves nothing makes no session either
    assert client.post("/api/learn", json={}).status_code == 400 and COOKIE not in client.cookies
    assert set(app_state.session_ids()) == before
    target = _start_session(client, photos)
    assert set(app_state.session_ids()) - before == {client.cookies[COOKIE]}
    assert [t["id"] for t in client.get("/api/state").json()["targets"]] == [target["id"]]
    assert client.get("/api/state").json()["session"] is True


# --------------------------------------------------------------------------------------------
# the reference


def test_clicks_only_decode_and_bad_clicks_are_refused(app_state, session_a):
    client, ref, _ = session_a
    assert ref["encoded"] is True and ref["width"] == 1282 and ref["preview_width"] == 1024
    picture = client.get(ref["preview"])
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
    encodes = app_state.model.encodes
    url = f"/api/references/{ref['id']}/prompts"
    # a click either gives a mask or says, visibly, that SAM found none there (random weights)
    outcomes = []
    for x, y in ((640, 700), (375, 310), (194, 702), (800, 900)):
        response = client.post(url, json={"points": [[x, y, 1]]})
        if response.status_code == 200:
            body = response.json()
            assert body["area"] > 0 and body["mask"].startswith("data:image/png;base64,")
            assert body["encoded"] is False and body["points"] == [[x, y, 1]]
            outcomes.append("mask")
        else:
            assert "SAM found no object" in _error(response, 400)
            outcomes.append("none")
    assert app_state.model.encodes == encodes  # clicks never encode
    box = client.post(url, json={"points": [], "box": [100, 100, 1200, 1200]})
    assert box.status_code in (200, 400)
    assert "outside the reference" in _error(client.post(url, json={"points": [[1282, 5, 1]]}), 400)
    assert "click on the object" in _error(client.post(url, json={"points": [[5, 5, 0]]}), 400)
    assert "not both" in _error(client.post(url, json={"points": [[5, 5, 1]], "box": [0, 0, 9, 9]}), 400)
    assert "label" in _error(client.post(url, json={"points": [[5, 5, 7]]}), 400)
    assert "empty or invalid" in _error(client.post(url, json={"box": [50, 50, 10, 10]}), 400)
    assert "points.0" in _error(client.post(url, json={"points": [["a"]]}), 422)
    cleared = client.post(url, json={"points": []})
    assert cleared.status_code == 200 and cleared.json()["area"] == 0 and cleared.json()["mask"] is None


def test_reference_mask_upload_and_bad_masks(session_a, photos):
    client, ref, _ = session_a
    url = f"/api/references/{ref['id']}/mask"
    empty = _png_bytes(np.zeros((1282, 1282), np.uint8))
    assert "empty.png is empty" in _error(client.post(url, files={"file": ("empty.png", empty, "image/png")}), 400)
    small = _png_bytes(np.full((10, 12), 255, np.uint8))
    assert "is 12x10" in _error(client.post(url, files={"file": ("small.png", small, "image/png")}), 400)
    assert "notes.txt" in _error(client.post(url, files={"file": ("notes.txt", b"hello", "text/plain")}), 400)
    good = client.post(url, files={"file": ("00.png", photos["ref_mask"], "image/png")})
    assert good.status_code == 200 and good.json()["mask_source"] == "file"
    assert good.json()["area"] == int(np.count_nonzero(np.asarray(Image.open(io.BytesIO(photos["ref_mask"])))))


def test_bad_uploads_give_one_line(app_state, random_vit_t_checkpoint, predictor):
    client = _client(app_state)
    assert "not a readable image" in _error(
        client.post("/api/references", files={"file": ("notes.txt", b"not an image", "text/plain")}), 400)
    assert "is empty" in _error(client.post("/api/references", files={"file": ("zero.jpg", b"", "image/jpeg")}), 400)
    bomb = _png_header_only(20000, 20000)  # 400 megapixels: Pillow's decompression-bomb check
    assert "far too large" in _error(client.post("/api/references", files={"file": ("bomb.png", bomb, "image/png")}), 400)
    big = _png_header_only(9000, 7000)  # 63 megapixels: over the app's limit of 50
    message = _error(client.post("/api/targets", files={"files": ("big.png", big, "image/png")}), 400)
    assert "9000x7000" in message and "limit of 50 megapixels" in message
    assert "file: Field required" in _error(client.post("/api/references"), 422)  # no file at all
    tiny = AppState(predictor, AppConfig("vit_t", random_vit_t_checkpoint, max_upload_mb=0.001))
    try:
        too_long = _client(tiny).post("/api/targets", files={"files": ("x.png", b"\0" * 3_000_000, "image/png")})
        assert "larger than the app's limit" in _error(too_long, 413)
        over = _client(tiny).post("/api/targets", files={"files": ("x.png", b"\0" * 5000, "image/png")})
        assert "upload limit" in _error(over, 400)
    finally:
        tiny.close()
    assert client.get("/api/state").status_code == 200  # still serving


def test_one_bad_target_does_not_spoil_the_others(app_state, photos):
    client = _client(app_state)
    response = client.post("/api/targets", files=[("files", ("01.jpg", photos["targets"][0], "image/jpeg")),
                                                  ("files", ("bad.jpg", b"\xff\xd8garbage", "image/jpeg"))])
    assert response.status_code == 200
    body = response.json()
    assert [t["name"] for t in body["targets"]] == ["01.jpg"] and "bad.jpg" in body["errors"][0]
    assert client.get(body["targets"][0]["thumb"]).status_code == 200


# --------------------------------------------------------------------------------------------
# run, re-run, heat map, zip, concept


def test_run_then_rerun_from_cached_embeddings_and_download(app_state, session_a, photos, tmp_path):
    from persam.data.concept import load_concept

    client, ref, targets = session_a
    assert client.post(f"/api/references/{ref['id']}/mask",
                       files={"file": ("00.png", photos["ref_mask"], "image/png")}).status_code == 200
    assert "nothing learned" in _error(client.post(f"/api/targets/{targets[0]['id']}/segment", json={}), 400)
    learned = client.post("/api/learn", json={"method": "persam"}).json()
    assert learned["method"] == "persam" and learned["references"] == 1
    assert client.post("/api/learn", json={"method": "persam"}).json()["learned"] is False  # nothing changed

    first = [client.post(f"/api/targets/{t['id']}/segment", json={}).json()["result"] for t in targets]
    for result in first:
        assert result["status"] == "ok" and result["encoded"] is True
        assert -1 <= result["peak_similarity"] <= 1 and result["iou_score"] is not None
    encodes = app_state.model.encodes
    # a threshold above every peak: "not found", decoded from the cached embeddings
    missing = [client.post(f"/api/targets/{t['id']}/segment", json={"min_similarity": 1.0}).json()["result"]
               for t in targets]
    assert all(r["found"] is False and r["encoded"] is False for r in missing)
    # the other method: learned again, decoded again, nothing encoded
    assert client.post("/api/learn", json={"method": "persam_f", "steps": 50}).json()["method"] == "persam_f"
    several = [client.post(f"/api/targets/{t['id']}/segment", json={"multi": True, "max_objects": 3}).json()["result"]
               for t in targets]
    assert all(r["method"] == "persam_f" and r["encoded"] is False and r["objects"] <= 3 for r in several)
    assert app_state.model.encodes == encodes
    overlay = client.get(several[0]["overlay"])
    heat = client.get(f"/api/targets/{targets[0]['id']}/similarity.png")
    assert overlay.headers["content-type"] == "image/jpeg" and heat.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(heat.content)).size == (768, 768)
    assert app_state.model.encodes == encodes

    response = client.post("/api/results.zip", json={"multi": False, "min_similarity": None})
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    names = set(archive.namelist())
    assert {"results.json", "01.png", "01_overlay.jpg", "02.png", "02_overlay.jpg", "reference.concept",
            "reference_mask.png"} <= names
    results = json.loads(archive.read("results.json"))
    assert results["format"] == "persam-results" and results["method"] == "persam_f"
    assert [r["image"] for r in results["images"]] == ["01.jpg", "02.jpg"]
    assert all(r["status"] == "ok" for r in results["images"]) and results["summary"]["segmented"] == 2
    assert results["made_with"]["concept_sha256"] and results["made_by"] == "persam app"
    mask = np.asarray(Image.open(io.BytesIO(archive.read("01.png"))))
    assert mask.shape == (1277, 1277)
    (tmp_path / "c.concept").write_bytes(archive.read("reference.concept"))
    assert load_concept(tmp_path / "c.concept", model_type="vit_t").method == "persam_f"
    assert app_state.model.encodes == encodes


def test_few_shot_from_two_references(app_state, session_a, perseg_dir):
    client, _, _ = session_a
    second = client.post("/api/references", files={"file": ("01.jpg", (perseg_dir / "Images/cat/01.jpg").read_bytes())})
    assert second.status_code == 200 and second.json()["encoded"] is False  # a target already: its embedding is cached
    ref_id = second.json()["id"]
    assert client.post("/api/learn", json={"method": "persam"}).json()["references"] == 1  # no mask yet: not used
    mask = client.post(f"/api/references/{ref_id}/mask",
                       files={"file": ("01.png", (perseg_dir / "Annotations/cat/01.png").read_bytes())})
    assert mask.status_code == 200
    learned = client.post("/api/learn", json={"method": "persam"}).json()
    assert learned["references"] == 2 and learned["learned"] is True
    archive = zipfile.ZipFile(io.BytesIO(client.post("/api/results.zip", json={}).content))
    assert {"reference_mask_1.png", "reference_mask_2.png"} <= set(archive.namelist())
    assert json.loads(archive.read("results.json"))["reference"]["images"] == ["00.jpg", "01.jpg"]
    assert client.delete(f"/api/references/{ref_id}").status_code == 200
    assert client.post("/api/learn", json={"method": "persam"}).json()["references"] == 1


def test_concept_save_load_and_refusals(app_state, session_a, random_vit_t_checkpoint, tmp_path):
    from persam.data.concept import load_concept, save_concept

    client, _, _ = session_a
    client.post("/api/learn", json={"method": "persam"})
    saved = client.get("/api/concept")
    assert saved.status_code == 200 and 'filename="00.concept"' in saved.headers["content-disposition"]
    other = _client(app_state)  # another browser loads it
    assert "no session" in _error(other.get("/api/concept"), 404)  # nothing there yet
    loaded = other.post("/api/concept", files={"file": ("cat.concept", saved.content, "application/octet-stream")})
    assert loaded.status_code == 200 and loaded.json()["source"] == "cat.concept"
    assert other.get("/api/concept").status_code == 200

    path = tmp_path / "c.concept"
    path.write_bytes(saved.content)
    concept = load_concept(path)
    save_concept(concept, tmp_path / "b.concept", model_type="vit_b")
    message = _error(other.post("/api/concept", files={"file": ("dog.concept", (tmp_path / "b.concept").read_bytes())}), 400)
    assert message.startswith("concept dog.concept was learned with vit_b") and "learn it again" in message
    save_concept(concept, tmp_path / "s.concept", model_type="vit_t", checkpoint_sha256="ab" * 32)
    assert "learned with vit_t (sha abababababab)" in _error(
        other.post("/api/concept", files={"file": ("s.concept", (tmp_path / "s.concept").read_bytes())}), 400)
    assert "not a concept file" in _error(other.post("/api/concept", files={"file": ("x.concept", b"junk")}), 400)
    assert other.get("/api/state").json()["concept"]["source"] == "cat.concept"  # the good one stays


def test_bad_settings_and_requests(session_a):
    client, _, targets = session_a
    url = f"/api/targets/{targets[0]['id']}/segment"
    assert "max objects" in _error(client.post(url, json={"multi": True, "max_objects": 0}), 400)
    assert "min similarity" in _error(client.post(url, json={"min_similarity": 2}), 400)
    assert "min_similarity" in _error(client.post(url, json={"min_similarity": "nan"}), 422)
    assert "bad request" in _error(client.post(url, content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert "method must be" in _error(client.post("/api/learn", json={"method": "sam"}), 400)
    assert "no target" in _error(client.post("/api/targets/nope/segment", json={}), 404)
    assert "no reference" in _error(client.get("/api/references/nope/image.jpg"), 404)


# --------------------------------------------------------------------------------------------
# sessions


def test_sessions_never_see_each_other(app_state, session_a, photos):
    client_a, ref, targets = session_a
    client_b = _client(app_state)
    assert client_b.get(ref["preview"]).status_code == 404  # no session at all yet
    _start_session(client_b, photos)
    state_b = client_b.get("/api/state").json()
    assert state_b["references"] == [] and [t["name"] for t in state_b["targets"]] == ["01.jpg"]
    assert client_b.cookies[COOKIE] != client_a.cookies[COOKIE]
    assert client_b.get(ref["preview"]).status_code == 404
    assert client_b.get(f"/api/targets/{targets[0]['id']}/thumb.jpg").status_code == 404
    assert client_b.post(f"/api/references/{ref['id']}/prompts", json={"points": [[5, 5, 1]]}).status_code == 404
    assert client_b.post(f"/api/targets/{targets[0]['id']}/segment", json={}).status_code == 404
    assert client_b.delete(f"/api/targets/{targets[0]['id']}").status_code == 404
    assert client_a.get(ref["preview"]).status_code == 200  # still there for A
    forged = _client(app_state, cookies={COOKIE: "guessed-session-id"})
    assert forged.get("/api/state").json()["references"] == []  # an unknown id sees nothing
    assert "guessed-session-id" not in app_state.session_ids()


def test_sessions_and_embeddings_are_bounded(predictor, random_vit_t_checkpoint, photos):
    state = AppState(predictor, AppConfig("vit_t", random_vit_t_checkpoint, max_sessions=2, session_idle_s=0))
    try:
        clients = [_client(state) for _ in range(3)]
        folders = []
        for client in clients:
            _start_session(client, photos)
            folders.append(state.find(client.cookies[COOKIE]).dir)
        assert len(state.session_ids()) == 2 and clients[0].cookies[COOKIE] not in state.session_ids()
        assert not folders[0].exists() and folders[1].exists() and folders[2].exists()
        assert clients[0].get("/api/state").json()["targets"] == []  # its images are gone
    finally:
        state.close()
    assert not folders[2].exists()

    cache = EmbeddingCache(2)
    for k in range(3):
        cache.put(("s", str(k)), (k,))
    assert ("s", "0") not in cache and len(cache) == 2
    cache.put(("t", "x"), (9,))
    cache.drop_session("s")
    assert len(cache) == 1


def test_folder_targets(app_state, photos, predictor, random_vit_t_checkpoint):
    client = _client(app_state)
    added = client.post("/api/targets/folder", json={"path": str(photos["folder"])})
    assert added.status_code == 200 and [Path(t["name"]).name for t in added.json()["targets"]] == ["00.jpg", "01.jpg", "02.jpg"]
    assert added.json()["notes"] == []
    assert "no such file or folder" in _error(client.post("/api/targets/folder", json={"path": "/no/such/folder"}), 400)
    empty = photos["folder"].parent.parent / "Annotations"  # a folder of folders: no images in it
    assert "holds no images" in _error(client.post("/api/targets/folder", json={"path": str(empty)}), 400)
    assert "give a folder" in _error(client.post("/api/targets/folder", json={"path": ""}), 400)
    closed = AppState(predictor, AppConfig("vit_t", random_vit_t_checkpoint, allow_folders=False))
    try:
        message = _error(_client(closed).post("/api/targets/folder", json={"path": str(photos["folder"])}), 400)
        assert "--allow-folders" in message
    finally:
        closed.close()


def test_a_bug_is_a_500_and_the_server_keeps_serving(app_state, session_a, monkeypatch):
    client, _, targets = session_a

    def broken(self, target_id, settings):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(Session, "segment_target", broken)
    tolerant = TestClient(client.app, base_url=ORIGIN, cookies=dict(client.cookies), raise_server_exceptions=False)
    response = tolerant.post(f"/api/targets/{targets[0]['id']}/segment", json={})
    assert "internal error (RuntimeError: planted failure)" in _error(response, 500)
    assert tolerant.get("/api/state").status_code == 200


# --------------------------------------------------------------------------------------------
# the command


def test_cli_app_help_busy_port_and_missing_extra(random_vit_t_checkpoint, capsys, monkeypatch):
    from persam import app as app_package
    from persam.cli.commands import main

    assert main(["app", "--help"]) == 0
    assert "--port" in capsys.readouterr().out
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["app", "--checkpoint", str(random_vit_t_checkpoint), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["app", "--port", "70000"]) == 2
    assert "port number" in capsys.readouterr().err

    real_import = app_package.importlib.import_module

    def no_fastapi(name, *args):
        if name == "fastapi":
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(app_package.importlib, "import_module", no_fastapi)
    assert main(["app", "--checkpoint", str(random_vit_t_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "needs the app extra (fastapi not installed)" in err and 'pip install -e ".[app]"' in err


# --------------------------------------------------------------------------------------------
# issue 23: what an attacker found


def test_only_the_servers_own_host_names_are_served(app_state, photos):
    """DNS rebinding: a page of another site whose name now points here gets 421 for everything,
    and adds no folder (server folders are on in app_state)."""
    before = set(app_state.session_ids())
    rebound = _client(app_state, base_url=f"http://rebind.attacker.example:{PORT}")
    added = rebound.post("/api/targets/folder", json={"path": str(photos["folder"])})
    assert "not to the name 'rebind.attacker.example:7811'" in _error(added, 421)
    assert rebound.get("/").status_code == 421 and rebound.get("/api/state").status_code == 421
    assert set(app_state.session_ids()) == before and COOKIE not in rebound.cookies
    assert _client(app_state, base_url="http://127.0.0.1:9999").get("/api/state").status_code == 421  # another port
    for name in ("127.0.0.1", "localhost", "[::1]"):
        assert _client(app_state, base_url=f"http://{name}:{PORT}").get("/api/state").status_code == 200, name

    # which names: loopback names on a loopback address, the --host given otherwise
    assert "localhost:80" in served_hosts("127.0.0.1", 80) and "localhost" in served_hosts("127.0.0.1", 80)
    lan = served_hosts("192.168.1.5", PORT)
    assert f"192.168.1.5:{PORT}" in lan and f"localhost:{PORT}" not in lan and f"evil.example:{PORT}" not in lan
    named = served_hosts("persam.lan", PORT)
    assert f"PERSAM.lan:{PORT}" in named and f"127.0.0.1:{PORT}" not in named
    everywhere = served_hosts("0.0.0.0", PORT)  # every interface: any address, but no foreign name
    assert f"10.1.2.3:{PORT}" in everywhere and f"[::1]:{PORT}" in everywhere
    assert f"rebind.attacker.example:{PORT}" not in everywhere and "10.1.2.3:1" not in everywhere


def test_a_foreign_origin_changes_nothing(app_state, photos):
    client = _client(app_state)
    target = _start_session(client, photos)
    foreign = {"Origin": "http://rebind.attacker.example:7811"}
    assert "another site" in _error(client.delete(f"/api/targets/{target['id']}", headers=foreign), 403)
    assert _error(client.post("/api/targets/folder", json={"path": str(photos["folder"])},
                              headers={"Origin": "null"}), 403)
    assert [t["id"] for t in client.get("/api/state", headers=foreign).json()["targets"]] == [target["id"]]
    own = client.delete(f"/api/targets/{target['id']}", headers={"Origin": ORIGIN})
    assert own.status_code == 200 and client.get("/api/state").json()["targets"] == []


def test_server_folders_only_with_allow_folders(random_vit_t_checkpoint, monkeypatch):
    """`persam app` on 127.0.0.1 reads no server folder unless --allow-folders is given."""
    from persam.cli import commands as cli
    from persam.app import server

    started = []
    monkeypatch.setattr(cli, "build_predictor", lambda *args: "the predictor")
    monkeypatch.setattr(server, "serve", lambda predictor, config, sock, host=None, quiet=False:
                        started.append((config, host)) or sock.close() or 0)
    base = ["app", "--checkpoint", str(random_vit_t_checkpoint), "--port", "0", "-q"]
    assert cli.main(base) == 0 and cli.main(base + ["--allow-folders"]) == 0
    assert [(config.allow_folders, host) for config, host in started] == [(False, "127.0.0.1"), (True, "127.0.0.1")]


def test_a_huge_mask_is_refused_from_its_header(session_a, monkeypatch):
    """A 13000 x 13000 mask (169 megapixels, a few hundred kB as a PNG) is refused before it is
    decoded: the file holds only a header, so only the header check can name its size."""
    from persam.app import session as session_module

    client, ref, _ = session_a
    decoded = []
    monkeypatch.setattr(session_module, "load_mask", lambda *args, **kwargs: decoded.append(args) or None)
    response = client.post(f"/api/references/{ref['id']}/mask",
                           files={"file": ("huge.png", _png_header_only(13000, 13000), "image/png")})
    message = _error(response, 400)
    assert "huge.png" in message and "13000x13000" in message and "limit of 50 megapixels" in message
    assert decoded == []


def _multipart(name: str, filename: str, size: int, boundary: str = "persamtest"):
    """A multipart body with one file of `size` bytes, as chunks (sent chunked: no Content-Length)."""
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
           f"Content-Type: image/png\r\n\r\n").encode()
    for start in range(0, size, 65536):
        yield b"\0" * min(65536, size - start)
    yield f"\r\n--{boundary}--\r\n".encode()


def test_a_chunked_body_is_cut_off_at_the_limit(predictor, random_vit_t_checkpoint):
    tiny = AppState(predictor, AppConfig("vit_t", random_vit_t_checkpoint, max_upload_mb=0.001))
    try:  # the request limit is the upload limit and 1 MiB for the form around it
        client = _client(tiny)
        response = client.post("/api/targets", content=_multipart("files", "x.png", 3_000_000),
                               headers={"content-type": "multipart/form-data; boundary=persamtest"})
        assert "content-length" not in {k.lower() for k in response.request.headers}
        assert "larger than the app's limit" in _error(response, 413)
        assert tiny.session_ids() == []

        # an endless body, as a server sees it: reading stops at the limit
        app = create_app(tiny, served_hosts("127.0.0.1", PORT))
        pulled, sent = [0], []
        endless = _multipart("files", "x.png", 2**40)  # a file that never ends

        async def receive():
            chunk = next(endless)
            pulled[0] += len(chunk)
            assert pulled[0] < 50 * 2**20, "the app kept reading past its limit"
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/api/targets", "raw_path": b"/api/targets", "query_string": b"", "root_path": "",
                 "headers": [(b"host", f"127.0.0.1:{PORT}".encode()),
                             (b"content-type", b"multipart/form-data; boundary=persamtest"),
                             (b"transfer-encoding", b"chunked")],
                 "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", PORT)}
        asyncio.run(app(scope, receive, send))
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
        assert pulled[0] <= int(0.001 * 2**20) + 2**20 + 65536
    finally:
        tiny.close()


def test_a_sessions_disk_use_is_bounded(predictor, random_vit_t_checkpoint, photos):
    limit_mb = 0.45  # 471,859 bytes: the cat photos 01 and 02 are 327,030 and 180,854 bytes
    state = AppState(predictor, AppConfig("vit_t", random_vit_t_checkpoint, max_session_mb=limit_mb))
    try:
        client = _client(state)
        _start_session(client, photos)
        session = state.find(client.cookies[COOKIE])
        second = client.post("/api/targets", files={"files": ("02.jpg", photos["targets"][1], "image/jpeg")})
        message = _error(second, 400)
        assert "02.jpg" in message and "at most 0.45 MB per session" in message and "remove some images" in message
        assert session.disk_bytes() <= limit_mb * 2**20 and len(client.get("/api/state").json()["targets"]) == 1
        other = _client(state)  # another session has room of its own
        assert other.post("/api/targets", files={"files": ("02.jpg", photos["targets"][1])}).status_code == 200
    finally:
        state.close()


def test_gets_make_no_sessions_and_a_working_session_is_never_dropped(predictor, random_vit_t_checkpoint, photos):
    state = AppState(predictor, AppConfig("vit_t", random_vit_t_checkpoint, max_sessions=2))
    try:
        user = _client(state)
        _start_session(user, photos)
        mine = user.cookies[COOKIE]
        for _ in range(8):  # what wiped a session before: cookie-less GETs
            assert _client(state).get("/api/state").status_code == 200
        assert state.session_ids() == [mine]
        _start_session(_client(state), photos)  # a second person: room for two
        refused = _client(state).post("/api/targets", files={"files": ("01.jpg", photos["targets"][0])})
        assert "try again later" in _error(refused, 503)  # both were used in the last 10 minutes
        assert mine in state.session_ids() and len(user.get("/api/state").json()["targets"]) == 1

        # idle sessions may be replaced, never one with a request in progress (holding its lock)
        state.config.session_idle_s = 0
        session = state.find(mine)
        with session.lock:
            _start_session(_client(state), photos)
            _start_session(_client(state), photos)
            assert mine in state.session_ids() and session.dir.exists()
        assert len(user.get("/api/state").json()["targets"]) == 1
    finally:
        state.close()


def test_an_ended_session_is_deleted_and_the_page_is_told(predictor, random_vit_t_checkpoint, photos):
    state = AppState(predictor, AppConfig("vit_t", random_vit_t_checkpoint, max_sessions=1, session_idle_s=0))
    try:
        first = _client(state)
        target = _start_session(first, photos)
        session = state.find(first.cookies[COOKIE])
        folder = session.dir
        assert any(folder.rglob("01.jpg"))
        _start_session(_client(state), photos)  # replaces the idle one
        assert not folder.exists() and session.closed

        told = first.get("/api/state")
        assert "session on this server has ended" in told.json()["expired"] and told.json()["targets"] == []
        assert COOKIE not in told.cookies or not told.cookies[COOKIE]  # the stale cookie is cleared
        stale = _client(state, cookies={COOKIE: session.id})
        assert "reload the page" in _error(stale.post(f"/api/targets/{target['id']}/segment", json={}), 410)
        assert "reload the page" in _error(stale.get(f"/api/targets/{target['id']}/thumb.jpg"), 410)
        with pytest.raises(SessionClosed):  # a request that waited for the lock meanwhile does nothing
            session.run(lambda s: s.add_target("late.jpg", io.BytesIO(photos["targets"][0])))
        assert not folder.exists()
    finally:
        state.close()


def test_request_bodies_of_the_wrong_shape_are_422_naming_the_field(session_a, photos):
    client, ref, targets = session_a
    prompts = f"/api/references/{ref['id']}/prompts"
    segment = f"/api/targets/{targets[0]['id']}/segment"
    as_json = {"content-type": "application/json"}
    cases = [
        (prompts, b'{"points": [[10, 10, 1e400]]}', "points.0.2"),
        (prompts, b'{"box": [0, 0, 1e400, 5]}', "box.2"),
        (segment, b'{"x": 1}', "x: Extra inputs are not permitted"),
        (segment, b"Infinity", "body"),
        (segment, b'{"multi": "maybe"}', "multi"),
        (segment, b'{"max_objects": 2.5}', "max_objects"),
        ("/api/learn", b'{"steps": "many"}', "steps"),
        ("/api/targets/folder", b'{"path": ["/etc"]}', "path"),
        ("/api/results.zip", b"[1, 2]", "body"),
    ]
    for url, body, field in cases:
        assert field in _error(client.post(url, content=body, headers=as_json), 422), (url, body)
    # "false" is read as false (it was read as true), and the library refuses a string outright
    assert client.post(f"/api/references/{ref['id']}/mask",
                       files={"file": ("00.png", photos["ref_mask"], "image/png")}).status_code == 200
    assert client.post("/api/learn", json={"method": "persam"}).status_code == 200
    result = client.post(segment, json={"multi": "false", "max_objects": 3})
    assert result.status_code == 200 and result.json()["result"]["settings"]["multi"] is False
    assert "x: Extra inputs" in _error(client.post("/api/results.zip", json={"x": 1}), 422)
    with pytest.raises(InputError, match="multi must be true or false"):
        Settings.parse({"multi": "false"})


def test_a_reference_added_as_a_target_is_skipped(app_state, photos):
    client = _client(app_state)
    ref = client.post("/api/references", files={"file": ("00.jpg", photos["ref"], "image/jpeg")}).json()
    assert client.post(f"/api/references/{ref['id']}/mask",
                       files={"file": ("00.png", photos["ref_mask"], "image/png")}).status_code == 200
    targets = client.post("/api/targets", files=[("files", ("again.jpg", photos["ref"], "image/jpeg")),
                                                 ("files", ("01.jpg", photos["targets"][0], "image/jpeg"))]).json()
    assert client.post("/api/learn", json={"method": "persam"}).status_code == 200
    same, other = (client.post(f"/api/targets/{t['id']}/segment", json={}).json()["result"] for t in targets["targets"])
    assert same == {"status": "skipped", "reason": "reference image"}
    assert other["status"] == "ok"
    assert client.get(f"/api/targets/{targets['targets'][0]['id']}/overlay.jpg").status_code == 404

    # the full-size overlay of a result is the image's size
    full = client.get(other["full"])
    assert full.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(full.content)).size == (targets["targets"][1]["width"], targets["targets"][1]["height"])

    archive = zipfile.ZipFile(io.BytesIO(client.post("/api/results.zip", json={}).content))
    records = {r["image"]: r for r in json.loads(archive.read("results.json"))["images"]}
    assert records["again.jpg"]["status"] == "skipped" and records["01.jpg"]["status"] == "ok"
    assert "again.png" not in archive.namelist() and "01.png" in archive.namelist()


def test_server_folders_are_expanded_as_the_command_line_does(app_state, tmp_path, perseg_dir, monkeypatch):
    """Through persam.data.sources.expand_targets: two sibling symbolic links back up the tree (which
    kept `**` going for ever) are followed once, and the expansion's limit message comes back."""
    from persam.data import sources

    tree = tmp_path / "g"
    (tree / "d" / "build").mkdir(parents=True)
    (tree / "d" / "build" / "A").symlink_to("..")
    (tree / "d" / "build" / "B").symlink_to("..")
    (tree / "d" / "cat.jpg").write_bytes((perseg_dir / "Images" / "cat" / "01.jpg").read_bytes())
    client = _client(app_state)
    added = client.post("/api/targets/folder", json={"path": f"{tree}/**/*.jpg"})
    assert added.status_code == 200, added.text
    assert [Path(t["name"]).name for t in added.json()["targets"]] == ["cat.jpg"]

    def endless(specs, limits=None):
        raise InputError(f"target {specs[0]}: stopped listing it after {limits.max_seconds:g} s (the limit against "
                         f"endless listings); give a narrower folder or pattern")

    monkeypatch.setattr(sources, "expand_targets", endless)
    message = _error(client.post("/api/targets/folder", json={"path": "/usr/**/*.png"}), 400)
    assert message.startswith("target /usr/**/*.png: stopped listing it after 30 s")


_STUCK_SERVER = """
import sys, threading
from persam.app.session import Session

def stuck(self, folder):  # a request whose work never ends
    print("persam test: busy", file=sys.stderr, flush=True)
    threading.Event().wait()

Session.add_folder = stuck
from persam.cli.commands import main
sys.exit(main(["app", "--model", "vit_t", "--checkpoint", sys.argv[1], "--port", "0", "-q", "--allow-folders"]))
"""


def test_ctrl_c_stops_the_server_while_a_request_is_busy(random_vit_t_checkpoint, tmp_path):
    import queue
    import urllib.request

    script = tmp_path / "stuck_server.py"
    script.write_text(_STUCK_SERVER)
    env = dict(os.environ, PERSAM_BACKEND="torch", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, str(script), str(random_vit_t_checkpoint)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()

    def line_starting(prefix: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line
        pytest.fail(f"no line starting {prefix!r} from the app")

    try:
        url = line_starting("persam app: http://").split()[2]
        request = urllib.request.Request(url + "api/targets/folder", data=b'{"path": "/tmp"}', method="POST",
                                         headers={"content-type": "application/json"})
        threading.Thread(target=lambda: _ignore_errors(lambda: urllib.request.urlopen(request, timeout=60)),
                         daemon=True).start()  # a browser waiting for its answer, with the server's worker stuck
        line_starting("persam test: busy")
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
            pytest.fail("persam app did not stop on Ctrl-C while a request was busy")
    time.sleep(0.5)  # the reader thread's last lines
    rest = "".join(list(lines.queue))
    assert code == 0 and "persam app: stopped (1 request still running cut off)" in rest, rest
    assert "Traceback" not in rest, rest


def _ignore_errors(call):
    try:
        call()
    except Exception:
        pass
