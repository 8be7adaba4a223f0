"""The Ray engine of `persam segment / apply --engine ray`: one collection over many workers.

    persam apply dog.concept s3://bucket/photos/ --out out/ --engine ray --address auto \\
        --gpus-per-worker 1 --workers 8 --batch-size 8

The driver (the process running the command) keeps the whole output folder, exactly as the
local engine does (:class:`persam.runs.folder.OutputFolder`: the lock on --out, which files are
persam's, the run's key, atomic writes, strict JSON):

1. it plans the targets; images already recorded in --out with the run's key are left out
   before anything is read (Ray Data has no skip of its own);
2. a Ray Data pipeline over the pending images: ``from_items`` (index, name, path) ->
   ``map_batches(read_files)`` (tasks: the file bytes, through ``pyarrow.fs`` for URIs) ->
   ``map_batches(Segmenter)`` (actors: each loads the model and the concept once, on a GPU when
   ``gpus_per_worker`` > 0, and segments its batch together with :func:`persam.runs.local.segment_targets`,
   the local engine's own code: one decoder call per step of the method for the batch, and on a
   GPU one encoder call);
3. the workers return each image's record and output files (PNG mask, overlay, heat map) as
   bytes; the driver writes them atomically into --out and merges the records into
   results.json after every batch it receives (:meth:`OutputFolder.add_result`).

An interrupted run leaves complete outputs and records of every batch received; the next run
skips those images.  Ray is an optional extra: ``pip install 'persam[ray]'``.

On a CPU a worker segments each image alone on one torch thread, as the local engine does
(:func:`persam.method.pipeline.each_on_one_thread`), so that both engines write the same bits whatever
the workers, their CPUs and their batches.  Ray's own logs stay quiet unless something fails:
its Python loggers and Ray Data's console show errors only, and Ray restarts no worker (the
driver sends the images not received yet to new workers instead: see WORKER_RESTARTS).  A Ray
started for the run is shut down when the run ends, fails, or is stopped by Ctrl-C, SIGTERM or
SIGHUP.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from tqdm import tqdm

from persam.errors import InputError, SettingError
from persam.runs.folder import OutputFolder
from persam.runs.defaults import DEFAULT_BATCH_SIZE, DEFAULT_PRECISION
from persam.runs.records import ImageResult, RunOptions, Target

__all__ = ["INSTALL_HINT", "RayOptions", "RunStopped", "WorkerModel", "Segmenter", "read_files", "require_ray",
           "run_ray"]

INSTALL_HINT = "pip install 'persam[ray]'"
READ_CPUS = 0  # read tasks hold no CPU (I/O bound): they run beside workers that hold every CPU
SAVE_EVERY_S = 2.0  # results.json is rewritten at most this often (and after the last batch), and
                    # at most every 10x the time one rewrite takes (a big collection's file is big)
RAY_LOG_LEVEL = logging.ERROR  # Ray's Python loggers on the driver, and Ray Data's console
# Ray does not restart a worker that dies: the driver starts the pipeline again for the images
# not received yet, at most WORKER_DEATHS times (then the run stops, keeping what it received; a
# re-run resumes).  Ray Data restarts its actors without end by default: a worker that dies on an
# image, out of memory, would be restarted on it forever; and Ray's core worker prints an error
# line on every run whose actors may restart and take their arguments from the object store.
WORKER_RESTARTS = 0
WORKER_DEATHS = 3  # the driver sends the images not received yet to new workers this many times
STOP_SIGNALS = ("SIGTERM", "SIGHUP")  # also end a run on Ray as Ctrl-C does (Ray shut down)


@dataclass
class RayOptions:
    address: Optional[str] = None  # None: $RAY_ADDRESS, else a local Ray; "auto": the running cluster; "ray://host:10001"
    workers: int = 1  # at most this many segmenting actors (each holds one model), as the cluster has room
    gpus_per_worker: float = 0.0  # > 0: each worker runs on (a share of) a GPU, with device cuda
    cpus_per_worker: float = 1.0  # CPUs each worker holds (and torch threads on CPU)
    batch_size: int = DEFAULT_BATCH_SIZE  # images per worker call, encoded together

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ValueError("gpus_per_worker must be >= 0 and cpus_per_worker > 0")


@dataclass
class WorkerModel:
    """What each worker builds (picklable): persam.runs.models.build_predictor's arguments, and the
    checkpoint's sha256 the run's key was made with (checked on every worker)."""

    model_type: str
    checkpoint: str
    checkpoint_sha256: Optional[str]
    device: str = "cpu"
    precision: str = DEFAULT_PRECISION
    backend: str = "auto"
    # GF-SAM's DINOv2 (persam.runs.gfsam_run): built beside SAM on every worker, its sha256 checked
    dinov2_variant: Optional[str] = None
    dinov2_checkpoint: Optional[str] = None
    dinov2_sha256: Optional[str] = None


def require_ray():
    """The ray module with Ray Data; InputError saying how to install it when missing."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise SettingError(f"{{engine}} ray needs Ray Data, which is not installed ({exc}); install it with "
                           f"{INSTALL_HINT} (or pip install 'ray[data]' pyarrow)", "engine") from None
    return ray


