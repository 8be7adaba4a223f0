#!/usr/bin/env python
"""Image-encoder speed: our backends against the reference model and plain OpenVINO / ONNX Runtime
exports, on the same weights and input, next to the hardware limit.

    python scripts/bench_encoder.py [--models vit_t,vit_b] [--repeats 5] [--rounds 1] [--threads N]
                                    [--checkpoint PATH] [--batch-size 1] [--out DIR]

For each model (same seeded random weights in every row, or --checkpoint; one shared photo,
preprocessed as the predictor does) it times, each row in its own fresh process (so that
thread pools do not meet and the peak memory is the row's own):

    ours torch          our encoder, eager PyTorch (backend "torch")
    ours openvino       our backend "openvino": our export, OpenVINO IR, f32, latency hint
    ours onnxruntime    our backend "onnxruntime"
    ref torch           the reference module in PyTorch: Meta's segment_anything ImageEncoderViT
                        (ViT) or, for vit_t, our TinyViT weights in MobileSAM's blocks (windows cut
                        from the padded grid, explicit attention q k^T + bias, softmax, v; the local
                        conv on a B x C x H x W copy)
    plain openvino      the reference module exported as it is (torch.onnx.export, opset 17) and
                        read by OpenVINO with its defaults, inference precision f32 (a CPU with
                        native bf16 would otherwise run bf16: see "plain openvino default")
    plain onnxruntime   the same ONNX file in ONNX Runtime with its defaults

and prints seconds per image (median of --repeats after one warm-up run, and the fastest; with
--rounds R the rows run in turn R times, each in a fresh process, and the times are pooled),
the one-time cost of the compiled rows (ours: export + conversion + compilation, built in an
empty cache, later runs load it, see sam/backends.py; plain: loading and compiling the ONNX file,
plus exporting it for the first plain row), the largest difference of the embedding from ours torch,
the peak resident memory of the row's process, the ratio to plain OpenVINO's time and the ratio
to the limit. The limit is the encoder's FLOPs (counted by torch's FlopCounterMode) over the
measured sgemm peak of this machine (torch.mm of 4096 x 4096 fp32 matrices, best of 5, same
threads). With --batch-size B > 1 our rows encode B images per call and report seconds per image.

On a GPU (--device cuda, --precision fp32|bf16|fp16, --batch-size) only torch rows run; peak memory is the GPU's.

When both OpenVINO rows ran, ours and plain then run alternating in one process (2 x --repeats
each, after a warm-up; --no-paired skips it): on a machine whose speed drifts, this pairing is
the steadier comparison, since both sample the same moments.

Rows whose package is missing (segment-anything, openvino, onnxruntime) are skipped with a note.
Outputs: --out (default runs/bench_encoder)/bench_encoder.csv and .json. Each row's process
reuses freed memory as `persam` does (sam/memory.py; --default-malloc keeps glibc's defaults).
A quick end-to-end check: --models vit_t --repeats 1 --img-size 1024 (ViT also at --img-size 256).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
SHARED_DATA = REPO.parent / "shared" / "data"
ROWS = ("ours torch", "ours openvino", "ours onnxruntime", "ref torch", "plain openvino", "plain onnxruntime",
        "plain openvino default")
DEFAULT_ROWS = ROWS[:-1]


# --------------------------------------------------------------------------- #
# Models, input, FLOPs, sgemm peak
# --------------------------------------------------------------------------- #


def _test_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_tests_{name}", TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def our_model(model_type: str, checkpoint: Optional[str], seed: int, img_size: int):
    if checkpoint:
        from sam.build import build_sam

        return build_sam(model_type, checkpoint)
    return _test_module("sam_testing").random_sam(model_type, img_size=img_size, seed=seed)[0]


def reference_encoder(model_type: str, ours) -> torch.nn.Module:
    """Meta's ImageEncoderViT holding our weights (ViT), or our TinyViT with MobileSAM's blocks (vit_t)."""
    if model_type == "vit_t":
        encoder = ours.image_encoder
        from sam import tiny_vit

        for module in encoder.modules():
            if isinstance(module, tiny_vit.TinyViTBlock):
                module.forward = _mobile_sam_block.__get__(module)
        return encoder
    conftest = _test_module("conftest")
    segment_anything = conftest.import_official_sam()  # pytest.skip.Exception when missing
    sam_testing = _test_module("sam_testing")
    official = sam_testing.official_sam_model(segment_anything, model_type, ours.state_dict(),
                                              img_size=ours.image_encoder.img_size)
    return official.image_encoder.eval()


def _mobile_sam_block(self, x: torch.Tensor, grid) -> torch.Tensor:
    """MobileSAM's TinyViTBlock.forward with its Attention.forward (inference): pad the grid with
    zeros, cut it into windows, project every token, explicit scores plus the dense bias table,
    softmax, put the windows back, crop; the local conv on a B x C x H x W copy."""
    (H, W), ws = grid, self.window_size
    B, L, C = x.shape
    residual = x
    x = x.view(B, H, W, C)
    pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
    if pad_b or pad_r:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    pH, pW = H + pad_b, W + pad_r
    nH, nW = pH // ws, pW // ws
    x = x.view(B, nH, ws, nW, ws, C).transpose(2, 3).reshape(B * nH * nW, ws * ws, C)
    Bw, N, _ = x.shape
    attention = self.attn
    qkv = attention.qkv(attention.norm(x))
    q, k, v = qkv.view(Bw, N, attention.num_heads, -1).split([attention.head_dim] * 3, dim=3)
    q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    scores = (q @ k.transpose(-2, -1)) * attention.scale
    scores = scores + attention.attention_biases[:, attention.attention_bias_idxs]
    x = attention.proj((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(Bw, N, C))
    x = x.view(B, nH, nW, ws, ws, C).transpose(2, 3).reshape(B, pH, pW, C)
    x = residual + x[:, :H, :W].reshape(B, L, C)
    x = self.local_conv(x.transpose(1, 2).reshape(B, C, H, W)).view(B, C, L).transpose(1, 2)
    return x + self.mlp(x)


def encoder_input(model, batch: int = 1) -> torch.Tensor:
    """A shared photo (or seeded noise) resized, normalised and padded as SamPredictor does: B x 3 x S x S."""
    from sam.transforms import resize_longest_side

    photos = sorted((SHARED_DATA / "perseg_subset" / "Images" / "cat").glob("*.jpg"))
    if photos:
        from persam.data.io import load_image

        resized = torch.from_numpy(resize_longest_side(load_image(photos[1 % len(photos)]), model.img_size))
        x = model.preprocess(resized.permute(2, 0, 1)[None].float())
    else:
        x = torch.randn(1, 3, model.img_size, model.img_size, generator=torch.Generator().manual_seed(0))
    return x.expand(batch, -1, -1, -1).contiguous()


def count_flops(encoder: torch.nn.Module, img_size: int) -> float:
    """FLOPs of one forward (multiply-add = 2), counted on the meta device (no arithmetic is done)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(encoder).to("meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(torch.empty(1, 3, img_size, img_size, device="meta"))
    return float(counter.get_total_flops())


def sgemm_peak(threads: int, size: int = 4096, repeats: int = 5, device: str = "cpu") -> float:
    """Best fp32 matrix-multiply rate of this machine (or GPU), GFLOP/s, with `threads` CPU threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError):
        return float("nan")


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


# --------------------------------------------------------------------------- #
# One row, in its own process
# --------------------------------------------------------------------------- #


def plain_export(encoder: torch.nn.Module, img_size: int, path: Path) -> None:
    """The module as it is, through torch's ONNX exporter: what a user of OpenVINO / ONNX Runtime would do."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, (torch.zeros(1, 3, img_size, img_size),), str(path), dynamo=False,
                          input_names=["image"], output_names=["embedding"], opset_version=17)


