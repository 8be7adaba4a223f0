#!/usr/bin/env python
"""Image-encoder throughput on a GPU: ours in fp32 / bf16 / fp16 with several images per call
against Meta's segment_anything in fp32, for several models in one run; peak GPU memory; and
the masks of each reduced precision against fp32.

    python scripts/bench_gpu.py [--models vit_t,vit_b,vit_h] [--batch-sizes 1,8] [--precisions fp32,bf16,fp16]
                                [--repeats 10] [--photos DIR] [--mask-images 2] [--device cuda]
                                [--img-size 1024] [--out runs/bench_gpu]

Every model gets seeded random weights (the work, and so the time, is that of the official
checkpoints), loaded into our SAM and into Meta's (ViT models; Meta has no TinyViT). Rows, each
after two warm-up calls, the median of --repeats timed calls, synchronised:

    meta fp32 B=b   Meta's ImageEncoderViT on a batch of b preprocessed images
    ours P B=b      our predictor's encoder call (`SamPredictor.encode`, backend torch,
                    precision P: autocast for bf16 / fp16) on the same batch; also
                    `encode_images` from the uint8 photos (resize and normalisation included)

Each row prints images/s, its ratio to Meta's fp32 at batch 1 of the same model and to Meta's
ViT-H fp32 at batch 1 (the issue's yardstick: segment-anything-fast reports about 3x with bf16),
and the peak GPU memory of the row (torch.cuda.max_memory_allocated, weights included).
The mask part runs our full predictor in fp32 and in each reduced precision on --mask-images
photos with three one-point prompts and prints the lowest IoU of the reduced masks against the
fp32 ones (all three multimask outputs) and the embedding's relative error
(scripts/bench_precision.py's mask_effect). With random weights the masks are arbitrary
shapes; the agreement still measures what the reduced precision changes.

The photos come from --photos (any folder of JPEG/PNG files), else ../shared/data; without
either the batch is seeded noise and the mask part is skipped. The device machine does not get
../shared: copy a few photos into a folder of the checkout that git ignores and carry it.
On a CPU (--device cpu --img-size 256 --models vit_b --precisions fp32,bf16 --repeats 1) it runs
as a quick check; like the persam command it makes malloc reuse freed memory (sam/memory.py).
Outputs in --out: bench_gpu.csv, bench_gpu.json, bench_gpu.png (bars: images/s relative to the
yardstick), bench_gpu_masks.csv.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def _bench_precision():
    """scripts/bench_precision.py as a module (its model building, mask effect, CSV and chart)."""
    spec = importlib.util.spec_from_file_location("_bench_precision", Path(__file__).resolve().parent / "bench_precision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_photos(folder: Optional[str], count: int, bench_precision) -> List[Path]:
    if folder is None:
        return bench_precision.shared_images(count)
    root = Path(folder)
    if not root.is_dir():
        sys.exit(f"--photos {folder}: not a folder")
    photos = sorted(p for p in root.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        sys.exit(f"--photos {folder}: no JPEG or PNG files in it")
    return photos[:count]


def per_call_seconds(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `call` after two warm-up calls, each timed call synchronised."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        call()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def measure_model(model_type: str, ours, official, args, device: torch.device, photos: List[np.ndarray],
                  bench_precision) -> List[dict]:
    """The rows of one model: Meta's fp32 (ViT only; its weights then leave the GPU, so that our
    rows' peak memory is ours alone), then ours in each precision and batch size."""
    from sam.predictor import SamPredictor

    largest = max(args.batch_sizes)
    if photos:
        inputs = [bench_precision.encoder_input(ours, photos[i % len(photos)], device) for i in range(largest)]
        batch_all = torch.cat(inputs)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        batch_all = torch.randn(largest, 3, args.img_size, args.img_size, generator=generator).to(device)
    rows = []

    def add(encoder: str, precision: str, batch: int, seconds: float, from_photos: Optional[float]) -> None:
        rows.append({"model": model_type, "encoder": encoder, "precision": precision, "batch": batch,
                     "images_per_s": round(batch / seconds, 3),
                     "images_per_s_from_photos": None if from_photos is None else round(batch / from_photos, 3),
                     "peak_gpu_mib": None if peak_mib(device) is None else round(peak_mib(device), 1)})
        row = rows[-1]
        extra = "" if from_photos is None else f", {row['images_per_s_from_photos']:8.2f} from photos"
        memory = "" if row["peak_gpu_mib"] is None else f", peak {row['peak_gpu_mib']:8.0f} MiB"
        print(f"  {model_type} {encoder:<4} {precision:<4} B={batch:<3} {row['images_per_s']:8.2f} images/s{extra}{memory}",
              flush=True)

    if official is not None:
        for batch in args.batch_sizes:
            x = batch_all[:batch]
            reset_peak(device)
            with torch.inference_mode():
                seconds = per_call_seconds(lambda: official.image_encoder(x), device, args.repeats)
            add("meta", "fp32", batch, seconds, None)
        official.to("cpu")
    for precision in args.precisions:
        predictor = SamPredictor(ours, precision=precision, backend="torch")
        for batch in args.batch_sizes:
            x = batch_all[:batch]
            reset_peak(device)
            with torch.inference_mode():
                seconds = per_call_seconds(lambda: predictor.encode(x), device, args.repeats)
            from_photos = None
            if photos:
                chunk = [photos[i % len(photos)] for i in range(batch)]
                from_photos = per_call_seconds(lambda: predictor.encode_images(chunk, batch_size=batch), device,
                                               args.repeats)
            add("ours", precision, batch, seconds, from_photos)
    return rows


