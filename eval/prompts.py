"""Prompts for interactive-segmentation evaluation: simulated clicks and ground-truth boxes.

The protocol of SAM's paper and RITM: the first click is the point farthest from the object's
boundary; each further click goes to the point farthest from the boundary of the larger error
region (missed pixels -> positive click, label 1; extra pixels -> negative click, label 0).
The image border counts as boundary (the masks are padded with a zero border), so an object cut
by the frame gets its click away from the frame too.

Points are (x, y) = (column, row) integer pixel indices, the order SAM's ``point_coords`` use.
"""
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from .annotations import xywh_to_xyxy

# Distances within this relative margin of the maximum count as tied: cv2's exact Euclidean
# transform is computed in float32, so sqrt(n) for equal n may differ in the last bits.
_TIE_RTOL = 1e-6


def _as_mask(mask: Any, name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be (H, W), got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def distance_to_boundary(mask: np.ndarray) -> np.ndarray:
    """(H, W) float32 Euclidean distance of each mask pixel to the nearest pixel outside the
    mask or outside the image (0 off the mask). Exact (cv2 ``DIST_MASK_PRECISE``)."""
    mask = _as_mask(mask)
    padded = np.pad(mask.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def _farthest(mask: np.ndarray) -> Optional[Tuple[int, int, float]]:
    """(x, y, distance) of the farthest-from-boundary pixel of ``mask``; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    y0, x0 = int(rows[0]), int(cols[0])
    crop = mask[y0:rows[-1] + 1, x0:cols[-1] + 1]
    dist = cv2.distanceTransform(np.pad(crop.astype(np.uint8), 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    best = float(dist.max())
    ties = np.argwhere(dist >= best * (1.0 - _TIE_RTOL))  # (K, 2) row, col in row-major order
    if len(ties) > 1:
        d2 = ((ties - ties.mean(axis=0)) ** 2).sum(axis=1)
        ties = ties[np.argmin(d2):]  # argmin returns the first minimum: row-major tie-break
    r, c = ties[0]
    return int(x0 + c), int(y0 + r), best


def farthest_point(mask: np.ndarray) -> Optional[Tuple[int, int]]:
    """(x, y) of the mask pixel farthest from the mask's boundary, or None for an empty mask.

    Works on the mask's bounding box plus a one-pixel zero border, which gives exactly the
    full-image distances (every pixel outside the box is background, and the border pixel on
    the way to it is nearer), so cost scales with the object, not the image.

    Ties (a ridge of equally distant pixels, e.g. in a rectangle) are broken deterministically:
    the tied pixel nearest to the tied pixels' mean, then the first in row-major order. This
    lands in the middle of the ridge rather than at one end, and is always a mask pixel.
    """
    found = _farthest(_as_mask(mask))
    return None if found is None else found[:2]


def first_click(mask: np.ndarray) -> Tuple[int, int]:
    """(x, y) of the first simulated click: the object pixel farthest from its boundary.

    Args:
        mask: (H, W) bool object mask (any multi-part, thin or 1-pixel object).

    Raises:
        ValueError: for an empty mask (there is nothing to click on).
    """
    point = farthest_point(mask)
    if point is None:
        raise ValueError("first_click: the object mask is empty")
    return point


def next_click(gt_mask: np.ndarray, pred_mask: np.ndarray) -> Optional[Tuple[int, int, int]]:
    """(x, y, label) of the next corrective click, or None if the prediction is exact.

    Error regions: false negatives (gt & ~pred) and false positives (pred & ~gt). The larger
    one, measured by its largest distance to its own boundary (the maximum of its distance
    transform), gets the click, at that farthest point. Label 1 (positive) for a false-negative
    region, 0 (negative) for a false-positive one. On an exact tie of the two maxima the click
    is negative, as in RITM's reference implementation (``fn_max > fp_max`` -> positive).

    Args:
        gt_mask: (H, W) bool ground truth.
        pred_mask: (H, W) bool prediction (threshold logits before calling).
    """
    gt, pred = _as_mask(gt_mask, "gt_mask"), _as_mask(pred_mask, "pred_mask")
    if gt.shape != pred.shape:
        raise ValueError(f"gt_mask {gt.shape} and pred_mask {pred.shape} differ in shape")
    fn, fp = _farthest(gt & ~pred), _farthest(pred & ~gt)
    if fn is None and fp is None:
        return None
    if fp is None or (fn is not None and fn[2] > fp[2]):
        return fn[0], fn[1], 1
    return fp[0], fp[1], 0


def box_prompt(ann: Mapping[str, Any]) -> np.ndarray:
    """(4,) float64 [x0, y0, x1, y1] box prompt from a COCO/LVIS annotation's ``bbox`` [x, y, w, h]."""
    if "bbox" not in ann:
        raise KeyError(f"annotation {ann.get('id')!r} has no bbox")
    return xywh_to_xyxy(ann["bbox"])


# COCO's boxes are floats computed from polygons; a box may overhang the frame by rounding.
_BOX_SLACK_PX = 1.0


def box_problem(ann: Mapping[str, Any], width: int, height: int) -> Optional[str]:
    """Why an annotation's ``bbox`` cannot be a box prompt on a ``width`` x ``height`` image
    (None if it can): missing, not 4 finite numbers, zero or negative size, or outside the image
    (beyond a one-pixel slack)."""
    bbox = ann.get("bbox")
    if bbox is None:
        return "no bbox"
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        return f"bbox {bbox!r} is not 4 numbers [x, y, w, h]"
    x, y, w, h = (float(v) for v in bbox)
    if not all(np.isfinite([x, y, w, h])):
        return f"bbox {list(bbox)} is not finite"
    if w <= 0 or h <= 0:
        return f"bbox {list(bbox)} has no area (width {w:g}, height {h:g})"
    if x < -_BOX_SLACK_PX or y < -_BOX_SLACK_PX or x + w > width + _BOX_SLACK_PX or y + h > height + _BOX_SLACK_PX:
        return f"bbox {list(bbox)} is outside the {width}x{height} image"
    return None


def clicks_to_arrays(clicks: Sequence[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
    """Clicks [(x, y, label), ...] -> SAM's ``point_coords`` (N, 2) float32 and ``point_labels``
    (N,) int32. A (x, y) pair without a label counts as positive (a first click)."""
    coords: List[Tuple[float, float]] = []
    labels: List[int] = []
    for click in clicks:
        coords.append((float(click[0]), float(click[1])))
        labels.append(int(click[2]) if len(click) > 2 else 1)
    return np.asarray(coords, np.float32).reshape(-1, 2), np.asarray(labels, np.int32)
