"""The local engine: segment the targets of an output folder in this process.

The work on a group of ``batch_size`` images is :func:`segment_targets` (load, encode, segment
with each decoder call made once for the group, encode the output files: nothing written), then
each image's files are written (:meth:`persam.runs.folder.OutputFolder.add_result`); the Ray
engine (persam.runs.engine_ray) runs the same :func:`segment_targets` on the files' bytes in its
workers.  :func:`run_folder` runs the pending targets of an :class:`OutputFolder`, and
:func:`run_batch` locks and plans the folder first.  Targets may be URIs (persam.data.sources.UriPath).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from persam.errors import InputError
from persam.data.io import encode_png
from persam.method.pipeline import Concept, Segmentation, decode_workers, each_on_one_thread, locate, segment_images
from persam.runs.folder import OutputFolder
from persam.runs.records import ImageResult, RunOptions, Target, all_points, error_result, image_record, output_files


def _encode_jpg_or_png(rgb: np.ndarray, fmt: str) -> bytes:
    import cv2

    ext = ".png" if fmt == "png" else ".jpg"
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise InputError(f"cannot encode the overlay as {fmt}")
    return buf.tobytes()


def _segment_images(predictor, concept: Concept, embeddings,
                    options: RunOptions) -> Tuple[List[List[Segmentation]], List[float], bool]:
    """Each image's segmentations: one object per image, or (``multi``) the objects of each image;
    with the seconds each took and whether those were measured for the whole group (the group's
    time per image) rather than per image.  On a GPU one object per image takes each decoder call
    of the method once for the group; on a CPU each image is segmented alone on one thread
    (:func:`persam.method.pipeline.each_on_one_thread`)."""
    start = time.perf_counter()
    if not options.multi and predictor.device.type != "cpu":
        segmented = [[seg] for seg in segment_images(predictor, concept, embeddings, options.min_similarity,
                                                     options.save_similarity)]
        return segmented, [(time.perf_counter() - start) / max(1, len(embeddings))] * len(embeddings), True
    from persam.method.multi import segment_objects

    def segment_one(pred, embedding) -> Tuple[List[Segmentation], float]:
        start = time.perf_counter()
        if options.multi:
            pred.set_embedding(*embedding)
            segs = list(segment_objects(pred, concept, None, max_objects=options.max_objects,
                                        min_similarity=options.min_similarity))
        else:
            segs = segment_images(pred, concept, [embedding], options.min_similarity, options.save_similarity)
        return segs, time.perf_counter() - start

    # on a CPU each image alone on one thread, up to one per torch thread side by side: its values
    # are then the same whatever the thread count and the images beside it, in either engine
    done = each_on_one_thread(predictor, segment_one, embeddings, decode_workers(predictor, len(embeddings)))
    return [segs for segs, _ in done], [seconds for _, seconds in done], False


def _similarity(predictor, concept: Concept, segs: List[Segmentation]):
    for s in segs:
        if s.similarity is not None:
            return s.similarity
    # on one thread, as the segmentations were made: the map's values depend on torch's thread count
    return each_on_one_thread(predictor, lambda pred, image: locate(pred, concept, image),
                              [predictor.current_image()])[0]


def _encode_outputs(predictor, concept, options, image, segs, found, files) -> List[Tuple[str, bytes]]:
    """The similarity heat map, overlay and mask of one image as file bytes (mask last)."""
    from persam.data import visualize

    outputs = []
    if options.save_similarity:  # over the photo, with its colour scale
        sim = _similarity(predictor, concept, segs)
        picture = visualize.heatmap(sim, image=image)
        outputs.append((files["similarity"], encode_png(picture, path=files["similarity"])))
    points, labels = all_points(segs)
    boxes = [s.box for s in found if s.box is not None]
    picture = visualize.overlay(image, [s.mask for s in found], points, labels, boxes or None)
    if not found:  # framed in red and marked, as persam track marks its frames
        picture = visualize.mark_not_found(picture)
    outputs.append((files["overlay"], _encode_jpg_or_png(picture, options.overlay_format)))
    if options.multi:
        label_map = np.zeros(image.shape[:2], dtype=np.uint8)
        for k, s in enumerate(found, start=1):
            label_map[np.asarray(s.mask, dtype=bool) & (label_map == 0)] = k
        outputs.append((files["mask"], encode_png(label_map, palette="davis", path=files["mask"])))
    else:
        mask = found[0].mask if found else np.zeros(image.shape[:2], dtype=bool)
        outputs.append((files["mask"], encode_png(np.asarray(mask, dtype=bool), path=files["mask"])))
    return outputs


def load_target(target: Target, data: Optional[bytes] = None) -> Tuple[Optional[np.ndarray], Optional[ImageResult]]:
    """(the target's RGB image, None), or (None, its error result) when it cannot be loaded.
    `data`: the file's bytes, already read (a worker of the Ray engine)."""
    from persam.data.sources import load_image

    try:
        image = load_image(target.path, data)
    except InputError as exc:
        return None, error_result(target, str(exc))
    if not image.flags.writeable:  # torch warns on read-only arrays
        image = image.copy()
    return image, None


def encode_loaded(predictor, images: Sequence[np.ndarray]) -> Tuple[list, List[float], bool]:
    """Encode loaded images: (their ImageEmbeddings, the seconds each took, shared). On a CPU one
    encoder call per image, through `set_image` (a batch of 4 took 6 % longer per image with
    OpenVINO on the project's CPU), each timed; on a GPU all in one call, whose time is shared
    (``shared`` True: each image is given the call's time per image).

    On a CPU the torch encoder, whose values depend on torch's thread count, encodes each image on
    one thread, up to one image per thread side by side (:func:`persam.method.pipeline.each_on_one_thread`;
    as many images' working memory at once); OpenVINO and ONNX Runtime, whose values do not
    (tests/runs/test_ray_engine.py), take every thread for one image after another."""
    start = time.perf_counter()
    if len(images) > 1 and predictor.device.type != "cpu":
        embeddings = predictor.encode_images(images, batch_size=len(images))
        return embeddings, [(time.perf_counter() - start) / len(images)] * len(images), True
    predictor.prepare()  # built here, once (a compiled encoder that cannot be built falls back to torch)

    def encode(pred, image) -> Tuple[object, float]:
        start = time.perf_counter()
        pred.set_image(image)
        return pred.current_image(), time.perf_counter() - start

    if predictor.device.type == "cpu" and predictor.backend == "torch":
        encoded = each_on_one_thread(predictor, encode, images, decode_workers(predictor, len(images)))
    else:
        encoded = [encode(predictor, image) for image in images]
    return [embedding for embedding, _ in encoded], [seconds for _, seconds in encoded], False


def segment_loaded_images(predictor, concept: Concept, targets: Sequence[Target], images: Sequence[np.ndarray],
                          options: RunOptions, embeddings: Sequence, timings: Sequence[Dict[str, float]] = (),
                          shared: Sequence[str] = ()) -> List[ImageResult]:
    """Segment loaded, encoded targets together (`embeddings`: their ImageEmbeddings): each one's
    record and output files (nothing is written).  On a GPU each decoder call of the method is
    made once for all of them; on a CPU each is segmented alone on one thread (`_segment_images`).

    `timings`: per image, the seconds its earlier steps took (``load_s``, ``encode_s``), and
    `shared` the names of those measured for the whole group (given per image: the group's
    time / its size).  A record's ``timings`` adds ``segment_s`` (shared on a GPU, unless ``multi``,
    where each image is segmented alone, as on a CPU) and ``outputs_s`` (drawing and encoding its output files, per
    image), and says which are shared (``shared``) and the group's size (``group_size``)."""
    timings = list(timings) or [{} for _ in targets]
    segmented, segment_s, segment_shared = _segment_images(predictor, concept, embeddings, options)
    shared = [*shared, *(["segment_s"] if segment_shared else [])]
    results = []
    for target, image, embedding, segs, before, seconds in zip(targets, images, embeddings, segmented, timings,
                                                              segment_s):
        predictor.set_embedding(*embedding)  # the image its outputs are drawn from
        measured = {**before, "segment_s": seconds}
        results.append(_image_result(predictor, concept, target, image, options, segs, measured, shared,
                                     len(targets)))
    return results


def _image_result(predictor, concept: Concept, target: Target, image: np.ndarray, options: RunOptions,
                  segs: List[Segmentation], timings: Dict[str, float], shared: Sequence[str],
                  group_size: int) -> ImageResult:
    """One segmented image's record and output files; `timings`: the seconds of its steps so far
    (see :func:`segment_loaded_images`)."""
    found = [s for s in segs if s.found]
    files = output_files(target.name, options)
    start = time.perf_counter()
    outputs = _encode_outputs(predictor, concept, options, image, segs, found, files)
    timings = {**timings, "outputs_s": time.perf_counter() - start}
    return ImageResult(image_record(target, image, options, segs, timings, shared, group_size, files), outputs)


def segment_targets(predictor, concept: Concept, targets: Sequence[Target], options: RunOptions,
                    data: Optional[Sequence[Optional[bytes]]] = None) -> List[ImageResult]:
    """Load, encode and segment targets together (:func:`segment_loaded_images`): each one's
    record (status ok, or error when it cannot be loaded) and output files, in order.  `data`:
    the files' bytes, already read (None each: read here; a record's ``load_s`` is then the
    decoding alone).  Nothing is written.  A GF-SAM run's `concept` is a
    persam.runs.gfsam_run.GFSAMTask (its method encodes each photo itself)."""
    results: List[Optional[ImageResult]] = []
    loaded = []  # (position, target, image, seconds to load it)
    for i, (target, content) in enumerate(zip(targets, data if data is not None else [None] * len(targets))):
        start = time.perf_counter()
        image, failed = load_target(target, content)
        results.append(failed)
        if failed is None:
            loaded.append((i, target, image, time.perf_counter() - start))
    if loaded and getattr(concept, "method", None) == "gfsam":  # a persam.runs.gfsam_run.GFSAMTask
        from persam.runs.gfsam_run import segment_gfsam_targets

        def encode_outputs(image, segs, found, files):
            return _encode_outputs(predictor, concept, options, image, segs, found, files)

        segmented = segment_gfsam_targets(predictor, concept, [t for _, t, _, _ in loaded],
                                          [image for _, _, image, _ in loaded], options,
                                          [{"load_s": load_s} for _, _, _, load_s in loaded], encode_outputs)
        for (i, _, _, _), result in zip(loaded, segmented):
            results[i] = result
    elif loaded:
        images = [image for _, _, image, _ in loaded]
        embeddings, encode_s, encode_shared = encode_loaded(predictor, images)
        timings = [{"load_s": load_s, "encode_s": seconds} for (_, _, _, load_s), seconds in zip(loaded, encode_s)]
        segmented = segment_loaded_images(predictor, concept, [t for _, t, _, _ in loaded], images, options,
                                          embeddings, timings, ["encode_s"] if encode_shared else [])
        for (i, _, _, _), result in zip(loaded, segmented):
            results[i] = result
    return results


# --------------------------------------------------------------------------------------------
# the run


def run_folder(folder: OutputFolder, predictor, concept: Optional[Concept], targets: Sequence[Target]) -> dict:
    """Segment the pending targets of `folder` (after :meth:`OutputFolder.plan`); write their outputs
    and results.json after every image.  Returns the results dictionary as written.  `predictor` and
    `concept` are used only when something is pending."""
    options = folder.options
    if folder.method is None and concept is not None:
        folder.method = concept.method
    data = folder.claim(targets)
    pending = [t for t in targets if t.pending]
    bar = tqdm(total=len(pending), desc="segmenting", unit="image", file=sys.stderr,
               disable=(not options.progress) if options.progress is not None else None)
    for first in range(0, len(pending), options.batch_size):
        group = pending[first:first + options.batch_size]
        for t, result in zip(group, segment_targets(predictor, concept, group, options)):
            folder.add_result(t, result)
            data = folder.save()
            bar.update(1)
    bar.close()
    return data


def run_batch(
    predictor,
    concept: Concept,
    targets: Sequence[Target],
    out_dir,
    options: Optional[RunOptions] = None,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Segment every target not done yet; write its outputs and results.json (after each image).

    The folder is locked and the targets planned again under the lock (:class:`OutputFolder`),
    which raises InputError on conflicts.  Returns the results dictionary (as written).  `log`
    receives one line per problem (default: stderr, through tqdm so that the progress bar stays
    intact)."""
    with OutputFolder(out_dir, options, log) as folder:
        planned = folder.plan([t.path for t in targets])
        return run_folder(folder, predictor, concept, planned)
