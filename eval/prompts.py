"""Prompts for interactive-segmentation evaluation: simulated clicks and ground-truth boxes.

Clicks follow RITM's released click simulator (``isegm/inference/clicker.py``, ``Clicker``),
pixel for pixel, which is the protocol SAM's paper evaluates with:

1. error regions: false negatives ``gt & ~pred`` and false positives ``pred & ~gt``; before the
   first click the prediction is empty, so click 1 is the object pixel farthest from its
   boundary;
2. each region's exact Euclidean distance transform (``cv2.DIST_L2``, mask size 0), computed
   with a one-pixel zero border, so the image frame counts as boundary;
3. distances at pixels clicked before are zeroed: a pixel is never clicked twice;
4. positive (label 1) if the false-negative maximum is strictly larger, otherwise negative (a tie,
   0 == 0 included, gives a negative click);
5. among the pixels at the maximum, the first in row-major order (``np.where(...)[0]``); when
   both regions are empty or fully clicked every distance is 0 and, as in RITM, the click is a
   negative one at pixel (0, 0).

RITM thresholds probabilities at 0.49; SAM's masks are logits thresholded at 0 (the evaluation
loop's choice).

Points are (x, y) = (column, row) integer pixel indices, the order SAM's ``point_coords`` use.
"""
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from .annotations import xywh_to_xyxy


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


def _farthest(region: np.ndarray, not_clicked: Optional[np.ndarray] = None) -> Tuple[float, Optional[Tuple[int, int]]]:
    """RITM's choice within one error region: (max distance, (x, y) of the first maximum in
    row-major order), with distances at clicked pixels zeroed; (0.0, None) if nothing is left.

    The transform runs on the whole padded image, as RITM's does: cv2's exact transform rounds
    its float32 results differently at other offsets (a crop to the object moved LVIS annotation
    46's first click from (298, 221) to (300, 222)), and a tie is decided on those last bits."""
    if not region.any():
        return 0.0, None
    dist = distance_to_boundary(region)
    if not_clicked is not None:
        dist = dist * not_clicked
    best = dist.max()
    if best == 0.0:
        return 0.0, None
    r, c = np.unravel_index(int(np.argmax(dist == best)), dist.shape)  # first maximum, row-major
    return float(best), (int(c), int(r))


class Clicker:
    """RITM's click simulator for one object: it keeps the clicks made so far and never clicks
    a pixel twice (see the module's docstring for the rules).

    Args:
        gt_mask: (H, W) bool ground truth of the object.
    """

    def __init__(self, gt_mask: np.ndarray) -> None:
        self.gt = _as_mask(gt_mask, "gt_mask")
        self.not_clicked = np.ones_like(self.gt)
        self.clicks: List[Tuple[int, int, int]] = []

    def next_click(self, pred_mask: Optional[np.ndarray] = None) -> Tuple[int, int, int]:
        """(x, y, label) of the next click after prediction ``pred_mask`` ((H, W) bool; None or
        all False before the first click), recorded in :attr:`clicks`."""
        if pred_mask is None:
            pred = np.zeros_like(self.gt)
        else:
            pred = _as_mask(pred_mask, "pred_mask")
            if pred.shape != self.gt.shape:
                raise ValueError(f"gt_mask {self.gt.shape} and pred_mask {pred.shape} differ in shape")
        fn_max, fn_at = _farthest(self.gt & ~pred, self.not_clicked)
        fp_max, fp_at = _farthest(pred & ~self.gt, self.not_clicked)
        if fn_max > fp_max:
            (x, y), label = fn_at, 1
        else:
            (x, y), label = (fp_at if fp_at is not None else (0, 0)), 0  # nothing left: RITM's (0, 0)
        self.not_clicked[y, x] = False
        self.clicks.append((x, y, label))
        return x, y, label


def farthest_point(mask: np.ndarray) -> Optional[Tuple[int, int]]:
    """(x, y) of the mask pixel farthest from the mask's boundary (the image frame counts as
    boundary), the first in row-major order on a tie; None for an empty mask."""
    return _farthest(_as_mask(mask))[1]


def first_click(mask: np.ndarray) -> Tuple[int, int]:
    """(x, y) of the first simulated click: RITM's click on an empty prediction, the object pixel
    farthest from its boundary (first in row-major order on a tie).

    Args:
        mask: (H, W) bool object mask (any multi-part, thin or 1-pixel object).

    Raises:
        ValueError: for an empty mask (there is nothing to click on).
    """
    point = farthest_point(mask)
    if point is None:
        raise ValueError("first_click: the object mask is empty")
    return point


def next_click(gt_mask: np.ndarray, pred_mask: np.ndarray,
               clicked: Iterable[Sequence[int]] = ()) -> Tuple[int, int, int]:
    """(x, y, label) of the next corrective click by RITM's rules, given the clicks made before
    (``clicked``: (x, y[, label]) each; those pixels are never clicked again). Label 1 (positive)
    for a false-negative region, 0 (negative) for a false-positive one; see :class:`Clicker`
    (which keeps the history itself) for the rules, including an exact prediction.
    """
    clicker = Clicker(gt_mask)
    for click in clicked:
        clicker.not_clicked[int(click[1]), int(click[0])] = False
    return clicker.next_click(pred_mask)


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


def random_points_problem(mask: np.ndarray, n: int) -> Optional[str]:
    """Why ``n`` distinct random points cannot be drawn from ``mask`` (None if they can): an empty
    mask, a mask of one pixel (no sampling to speak of), or fewer pixels than points."""
    area = int(_as_mask(mask).sum())
    if area == 0:
        return "empty mask"
    if area == 1:
        return "mask of one pixel"
    if area < n:
        return f"mask of {area} pixels, fewer than the {n} points asked"
    return None


def random_points(mask: np.ndarray, n: int, seed: Sequence[int]) -> np.ndarray:
    """(n, 2) int64 (x, y) distinct pixels drawn uniformly from ``mask``: the bLViT / SAM papers'
    "N random points" prompt. ``seed``: e.g. (run seed, image id, annotation id), so that every
    model sees the same points for the same object whatever the order or sharding of the run.

    Raises:
        ValueError: what :func:`random_points_problem` reports.
    """
    problem = random_points_problem(mask, n)
    if problem is not None:
        raise ValueError(f"random_points: {problem}")
    rows, cols = np.nonzero(_as_mask(mask))  # row-major order: deterministic for a given mask
    picked = np.random.default_rng([int(v) for v in seed]).choice(rows.size, size=n, replace=False)
    return np.stack([cols[picked], rows[picked]], axis=1).astype(np.int64)


def clicks_to_arrays(clicks: Sequence[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
    """Clicks [(x, y, label), ...] -> SAM's ``point_coords`` (N, 2) float32 and ``point_labels``
    (N,) int32. A (x, y) pair without a label counts as positive (a first click)."""
    coords: List[Tuple[float, float]] = []
    labels: List[int] = []
    for click in clicks:
        coords.append((float(click[0]), float(click[1])))
        labels.append(int(click[2]) if len(click) > 2 else 1)
    return np.asarray(coords, np.float32).reshape(-1, 2), np.asarray(labels, np.int32)
