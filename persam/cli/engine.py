"""The `persam segment / apply` options for large collections and dataset tools, and what they do.

    --engine local|ray  --address  --workers  --gpus-per-worker  --cpus-per-worker  --batch-size (both engines)
    --format png|coco

Kept out of cli.py (which calls :func:`add_options`, :func:`check`, :func:`extra_outputs`,
:func:`run_on_ray` and :func:`write_formats`); nothing heavy is imported until a run needs it.
"""

from __future__ import annotations

import argparse
from typing import Callable, Tuple

from persam.cli.args import positive_int
from persam.runs.defaults import DEFAULT_BATCH_SIZE

__all__ = ["add_options", "check", "extra_outputs", "run_on_ray", "write_formats"]

COCO_FILE = "coco.json"  # persam.data.coco.COCO_FILE (not imported here: numpy-free parser)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def add_options(q) -> None:
    """--format and the engine options of `segment` / `apply`."""
    q.add_argument("--format", choices=("png", "coco"), default="png",
                   help="png (default): a mask PNG per image and results.json; coco: also OUT/coco.json, COCO "
                        "instances (RLE masks, boxes, areas, scores; the category is the concept's name: --name, "
                        "else the reference image's, its folder's when the file name is a number)")
    g = q.add_argument_group("engine (large collections)")
    g.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local (default): this process; ray: Ray Data workers on this machine or a cluster "
                        "(pip install 'persam[ray]'), same outputs")
    g.add_argument("--address", metavar="ADDR", default=None,
                   help="--engine ray: the Ray cluster (auto: the one this machine belongs to; ray://HOST:10001: a "
                        "remote one); default $RAY_ADDRESS, else a Ray started here for the run")
    g.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="--engine ray: up to N segmenting workers (as many as the cluster has room for), each holding "
                        "one model (default 1)")
    g.add_argument("--gpus-per-worker", type=_non_negative_float, default=None, metavar="G",
                   help="--engine ray: GPUs per worker, fractions share one (default 0, or 1 with --device cuda); "
                        "> 0 runs the workers on CUDA")
    g.add_argument("--cpus-per-worker", type=_positive_float, default=1.0, metavar="C",
                   help="--engine ray: CPUs per worker (default 1): on a CPU its threads, one image on each")
    g.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, metavar="B",
                   help=f"images segmented together (default {DEFAULT_BATCH_SIZE}): "
                        "on a CPU up to one per torch thread side by side, "
                        "each alone on one thread, so that any engine, worker count and thread count writes the "
                        "same masks (with the torch encoder, a B of at least the cores keeps them all busy); on a "
                        "GPU each decoder call of the method is made once for the B images, which are also "
                        "encoded together; with --engine ray, images per worker call")


def check(args) -> None:
    """Refuse, before any work, an engine or format whose packages are missing."""
    if args.engine == "ray":
        from persam.runs.engine_ray import require_ray

        require_ray()
    elif args.engine == "local":
        given = [flag for flag, value, default in (
            ("--address", args.address, None), ("--workers", args.workers, 1),
            ("--gpus-per-worker", args.gpus_per_worker, None), ("--cpus-per-worker", args.cpus_per_worker, 1.0))
            if value != default]
        if given:
            from persam.errors import InputError

            raise InputError(f"{', '.join(given)}: only with --engine ray")
    if args.format == "coco":
        from persam.data.coco import require_pycocotools

        require_pycocotools()


def extra_outputs(args) -> Tuple[str, ...]:
    """Files the formats add to --out (listed in results.json before they are written)."""
    return (COCO_FILE,) if args.format == "coco" else ()


def run_on_ray(args, folder, targets, predictor_factory: Callable, concept_factory: Callable, made_with: dict,
               learns: bool) -> dict:
    """Run the planned targets of a locked `folder` on Ray (persam.runs.engine_ray).  A concept learned
    from references (`learns`: segment) is learned here, on the driver, and sent to the workers."""
    from persam.runs.engine_ray import RayOptions, WorkerModel, run_ray

    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1.0 if args.device == "cuda" else 0.0)
    ray_options = RayOptions(address=args.address, workers=args.workers, gpus_per_worker=gpus,
                             cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size)
    device = "cuda" if gpus > 0 else "cpu"
    model = WorkerModel(
        model_type=made_with["model_type"],
        checkpoint=str(folder.options.info["checkpoint"]),
        checkpoint_sha256=made_with.get("checkpoint_sha256"),
        device=device,
        precision=args.precision,
        backend=_worker_backend(args.backend, device, args.precision),
        dinov2_variant=made_with.get("dinov2"),  # GF-SAM's feature model (persam.cli.gfsam_command)
        dinov2_checkpoint=folder.options.info.get("dinov2_checkpoint"),
        dinov2_sha256=made_with.get("dinov2_sha256"),
    )
    folder.claim(targets)  # lists the outputs (and reference_mask.png) before any is written
    concept = concept_factory(predictor_factory() if learns else None)
    return run_ray(folder, targets, concept, model, ray_options)


def _worker_backend(backend: str, device: str, precision: str) -> str:
    """The encoder backend the workers use: "auto" resolved here, on the driver, as the local
    engine would, so that no node picks another (a node without it refuses to start its worker)."""
    import sys

    from sam.backends import BackendUnavailable, faster_backend_hint, resolve_backend

    from persam.errors import InputError

    try:
        resolved = resolve_backend(backend, device, precision)
    except (BackendUnavailable, ValueError) as exc:
        raise InputError(f"--backend {backend}: {exc}") from None
    hint = faster_backend_hint(backend, device, precision)  # said once here, not by every worker
    if hint is not None:
        print(f"persam: {hint}", file=sys.stderr)
    return resolved


def write_formats(args, folder, data: dict) -> None:
    """Write the extra formats of a finished run (coco.json) into the locked `folder`."""
    if args.format != "coco":
        return
    from persam.data.coco import results_to_coco, write_coco

    folder.claim_files([COCO_FILE])
    write_coco(folder.out_dir / COCO_FILE, results_to_coco(folder.out_dir, data))
