"""Few-shot segmentation benchmarks (FSS-1000, COCO-20i): run a method on every episode, then score
mIoU and FB-IoU as the official HSNet / Matcher / GF-SAM evaluation does (eval.fewshot_metrics).

    OUT/pred/<class>/<N>.png (FSS-1000), OUT/pred/fold<k>/<episode>_<image>.png (COCO-20i)
                                  the query masks (palette PNG, index 1 = object)
    OUT/scores.csv, scores.json   per-class IoU and episode counts, mIoU, FB-IoU, timings
    OUT/scores.png                bar chart of the class IoUs
    OUT/eval.json                 the files persam wrote here, the settings of the predictions

Protocol: as in the official evaluation (``--img-size 1024``), each image is resized to a
`size` x `size` square (Pillow bilinear, as torchvision's ``Resize`` on a PIL image) and each mask
with nearest neighbours (torch ``interpolate``), the method sees the squares, and the masks are
scored at that size; ``size=0`` keeps the images as they are. The output folder keeps persam's
promises (eval.outputs): an interrupted run resumes, other settings are refused unless
``overwrite``. With ``pred`` nothing is run: the masks there, named as above, are scored.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import numpy as np
from tqdm import tqdm

from persam.errors import InputError, SettingError
from persam.data.io import atomic_save_png, load_mask
from persam.runs.defaults import DEFAULT_DINOV2, DEFAULT_MODEL, DEFAULT_PRECISION

from eval.fewshot_data import COCO20i, FSS1000, Episode, split_sha256
from eval.fewshot_metrics import FewShotMeter, episode_areas
from eval.outputs import PRED_FOLDER, SCORE_FILES, EvalFolder
from eval.report import (PredictionModel, bar_chart, check_prediction_size, checkpoint_sha256, format_table,
                         prediction_settings, predictions_to_score, timing_summary, write_csv, write_json)

__all__ = ["FEWSHOT_METHODS", "OFFICIAL_SIZE", "DinoModel", "run_fss", "run_coco20i", "load_square_image",
           "resize_mask"]

FEWSHOT_METHODS = ("persam", "persam_f", "gfsam")
OFFICIAL_SIZE = 1024  # the official evaluation's --img-size


# --------------------------------------------------------------------------- #
# Inputs at the protocol's size
# --------------------------------------------------------------------------- #


def load_square_image(path: Path, size: int) -> np.ndarray:
    """The image as H x W x 3 uint8 RGB (no EXIF rotation, as the official loader reads it), resized to
    `size` x `size` with Pillow's bilinear filter; `size` 0 keeps it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the image {path} ({exc})") from None
    if size:
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A bool mask resized to `size` x `size` by torch's nearest interpolation (as the official loader
    resizes masks); `size` 0 keeps it."""
    if not size or mask.shape == (size, size):
        return mask
    import torch
    import torch.nn.functional as F

    grid = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(grid, (size, size), mode="nearest")[0, 0].numpy() > 0.5


# --------------------------------------------------------------------------- #
# Methods
# --------------------------------------------------------------------------- #


@dataclass
class DinoModel:
    """The DINOv2 of GF-SAM, its variant and checkpoint resolved before the output folder is touched, and
    GF-SAM's settings (persam.method.gfsam.GFSAMSettings; None: the official defaults)."""

    variant: str
    checkpoint: Path
    settings: object = None

    @classmethod
    def resolve(cls, variant: Optional[str], checkpoint: Optional[str], settings=None) -> "DinoModel":
        from persam.runs.models import resolve_dinov2_checkpoint

        variant = variant or DEFAULT_DINOV2
        return cls(variant, resolve_dinov2_checkpoint(variant, checkpoint), settings)

    def gfsam_settings(self):
        from persam.method.gfsam import GFSAMSettings

        return self.settings if self.settings is not None else GFSAMSettings()

    def made_with(self) -> Dict[str, object]:
        """The DINOv2 model and GF-SAM's settings, as the predictions' settings record them."""
        from dataclasses import asdict

        return {"dinov2": self.variant, "dinov2_sha256": checkpoint_sha256(self.checkpoint),
                "gfsam": asdict(self.gfsam_settings())}


