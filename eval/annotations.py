"""COCO / LVIS instance annotations: checked loading, image paths, masks and boxes.

Everything here is model-independent and works from the JSON alone (no images are needed
except by :func:`image_path`). Masks follow pycocotools' rasterisation exactly, so a mask made
here and submitted as a result is scored IoU 1.0 against the same ground truth by
``COCOeval`` / ``LVISEval``.
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
from pycocotools import mask as mask_utils

PathLike = Union[str, os.PathLike]

DATASET_KINDS = ("coco", "lvis")
_LVIS_IMAGE_FIELDS = ("neg_category_ids", "not_exhaustive_category_ids")


class AnnotationError(ValueError):
    """An annotation file (or one of its entries) that cannot be used."""


def _few(values: Iterable[Any], limit: int = 10) -> str:
    """The first ``limit`` values for an error message, with a count of the rest."""
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (f" ... ({len(values) - limit} more)" if len(values) > limit else "")


def _sorted(values: Iterable[Any]) -> List[Any]:
    """Sorted when comparable (ids are ints), else by repr: for stable error messages."""
    values = list(values)
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=repr)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class AnnotationSet:
    """A validated COCO- or LVIS-format instance file, indexed by id.

    Attributes:
        dataset: the JSON dict as read (never modified here; evaluation works on copies).
        kind: "coco" or "lvis" (drives which evaluator :mod:`eval.metrics` uses).
        source: where it came from (the file path, or "<memory>"): used in every error message.
        images: image id -> image record ({id, height, width, file_name and/or coco_url, ...}).
        categories: category id -> category record.
        anns_by_image: image id -> its annotations, in file order (images without any: []).
    """

    dataset: Dict[str, Any]
    kind: str
    source: str
    images: Dict[int, Dict[str, Any]] = field(repr=False)
    categories: Dict[int, Dict[str, Any]] = field(repr=False)
    anns_by_image: Dict[int, List[Dict[str, Any]]] = field(repr=False)

    @property
    def annotations(self) -> List[Dict[str, Any]]:
        """All annotations, in file order."""
        return self.dataset["annotations"]

    @property
    def path(self) -> Optional[Path]:
        """The file it was read from, or None for an in-memory set."""
        return None if self.source == "<memory>" else Path(self.source)

    def image(self, image_id: int) -> Dict[str, Any]:
        """The image record of ``image_id`` (KeyError naming the file if unknown)."""
        try:
            return self.images[image_id]
        except KeyError:
            raise KeyError(f"{self.source}: no image with id {image_id!r}") from None

    def annotation_mask(self, ann: Mapping[str, Any]) -> np.ndarray:
        """(H, W) bool mask of ``ann`` at its image's size."""
        img = self.image(ann["image_id"])
        return annotation_mask(ann, img["height"], img["width"], source=self.source)

    def annotation_rle(self, ann: Mapping[str, Any]) -> Dict[str, Any]:
        """Compressed RLE of ``ann`` at its image's size (counts as bytes, as pycocotools makes it)."""
        img = self.image(ann["image_id"])
        return annotation_rle(ann, img["height"], img["width"], source=self.source)

    def image_path(self, image_id: int, images_dir: PathLike) -> Path:
        """The existing file of ``image_id`` under ``images_dir`` (see :func:`image_path`)."""
        return image_path(self.image(image_id), images_dir, source=self.source)

    @classmethod
    def from_dict(cls, data: Any, kind: Optional[str] = None, source: str = "<memory>") -> "AnnotationSet":
        """Validate and index an already-parsed COCO/LVIS dict (see :func:`load_annotations`)."""
        return _build(data, kind, source)


def detect_kind(data: Mapping[str, Any]) -> str:
    """"lvis" if categories carry ``frequency`` or images carry the federated fields
    (``neg_category_ids`` / ``not_exhaustive_category_ids``), else "coco"."""
    if any(isinstance(c, Mapping) and "frequency" in c for c in data.get("categories", [])):
        return "lvis"
    if any(isinstance(im, Mapping) and any(k in im for k in _LVIS_IMAGE_FIELDS) for im in data.get("images", [])):
        return "lvis"
    return "coco"


def _index(records: Any, what: str, source: str, required: Sequence[str]) -> Dict[int, Dict[str, Any]]:
    """id -> record for a list of dicts, checking the required fields and unique int ids."""
    index: Dict[int, Dict[str, Any]] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise AnnotationError(f"{source}: {what}[{i}] is a {type(rec).__name__}, not an object")
        missing = [k for k in required if k not in rec]
        if missing:
            raise AnnotationError(f"{source}: {what}[{i}] (id {rec.get('id')!r}) lacks {_few(missing)}")
        if not _is_int(rec["id"]):
            raise AnnotationError(f"{source}: {what}[{i}] has a non-integer id {rec['id']!r}")
        if rec["id"] in index:
            raise AnnotationError(f"{source}: duplicate {what} id {rec['id']}")
        index[int(rec["id"])] = rec
    return index