def build(model_type: str, args, device: torch.device, bench_precision):
    """(our Sam, Meta's Sam or None for TinyViT) with the same seeded random weights, on `device`."""
    if model_type == "vit_t":
        sam_testing = bench_precision._load_test_module("sam_testing")
        ours, _ = sam_testing.random_sam("vit_t", img_size=args.img_size, seed=args.seed)
        return ours.to(device).eval(), None
    return bench_precision.build_models(model_type, None, args.seed, device, args.img_size)


def with_ratios(rows: List[dict]) -> List[dict]:
    """Each row's images/s over Meta's fp32 at batch 1 of its model, and over Meta's ViT-H fp32 at batch 1."""
    baselines = {r["model"]: r["images_per_s"] for r in rows if r["encoder"] == "meta" and r["batch"] == 1}
    yardstick = baselines.get("vit_h")
    for row in rows:
        same = baselines.get(row["model"])
        row["x_meta_fp32_same_model"] = None if same is None else round(row["images_per_s"] / same, 3)
        row["x_meta_vit_h_fp32"] = None if yardstick is None else round(row["images_per_s"] / yardstick, 3)
    return rows


def print_table(rows: List[dict]) -> None:
    def cell(value, form):
        return format("-", f">{form.split('.')[0]}") if value is None else format(value, form)

    print(f"{'model':<6} {'encoder':<7} {'prec':<5} {'B':>3} {'images/s':>9} {'from photos':>11} "
          f"{'x meta (same)':>13} {'x meta vit_h':>12} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['model']:<6} {r['encoder']:<7} {r['precision']:<5} {r['batch']:>3} {r['images_per_s']:9.2f} "
              f"{cell(r['images_per_s_from_photos'], '11.2f')} {cell(r['x_meta_fp32_same_model'], '13.2f')} "
              f"{cell(r['x_meta_vit_h_fp32'], '12.2f')} {cell(r['peak_gpu_mib'], '9.0f')}")


def chart_rows(rows: List[dict]) -> List[dict]:
    """Rows for bench_precision.draw_chart: each speed relative to the yardstick (ViT-H, else the model's own)."""
    out = []
    for r in rows:
        ratio = r["x_meta_vit_h_fp32"] if r["x_meta_vit_h_fp32"] is not None else r["x_meta_fp32_same_model"]
        if ratio is None:
            continue
        out.append({"mode": f"{r['model']} {r['precision']} B={r['batch']}", "encoder": "official" if r["encoder"] == "meta"
                    else "ours", "timing": "full", "speedup_vs_official_fp32": ratio})
    return out