def plain_openvino(onnx_file: Path, threads: int, default_precision: bool = False):
    """The plain ONNX file compiled by OpenVINO for the CPU with its defaults (f32 unless default_precision)."""
    import openvino as ov

    config = {} if default_precision else {"INFERENCE_PRECISION_HINT": "f32"}
    config["INFERENCE_NUM_THREADS"] = threads
    request = ov.Core().compile_model(str(onnx_file), "CPU", config).create_infer_request()

    def run(inp):
        return torch.from_numpy(request.infer({0: inp.numpy()})[0].copy())

    return run


def paired_worker(spec: dict) -> dict:
    """Ours openvino and plain openvino in one process, alternating: the two rows' files as built."""
    from sam.backends import make_encoder

    ours = our_model(spec["model"], spec["checkpoint"], spec["seed"], spec["img_size"])
    x = encoder_input(ours, 1)
    runs = {"ours": make_encoder(ours, "openvino", "fp32", cache_dir=Path(spec["work"]) / "cache", log=None,
                                 threads=spec["threads"]),
            "plain": plain_openvino(Path(spec["work"]) / f"plain-{spec['model']}.onnx", spec["threads"])}
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for turn in range(spec["repeats"] + 1):
        for name, run in (runs.items() if turn % 2 else reversed(list(runs.items()))):
            start = time.perf_counter()
            run(x)
            if turn:  # the first turn warms both up
                times[name].append(time.perf_counter() - start)
    return {"times": times}


