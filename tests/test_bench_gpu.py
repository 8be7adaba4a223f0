"""scripts/bench_gpu.py, the prepared GPU check, in its quick CPU form: rows for Meta's encoder and
ours, ratios computed from the rows, the mask agreement and the written files."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from conftest import PERSEG, import_official_sam

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_gpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_cpu_run_writes_rows_ratios_masks_and_chart(tmp_path):
    import_official_sam()  # skips without segment_anything
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("00.jpg", "01.jpg"):
        (photos / name).write_bytes((PERSEG / "Images" / "cat" / name).read_bytes())
    out = tmp_path / "out"
    bench = load_script()
    code = bench.main(["--device", "cpu", "--img-size", "256", "--models", "vit_b", "--batch-sizes", "2,1",
                       "--precisions", "fp32,bf16", "--repeats", "1", "--mask-images", "1", "--photos", str(photos),
                       "--out", str(out)])
    assert code == 0
    with open(out / "bench_gpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["encoder"], r["precision"], r["batch"]) for r in rows] == [
        ("meta", "fp32", "1"), ("meta", "fp32", "2"),
        ("ours", "fp32", "1"), ("ours", "fp32", "2"), ("ours", "bf16", "1"), ("ours", "bf16", "2")]
    baseline = float(rows[0]["images_per_s"])
    for row in rows:
        speed = float(row["images_per_s"])
        assert speed > 0
        assert float(row["x_meta_fp32_same_model"]) == pytest.approx(speed / baseline, rel=1e-2, abs=2e-3)
        assert row["x_meta_vit_h_fp32"] == ""  # no ViT-H in this run
        assert (row["images_per_s_from_photos"] == "") == (row["encoder"] == "meta")
    with open(out / "bench_gpu_masks.csv") as f:
        masks = list(csv.DictReader(f))
    assert len(masks) == 9 and {m["mode"] for m in masks} == {"bf16"}  # 3 prompts x 3 masks, one photo
    assert all(0.0 <= float(m["iou_vs_fp32"]) <= 1.0 for m in masks)
    assert json.loads((out / "bench_gpu.json").read_text())["rows"][0]["model"] == "vit_b"
    assert (out / "bench_gpu.png").stat().st_size > 0


def test_arguments_that_cannot_run_stop_with_one_line(tmp_path, capsys):
    bench = load_script()
    for argv, expected in ((["--device", "cpu", "--precisions", "fp32,fp16"], "fp16 runs on a GPU only"),
                           (["--device", "cpu", "--models", "vit_x"], "--models: vit_x"),
                           (["--device", "cpu", "--batch-sizes", "0"], "each at least 1")):
        with pytest.raises(SystemExit) as stop:
            bench.main(argv)
        assert stop.value.code == 2
        assert expected in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        bench.main(["--device", "cpu", "--precisions", "fp32", "--photos", str(tmp_path / "missing"),
                    "--out", str(tmp_path / "out")])
    assert "missing: not a folder" in str(stop.value.code)
