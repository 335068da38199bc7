"""Trivial baselines on the same annotations as the models: what a model must beat.

``filled_box``: every object's ground-truth box, filled, as its mask. A box-prompted segmenter
that scores below it has not learned to segment (it would do better returning its prompt).
"""
from typing import Any, Dict, List, Union

import numpy as np

from .annotations import AnnotationSet, PathLike, load_annotations, mask_to_rle, xywh_to_xyxy
from .metrics import evaluate_instances, mask_iou


def filled_box_mask(bbox, height: int, width: int) -> np.ndarray:
    """(H, W) bool: the pixels of a COCO [x, y, w, h] box (pixel (c, r) inside when its area
    overlaps the box by at least half, i.e. rounding the corners)."""
    x0, y0, x1, y1 = np.round(xywh_to_xyxy(bbox)).astype(int)
    mask = np.zeros((height, width), bool)
    mask[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return mask


def filled_box(annotations: Union[PathLike, AnnotationSet]) -> Dict[str, Any]:
    """Box mIoU and instance AP (every ground-truth box as a detection with score 1) of the
    filled-box baseline: {"mIoU", "AP", "AP50", ..., "objects"}."""
    gt = annotations if isinstance(annotations, AnnotationSet) else load_annotations(annotations)
    ious: List[float] = []
    results = []
    for ann in gt.annotations:
        if ann.get("iscrowd", 0):
            continue
        image = gt.image(ann["image_id"])
        box = filled_box_mask(ann["bbox"], image["height"], image["width"])
        ious.append(mask_iou(box, gt.annotation_mask(ann)))
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0,
                        "segmentation": mask_to_rle(box)})
    report = {"mIoU": float(np.mean(ious)) if ious else float("nan"), "objects": len(ious)}
    report.update(evaluate_instances(gt, results))
    return report