def mask_agreement(model_type: str, ours, args, photo_paths: List[Path], bench_precision) -> List[dict]:
    """Our predictor's masks in each reduced precision against fp32 (bench_precision.mask_effect)."""
    reduced = [p for p in args.precisions if p != "fp32"]
    if not reduced or not photo_paths or args.mask_images < 1:
        return []
    rows, _ = bench_precision.mask_effect(ours, photo_paths[:args.mask_images], reduced)
    for precision in reduced:
        mine = [r for r in rows if r["mode"] == precision]
        print(f"  {model_type} {precision}: lowest mask IoU against fp32 {min(r['iou_vs_fp32'] for r in mine):.4f} "
              f"over {len(mine)} masks; embedding relative error {max(r['embedding_rel_err'] for r in mine):.2e}")
    return [{"model": model_type, **r} for r in rows]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_t,vit_b,vit_h", help="comma-separated (default vit_t,vit_b,vit_h)")
    parser.add_argument("--batch-sizes", default="1,8", help="images per encoder call, comma-separated (default 1,8)")
    parser.add_argument("--precisions", default="fp32,bf16,fp16", help="our rows' precisions (default fp32,bf16,fp16)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per row after two warm-ups (default 10)")
    parser.add_argument("--photos", default=None, help="folder of photos (default: ../shared/data)")
    parser.add_argument("--mask-images", type=int, default=2, help="photos for the mask agreement (0: skip it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--img-size", type=int, default=1024, help="input side (1024; smaller for a quick CPU check)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench_gpu"), help="folder for the CSVs, JSON and chart")
    args = parser.parse_args(argv)
    try:
        args.models = [m for m in args.models.split(",") if m]
        args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b})
        args.precisions = [p for p in args.precisions.split(",") if p]
    except ValueError:
        parser.error(f"--batch-sizes: whole numbers separated by commas, not {args.batch_sizes!r}")
    from sam.build import MODEL_TYPES
    from sam.precision import PRECISIONS

    for name, given, allowed in (("--models", args.models, MODEL_TYPES), ("--precisions", args.precisions, PRECISIONS)):
        unknown = [g for g in given if g not in allowed]
        if unknown or not given:
            parser.error(f"{name}: {', '.join(unknown) or 'none given'}; choose from {', '.join(allowed)}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error("--batch-sizes: each at least 1")
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device == "cpu" and "fp16" in args.precisions:
        parser.error("--precisions: fp16 runs on a GPU only (bf16 and fp32 on a CPU)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    from sam.memory import reuse_freed_memory

    reuse_freed_memory()  # as the persam command does (CPU tensors; sam/memory.py)
    bench_precision = _bench_precision()
    from persam.data.io import load_image

    photo_paths = find_photos(args.photos, max(max(args.batch_sizes), args.mask_images), bench_precision)
    photos = [load_image(p) for p in photo_paths]
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    machine = f"{time.strftime('%Y-%m-%d')}: {hardware}, torch {torch.__version__}"
    source = f"{len(photos)} photos" if photos else "seeded noise (no photos: no mask agreement)"
    print(f"bench_gpu: {machine}; models {', '.join(args.models)} at {args.img_size} px, random weights "
          f"(seed {args.seed}); input: {source}", flush=True)
    rows: List[dict] = []
    masks: List[dict] = []
    for model_type in args.models:  # each model built once, for its rows and its masks
        ours, official = build(model_type, args, device, bench_precision)
        rows.extend(measure_model(model_type, ours, official, args, device, photos, bench_precision))
        del official
        masks.extend(mask_agreement(model_type, ours, args, photo_paths, bench_precision))
        ours.to("cpu")
        del ours
    rows = with_ratios(rows)
    print_table(rows)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench_precision.write_csv(out / "bench_gpu.csv", rows)
    bench_precision.write_csv(out / "bench_gpu_masks.csv", masks)
    (out / "bench_gpu.json").write_text(json.dumps({"machine": machine, "img_size": args.img_size,
                                                    "repeats": args.repeats, "rows": rows}, indent=1))
    bars = chart_rows(rows)
    if bars:
        yardstick = "Meta's ViT-H fp32, batch 1" if any(r["x_meta_vit_h_fp32"] for r in rows) else \
            "Meta's fp32 of the same model, batch 1"
        bench_precision.draw_chart(out / "bench_gpu.png", bars, f"images/s relative to {yardstick}; {machine}")
    print(f"written: {out / 'bench_gpu.csv'}, bench_gpu.json, bench_gpu_masks.csv"
          + (", bench_gpu.png" if bars else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
