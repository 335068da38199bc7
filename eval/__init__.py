"""Zero-shot evaluation (COCO, LVIS, ImageNet).

The model-independent core: annotation loading (:mod:`eval.annotations`), simulated prompts
(:mod:`eval.prompts`) and scores (:mod:`eval.metrics`).
"""
from .annotations import (
    AnnotationError,
    AnnotationSet,
    annotation_mask,
    annotation_rle,
    detect_kind,
    image_path,
    load_annotations,
    mask_to_rle,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from .metrics import (
    ResultsError,
    area_bucket,
    evaluate_instances,
    load_results,
    lvis_numpy_compat,
    mask_iou,
    summarize_miou,
)
from .prompts import Clicker, box_prompt, clicks_to_arrays, distance_to_boundary, farthest_point, first_click, next_click

__all__ = [
    "AnnotationError",
    "AnnotationSet",
    "ResultsError",
    "annotation_mask",
    "annotation_rle",
    "area_bucket",
    "box_prompt",
    "clicks_to_arrays",
    "detect_kind",
    "distance_to_boundary",
    "evaluate_instances",
    "Clicker",
    "farthest_point",
    "first_click",
    "image_path",
    "load_annotations",
    "load_results",
    "lvis_numpy_compat",
    "mask_iou",
    "mask_to_rle",
    "next_click",
    "summarize_miou",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]