def check_method(method: str) -> None:
    """SettingError for a method this toolkit cannot run (GF-SAM before persam.method.gfsam exists)."""
    if method not in FEWSHOT_METHODS:
        raise SettingError(f"{{method}} {method}: one of {', '.join(FEWSHOT_METHODS)}", "method")
    if method == "gfsam":
        import importlib

        try:
            importlib.import_module("persam.method.gfsam")
        except ImportError:
            raise SettingError("{method} gfsam: GF-SAM is not available in this persam (no persam.method.gfsam); "
                               "use {method} persam or persam_f", "method") from None


Pairs = Sequence[Tuple[np.ndarray, np.ndarray]]


def episode_method(method: str, predictor, dino: Optional[DinoModel]) -> Callable[[Pairs, np.ndarray], np.ndarray]:
    """``run(supports, query) -> H x W bool mask`` of `method` on a built SAM predictor."""
    if method == "gfsam":
        from persam.method.gfsam import GFSAM
        from sam.dinov2 import load_dinov2

        gfsam = GFSAM(predictor, load_dinov2(dino.variant, dino.checkpoint), dino.gfsam_settings(),
                      dinov2_sha256=checkpoint_sha256(dino.checkpoint))

        def run_gfsam(supports: Pairs, query: np.ndarray) -> np.ndarray:
            concept = gfsam.learn(supports[0][0], supports[0][1], *supports[1:])
            return np.asarray(gfsam.segment(query, concept).mask, dtype=bool)

        return run_gfsam
    from persam.method.pipeline import learn_concept, segment

    def run_persam(supports: Pairs, query: np.ndarray) -> np.ndarray:
        concept = learn_concept(predictor, list(supports), method=method)
        return np.asarray(segment(predictor, concept, query).mask, dtype=bool)

    return run_persam


# --------------------------------------------------------------------------- #
# Predict and score
# --------------------------------------------------------------------------- #


def predict_episodes(run, dataset, episodes: Sequence[Episode], pred_dir: Path, size: int, desc: str,
                     progress: bool = True, done: Optional[Callable[[Path], bool]] = None) -> Dict[str, object]:
    """Write the prediction of every episode not `done`; returns timings (seconds)."""
    done = done or Path.is_file
    times: List[float] = []
    skipped = 0
    bar = tqdm(total=len(episodes), desc=desc, unit="episode", disable=not progress)
    try:
        for episode in episodes:
            path = pred_dir / f"{episode.name}.png"
            if done(path):
                skipped += 1
                bar.update(1)
                continue
            supports = [(load_square_image(p, size), support_mask(dataset, p, episode, size))
                        for p in episode.supports]
            query = load_square_image(episode.query, size)
            start = time.perf_counter()
            try:
                mask = run(supports, query)
            except SettingError:
                raise
            except ValueError as exc:  # the method refuses a reference (InputError is a ValueError)
                raise InputError(f"episode {episode.index} (query {episode.query}, supports "
                                 f"{', '.join(p.name for p in episode.supports)}): {exc}") from None
            times.append(time.perf_counter() - start)
            atomic_save_png(path, mask.astype(np.uint8), palette="davis")
            bar.update(1)
    finally:
        bar.close()
    return {"per_episode": timing_summary(times), "skipped_episodes": skipped}


def support_mask(dataset, image: Path, episode: Episode, size: int) -> np.ndarray:
    """A support's mask at the protocol's size; InputError when it is empty there (nothing to learn)."""
    mask = resize_mask(dataset.mask(image, episode), size)
    if mask.any():
        return mask
    what = f"episode {episode.index}: the mask of support {image} is empty"
    if size and dataset.mask(image, episode).any():
        raise SettingError(f"{what} at {{img-size}} {size}: nothing to learn (use a larger size)", "img-size")
    raise InputError(f"{what}: nothing to learn")