# --------------------------------------------------------------------------------------------
# the workers


def _check_sha256(checkpoint: str, sha256: Optional[str], name: str) -> None:
    """InputError when a worker's copy of a checkpoint is missing or not the driver's (sha256)."""
    if not sha256:
        return
    from persam.runs.key import file_sha256

    try:
        found = file_sha256(checkpoint)
    except OSError as exc:
        raise InputError(f"worker: checkpoint {checkpoint} cannot be read here ({exc}); every node needs it at "
                         f"that path (`persam download {name}` on each, or a shared file system)") from None
    if found != sha256:
        raise InputError(f"worker: checkpoint {checkpoint} here is not the driver's "
                         f"(sha256 {found[:12]}, expected {sha256[:12]})")


def _target(name: str, path: str) -> Target:
    from persam.runs.key import as_image_path

    return Target(as_image_path(path), name)


def read_files(batch: Dict[str, Any]) -> Dict[str, Any]:
    """Ray Data task: the bytes of each image of the batch (local or a URI through pyarrow.fs),
    or the one-line reason it cannot be read."""
    from persam.data.sources import read_image_bytes

    data, errors = [], []
    for name, path in zip(batch["name"], batch["path"]):
        try:
            data.append(read_image_bytes(_target(str(name), str(path)).path))
            errors.append("")
        except InputError as exc:
            data.append(b"")
            errors.append(str(exc))
    return {"index": batch["index"], "name": batch["name"], "path": batch["path"], "data": data, "error": errors}


class Segmenter:
    """Ray Data actor: the model and the concept, loaded once; segments a batch per call.

    Returns, per image, its index and the pickled :class:`persam.runs.records.ImageResult`."""

    def __init__(self, model: WorkerModel, concept, options: RunOptions, cpus: float = 1.0) -> None:
        import torch

        from sam.memory import reuse_freed_memory

        from persam.runs.models import build_predictor

        reuse_freed_memory()  # the worker process is the engine's own, as the persam command's is
        if model.device == "cpu":
            torch.set_num_threads(max(1, int(cpus)))
        _check_sha256(model.checkpoint, model.checkpoint_sha256, model.model_type)
        self.predictor = build_predictor(model.model_type, model.checkpoint, model.device, model.precision,
                                         model.backend, log=None)  # the driver gives any hint once
        if model.dinov2_checkpoint:  # GF-SAM: the task arrives without its DINOv2 (GFSAMTask.__getstate__)
            from persam.runs.models import build_dinov2_features

            _check_sha256(model.dinov2_checkpoint, model.dinov2_sha256, f"dinov2_{model.dinov2_variant}")
            concept = concept.with_dinov2(build_dinov2_features(model.dinov2_variant, model.dinov2_checkpoint,
                                                                model.device, model.precision, model.backend,
                                                                log=None))
        self.concept = concept
        self.options = options

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        from persam.runs.local import segment_targets
        from persam.runs.records import error_result

        results: List[Optional[ImageResult]] = []
        readable = []  # (position, target, file bytes)
        for i, (name, path, data, error) in enumerate(zip(batch["name"], batch["path"], batch["data"], batch["error"])):
            target = _target(str(name), str(path))
            results.append(error_result(target, str(error)) if error else None)
            if not error:
                readable.append((i, target, bytes(data)))
        segmented = segment_targets(self.predictor, self.concept, [t for _, t, _ in readable], self.options,
                                    [data for _, _, data in readable])
        for (i, _, _), result in zip(readable, segmented):
            results[i] = result
        return {"index": batch["index"], "result": [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in results]}


# --------------------------------------------------------------------------------------------
# the driver


