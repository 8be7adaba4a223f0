"""Helpers shared by the tests that drive the `persam` command (test_cli, test_outputs, test_track)."""

import contextlib
import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from persam.cli import commands as cli
from sam.predictor import SamPredictor


@contextlib.contextmanager
def memoized_encoder():
    """Encode each distinct image once while active (the same features as encoding it again)."""
    cache = {}
    original = SamPredictor.set_torch_image

    def set_torch_image(self, resized_image, original_size):
        key = (hashlib.sha1(resized_image.cpu().numpy().tobytes()).hexdigest(), tuple(original_size),
               id(self.model.image_encoder.__class__), self.precision)
        if key not in cache:
            original(self, resized_image, original_size)
            cache[key] = self.features.clone()
            return self.features
        self.set_embedding(cache[key].clone(), original_size, tuple(resized_image.shape[-2:]))
        return self.features

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SamPredictor, "set_torch_image", set_torch_image)
        yield


def write_cat_photos(perseg_dir: Path, root: Path, side: int) -> Image.Image:
    """ref.jpg / ref.png (PerSeg cat 00) and targets/01.jpg, targets/02.jpg in `root`, side x side.

    Returns the reference mask as an L image (for tests that derive bad masks from it)."""
    (root / "targets").mkdir()
    for name, dest in (("00", root / "ref.jpg"), ("01", root / "targets" / "01.jpg"), ("02", root / "targets" / "02.jpg")):
        Image.open(perseg_dir / "Images" / "cat" / f"{name}.jpg").convert("RGB").resize((side, side)).save(dest)
    mask = Image.open(perseg_dir / "Annotations" / "cat" / "00.png").convert("L").resize((side, side), Image.NEAREST)
    mask.save(root / "ref.png")
    return mask


def model_args(checkpoint):
    return ["--model", "vit_t", "--checkpoint", str(checkpoint), "-q"]


def ref_args(data):
    return ["--ref-image", str(data / "ref.jpg"), "--ref-mask", str(data / "ref.png")]


def run_cli(argv):
    return cli.main([str(a) for a in argv])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("persam: error:")]
    assert len(errors) == 1, err
    return errors[0]


def strict_json(path):
    """A JSON file parsed by a strict parser: NaN, Infinity and -Infinity are errors."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not strict JSON")

    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=refuse)