def _build(data: Any, kind: Optional[str], source: str) -> AnnotationSet:
    if not isinstance(data, Mapping):
        raise AnnotationError(f"{source}: not a COCO/LVIS annotation file: the top level is a "
                              f"{type(data).__name__}, expected an object with images, annotations, categories")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise AnnotationError(f"{source}: not a COCO/LVIS annotation file: missing {_few(missing)} "
                              f"(top-level keys: {_few(sorted(map(str, data)))})")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise AnnotationError(f"{source}: not a COCO/LVIS annotation file: {key!r} is a "
                                  f"{type(data[key]).__name__}, expected a list")
    if kind is not None and kind not in DATASET_KINDS:
        raise ValueError(f"dataset kind must be one of {DATASET_KINDS} or None, got {kind!r}")
    kind = kind or detect_kind(data)

    images = _index(data["images"], "images", source, ("id", "height", "width"))
    for im in images.values():
        if not (_is_int(im["height"]) and _is_int(im["width"]) and im["height"] > 0 and im["width"] > 0):
            raise AnnotationError(f"{source}: image {im['id']} has an invalid size "
                                  f"height={im['height']!r} width={im['width']!r}")
    categories = _index(data["categories"], "categories", source, ("id",))
    anns = _index(data["annotations"], "annotations", source, ("id", "image_id", "category_id"))

    # Dangling references make both evaluators fail deep inside with a KeyError: report them here.
    bad_images = _sorted({a["image_id"] for a in anns.values() if a["image_id"] not in images})
    if bad_images:
        raise AnnotationError(f"{source}: annotations refer to {len(bad_images)} unknown image id(s): {_few(bad_images)}")
    bad_cats = _sorted({a["category_id"] for a in anns.values() if a["category_id"] not in categories})
    if bad_cats:
        raise AnnotationError(f"{source}: annotations refer to {len(bad_cats)} unknown category id(s): {_few(bad_cats)}")

    if kind == "lvis":  # LVISEval reads these unconditionally: fail now, not mid-evaluation
        no_freq = [c for c, rec in categories.items() if rec.get("frequency") not in ("r", "c", "f")]
        if no_freq:
            raise AnnotationError(f"{source}: LVIS categories need frequency in r/c/f; "
                                  f"{len(no_freq)} lack it, ids {_few(no_freq)}")
        no_fed = [i for i, im in images.items() if any(k not in im for k in _LVIS_IMAGE_FIELDS)]
        if no_fed:
            raise AnnotationError(f"{source}: LVIS images need {' and '.join(_LVIS_IMAGE_FIELDS)}; "
                                  f"{len(no_fed)} lack them, ids {_few(no_fed)}")

    by_image: Dict[int, List[Dict[str, Any]]] = {i: [] for i in images}
    for a in data["annotations"]:
        by_image[a["image_id"]].append(a)
    return AnnotationSet(dict(data), kind, source, images, categories, by_image)


