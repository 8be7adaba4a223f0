"""Every Python block in README.md runs as written.

The blocks run from a checkout-like folder with `../shared` beside it (as the
README says), against a seeded random MobileSAM checkpoint placed in the cache
as `persam download vit_t` would leave it (and a random DINOv2 ViT-S/14 as
`persam download dinov2_vits14` would). The registry entry is pointed at
that file's size and sha256, and at an address where nothing listens, so a
block that tried to download would fail instead of passing silently.
"""

import dataclasses
import re

import pytest

from conftest import REPO, SHARED_DATA
from sam import download
from sam.download import sha256_file

PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def readme_python_blocks():
    return PYTHON_BLOCK.findall((REPO / "README.md").read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
    blocks = readme_python_blocks()
    assert len(blocks) >= 2
    assert all("import" in block for block in blocks)


@pytest.fixture(scope="module")
def random_dinov2_vits14(tmp_path_factory):
    """Seeded random DINOv2 ViT-S/14 weights in Meta's layout, for the GF-SAM block."""
    import torch

    from sam.dinov2 import build_dinov2
    from sam_testing import random_state_dict

    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(random_state_dict(build_dinov2("vits14"), seed=4), path)
    return path


@pytest.fixture
def readme_workspace(tmp_path, monkeypatch, random_vit_t_checkpoint, random_dinov2_vits14):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)
    cache = tmp_path / "cache"
    cache.mkdir()
    entry = download.MODELS["vit_t"]
    cached = cache / entry.filename
    cached.write_bytes(random_vit_t_checkpoint.read_bytes())
    monkeypatch.setitem(download.MODELS, "vit_t", dataclasses.replace(
        entry, url="http://127.0.0.1:9/mobile_sam.pt", size=cached.stat().st_size, sha256=sha256_file(cached)))
    dinov2 = download.MODELS["dinov2_vits14"]  # placed as `persam download dinov2_vits14` would leave it
    (cache / dinov2.filename).symlink_to(random_dinov2_vits14)
    monkeypatch.setitem(download.MODELS, "dinov2_vits14", dataclasses.replace(
        dinov2, url="http://127.0.0.1:9/dinov2.pth", size=random_dinov2_vits14.stat().st_size,
        sha256=sha256_file(random_dinov2_vits14)))
    monkeypatch.setenv("PERSAM_CACHE", str(cache))
    monkeypatch.chdir(checkout)
    return checkout


@pytest.mark.parametrize("index", range(len(readme_python_blocks())))
def test_readme_python_block_runs_as_written(index, readme_workspace, capsys):
    block = readme_python_blocks()[index]
    namespace = {"__name__": f"readme_block_{index}"}
    exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)  # noqa: S102 - the README's own code
    printed = capsys.readouterr().out
    assert printed.strip(), "each README block prints what it computed"
    if "save_concept" in block:
        assert (readme_workspace / "cat.concept").is_file()