def worker(spec: dict) -> dict:
    """Build the row's runner, time it, save its embedding; returns the row's numbers."""
    torch.set_num_threads(spec["threads"])
    if not spec["default_malloc"]:
        from sam.memory import reuse_freed_memory

        reuse_freed_memory()  # every row alike, as in the persam command
    if spec["row"] == "paired openvino":
        return paired_worker(spec)
    row, batch = spec["row"], spec["batch_size"]
    device = torch.device(spec["device"])
    if device.type != "cpu" and not row.endswith("torch"):
        raise SystemExit(f"runs on the CPU only (--device {device})")
    ours = our_model(spec["model"], spec["checkpoint"], spec["seed"], spec["img_size"])
    x = encoder_input(ours, batch if row.startswith("ours") else 1).to(device)
    ours.to(device)
    rss_model = rss_mib()
    work = Path(spec["work"])
    start = time.perf_counter()
    if row == "ours torch":
        from sam.backends import TorchEncoder

        run = TorchEncoder(ours.image_encoder, spec["precision"])
    elif row.startswith("ours "):
        from sam.backends import make_encoder

        runner = make_encoder(ours, row.split()[1], "fp32", cache_dir=work / "cache", log=None,
                              threads=spec["threads"])
        run = runner
    else:
        reference = reference_encoder(spec["model"], ours).to(device)
        if row == "ref torch":
            from sam.precision import autocast_context

            def run(inp, encoder=reference):
                with torch.inference_mode(), autocast_context(device, spec["precision"]):
                    return encoder(inp).float()
        else:
            onnx_file = work / f"plain-{spec['model']}.onnx"
            if not onnx_file.exists():
                plain_export(reference, ours.image_encoder.img_size, onnx_file)
            if row.startswith("plain openvino"):
                run = plain_openvino(onnx_file, spec["threads"], default_precision=row.endswith("default"))
            else:
                import onnxruntime as ort

                options = ort.SessionOptions()
                options.intra_op_num_threads = spec["threads"]
                session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])

                def run(inp, session=session):
                    return torch.from_numpy(session.run(None, {"image": inp.numpy()})[0])
    build = time.perf_counter() - start

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    first_start = time.perf_counter()
    out = run(x)
    sync()
    first = time.perf_counter() - first_start
    times = []
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        run(x)
        sync()
        times.append((time.perf_counter() - t) / x.shape[0])
    np.save(work / f"{spec['model']}-{row.replace(' ', '_')}.npy", out[:1].float().cpu().numpy())
    peak = peak_rss_mib()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return {"build_s": build, "first_run_s": first, "times": times, "rss_model_mib": rss_model,
            "peak_rss_mib": peak, "batch": int(x.shape[0])}


