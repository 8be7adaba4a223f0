"""`persam app`'s GF-SAM choice (issue 25) through its HTTP API: disabled, saying why, without a DINOv2
checkpoint; with one, learned from the references, run on targets (one object or every instance),
downloaded in the zip and its concept loaded back.

Random vit_t SAM and DINOv2 ViT-S/14 weights; 96-pixel PerSeg photos; GF-SAM with 8 prompt points
and a 10 x 10 DINOv2 grid (persam.app.gfsam.settings patched) so that a target takes about a second.
"""

import io
import json
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the app extra is not installed: pip install -e '.[app]'")
pytest.importorskip("multipart", reason="python-multipart (the app extra) is not installed")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient  # noqa: E402

from persam.app.guard import served_hosts  # noqa: E402
from persam.app.server import create_app  # noqa: E402
from persam.app.settings import AppConfig  # noqa: E402
from persam.app.state import AppState  # noqa: E402
from persam.runs.models import build_predictor  # noqa: E402
from sam_testing import random_state_dict  # noqa: E402

PORT = 7812
ORIGIN = f"http://127.0.0.1:{PORT}"
SIDE = 96


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos(perseg_dir):
    def photo(name):
        rgb = Image.open(perseg_dir / "Images" / "cat" / f"{name}.jpg").convert("RGB").resize((SIDE, SIDE))
        return _png(np.asarray(rgb))

    mask = Image.open(perseg_dir / "Annotations" / "cat" / "00.png").convert("L").resize((SIDE, SIDE), Image.NEAREST)
    return {"ref": photo("00"), "mask": _png((np.asarray(mask) > 0).astype(np.uint8) * 255),
            "targets": [photo("01"), photo("02")]}


@pytest.fixture(scope="module")
def predictor(random_vit_t_checkpoint):
    return build_predictor("vit_t", random_vit_t_checkpoint, "cpu", "fp32", "torch")


@pytest.fixture(scope="module")
def dinov2_checkpoint(tmp_path_factory):
    from sam.dinov2 import build_dinov2

    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(random_state_dict(build_dinov2("vits14"), seed=4), path)
    return path


@pytest.fixture(autouse=True)
def small_gfsam(monkeypatch):
    from persam.app import gfsam
    from persam.method.gfsam import GFSAMSettings

    monkeypatch.setattr(gfsam, "settings", lambda: replace(GFSAMSettings(), max_points=8, dinov2_side=140))


def _client(state) -> TestClient:
    return TestClient(create_app(state, served_hosts("127.0.0.1", PORT)), base_url=ORIGIN)


def _add_reference_and_targets(client, photos) -> list:
    ref = client.post("/api/references", files={"file": ("00.png", photos["ref"], "image/png")})
    assert ref.status_code == 200, ref.text
    mask = client.post(f"/api/references/{ref.json()['id']}/mask", files={"file": ("00_mask.png", photos["mask"],
                                                                                    "image/png")})
    assert mask.status_code == 200, mask.text
    targets = client.post("/api/targets", files=[("files", (f"0{k}.png", data, "image/png"))
                                                 for k, data in zip((1, 2), photos["targets"])])
    assert targets.status_code == 200, targets.text
    return targets.json()["targets"]


def test_without_a_dinov2_checkpoint_the_choice_is_refused_with_why(predictor, random_vit_t_checkpoint, photos):
    why = "GF-SAM needs a DINOv2 checkpoint: start the app with one"
    state = AppState(predictor, AppConfig("vit_t", random_vit_t_checkpoint, gfsam_unavailable=why))
    try:
        client = _client(state)
        _add_reference_and_targets(client, photos)
        status = client.get("/api/state").json()["app"]["gfsam"]
        assert status == {"available": False, "dinov2": None, "why": why}
        response = client.post("/api/learn", json={"method": "gfsam"})
        assert response.status_code == 400 and response.json()["error"] == why
        assert client.post("/api/learn", json={"method": "persam"}).status_code == 200  # the others still work
    finally:
        state.close()


def test_gfsam_learned_run_zipped_and_loaded_back(predictor, random_vit_t_checkpoint, dinov2_checkpoint, photos,
                                                   tmp_path):
    from persam.data.concept import load_concept

    config = AppConfig("vit_t", random_vit_t_checkpoint, dinov2_variant="vits14", dinov2_checkpoint=dinov2_checkpoint)
    state = AppState(predictor, config)
    try:
        client = _client(state)
        targets = _add_reference_and_targets(client, photos)
        assert client.get("/api/state").json()["app"]["gfsam"] == {"available": True, "dinov2": "vits14", "why": None}
        learned = client.post("/api/learn", json={"method": "gfsam"})
        assert learned.status_code == 200 and learned.json()["method"] == "gfsam", learned.text

        one = client.post(f"/api/targets/{targets[0]['id']}/segment", json={}).json()["result"]
        assert one["status"] == "ok" and one["method"] == "gfsam" and one["objects"] == int(one["found"])
        several = client.post(f"/api/targets/{targets[0]['id']}/segment", json={"multi": True, "max_objects": 2})
        result = several.json()["result"]
        assert result["objects"] <= 2 and len(result["objects_detail"]) == result["objects"]
        areas = [o["area"] for o in result["objects_detail"]]
        assert areas == sorted(areas, reverse=True)
        absent = client.post(f"/api/targets/{targets[1]['id']}/segment", json={"min_similarity": 1.0}).json()
        assert absent["result"]["found"] is False and "below" in absent["result"]["reason"]
        heat = client.get(f"/api/targets/{targets[0]['id']}/similarity.png")
        assert heat.status_code == 400 and "GF-SAM" in heat.json()["error"]

        response = client.post("/api/results.zip", json={"multi": True})
        assert response.status_code == 200, response.text
        archive = zipfile.ZipFile(io.BytesIO(response.content))
        results = json.loads(archive.read("results.json"))
        assert results["method"] == "gfsam" and results["summary"]["segmented"] == 2
        assert all("score" in r for r in results["images"])
        concept_file = tmp_path / "reference.concept"
        concept_file.write_bytes(archive.read("reference.concept"))
        concept = load_concept(concept_file, model_type="vit_t", dinov2_variant="vits14")
        assert concept.method == "gfsam" and concept.references[0].grid == (10, 10)

        loaded = client.post("/api/concept", files={"file": ("cat.concept", concept_file.read_bytes(),
                                                             "application/octet-stream")})
        assert loaded.status_code == 200 and loaded.json()["method"] == "gfsam", loaded.text
    finally:
        state.close()
