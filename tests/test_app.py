"""`persam app` without a browser: the HTTP API (FastAPI's TestClient) on a random vit_t model.

Bad input gives a 400 with one visible line (never a server path), unknown ids a 404, a bug a
500 while the server keeps serving; sessions never see each other's images and are bounded;
changing the threshold or the method decodes again without encoding; the zip holds what
`persam apply` writes.  The browser itself is tests/test_app_browser.py.
"""

import io
import json
import re
import socket
import struct
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

from persam.app.server import COOKIE, SECURITY_HEADERS, STATIC, create_app  # noqa: E402
from persam.app.state import AppConfig, AppState, EmbeddingCache, Session  # noqa: E402
from persam.models import build_predictor  # noqa: E402
from conftest import REPO  # noqa: E402


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
    state = AppState(predictor, AppConfig("vit_t", random_vit_t_checkpoint, allow_folders=True, max_sessions=8))
    yield state
    state.close()


def _client(state, **kwargs) -> TestClient:
    return TestClient(create_app(state), **kwargs)


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


def test_state_creates_a_session_cookie(app_state):
    client = _client(app_state)
    response = client.get("/api/state")
    assert response.status_code == 200
    assert COOKIE in response.cookies
    body = response.json()
    assert body["references"] == [] and body["targets"] == [] and body["concept"] is None
    assert body["app"]["model_type"] == "vit_t"
    for name in SECURITY_HEADERS:
        assert name.lower() in {k.lower() for k in response.headers}


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
    assert "[x, y, label]" in _error(client.post(url, json={"points": [["a"]]}), 400)
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
    assert "file: Field required" in _error(client.post("/api/references"), 400)  # no file at all
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
    from persam.concept import load_concept

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
    from persam.concept import load_concept, save_concept

    client, _, _ = session_a
    client.post("/api/learn", json={"method": "persam"})
    saved = client.get("/api/concept")
    assert saved.status_code == 200 and 'filename="00.concept"' in saved.headers["content-disposition"]
    other = _client(app_state)  # another browser loads it
    assert "nothing learned" in _error(other.get("/api/concept"), 400)
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
    assert "min similarity" in _error(client.post(url, json={"min_similarity": "nan"}), 400)
    assert "bad request" in _error(client.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert "method must be" in _error(client.post("/api/learn", json={"method": "sam"}), 400)
    assert "no target" in _error(client.post("/api/targets/nope/segment", json={}), 404)
    assert "no reference" in _error(client.get("/api/references/nope/image.jpg"), 404)


# --------------------------------------------------------------------------------------------
# sessions


def test_sessions_never_see_each_other(app_state, session_a):
    client_a, ref, targets = session_a
    client_b = _client(app_state)
    state_b = client_b.get("/api/state").json()
    assert state_b["references"] == [] and state_b["targets"] == []
    assert client_b.cookies[COOKIE] != client_a.cookies[COOKIE]
    assert client_b.get(ref["preview"]).status_code == 404
    assert client_b.get(f"/api/targets/{targets[0]['id']}/thumb.jpg").status_code == 404
    assert client_b.post(f"/api/references/{ref['id']}/prompts", json={"points": [[5, 5, 1]]}).status_code == 404
    assert client_b.post(f"/api/targets/{targets[0]['id']}/segment", json={}).status_code == 404
    assert client_b.delete(f"/api/targets/{targets[0]['id']}").status_code == 404
    assert client_a.get(ref["preview"]).status_code == 200  # still there for A
    forged = _client(app_state, cookies={COOKIE: "guessed-session-id"})
    assert forged.get("/api/state").json()["references"] == []  # an unknown id gets a new, empty session


def test_sessions_and_embeddings_are_bounded(predictor, random_vit_t_checkpoint):
    state = AppState(predictor, AppConfig("vit_t", random_vit_t_checkpoint, max_sessions=2))
    try:
        clients = [_client(state) for _ in range(3)]
        folders = []
        for client in clients:
            client.get("/api/state")
            folders.append(state._sessions[client.cookies[COOKIE]].dir)
        assert len(state.session_ids()) == 2 and clients[0].cookies[COOKIE] not in state.session_ids()
        assert not folders[0].exists() and folders[1].exists() and folders[2].exists()
        assert clients[0].get("/api/state").json()["references"] == []  # comes back as a new session
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
    assert "no image files there" in _error(client.post("/api/targets/folder", json={"path": "/no/such/folder"}), 400)
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
    tolerant = TestClient(client.app, cookies=dict(client.cookies), raise_server_exceptions=False)
    response = tolerant.post(f"/api/targets/{targets[0]['id']}/segment", json={})
    assert "internal error (RuntimeError: planted failure)" in _error(response, 500)
    assert tolerant.get("/api/state").status_code == 200


# --------------------------------------------------------------------------------------------
# the command


def test_cli_app_help_busy_port_and_missing_extra(random_vit_t_checkpoint, capsys, monkeypatch):
    from persam import app as app_package
    from persam.cli import main

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