def run_row(spec: dict) -> Optional[dict]:
    """Run `worker(spec)` in a fresh Python process; None (and a note) when the row cannot run here."""
    result_file = Path(spec["work"]) / "result.json"
    if result_file.exists():
        result_file.unlink()
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); sys.argv = ['bench_encoder'];"
            f"import importlib.util as u; s = u.spec_from_file_location('bench', {str(Path(__file__).resolve())!r});"
            f"m = u.module_from_spec(s); s.loader.exec_module(m);"
            f"r = m.worker(json.loads({json.dumps(json.dumps(spec))}));"
            f"open({str(result_file)!r}, 'w').write(json.dumps(r))")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result_file.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        reason = next((line for line in reversed(tail) if line.strip()), "failed")
        print(f"    {spec['row']}: skipped ({reason[:160]})", flush=True)
        return None
    return json.loads(result_file.read_text())


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_t,vit_b", help="comma-separated model types (default vit_t,vit_b)")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help=f"comma-separated rows (default all but the last of: {', '.join(ROWS)})")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row after one warm-up (default 5)")
    parser.add_argument("--no-paired", action="store_true",
                        help="skip the last step: ours openvino and plain openvino alternating in one process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the rows in turn this many times and pool their times (default 1): on a "
                             "machine whose speed drifts, every row then samples the same spells")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"CPU threads for every runtime (default torch's: {torch.get_num_threads()})")
    parser.add_argument("--batch-size", type=int, default=1, help="images per encoder call in our rows (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: on a GPU only the torch rows run, "
                        "and peak memory is the GPU's (torch.cuda.max_memory_allocated)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="precision of the torch rows (autocast; fp16 on GPU only); the compiled rows run fp32")
    parser.add_argument("--checkpoint", default=None, help="real weights (one model only) instead of random ones")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--img-size", type=int, default=1024, help="input side (1024; 256 for a quick ViT check)")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench_encoder"), help="folder for the CSV and JSON")
    parser.add_argument("--default-malloc", action="store_true",
                        help="every row with glibc's malloc defaults (by default every row reuses freed memory, "
                             "as the persam command does: sam/memory.py)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    if args.checkpoint and len(models) != 1:
        sys.exit("--checkpoint needs exactly one model in --models")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    versions = [f"torch {torch.__version__}"]
    for name in ("openvino", "onnxruntime"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} not installed")
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    hardware = f"{cpu}, {os.cpu_count()} logical CPUs, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}"
    if args.device != "cpu":
        if not torch.cuda.is_available():
            sys.exit(f"--device {args.device}: no CUDA device is available")
        hardware += f"; {torch.cuda.get_device_name(0)}, torch rows on {args.device} in {args.precision}"
    load = "load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    malloc = "glibc malloc defaults" if args.default_malloc else "malloc reuses freed memory in every row (as persam)"
    print(f"bench_encoder {time.strftime('%Y-%m-%d')}: {hardware}; {', '.join(versions)}; {malloc}; {load}")
    peak = sgemm_peak(args.threads, device=args.device)
    print(f"  measured sgemm peak: {peak:.0f} GFLOP/s (torch.mm 4096^2 fp32 on {args.device}"
          f"{'' if args.device != 'cpu' else f', {args.threads} threads'})", flush=True)
    torch.set_num_threads(args.threads)

    results: List[dict] = []
    paired_results: List[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_encoder_") as work:
        for model_type in models:
            ours = our_model(model_type, args.checkpoint, args.seed, args.img_size)
            flops = count_flops(ours.image_encoder, ours.image_encoder.img_size)
            limit = flops / (peak * 1e9)
            weights = f"checkpoint {args.checkpoint}" if args.checkpoint else f"random weights (seed {args.seed})"
            print(f"\n{model_type}, {args.img_size} x {args.img_size}, {weights}: {flops / 1e9:.1f} GFLOP per image, "
                  f"limit {limit:.2f} s at the sgemm peak", flush=True)
            del ours
            measured: Dict[str, dict] = {}
            for round_index in range(max(1, args.rounds)):
                for row in rows:
                    if round_index and row not in measured:
                        continue  # it could not run in the first round
                    spec = {"row": row, "model": model_type, "checkpoint": args.checkpoint, "seed": args.seed,
                            "img_size": args.img_size, "threads": args.threads, "repeats": max(1, args.repeats),
                            "batch_size": max(1, args.batch_size), "work": work, "device": args.device,
                            "precision": args.precision, "default_malloc": args.default_malloc}
                    print(f"  {row} ..." + (f" (round {round_index + 1})" if args.rounds > 1 else ""), flush=True)
                    result = run_row(spec)
                    if result is None:
                        continue
                    if row in measured:  # a later round: more times; the one-time cost stays the first round's
                        measured[row]["times"] += result["times"]
                        measured[row]["peak_rss_mib"] = max(measured[row]["peak_rss_mib"], result["peak_rss_mib"])
                    else:
                        measured[row] = result
            paired = None
            if "ours openvino" in measured and "plain openvino" in measured and not args.no_paired:
                print("  ours openvino and plain openvino alternating in one process ...", flush=True)
                paired = run_row(dict(spec, row="paired openvino", repeats=2 * max(1, args.repeats)))
            reference = np.load(Path(work) / f"{model_type}-ours_torch.npy") if "ours torch" in measured else None
            base = measured.get("plain openvino")
            base_s = statistics.median(base["times"]) if base else float("nan")
            for row, r in measured.items():
                median = statistics.median(r["times"])
                output = np.load(Path(work) / f"{model_type}-{row.replace(' ', '_')}.npy")
                results.append({
                    "model": model_type, "row": row, "batch": r["batch"], "s_per_image": round(median, 4),
                    "s_min": round(min(r["times"]), 4), "runs": len(r["times"]),
                    "one_time_s": round(r["build_s"], 2) if row not in ("ours torch", "ref torch") else None,
                    "first_run_s": round(r["first_run_s"], 3),
                    "max_diff_vs_ours_torch": None if reference is None else float(np.abs(output - reference).max()),
                    "peak_rss_mib": round(r["peak_rss_mib"]), "model_rss_mib": round(r["rss_model_mib"]),
                    "ratio_to_openvino": round(median / base_s, 3) if base else None,
                    "ratio_to_limit": round(median / limit, 2), "gflop": round(flops / 1e9, 1),
                    "limit_s": round(limit, 3), "sgemm_gflops": round(peak, 1),
                })
            print_table([r for r in results if r["model"] == model_type])
            if paired is not None:
                ours_s, plain_s = (statistics.median(paired["times"][name]) for name in ("ours", "plain"))
                print(f"  alternating in one process ({len(paired['times']['ours'])} runs each): ours openvino "
                      f"{ours_s:.3f} s, plain openvino {plain_s:.3f} s, ratio {ours_s / plain_s:.2f}")
                paired_results.append({"model": model_type, "ours_openvino_s": round(ours_s, 4),
                                       "plain_openvino_s": round(plain_s, 4), "ratio": round(ours_s / plain_s, 3),
                                       "runs": len(paired["times"]["ours"])})

    with open(out_dir / "bench_encoder.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]) if results else ["model"])
        writer.writeheader()
        writer.writerows(results)
    (out_dir / "bench_encoder.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M"), "hardware": hardware, "versions": versions,
         "sgemm_gflops": peak, "rows": results, "alternating": paired_results}, indent=1))
    print(f"\nwrote {out_dir / 'bench_encoder.csv'} and {out_dir / 'bench_encoder.json'}")
    return 0


