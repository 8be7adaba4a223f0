#!/usr/bin/env python
"""Reduced precision (bf16 / fp16) of our ViT image encoder against Meta's, and its effect on masks.

    python scripts/bench_precision.py [--model vit_b] [--device cpu|cuda] [--repeats 3]
                                      [--images N] [--out DIR] [--checkpoint PATH]

(Speed of the encoder backends, fp32, against OpenVINO and the hardware limit: bench_encoder.py.)

Both encoders get the same (seeded random, or --checkpoint) weights and the same 1024 x 1024
input (a shared photo, preprocessed as the predictor does). For fp32 and the reduced modes (bf16
autocast on CPU; fp16 and bf16 on CUDA) it prints seconds per image, the speed-up over the official
fp32 encoder and our / official ratio within each mode. Runs are interleaved (official, ours, ours,
official, ...) so that load from other processes hits both alike; median of --repeats after a warm-up.

Reduced modes on a CPU without native bf16 (no AVX512-BF16 / AMX) are emulated and several times
slower than fp32; a full official forward then takes minutes. There (--reduced-timing auto) those
modes are timed on one pass through the patch embedding, one windowed block, one global block and
the neck, and the encoder time is estimated from them (marked "est."); our reduced mode also runs
for real in the mask-effect part, and that time is printed next to the estimate.

Mask effect: for --images shared photos our full predictor runs in fp32 and in each reduced mode;
for a few fixed one-point prompts it reports the IoU between fp32 and reduced-mode masks (all three
multimask outputs) and the relative error of the image embedding: with random weights the masks are
arbitrary, but the agreement still measures how much reduced precision moves the decoder's input.

The default (ViT-B) takes minutes on a CPU without native bf16, most of it in emulated
bf16; --modes fp32 --images 0 is the quick form.

Outputs in --out (default runs/bench_precision): bench_precision.csv (timings),
bench_masks.csv (IoUs), bench_precision.png (speed-up chart; matplotlib if
installed, else drawn with OpenCV).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
SHARED_DATA = REPO.parent / "shared" / "data"
IMAGE_DIRS = (SHARED_DATA / "perseg_subset" / "Images", SHARED_DATA / "dreambooth")
# One positive point each, as fractions of (width, height).
PROMPTS: Tuple[Tuple[float, float], ...] = ((0.5, 0.5), (0.3, 0.4), (0.7, 0.65))
ENCODERS = ("official", "ours")



def _load_test_module(name: str):
    """Import tests/<name>.py by path (the test helpers are not part of the package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_tests_{name}", TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_models(model_type: str, checkpoint: Optional[str], seed: int, device: torch.device, img_size: int = 1024):
    """(our Sam, Meta's Sam) holding the same weights, on `device`, in eval mode."""
    conftest = _load_test_module("conftest")
    sam_testing = _load_test_module("sam_testing")
    import pytest

    try:
        segment_anything = conftest.import_official_sam()
    except pytest.skip.Exception:
        sys.exit("segment_anything is not installed: pip install 'segment-anything==1.0' (or pip install -e '.[test]')")
    if checkpoint:
        from sam.build import build_sam

        ours = build_sam(model_type, checkpoint)
        state = ours.state_dict()
    else:
        ours, state = sam_testing.random_sam(model_type, img_size=img_size, seed=seed)
    official = sam_testing.official_sam_model(segment_anything, model_type, state, img_size=img_size)
    return ours.to(device).eval(), official.to(device).eval()



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> Tuple[float, torch.Tensor]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def native_reduced_precision(device: torch.device, precision: str) -> bool:
    """Whether `precision` runs on native hardware arithmetic (always assumed on CUDA)."""
    if precision == "fp32" or device.type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def time_full(
    encoders: Dict[str, torch.nn.Module], x: torch.Tensor, device: torch.device, precision: str, repeats: int
) -> Tuple[Dict[str, List[float]], Dict[str, torch.Tensor]]:
    """Seconds of whole forwards, interleaved (official, ours, ours, official, ...), after one warm-up each."""
    from sam.precision import autocast_context

    def forward(encoder):
        with torch.inference_mode(), autocast_context(device, precision):
            return encoder(x)

    for encoder in encoders.values():
        _timed(lambda: forward(encoder), device)
    times: Dict[str, List[float]] = {name: [] for name in encoders}
    outputs: Dict[str, torch.Tensor] = {}
    names = list(encoders)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            seconds, outputs[name] = _timed(lambda: forward(encoders[name]), device)
            times[name].append(seconds)
            print(f"    {precision:>4} {name:<8} run {repeat + 1}/{repeats}: {seconds:7.2f} s", flush=True)
    return times, outputs


def time_by_blocks(
    encoders: Dict[str, torch.nn.Module], x: torch.Tensor, device: torch.device, precision: str, repeats: int
) -> Dict[str, List[float]]:
    """Estimated seconds per forward from one pass through embed, a windowed block, a global block and the neck."""
    from sam.precision import autocast_context

    def estimate(encoder) -> float:
        windowed = [i for i, block in enumerate(encoder.blocks) if block.window_size > 0]
        global_ = [i for i, block in enumerate(encoder.blocks) if block.window_size == 0]
        with torch.inference_mode(), autocast_context(device, precision):

            def embed():
                tokens = encoder.patch_embed(x)
                return tokens if encoder.pos_embed is None else tokens + encoder.pos_embed

            total, tokens = _timed(embed, device)
            for indexes in (windowed, global_):
                if indexes:
                    seconds, tokens = _timed(lambda: encoder.blocks[indexes[0]](tokens), device)
                    total += len(indexes) * seconds
            seconds, _ = _timed(lambda: encoder.neck(tokens.permute(0, 3, 1, 2)), device)
        return total + seconds

    times: Dict[str, List[float]] = {name: [] for name in encoders}
    names = list(encoders)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            times[name].append(estimate(encoders[name]))
            print(f"    {precision:>4} {name:<8} est. {repeat + 1}/{repeats}: {times[name][-1]:7.2f} s", flush=True)
    return times



def shared_images(count: int) -> List[Path]:
    """`count` shared photos, one per class first (perseg_subset, then dreambooth)."""
    for root in IMAGE_DIRS:
        if not root.is_dir():
            continue
        per_class = [sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
                     for d in sorted(root.iterdir()) if d.is_dir()]
        ordered = [files[i] for i in range(max(map(len, per_class), default=0)) for files in per_class if i < len(files)]
        if ordered:
            return ordered[:count]
    return []


def encoder_input(model, image: np.ndarray, device: torch.device) -> torch.Tensor:
    """1 x 3 x S x S normalised, padded input (S = the model's input side), as SamPredictor builds it."""
    from sam.transforms import resize_longest_side

    resized = torch.from_numpy(resize_longest_side(image, model.img_size)).to(device).permute(2, 0, 1)[None]
    return model.preprocess(resized.to(torch.float32))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def mask_effect(model, images: Sequence[Path], precisions: Sequence[str]) -> Tuple[List[dict], Dict[str, List[float]]]:
    """IoU of reduced-precision masks against fp32 masks, and our predictor's real encoder times."""
    from persam.data.io import load_image
    from sam.predictor import SamPredictor

    predictors = {p: SamPredictor(model, precision=p, backend="torch") for p in ("fp32", *precisions)}
    rows: List[dict] = []
    encode_seconds: Dict[str, List[float]] = {p: [] for p in predictors}
    for path in images:
        image = load_image(path)
        height, width = image.shape[:2]
        for precision, predictor in predictors.items():
            seconds, _ = _timed(lambda: predictor.set_image(image), model.device)
            encode_seconds[precision].append(seconds)
        reference = predictors["fp32"]
        for precision in precisions:
            predictor = predictors[precision]
            rel_err = float((predictor.features - reference.features).norm() / reference.features.norm())
            for fx, fy in PROMPTS:
                point, label = np.array([[fx * width, fy * height]]), np.array([1])
                expected = reference.predict(point, label, multimask_output=True)
                got = predictor.predict(point, label, multimask_output=True)
                for index in range(expected.masks.shape[0]):
                    rows.append({
                        "image": str(path.relative_to(SHARED_DATA)) if path.is_relative_to(SHARED_DATA) else str(path),
                        "mode": precision,
                        "point_x": round(fx * width, 1),
                        "point_y": round(fy * height, 1),
                        "mask_index": index,
                        "iou_vs_fp32": round(mask_iou(expected.masks[index], got.masks[index]), 5),
                        "fp32_mask_fraction": round(float(expected.masks[index].mean()), 5),
                        "embedding_rel_err": round(rel_err, 6),
                    })
        print(f"    {path.name} ({path.parent.name}): encoded in "
              + ", ".join(f"{p} {s[-1]:.1f} s" for p, s in encode_seconds.items()), flush=True)
    return rows, encode_seconds



def write_csv(path: Path, rows: List[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def draw_chart(path: Path, rows: List[dict], title: str) -> str:
    """Horizontal bars of the speed-up over the official fp32 encoder, lines at 1x and 2x."""
    labels = [f"{r['mode']} {r['encoder']}{' (est.)' if r['timing'] != 'full' else ''}" for r in rows]
    values = [float(r["speedup_vs_official_fp32"]) for r in rows]
    colours = ["#1f77b4" if r["encoder"] == "official" else "#ff7f0e" for r in rows]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
        y = np.arange(len(rows))[::-1]
        ax.barh(y, values, color=colours)
        ax.set_yticks(y, labels)
        for value, yy in zip(values, y):
            ax.text(value, yy, f" {value:.2f}x", va="center")
        for line in (1.0, 2.0):
            ax.axvline(line, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("speed-up over the official fp32 encoder (higher is faster)")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return "matplotlib"
    except ImportError:
        pass
    import cv2

    left, right, top, bar, gap = 230, 120, 60, 28, 14
    width = 900
    height = top + len(rows) * (bar + gap) + 50
    canvas = np.full((height, width, 3), 255, np.uint8)
    scale = (width - left - right) / max(2.2, max(values, default=1.0) * 1.05)
    cv2.putText(canvas, title, (10, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (label, value, colour) in enumerate(zip(labels, values, colours)):
        y = top + i * (bar + gap)
        bgr = tuple(int(colour[j:j + 2], 16) for j in (5, 3, 1))
        cv2.rectangle(canvas, (left, y), (left + max(1, int(value * scale)), y + bar), bgr, -1)
        cv2.putText(canvas, label, (10, y + bar - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(canvas, f"{value:.2f}x", (left + int(value * scale) + 6, y + bar - 8),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for line in (1.0, 2.0):
        x = left + int(line * scale)
        for y in range(top - 10, height - 40, 8):
            cv2.line(canvas, (x, y), (x, y + 4), (128, 128, 128), 1)
        cv2.putText(canvas, f"{line:g}x", (x - 8, height - 25), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (80, 80, 80), 1, cv2.LINE_AA)
    cv2.putText(canvas, "speed-up over the official fp32 encoder (higher is faster)", (left, height - 8),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), canvas)
    return "opencv"


def load_text() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else "load average n/a"



def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per encoder and mode (median reported)")
    parser.add_argument("--images", type=int, default=2, help="shared photos for the mask effect (0: skip it)")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench_precision"), help="folder for the CSVs and the chart")
    parser.add_argument("--modes", default=None,
                        help="comma-separated precisions (default: fp32,bf16 on CPU; fp32,fp16,bf16 on CUDA)")
    parser.add_argument("--reduced-timing", default="auto", choices=("auto", "full", "blocks"),
                        help="reduced modes: whole forwards, or the per-block estimate (auto: estimate on a CPU "
                             "without native bf16, where a full official forward takes minutes)")
    parser.add_argument("--estimate-repeats", type=int, default=1, help="passes of the per-block estimate")
    parser.add_argument("--checkpoint", default=None, help="real weights for both encoders instead of random ones")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--img-size", type=int, default=1024, help="input side (default 1024; smaller only for a "
                        "quick smoke run with random weights)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = args.modes.split(",") if args.modes else (["fp32", "bf16"] if device.type == "cpu" else ["fp32", "fp16", "bf16"])
    if "fp32" not in modes:
        modes = ["fp32", *modes]
    from sam.precision import autocast_context

    for mode in modes:
        try:
            autocast_context(device, mode)
        except ValueError as exc:
            sys.exit(f"--modes: {exc}")
    reduced = [m for m in modes if m != "fp32"]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " \
                   f"{torch.backends.cpu.get_cpu_capability()}"
    print(f"bench_precision: {args.model} at {args.img_size} x {args.img_size} on {device} ({hardware}), torch {torch.__version__}")
    for m in reduced:
        if not native_reduced_precision(device, m):
            print(f"  note: this CPU has no native {m} arithmetic (oneDNN bf16 check is False): {m} is emulated "
                  "and slower than fp32 here")
    print(f"  {load_text()} at start")

    start = time.perf_counter()
    if args.checkpoint and args.img_size != 1024:
        sys.exit("--checkpoint needs --img-size 1024")
    ours, official = build_models(args.model, args.checkpoint, args.seed, device, args.img_size)
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else f"random weights (seed {args.seed})"
    images = shared_images(args.images if args.images > 0 else 1)
    if images:
        from persam.data.io import load_image

        x = encoder_input(ours, load_image(images[0]), device)
        input_name = f"{images[0].parent.name}/{images[0].name}"
    else:
        x = torch.randn(1, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(args.seed)).to(device)
        input_name = "seeded random noise"
    print(f"  built both encoders ({weights}) in {time.perf_counter() - start:.1f} s; input: {input_name}")
    encoders = {"official": official.image_encoder, "ours": ours.image_encoder}

    results: Dict[str, Dict[str, List[float]]] = {}
    methods: Dict[str, str] = {}
    loads: Dict[str, float] = {}
    for mode in modes:
        by_blocks = mode != "fp32" and (
            args.reduced_timing == "blocks"
            or (args.reduced_timing == "auto" and not native_reduced_precision(device, mode))
        )
        print(f"  timing {mode} ({'per-block estimate' if by_blocks else 'full forwards'}) ...", flush=True)
        if by_blocks:
            results[mode] = time_by_blocks(encoders, x, device, mode, max(1, args.estimate_repeats))
            methods[mode] = "est."
        else:
            results[mode], outputs = time_full(encoders, x, device, mode, max(1, args.repeats))
            methods[mode] = "full"
            diff = (outputs["ours"].float() - outputs["official"].float()).abs().max().item()
            print(f"    {mode}: max |ours - official| on the embedding = {diff:.2e}")
        loads[mode] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    baseline = statistics.median(results["fp32"]["official"])
    baseline_min = min(results["fp32"]["official"])
    rows = []
    for mode in modes:
        official_median = statistics.median(results[mode]["official"])
        for name in ENCODERS:
            times = results[mode][name]
            median = statistics.median(times)
            rows.append({
                "device": args.device,
                "model": args.model,
                "mode": mode if mode == "fp32" else f"{mode}-autocast",
                "encoder": name,
                "seconds_median": round(median, 4),
                "seconds_min": round(min(times), 4),
                "runs": len(times),
                "timing": methods[mode],
                "speedup_vs_official_fp32": round(baseline / median, 3),
                "speedup_vs_official_fp32_min": round(baseline_min / min(times), 3),
                "official_over_ours_same_mode": round(official_median / statistics.median(results[mode]["ours"]), 3),
                "load_avg_1m": round(loads[mode], 2),
            })

    mask_rows: List[dict] = []
    encode_seconds: Dict[str, List[float]] = {}
    if args.images > 0 and reduced:
        mask_images = shared_images(args.images)
        if mask_images:
            print(f"  mask effect on {len(mask_images)} shared image(s) ...", flush=True)
            mask_rows, encode_seconds = mask_effect(ours, mask_images, reduced)
        else:
            print(f"  mask effect skipped: no shared images under {SHARED_DATA}")

    # ---- report ----
    print()
    print(f"{args.model} image encoder, {args.img_size} x {args.img_size}, {device} ({hardware}); {weights}; {load_text()} at end")
    header = (f"{'mode':<14} {'encoder':<9} {'s/image':>9} {'min':>8} {'runs':>4}  {'timing':<6} "
              f"{'x official fp32':>15} {'(of mins)':>9} {'official/ours':>13}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['mode']:<14} {r['encoder']:<9} {r['seconds_median']:>9.2f} {r['seconds_min']:>8.2f} {r['runs']:>4}  "
              f"{r['timing']:<6} {r['speedup_vs_official_fp32']:>14.2f}x {r['speedup_vs_official_fp32_min']:>8.2f}x "
              f"{r['official_over_ours_same_mode']:>12.2f}x")
    print("s/image: median of the runs; x official fp32: official fp32 median / this median, (of mins): the same "
          "with the fastest runs, less sensitive to load from other processes; official/ours: within the mode")
    if any(m == "est." for m in methods.values()):
        print("est.: embed + n_windowed x (one windowed block) + n_global x (one global block) + neck, one pass each")
    for mode, seconds in encode_seconds.items():
        if mode != "fp32" and seconds:
            print(f"ours {mode} measured in SamPredictor.set_image (full forward + preprocessing): "
                  f"median {statistics.median(seconds):.2f} s over {len(seconds)} image(s), "
                  f"{baseline / statistics.median(seconds):.2f}x official fp32")

    if mask_rows:
        print()
        print("Mask effect of the reduced mode (our predictor, fp32 vs reduced encoder, same decoder in fp32):")
        print("  " + ("random weights: the masks are arbitrary shapes, but fp32-vs-reduced agreement is still a "
                      "fair measure of the reduced precision's effect" if not args.checkpoint else "real weights"))
        for mode in reduced:
            mode_rows = [r for r in mask_rows if r["mode"] == mode]
            by_image: Dict[str, List[dict]] = {}
            for r in mode_rows:
                by_image.setdefault(r["image"], []).append(r)
            for image, image_rows in by_image.items():
                ious = [r["iou_vs_fp32"] for r in image_rows]
                print(f"  {mode:<5} {image:<40} embedding rel. err {image_rows[0]['embedding_rel_err']:.2e}   "
                      f"mask IoU mean {np.mean(ious):.4f} min {np.min(ious):.4f} ({len(ious)} masks, "
                      f"{len(PROMPTS)} one-point prompts x 3 outputs)")
            ious = [r["iou_vs_fp32"] for r in mode_rows]
            print(f"  {mode:<5} all images: mask IoU mean {np.mean(ious):.4f}, min {np.min(ious):.4f}")

    write_csv(out_dir / "bench_precision.csv", rows)
    write_csv(out_dir / "bench_masks.csv", mask_rows)
    backend = draw_chart(out_dir / "bench_precision.png", rows,
                         f"{args.model} encoder, {args.img_size} px, {device} ({hardware}); {load_text()}")

    print()
    ours_fp32 = next(r for r in rows if r["mode"] == "fp32" and r["encoder"] == "ours")
    fast = max((r for r in rows if r["mode"] != "fp32" and r["encoder"] == "ours"),
               key=lambda r: r["speedup_vs_official_fp32"], default=None)
    print(f"goal: ours fp32 not slower than official fp32: {ours_fp32['speedup_vs_official_fp32']:.2f}x -> "
          f"{'met' if ours_fp32['speedup_vs_official_fp32'] >= 1.0 else 'NOT met'}")
    if fast is not None:
        print(f"goal: ours fast mode >= 2x official fp32: best is {fast['mode']} at "
              f"{fast['speedup_vs_official_fp32']:.2f}x ({fast['timing']}) -> "
              f"{'met' if fast['speedup_vs_official_fp32'] >= 2.0 else 'NOT met'}")
    print(f"wrote {out_dir / 'bench_precision.csv'}, {out_dir / 'bench_masks.csv'} and {out_dir / 'bench_precision.png'} "
          f"({backend}) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
