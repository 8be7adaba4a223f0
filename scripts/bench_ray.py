"""Time `persam apply` on the local engine and on Ray (--engine ray) over the same photos.

    python scripts/bench_ray.py [--images 12] [--model vit_t] [--checkpoint PATH] [--configs 1x2,2x1] [--repeats 2]

Learns a concept on the first shared DreamBooth photo (a centred box as its mask), then
segments the next N photos (cycling through the subjects) into fresh output folders: once with
the local engine (this process, torch's default threads), then on a local Ray started here with
every CPU, for each WORKERSxCPUS configuration (--workers W --cpus-per-worker C); the whole
round --repeats times (engines interleaved, so that load from other processes hits them alike).
Reports each engine's best time, images/s and the overhead ratio (Ray time / local time), with
the Ray start timed apart (a cluster is started once and serves many runs).  Random weights when no checkpoint is given: the
work, and so the time, is the same.  Needs `pip install 'persam[ray]'`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth"


def photos(count: int):
    subjects = sorted(p for p in SHARED.iterdir() if p.is_dir())
    per_subject = [sorted(s.glob("*.jpg")) for s in subjects]
    out, i = [], 0
    while len(out) < count + 1 and any(per_subject):
        column = [files[i] for files in per_subject if i < len(files)]
        if not column:
            break
        out += column
        i += 1
    if len(out) < count + 1:
        sys.exit(f"only {len(out)} photos in {SHARED}")
    return out[0], out[1:count + 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--model", default="vit_t")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--configs", default="1x2,2x1", help="WORKERSxCPUS_PER_WORKER, comma-separated")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all engines; the best time counts")
    args = parser.parse_args()
    os.environ.setdefault("PERSAM_BACKEND", "torch")

    import ray

    from persam.cli import commands as cli
    from persam.data.concept import save_concept
    from persam.data.io import load_image
    from persam.runs.models import build_predictor
    from persam.method.pipeline import learn_concept
    from persam.runs.key import file_sha256

    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    checkpoint = Path(args.checkpoint) if args.checkpoint else work / "random.pt"
    if not args.checkpoint:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from sam.build import build_sam_model
        from sam_testing import random_state_dict

        torch.save(random_state_dict(build_sam_model(args.model), seed=0), checkpoint)
    reference, targets = photos(args.images)
    image = load_image(reference)
    mask = np.zeros(image.shape[:2], bool)
    h, w = mask.shape
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
    concept = learn_concept(build_predictor(args.model, checkpoint, "cpu", "fp32", "torch"), [(image, mask)])
    concept_file = work / "object.concept"
    save_concept(concept, concept_file, model_type=args.model, checkpoint_sha256=file_sha256(checkpoint))
    common = ["apply", str(concept_file), *map(str, targets), "--model", args.model, "--checkpoint", str(checkpoint),
              "--backend", "torch", "-q"]

    def timed_run(name, extra):
        out = work / name
        if out.exists():
            shutil.rmtree(out)
        start = time.perf_counter()
        code = cli.main([*common, "--out", str(out), *extra])
        seconds = time.perf_counter() - start
        if code != 0:
            sys.exit(f"{name}: exit code {code}")
        return seconds

    n = len(targets)
    print(f"{n} DreamBooth photos, {args.model}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"ray {ray.__version__}", flush=True)
    engines = [(f"local engine (torch threads: {torch.get_num_threads()})", "local", [])]
    for config in args.configs.split(","):
        workers, cpus = config.lower().split("x")
        engines.append((f"ray, {workers} worker(s) x {cpus} CPU", f"ray_{config}",
                        ["--engine", "ray", "--workers", workers, "--cpus-per-worker", cpus, "--batch-size", "2"]))
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    ray_start = time.perf_counter() - start
    times = {name: [] for name, _, _ in engines}
    for _ in range(args.repeats):
        for name, folder, extra in engines:
            times[name].append(timed_run(folder, extra))
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    ray.shutdown()

    local = min(times[engines[0][0]])
    print(f"\n| engine | best of {args.repeats}: seconds for {n} images | images/s | overhead (time / local) | all runs (s) |")
    print("|---|---|---|---|---|")
    for name, _, _ in engines:
        best = min(times[name])
        print(f"| {name} | {best:.1f} | {n / best:.3f} | {best / local:.2f} | "
              f"{', '.join(f'{t:.1f}' for t in times[name])} |")
    print(f"\nRay start (ray.init, once per cluster, not in the times above): {ray_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