def print_table(rows: List[dict]) -> None:
    header = (f"  {'row':<26} {'s/image':>8} {'min':>7} {'x OpenVINO':>10} {'x limit':>8} {'one-time s':>10} "
              f"{'max diff':>9} {'peak MiB':>9}")
    print(header)
    print("  " + "-" * (len(header) - 2))
    for r in rows:
        def fmt(value, spec, width):
            return f"{value:{spec}}".rjust(width) if value is not None else "-".rjust(width)

        name = r["row"] + (f" (batch {r['batch']})" if r["batch"] > 1 else "")
        print(f"  {name:<26} "
              f"{r['s_per_image']:>8.3f} {r['s_min']:>7.3f} {fmt(r['ratio_to_openvino'], '.2f', 10)} "
              f"{r['ratio_to_limit']:>8.2f} {fmt(r['one_time_s'], '.1f', 10)} {fmt(r['max_diff_vs_ours_torch'], '.1e', 9)} "
              f"{r['peak_rss_mib']:>9}")
    print("  s/image: median; x OpenVINO: / plain openvino's median; x limit: / (FLOPs / sgemm peak); one-time: "
          "export + conversion + compilation (ours: once, then cached); max diff: embedding vs ours torch; "
          "peak MiB: the row process's peak resident memory (torch model included; on a GPU: GPU memory)")


if __name__ == "__main__":
    sys.exit(main())
