"""persam.runs.models' DINOv2 side (issue 25): the checkpoint resolved without downloading, one line
naming the setting and `persam download` when it is missing; the model built on a backend, what
GF-SAM calls of it working through the backend's runner."""

import pytest
import torch

from persam.errors import SettingError
from persam.runs.models import Dinov2OnBackend, build_dinov2_features, resolve_dinov2_checkpoint
from sam_testing import random_state_dict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from sam.dinov2 import build_dinov2

    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(random_state_dict(build_dinov2("vits14"), seed=3), path)
    return path


def test_missing_checkpoint_names_the_download_and_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path))
    with pytest.raises(SettingError) as caught:
        resolve_dinov2_checkpoint(None, None)
    text = caught.value.worded(lambda setting: "--" + setting.replace("_", "-"))
    assert "persam download dinov2_vitl14" in text and "--dinov2-checkpoint PATH" in text and "\n" not in text
    with pytest.raises(SettingError, match="file not found"):
        resolve_dinov2_checkpoint("vits14", tmp_path / "nothing.pth")
    with pytest.raises(SettingError, match="one of vits14"):
        resolve_dinov2_checkpoint("vit_huge", None)


def test_cached_download_is_found(tmp_path, monkeypatch, checkpoint):
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path))
    placed = tmp_path / "dinov2_vits14_pretrain.pth"
    placed.symlink_to(checkpoint)
    assert resolve_dinov2_checkpoint("vits14", None, log=lambda line: None) == placed


def test_backend_runner_serves_what_gfsam_calls(checkpoint):
    from persam.method.gfsam import GFSAM, token_features

    plain = build_dinov2_features("vits14", checkpoint, backend="torch")
    assert isinstance(plain, torch.nn.Module)  # torch in fp32: the model itself
    calls = []

    def runner(pixels):
        calls.append(tuple(pixels.shape))
        return plain.patch_features(pixels)

    wrapped = Dinov2OnBackend(plain, runner)
    pixels = torch.randn(1, 3, 28, 42)
    assert torch.equal(token_features(wrapped, pixels), token_features(plain, pixels)) and calls == [(1, 3, 28, 42)]

    class Predictor:  # what GFSAM's constructor reads of a predictor
        model = None

    assert GFSAM(Predictor(), wrapped).dinov2_variant == "vits14"
    on_bf16 = build_dinov2_features("vits14", checkpoint, precision="bf16", backend="torch")
    assert isinstance(on_bf16, Dinov2OnBackend) and on_bf16.features.name == "torch"