def run_ray(folder: OutputFolder, targets: Sequence[Target], concept, model: WorkerModel, ray_options: RayOptions,
            log: Optional[Callable[[str], None]] = None) -> dict:
    """Segment the pending targets (after ``folder.plan``) on Ray and write everything through
    `folder` (which must be entered: the lock is held).  Returns the results dictionary.

    Ray already initialised in this process is used as it is.  Otherwise Ray is started (or
    joined: ``ray_options.address``) for the run, its own logs quiet, and shut down when the run
    ends in any way but SIGKILL; SIGTERM and SIGHUP stop the run as Ctrl-C does (RunStopped, a
    KeyboardInterrupt), where their handlers are the default ones.  After a SIGKILL, Ray's own
    watchdogs end what it started: its raylet and GCS within seconds, its agents in about a minute."""
    from persam.runs.local import load_target

    log = log or folder.log
    if folder.method is None and concept is not None:
        folder.method = concept.method
    folder.claim(targets)
    pending = [t for t in targets if t.pending]
    # unreadable at planning (no sha256): recorded here as the local engine does, nothing to send
    to_send = []
    for t in pending:
        if t.sha256 is None:
            _, failed = load_target(t)
            if failed is not None:
                folder.add_result(t, failed)
                continue
        to_send.append(t)
    if not to_send:
        return folder.save()

    ray = require_ray()
    started_here = not ray.is_initialized()  # else the caller's Ray: used as it is, and left running
    handlers = _stop_handlers() if started_here else {}  # before ray.init puts its own
    ray_logger = logging.getLogger("ray")
    level = ray_logger.level
    try:
        if started_here:
            _init_ray(ray, ray_options.address)
            _interrupt_on_stop_signals(handlers)  # SIGTERM / SIGHUP: the finally below still runs
        _check_room(ray, ray_options, log)
        with _quiet_ray_data_console():
            return _segment_on_workers(ray, folder, to_send, concept, model, ray_options, log)
    finally:
        if started_here:
            ray.shutdown()  # the processes started for the run end with it (ended, failed or interrupted)
            _restore_handlers(handlers)
            ray_logger.setLevel(level)


def _segment_on_workers(ray, folder: OutputFolder, targets: Sequence[Target], concept, model: WorkerModel,
                        ray_options: RayOptions, log: Callable[[str], None]) -> dict:
    """The Ray Data pipeline over `targets`; when a worker dies (its process killed, out of
    memory, its node lost), again over the targets not received yet, up to WORKER_DEATHS times
    (Ray's own restarts are off: WORKER_RESTARTS)."""
    received: set = set()  # names of the targets whose results were recorded
    deaths = 0
    while True:
        left = [t for t in targets if t.name not in received]
        try:
            return _run_pipeline(ray, folder, left, concept, model, ray_options, received)
        except Exception as exc:  # noqa: BLE001 - only a worker's death is taken again
            if deaths >= WORKER_DEATHS or not _is_worker_death(exc):
                raise
            deaths += 1
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log(f"persam: warning: a Ray worker died ({reason}); the {len(targets) - len(received)} image(s) "
                f"not received yet go to new workers (worker death {deaths} of at most {WORKER_DEATHS})")


def _is_worker_death(exc: BaseException) -> bool:
    """Whether `exc` says that a worker's process or node died (not an error of persam's code or
    of a worker's start, such as a checkpoint it cannot read: those would fail again)."""
    import ray.exceptions as errors

    if isinstance(exc, errors.RayActorError):
        return not exc.actor_init_failed
    return isinstance(exc, (errors.WorkerCrashedError, errors.NodeDiedError, errors.OutOfMemoryError))


def _init_ray(ray, address: Optional[str]) -> None:
    """Start (or join, with `address`) Ray for the run, its own Python logs at RAY_LOG_LEVEL
    (a local Ray says on every start that it turned on token authentication, at WARNING).
    Workers' output still reaches this process's stderr (log_to_driver)."""
    ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level=RAY_LOG_LEVEL,
             configure_logging=True)