def read_json(path: PathLike, what: str, error: type) -> Any:
    """The JSON in ``path``: FileNotFoundError if there is no such file, ``error`` naming the
    file if it cannot be read or is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what}")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({type(err).__name__}: {err})") from err
    except OSError as err:
        raise error(f"{path}: cannot be read ({err})") from err


def load_annotations(path: PathLike, kind: Optional[str] = None) -> AnnotationSet:
    """Read and validate a COCO- or LVIS-format instance file.

    Args:
        path: the JSON file.
        kind: "coco" or "lvis" to override the detection (see :func:`detect_kind`).

    Raises:
        FileNotFoundError: no such file.
        AnnotationError: unreadable or corrupt JSON, not a COCO/LVIS layout, dangling image or
            category ids, duplicate ids, LVIS without its federated fields; the message names
            the file and the problem.
    """
    return _build(read_json(path, "annotation file", AnnotationError), kind, str(path))


def image_path(image: Mapping[str, Any], images_dir: PathLike, source: str = "annotation file") -> Path:
    """The existing image file of an image record under ``images_dir``.

    Tries, in order: ``file_name`` (may contain sub-folders), its basename, then the last two
    parts of ``coco_url`` (split folder and file, as detectron2's LVIS loader reads them), then
    its basename. LVIS v1 records have only ``coco_url``, and most LVIS v1 val images come from
    COCO's train2017 (".../train2017/000000000009.jpg"): ``images_dir`` = the COCO root holding
    ``train2017/`` and ``val2017/`` finds them all. LVIS v0.5 names files ``COCO_val2014_...``
    while users hold the val2017 copies, so the URL basename is the last fallback.

    Raises:
        FileNotFoundError: naming the image id, the annotation file and every path tried.
        ValueError: a name that leads outside ``images_dir`` (``../``, an absolute path).
    """
    images_dir = Path(images_dir)
    names: List[str] = []
    if image.get("file_name"):
        names += [str(image["file_name"]), Path(str(image["file_name"])).name]
    if image.get("coco_url"):
        split_and_file = str(image["coco_url"]).rstrip("/").rsplit("/", 2)[-2:]
        names += ["/".join(split_and_file), split_and_file[-1]]
    tried: List[Path] = []
    root = images_dir.resolve()
    for name in dict.fromkeys(names):  # ordered, without repeats
        candidate = images_dir / name
        if not candidate.resolve().is_relative_to(root):  # "../../x.jpg" or an absolute path
            raise ValueError(f"{source}: image id {image.get('id')!r} names {name!r}, outside the images folder "
                             f"{images_dir}; refused")
        tried.append(candidate)
        if candidate.is_file():
            return candidate
    if not tried:
        raise FileNotFoundError(f"{source}: image id {image.get('id')!r} has neither file_name nor coco_url")
    raise FileNotFoundError(f"{source}: image id {image.get('id')!r} not found; tried "
                            + ", ".join(str(p) for p in tried))


def annotation_rle(ann: Mapping[str, Any], height: int, width: int, source: str = "annotation file") -> Dict[str, Any]:
    """Compressed RLE ({"size": [H, W], "counts": bytes}) of an annotation's segmentation.

    Accepts polygons (a list of [x0, y0, x1, y1, ...] parts, merged into one mask), uncompressed
    RLE (counts as a list of ints) and compressed RLE (counts as str or bytes), like
    pycocotools' ``annToRLE``, but checks what pycocotools silently accepts: an RLE whose
    ``size`` is not (height, width) or whose counts do not cover H * W pixels.

    Polygon parts with fewer than 3 points are skipped: pycocotools would read a first part of
    exactly 4 numbers as an [x, y, w, h] box.
    """
    ann_id = ann.get("id")
    segm = ann.get("segmentation")
    where = f"{source}: annotation {ann_id}"
    if segm is None:
        raise AnnotationError(f"{where} has no segmentation")
    if isinstance(segm, list):
        parts = []
        for part in segm:
            if not isinstance(part, (list, tuple)) or len(part) % 2:
                raise AnnotationError(f"{where}: a polygon must be a flat list of x, y pairs, got {str(part)[:60]}")
            if len(part) >= 6:
                parts.append([float(v) for v in part])
        if not parts:
            raise AnnotationError(f"{where}: no polygon with at least 3 points")
        return mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
    if not isinstance(segm, Mapping) or "counts" not in segm or "size" not in segm:
        raise AnnotationError(f"{where}: segmentation is neither polygons nor an RLE with size and counts")
    try:
        size = [int(v) for v in segm["size"]]
    except (TypeError, ValueError):
        raise AnnotationError(f"{where}: RLE size {segm['size']!r} is not [height, width]") from None
    if size != [int(height), int(width)]:
        raise AnnotationError(f"{where}: RLE size {size} does not match its image's height x width "
                              f"[{height}, {width}]")
    counts = segm["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        if sum(counts) != height * width:
            raise AnnotationError(f"{where}: uncompressed RLE counts sum to {sum(counts)}, not H * W = {height * width}")
        return mask_utils.frPyObjects({"size": size, "counts": list(counts)}, height, width)
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            raise AnnotationError(f"{where}: compressed RLE counts are not ASCII") from None
    if not isinstance(counts, bytes):
        raise AnnotationError(f"{where}: RLE counts must be a list, str or bytes, got {type(counts).__name__}")
    return {"size": size, "counts": counts}


def annotation_mask(ann: Mapping[str, Any], height: int, width: int, source: str = "annotation file") -> np.ndarray:
    """(H, W) bool mask of an annotation (polygons, uncompressed or compressed RLE).

    Raises:
        AnnotationError: naming the annotation id, for a missing or malformed segmentation or an
            RLE whose size is not (height, width).
    """
    rle = annotation_rle(ann, height, width, source)
    try:
        mask = mask_utils.decode(rle)
    except Exception as err:  # a corrupt counts string
        raise AnnotationError(f"{source}: annotation {ann.get('id')}: RLE cannot be decoded ({err})") from err
    return np.ascontiguousarray(mask, dtype=bool)


def mask_to_rle(mask: np.ndarray) -> Dict[str, Any]:
    """COCO results-format compressed RLE of an (H, W) mask: {"size": [H, W], "counts": str}."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def xywh_to_xyxy(box: Sequence[float]) -> np.ndarray:
    """COCO [x, y, w, h] -> (4,) float64 [x0, y0, x1, y1] (x1 = x + w, as pycocotools does)."""
    box = np.asarray(box, dtype=np.float64).reshape(-1)
    if box.shape != (4,):
        raise ValueError(f"expected a box of 4 numbers [x, y, w, h], got {box.size}")
    return np.array([box[0], box[1], box[0] + box[2], box[1] + box[3]])


def xyxy_to_xywh(box: Sequence[float]) -> np.ndarray:
    """(4,) [x0, y0, x1, y1] -> COCO [x, y, w, h], float64."""
    box = np.asarray(box, dtype=np.float64).reshape(-1)
    if box.shape != (4,):
        raise ValueError(f"expected a box of 4 numbers [x0, y0, x1, y1], got {box.size}")
    return np.array([box[0], box[1], box[2] - box[0], box[3] - box[1]])
