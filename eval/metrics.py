"""Scores: mask IoU and its summaries (prompted segmentation), and COCO / LVIS mask AP.

The AP numbers are the official evaluators' (pycocotools ``COCOeval``, ``lvis.LVISEval``), run
on checked, copied inputs: this module adds input checks with clear errors, handles the cases
the evaluators crash on (an empty result list) and keeps their console output out of the way;
it never re-implements the matching or the averaging.
"""
import contextlib
import io
import logging
import math
import os
import warnings
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
from pycocotools import mask as mask_utils

from .annotations import AnnotationError, AnnotationSet, _few, _sorted, annotation_rle, load_annotations, read_json

PathLike = Union[str, os.PathLike]

# COCO's area ranges, on the annotation's ``area`` field (pixels).
SMALL_MAX = 32 ** 2
MEDIUM_MAX = 96 ** 2
BUCKETS = ("small", "medium", "large")

COCO_AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_AP_KEYS = COCO_AP_KEYS + ("APr", "APc", "APf")
_RESULT_KEYS = ("image_id", "category_id", "score")


class ResultsError(ValueError):
    """A detection / segmentation result list that cannot be evaluated."""


# ---------------------------------------------------------------------------------------------
# mIoU
# ---------------------------------------------------------------------------------------------

def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (H, W) masks (anything non-zero is foreground).

    Two empty masks give 1.0: the prediction is exactly right, and this keeps a perfect method
    at mIoU 1.0. (pycocotools' ``iou`` returns 0.0 there; ground-truth objects are never empty
    in practice, so the choice only matters for degenerate inputs.) One empty mask gives 0.0.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask_iou: shapes differ, {a.shape} vs {b.shape}")
    union = np.count_nonzero(a | b)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(a & b) / union)


def area_bucket(area: float) -> str:
    """COCO size bucket of an object area in pixels: "small" (< 32^2), "medium" (< 96^2) or
    "large". Half-open ranges, so every object has exactly one bucket (COCOeval's own ranges
    are closed and count an area of exactly 32^2 in both small and medium)."""
    area = float(area)
    if not math.isfinite(area) or area < 0:
        raise ValueError(f"area must be a finite number >= 0, got {area}")
    return "small" if area < SMALL_MAX else "medium" if area < MEDIUM_MAX else "large"


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def summarize_miou(records: Iterable[Mapping[str, Any]]) -> Dict[str, float]:
    """Mean IoU overall, per size bucket and per click.

    Args:
        records: one per object and prompt round: {"iou": float, "area": float (the annotation's
            ``area``) or "bucket": "small" | "medium" | "large", "click": int >= 1 (optional,
            default 1; box prompts are a single round)}. An object that stopped early (e.g. it
            reached a target IoU) should repeat its last IoU for the remaining clicks.

    Returns:
        Plain float dict. At the last click index N present (the headline number):
        "mIoU", "mIoU_small", "mIoU_medium", "mIoU_large", "count", "count_small", ...;
        for every click k: "mIoU@{k}click", "mIoU_small@{k}click", ..., "count@{k}click";
        "clicks": N. An empty group has mIoU NaN and count 0.
    """
    by_click: Dict[int, Dict[str, List[float]]] = {}
    for i, rec in enumerate(records):
        try:
            iou = float(rec["iou"])
            bucket = rec["bucket"] if "bucket" in rec else area_bucket(rec["area"])
            click = int(rec.get("click", 1))
        except KeyError as err:
            raise ValueError(f"summarize_miou: record {i} lacks {err}; need iou and area (or bucket)") from None
        if bucket not in BUCKETS:
            raise ValueError(f"summarize_miou: record {i} has bucket {bucket!r}, expected one of {BUCKETS}")
        if not 0.0 <= iou <= 1.0:
            raise ValueError(f"summarize_miou: record {i} has iou {iou}, outside [0, 1]")
        if click < 1:
            raise ValueError(f"summarize_miou: record {i} has click {click}; clicks count from 1")
        groups = by_click.setdefault(click, {b: [] for b in BUCKETS})
        groups[bucket].append(iou)

    out: Dict[str, float] = {}
    for click in sorted(by_click):
        groups = by_click[click]
        everything = [v for b in BUCKETS for v in groups[b]]
        out[f"mIoU@{click}click"] = _mean(everything)
        out[f"count@{click}click"] = float(len(everything))
        for b in BUCKETS:
            out[f"mIoU_{b}@{click}click"] = _mean(groups[b])
    last = max(by_click) if by_click else 1
    groups = by_click.get(last, {b: [] for b in BUCKETS})
    everything = [v for b in BUCKETS for v in groups[b]]
    out["mIoU"] = _mean(everything)
    out["count"] = float(len(everything))
    for b in BUCKETS:
        out[f"mIoU_{b}"] = _mean(groups[b])
        out[f"count_{b}"] = float(len(groups[b]))
    out["clicks"] = float(last)
    return out


