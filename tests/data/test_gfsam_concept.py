"""GF-SAM concept files (persam.data.concept, format version 2): what is saved comes back, and a
concept is refused, in one line naming the file and both sides, with another DINOv2 model or
checkpoint or another SAM; a damaged record is refused naming what is wrong."""

import io

import pytest
import torch

from persam.data.concept import load_concept, save_concept
from persam.errors import InputError
from persam.method.gfsam import GFSAMConcept, GFSAMReference

SHA_A, SHA_B = "a" * 64, "b" * 64


def concept() -> GFSAMConcept:
    generator = torch.Generator().manual_seed(0)
    references = [GFSAMReference(torch.randn(6, 4, generator=generator), (2, 3), torch.rand(6, generator=generator),
                                 torch.rand(6, generator=generator)) for _ in range(2)]
    return GFSAMConcept(references, "vits14", SHA_A, {"max_points": 8, "dinov2_side": 518}, name="cat")


def test_round_trip_keeps_features_masks_grid_models_and_settings(tmp_path):
    path = save_concept(concept(), tmp_path / "cat.concept", model_type="vit_t", checkpoint_sha256=SHA_B)
    loaded = load_concept(path, model_type="vit_t", checkpoint_sha256=SHA_B, dinov2_variant="vits14",
                          dinov2_sha256=SHA_A)
    original = concept()
    assert loaded.method == "gfsam" and loaded.name == "cat" and loaded.settings == original.settings
    assert (loaded.dinov2_variant, loaded.dinov2_sha256) == ("vits14", SHA_A)
    assert (loaded.model_type, loaded.checkpoint_sha256) == ("vit_t", SHA_B)
    for got, want in zip(loaded.references, original.references):
        assert got.grid == want.grid
        for name in ("features", "foreground", "background"):
            assert torch.equal(getattr(got, name), getattr(want, name))
    assert torch.load(path, weights_only=True)["version"] == 2


@pytest.mark.parametrize("other, says", [
    ({"dinov2_variant": "vitl14"}, "not DINOv2 vitl14"),
    ({"dinov2_sha256": SHA_B}, "not DINOv2 vits14 (sha bbbbbbbbbbbb)"),
    ({"model_type": "vit_b"}, "not vit_b"),
])
def test_another_model_is_refused_in_one_line(tmp_path, other, says):
    path = save_concept(concept(), tmp_path / "cat.concept", model_type="vit_t", checkpoint_sha256=SHA_B)
    with pytest.raises(InputError) as caught:
        load_concept(path, **other)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and says in message and "learn it again" in message


def _damaged(tmp_path, change) -> str:
    path = save_concept(concept(), tmp_path / "cat.concept", model_type="vit_t")
    record = torch.load(path, weights_only=True)
    change(record)
    buffer = io.BytesIO()
    torch.save(record, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(InputError) as caught:
        load_concept(path)
    assert str(path) in str(caught.value)
    return str(caught.value)


def test_damaged_records_are_refused_naming_what_is_wrong(tmp_path):
    assert "reference 1: grid" in _damaged(tmp_path, lambda r: r["references"][0].update(grid=[4, 4]))
    assert "foreground must hold 6" in _damaged(tmp_path, lambda r: r["references"][1].update(foreground=torch.ones(5)))
    assert "NaN" in _damaged(tmp_path, lambda r: r["references"][0]["features"].fill_(float("nan")))
    assert "at least one reference" in _damaged(tmp_path, lambda r: r.update(references=[]))
    assert "unknown DINOv2" in _damaged(tmp_path, lambda r: r.update(dinov2_variant="vit_huge"))
    assert "newer" in _damaged(tmp_path, lambda r: r.update(version=3))
    assert "not a concept file" in _damaged(tmp_path, lambda r: r.update(format="other"))