@contextlib.contextmanager
def _quiet_ray_data_console() -> Iterator[None]:
    """Ray Data's console handlers show errors only within the block (its log file, in Ray's
    session folder, still gets everything): on success they would say that progress bars are
    off (ours is the driver's) and when the dataset finished."""
    handlers = [h for h in logging.getLogger("ray.data").handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(max(h.level, RAY_LOG_LEVEL))
    try:
        yield
    finally:
        for h, level in zip(handlers, levels):
            h.setLevel(level)


class RunStopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a run on a Ray started for it: the run stops as on Ctrl-C."""


def _stop_handlers() -> Dict[int, Any]:
    """The handlers of STOP_SIGNALS that are the default ones (an application's own is left to
    it), by signal number; none outside the main thread (where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    numbers = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]
    return {n: signal.getsignal(n) for n in numbers if signal.getsignal(n) in (signal.SIG_DFL, None)}


def _interrupt_on_stop_signals(handlers: Dict[int, Any]) -> None:
    """Make the signals of `handlers` raise RunStopped (a KeyboardInterrupt) in the main thread,
    as Ctrl-C does, so that the run's clean-up runs: what was received is recorded, Ray shut
    down.  Ray's own handler would end the process at once (its core worker aborts with a stack
    trace) and leave the processes it started running."""

    def stop(signum, frame):
        raise RunStopped(signal.Signals(signum).name)

    for number in handlers:
        signal.signal(number, stop)


def _restore_handlers(handlers: Dict[int, Any]) -> None:
    for number, handler in handlers.items():
        signal.signal(number, handler if handler is not None else signal.SIG_DFL)


def _map_batches(ds, fn, **options):
    """``ds.map_batches(fn, **options)`` with actors restarted WORKER_RESTARTS times, where this
    Ray takes it: as an actor option (which Ray 2.60 says is deprecated, with nothing named in its
    place; the notice is not shown)."""
    import inspect

    parameters = inspect.signature(ds.map_batches).parameters
    if "max_restarts" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        options["max_restarts"] = WORKER_RESTARTS
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*ray_remote_args.* is deprecated")
        return ds.map_batches(fn, **options)


def _check_room(ray, ray_options: RayOptions, log: Callable[[str], None]) -> None:
    """Say so when one worker asks for more CPUs or GPUs than the whole cluster has now (it then
    waits for the cluster to grow: an autoscaling cluster adds nodes, a fixed one never does)."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if ray_options.cpus_per_worker > cpus or ray_options.gpus_per_worker > gpus:
        log(f"persam: warning: a worker asks for {ray_options.cpus_per_worker:g} CPU and "
            f"{ray_options.gpus_per_worker:g} GPU, but the Ray cluster has {cpus:g} CPU and {gpus:g} GPU now: "
            f"the run waits until a node with room joins (ask for fewer CPUs / GPUs per worker, or Ctrl-C)")


def _run_pipeline(ray, folder: OutputFolder, targets: Sequence[Target], concept, model: WorkerModel,
                  ray_options: RayOptions, received: set) -> dict:
    """One Ray Data pipeline over `targets`, each result recorded (its name added to `received`)
    as it arrives."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own bar (as the local engine's) counts the images
    if hasattr(context, "print_on_execution_start"):
        context.print_on_execution_start = False
    batch = ray_options.batch_size
    items = [{"index": i, "name": t.name, "path": str(t.path)} for i, t in enumerate(targets)]
    blocks = max(1, min(len(items), -(-len(items) // batch)))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(read_files, batch_size=batch, num_cpus=READ_CPUS)
    ds = _map_batches(
        ds,
        Segmenter,
        fn_constructor_kwargs={"model": model, "concept": concept, "options": folder.options,
                               "cpus": ray_options.cpus_per_worker},
        batch_size=batch,
        # up to `workers`: as many as the cluster has room for (a fixed pool larger than it would wait)
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=ray_options.workers),
        num_cpus=ray_options.cpus_per_worker,
        num_gpus=ray_options.gpus_per_worker or None,
    )
    data = folder.save()
    last_save, unsaved, save_s = time.monotonic(), 0, 0.0
    progress = folder.options.progress
    bar = tqdm(total=len(targets), desc="segmenting (ray)", unit="image", file=sys.stderr,
               disable=(not progress) if progress is not None else None)
    try:
        for out in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            for index, blob in zip(out["index"], out["result"]):
                result: ImageResult = pickle.loads(bytes(blob))
                folder.add_result(targets[int(index)], result)
                received.add(targets[int(index)].name)
                unsaved += 1
                bar.update(1)
            if time.monotonic() - last_save >= max(SAVE_EVERY_S, 10 * save_s):
                start = time.monotonic()
                data, unsaved = folder.save(), 0
                last_save = time.monotonic()
                save_s = last_save - start
    finally:  # also when interrupted or a worker failed: what was received is recorded
        bar.close()
        if unsaved:
            data = folder.save()
    return data