def score_episodes(dataset, episodes: Sequence[Episode], class_ids: Sequence[int], pred_dir: Path,
                   size: int) -> Tuple[FewShotMeter, List[Dict[str, object]]]:
    """The meter over `class_ids` after every episode, and each episode's foreground IoU."""
    missing = [str(pred_dir / f"{e.name}.png") for e in episodes if not (pred_dir / f"{e.name}.png").is_file()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise InputError(f"missing predictions: {', '.join(missing[:5])}{more}")
    meter = FewShotMeter(class_ids)
    per_episode = []
    for e in episodes:
        gt = resize_mask(dataset.mask(e.query, e), size)
        pred_path = pred_dir / f"{e.name}.png"
        pred = load_mask(pred_path)
        check_prediction_size(pred, pred_path, gt.shape, dataset.mask_path(e.query))
        inter, union = episode_areas(pred, gt)
        meter.add(e.class_index, inter, union)
        per_episode.append({"episode": e.index, "class": e.class_name, "query": str(e.query),
                            "supports": [str(s) for s in e.supports], "iou": float(inter[1] / max(union[1], 1))})
    return meter, per_episode


@dataclass
class FewShotRun:
    """What a benchmark run needs besides its dataset (see run_fss / run_coco20i for the arguments)."""

    out: str
    method: str = "persam"
    model_type: str = DEFAULT_MODEL
    checkpoint: Optional[str] = None
    size: int = OFFICIAL_SIZE
    max_episodes: Optional[int] = None
    pred: Optional[str] = None
    device: str = "cpu"
    precision: str = DEFAULT_PRECISION
    backend: str = "auto"
    dinov2: Optional[str] = None
    dinov2_checkpoint: Optional[str] = None
    gfsam_settings: object = None  # persam.method.gfsam.GFSAMSettings (None: the official defaults)
    progress: bool = True
    stream: Optional[TextIO] = None
    predictor: object = None
    overwrite: bool = False


def _run(run: FewShotRun, benchmark: str, title: str, dataset, episodes: List[Episode],
         class_names: Dict[int, str], record: Dict[str, object], options: Dict[str, object]) -> Dict[str, object]:
    """Plan, predict, score and report one benchmark run; returns what scores.json holds."""
    stream = sys.stdout if run.stream is None else run.stream
    if run.size < 0:
        raise SettingError(f"{{img-size}} {run.size}: a side in pixels, or 0 for the images' own size", "img-size")
    full_list = run.max_episodes is None or run.max_episodes >= len(episodes)
    episodes = episodes if full_list else episodes[:run.max_episodes]
    # the official mean runs over every class of the benchmark; a shortened list over the classes it reaches
    class_ids = list(class_names) if full_list else sorted({e.class_index for e in episodes})
    model, dino, made_with = None, None, None
    if run.pred is None:
        check_method(run.method)
        model = PredictionModel.resolve(run.model_type, run.checkpoint, run.device, run.precision, run.backend,
                                        run.predictor)
        dino = (DinoModel.resolve(run.dinov2, run.dinov2_checkpoint, run.gfsam_settings)
                if run.method == "gfsam" else None)
        made_with = prediction_settings(benchmark, dataset.root, run.method, model, size=run.size, **options,
                                        **(dino.made_with() if dino else {}))
    record.update({"size": run.size, "episodes_evaluated": len(episodes), "classes_scored": len(class_ids)})
    with EvalFolder(Path(run.out), made_with, run.overwrite) as folder:
        predictions = [f"{PRED_FOLDER}/{e.name}.png" for e in episodes]

        def predict(predictor, done):  # predictor None: every prediction is done, nothing is built
            method = episode_method(run.method, predictor, dino) if predictor is not None else None
            return predict_episodes(method, dataset, episodes, folder.pred_dir, run.size, title, run.progress, done)

        pred_dir, fields = predictions_to_score(run.pred, folder, predictions, predict, model, run.method,
                                                {"dinov2": dino.variant, "dinov2_checkpoint": str(dino.checkpoint)}
                                                if dino else None)
        record.update(fields)
        meter, per_episode = score_episodes(dataset, episodes, class_ids, pred_dir, run.size)
        scores = meter.scores()
        record.update({"classes": {class_names[c]: s for c, s in scores["classes"].items()},
                       "miou": scores["miou"], "fb_iou": scores["fb_iou"], "episodes": per_episode})
        _report(record, title, Path(run.out), folder, stream)
    return record


def _report(record: Dict[str, object], title: str, out_dir: Path, folder: EvalFolder, stream: TextIO) -> None:
    """The table on `stream`; scores.csv, scores.json and scores.png in `out_dir`."""
    rows = [[c, s["episodes"], s["iou"]] for c, s in record["classes"].items()]
    total = sum(s["episodes"] for s in record["classes"].values())
    summary = [["mIoU", total, record["miou"]], ["FB-IoU", total, record["fb_iou"]]]
    print(format_table(["class", "episodes", "IoU"], rows + summary), file=stream)
    timing = record.get("timing")
    if timing and timing["per_episode"]["mean_s"] is not None:
        print(f"time per episode: {timing['per_episode']['mean_s']:.3f} s ({timing['per_episode']['count']} episodes)",
              file=stream)
    folder.claim(SCORE_FILES)
    write_csv(out_dir / "scores.csv", ["class", "episodes", "iou"], rows + summary)
    write_json(out_dir / "scores.json", record)
    bar_chart(out_dir / "scores.png", [r[0] for r in rows] + ["mIoU"], {"IoU": [r[2] for r in rows] + [record["miou"]]},
              f"{title} {record.get('method') or 'predictions'}: mIoU {record['miou']:.3f}, "
              f"FB-IoU {record['fb_iou']:.3f}")


def run_fss(data: str, out: str, shots: int = 1, split: Optional[str] = None, seed: int = 0,
            **settings) -> Dict[str, object]:
    """FSS-1000 (see the module doc): every query of the split's classes with `shots` supports drawn from
    `seed` as the official loader draws them. `settings` are FewShotRun's. Everything is checked before
    `out` is touched; InputError / SettingError (one line) on bad input. Returns what scores.json holds."""
    run = FewShotRun(out, **settings)
    dataset = FSS1000(data, split)
    episodes = dataset.episodes(_shots(shots), seed)
    record = {"dataset": "fss1000", "data": str(dataset.root), "split": str(dataset.split_file), "shots": shots,
              "seed": seed}
    options = {"shots": shots, "seed": seed, "split_sha256": split_sha256(dataset.classes)}
    names = dict(enumerate(dataset.classes))
    return _run(run, "fss1000", f"FSS-1000 {shots}-shot", dataset, episodes, names, record, options)


def run_coco20i(data: str, out: str, fold: int = 0, shots: int = 1, split: Optional[str] = None, seed: int = 0,
                **settings) -> Dict[str, object]:
    """COCO-20i fold `fold` (see the module doc): 1000 episodes drawn from `seed` as the official loader
    draws them, from the images per class of `split` (default: the shipped official list)."""
    from eval.fewshot_data import COCO_CLASS_NAMES, split_file_sha256

    run = FewShotRun(out, **settings)
    dataset = COCO20i(data, fold, split)
    episodes = dataset.episodes(_shots(shots), seed)
    record = {"dataset": "coco20i", "data": str(dataset.root), "fold": fold, "shots": shots, "seed": seed,
              "split": str(split) if split else "shipped"}
    options = {"fold": fold, "shots": shots, "seed": seed, "split_sha256": split_file_sha256(dataset.images)}
    names = {c: COCO_CLASS_NAMES[c] for c in dataset.class_ids}
    return _run(run, "coco20i", f"COCO-20i fold {fold} {shots}-shot", dataset, episodes, names, record, options)


def _shots(shots: int) -> int:
    if not isinstance(shots, int) or shots < 1:
        raise SettingError(f"{{shots}} {shots}: the number of support images, 1 or more", "shots")
    return shots