# ---------------------------------------------------------------------------------------------
# Results files
# ---------------------------------------------------------------------------------------------

def load_results(path: PathLike) -> List[Dict[str, Any]]:
    """Read a COCO results-format JSON: a list of {image_id, category_id, score, segmentation
    and/or bbox}. Raises FileNotFoundError, or ResultsError naming the file and the entry."""
    results = read_json(path, "results file", ResultsError)
    check_results_format(results, str(path))
    return results


def check_results_format(results: Any, source: str = "results") -> None:
    """Raise ResultsError unless ``results`` is a list of dicts with image_id, category_id, a
    finite score and a segmentation or bbox."""
    if not isinstance(results, list):
        raise ResultsError(f"{source}: results must be a list of detections, got {type(results).__name__}")
    for i, res in enumerate(results):
        if not isinstance(res, Mapping):
            raise ResultsError(f"{source}: result {i} is a {type(res).__name__}, not an object")
        missing = [k for k in _RESULT_KEYS if k not in res]
        if "segmentation" not in res and "bbox" not in res:
            missing.append("segmentation or bbox")
        if missing:
            raise ResultsError(f"{source}: result {i} lacks {', '.join(missing)} (has {_few(sorted(map(str, res)))})")
        score = res["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float, np.number)) or not math.isfinite(score):
            raise ResultsError(f"{source}: result {i} has score {score!r}; need a finite number")


def _prepare_results(gt: AnnotationSet, results: Sequence[Mapping[str, Any]], iou_type: str,
                     source: str) -> List[Dict[str, Any]]:
    """Checked shallow copies of ``results`` in the form both evaluators expect.

    Both evaluators add fields to (and LVIS re-sorts) the result dicts: work on copies. For
    ``segm``: the segmentation becomes a compressed RLE (polygons and uncompressed RLE are
    converted at the image's size; counts may be str or bytes) and any ``bbox`` is dropped,
    because COCO.loadRes / LVISResults take the *box* area as the detection's area when a bbox
    is present, which moves detections between the small/medium/large ranges of mask AP.
    detectron2's COCO and LVIS evaluators drop it for the same reason (the published SAM / ViTDet
    mask APs); a results file that keeps its bboxes, scored directly with pycocotools or lvis,
    gives the same AP / AP50 / AP75 / APr / APc / APf but other APs / APm / APl.
    For ``bbox``: the segmentation is dropped (the evaluators would rasterise it for nothing).
    """
    check_results_format(results, source)
    bad_images = _sorted({r["image_id"] for r in results if r["image_id"] not in gt.images})
    if bad_images:
        raise ResultsError(f"{source}: {len(bad_images)} image id(s) are not in {gt.source}: {_few(bad_images)}")
    bad_cats = _sorted({r["category_id"] for r in results if r["category_id"] not in gt.categories})
    if bad_cats:
        raise ResultsError(f"{source}: {len(bad_cats)} category id(s) are not in {gt.source}: {_few(bad_cats)}")

    prepared = []
    for i, res in enumerate(results):
        res = dict(res)
        if iou_type == "segm":
            if "segmentation" not in res:
                raise ResultsError(f"{source}: result {i} has no segmentation; mask AP needs one (or use iou_type='bbox')")
            img = gt.images[res["image_id"]]
            try:
                rle = annotation_rle({"id": f"(result {i})", "segmentation": res["segmentation"]},
                                     img["height"], img["width"], source)
            except AnnotationError as err:
                raise ResultsError(str(err)) from None
            res["segmentation"] = rle
            res.pop("bbox", None)
        else:
            if "bbox" not in res or len(res["bbox"]) != 4:
                raise ResultsError(f"{source}: result {i} has no [x, y, w, h] bbox; box AP needs one")
            res.pop("segmentation", None)
        prepared.append(res)
    return prepared


# ---------------------------------------------------------------------------------------------
# Mask / box AP
# ---------------------------------------------------------------------------------------------

class _NumpyWithFloat:
    """numpy, plus the ``np.float`` alias that NumPy 1.24 removed.

    The PyPI ``lvis`` release (0.5.3) calls ``np.cumsum(...).astype(dtype=np.float)`` in
    LVISEval.accumulate, an AttributeError on NumPy >= 1.24. Rather than pin NumPy or set
    ``numpy.float`` for the whole process, :func:`lvis_numpy_compat` points the ``np`` name
    *inside lvis.eval only* at this proxy, for the duration of one evaluation. ``np.float`` was
    the builtin ``float`` (float64), so the numbers are the ones lvis always computed.
    """

    float = float

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


@contextlib.contextmanager
def lvis_numpy_compat() -> Iterator[None]:
    """Run lvis' evaluator under NumPy 2 (see :class:`_NumpyWithFloat`); restores on exit."""
    import lvis.eval as lvis_eval_module

    original = lvis_eval_module.np
    if isinstance(original, _NumpyWithFloat) or "float" in vars(original):
        yield  # already patched (nested call) or an lvis/numpy that has it
        return
    lvis_eval_module.np = _NumpyWithFloat()
    try:
        yield
    finally:
        lvis_eval_module.np = original


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Swallow the evaluators' progress prints and lvis' deprecated ``logger.warn`` calls."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        lvis_logger = logging.getLogger("lvis")
        level = lvis_logger.level
        lvis_logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            lvis_logger.setLevel(level)


def _gt_copy(gt: AnnotationSet, kind: str, iou_type: str) -> Dict[str, Any]:
    """A dataset dict the evaluators may modify (they overwrite ``segmentation`` and add
    ``ignore``), sharing the untouched images / categories lists.

    For mask AP the ground truth goes in as compressed RLE made by :func:`annotation_rle`:
    identical to the evaluators' own rasterisation for valid input, but a ground-truth RLE of
    the wrong size is an error naming the annotation instead of a silent IoU of 0.
    """
    anns = []
    for a in gt.annotations:
        a = dict(a)
        if iou_type == "segm" or "area" not in a:
            rle = gt.annotation_rle(a)
            if iou_type == "segm":
                a["segmentation"] = rle
            a.setdefault("area", float(mask_utils.area(rle)))  # both evaluators read it unconditionally
        if kind == "coco":
            a.setdefault("iscrowd", 0)  # COCOeval reads it unconditionally (KeyError on LVIS-style files)
        anns.append(a)
    data = dict(gt.dataset)
    data["annotations"] = anns
    return data


def _coco_ap(gt: AnnotationSet, results: List[Dict[str, Any]], iou_type: str,
             image_ids: Optional[List[int]] = None) -> Dict[str, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO()
    coco_gt.dataset = _gt_copy(gt, "coco", iou_type)
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(results)
    evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
    if image_ids is not None:
        evaluator.params.imgIds = image_ids
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    # stats: AP, AP50, AP75, APs, APm, APl, then six AR values
    return {k: float(v) for k, v in zip(COCO_AP_KEYS, evaluator.stats[:6])}


def _lvis_ap(gt: AnnotationSet, results: List[Dict[str, Any]], iou_type: str,
             image_ids: Optional[List[int]] = None) -> Dict[str, float]:
    from lvis import LVIS, LVISEval, LVISResults

    class _InMemoryLVIS(LVIS):
        """LVIS() only takes a path; feed it the checked dict instead of re-reading the file."""

        def _load_json(self, path: Any) -> Dict[str, Any]:
            return path

    with lvis_numpy_compat():
        lvis_gt = _InMemoryLVIS(_gt_copy(gt, "lvis", iou_type))
        lvis_dt = LVISResults(lvis_gt, results)  # max_dets=300 per image: the official setting
        evaluator = LVISEval(lvis_gt, lvis_dt, iou_type=iou_type)
        if image_ids is not None:
            evaluator.params.img_ids = image_ids
        evaluator.run()
    return {k: float(evaluator.results[k]) for k in LVIS_AP_KEYS}


def evaluate_instances(annotations: Union[PathLike, AnnotationSet], results: Union[PathLike, Sequence[Mapping[str, Any]]],
                       dataset: Optional[str] = None, iou_type: str = "segm", verbose: bool = False,
                       image_ids: Optional[Iterable[int]] = None) -> Dict[str, float]:
    """Instance-segmentation (or box) AP with the official evaluator.

    Args:
        annotations: the ground-truth COCO/LVIS file, or an :class:`AnnotationSet`.
        results: COCO results format, a list or a JSON file: {image_id, category_id, score,
            segmentation (compressed RLE with counts str or bytes; polygons and uncompressed
            RLE are converted)} and/or bbox [x, y, w, h] (required for ``iou_type="bbox"``,
            ignored for "segm", see :func:`_prepare_results`).
        dataset: "coco" -> pycocotools COCOeval; "lvis" -> LVISEval (federated, up to 300
            detections per image); None -> the kind detected from the annotation file.
        iou_type: "segm" (mask AP) or "bbox".
        verbose: let the evaluators print their progress and summary tables.
        image_ids: score these images only (the evaluators' ``imgIds`` / ``img_ids``), e.g. the
            subset a run covered; default every image of the annotation file, where an image
            without results counts its objects as missed.

    Returns:
        {"AP", "AP50", "AP75", "APs", "APm", "APl"} (+ "APr", "APc", "APf" for LVIS) as floats
        in [0, 1]; -1.0 where the evaluator has no ground truth to score (e.g. no small objects).
        An empty result list warns and gives 0.0 everywhere (both evaluators crash on it).

    Raises:
        ResultsError (a ValueError): malformed results, image or category ids not in the
        annotation file (some listed), an RLE of the wrong size.
        AnnotationError: a bad annotation file.
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    gt = annotations if isinstance(annotations, AnnotationSet) else load_annotations(annotations)
    kind = dataset or gt.kind
    if kind not in ("coco", "lvis"):
        raise ValueError(f"dataset must be 'coco', 'lvis' or None, got {dataset!r}")
    if kind == "lvis" and gt.kind != "lvis":
        gt = AnnotationSet.from_dict(gt.dataset, "lvis", gt.source)  # checks the LVIS fields
    keys = LVIS_AP_KEYS if kind == "lvis" else COCO_AP_KEYS

    source = "results"
    if isinstance(results, (str, os.PathLike)):
        source = str(results)
        results = load_results(results)
    prepared = _prepare_results(gt, results, iou_type, source)
    subset = None
    if image_ids is not None:
        subset = sorted({int(i) for i in image_ids})
        unknown = [i for i in subset if i not in gt.images]
        if unknown:
            raise ResultsError(f"image_ids not in {gt.source}: {unknown[:10]}")
        outside = sorted({r["image_id"] for r in prepared} - set(subset))
        if outside:
            raise ResultsError(f"{source}: results for images outside image_ids, e.g. {outside[:10]}")
    if not prepared:
        warnings.warn(f"{source}: no results to evaluate against {gt.source}; every AP is 0.0", RuntimeWarning,
                      stacklevel=2)
        return {k: 0.0 for k in keys}
    with _quiet(verbose):
        return _lvis_ap(gt, prepared, iou_type, subset) if kind == "lvis" else _coco_ap(gt, prepared, iou_type, subset)
