"""Synthetic data in the real SA-1B, COCO and LVIS formats: images with known object masks.

Each image is a textured background with a few shapes (rectangles, ellipses, triangles) in
random colours and textures, drawn in order so later shapes occlude earlier ones; every
object's mask is its visible region. Written exactly as the released data is: ``sa_<id>.jpg``
+ ``sa_<id>.json`` with COCO compressed RLE, optionally as ``sa_000000.tar`` shards, and a
held-out split as COCO and LVIS instance files (category = shape kind).
"""
import io
import json
import multiprocessing
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = [
    {"id": 1, "name": "rectangle", "frequency": "f"},
    {"id": 2, "name": "ellipse", "frequency": "c"},
    {"id": 3, "name": "triangle", "frequency": "r"},
]


def _texture(rng: np.random.Generator, h: int, w: int, colour: np.ndarray, flat: bool = False) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    kind = 2 if flat else rng.integers(3)
    if kind == 0:  # stripes
        period = rng.uniform(6, 20)
        pattern = 0.5 + 0.5 * np.sin((xx * rng.uniform(-1, 1) + yy) / period * 2 * np.pi)
    elif kind == 1:  # checker
        size = int(rng.integers(5, 15))
        pattern = ((xx // size + yy // size) % 2).astype(np.float32)
    else:  # flat
        pattern = np.ones((h, w), np.float32)
    shade = 0.75 + 0.25 * pattern[..., None]
    return np.clip(colour * shade + rng.normal(0, 6, (h, w, 3)), 0, 255)


def _shape_mask(rng: np.random.Generator, kind: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    ry, rx = rng.uniform(0.08, 0.3) * h, rng.uniform(0.08, 0.3) * w
    if kind == 1:  # rectangle
        return (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
    if kind == 2:  # ellipse
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, 3)
    pts = np.stack([cx + rx * 1.3 * np.cos(angles), cy + ry * 1.3 * np.sin(angles)], 1)
    inside = np.ones((h, w), bool)
    for i in range(3):  # same side of every edge as the opposite vertex
        (x0, y0), (x1, y1), (x2, y2) = pts[i], pts[(i + 1) % 3], pts[(i + 2) % 3]
        side = (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)
        ref = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
        inside &= side * ref > 0
    return inside


ALL_KINDS = (1, 2, 3)


def split_image_id(seed: int, index: int) -> int:
    """The id of a split's ``index``-th image (0-based): splits of different seeds never share ids."""
    return seed * 1_000_000 + index + 1


# Re-draws allowed per shape for max_occlusion / min_contrast (bounded: an image always finishes).
PLACEMENT_TRIES = 10


def _hidden_fraction(mask: np.ndarray, objects: List[Dict]) -> float:
    """The largest share of an earlier object's drawn area that would be hidden (by ``mask``
    and the shapes already over it) if ``mask`` were drawn."""
    worst = 0.0
    for obj in objects:
        left = float((obj["mask"] & ~mask).sum())
        worst = max(worst, 1.0 - left / obj["area"])
    return worst


def _contrast(colour: np.ndarray, covered: List[np.ndarray]) -> float:
    """The smallest RGB distance between ``colour`` and the base colours it is drawn over."""
    return min(float(np.linalg.norm(colour - c)) for c in covered) if covered else float("inf")


def render_image(seed: int, height: int = 240, width: int = 320, max_objects: int = 5,
                 kinds: Sequence[int] = ALL_KINDS, flat: bool = False, max_occlusion: float = 1.0,
                 min_contrast: float = 0.0) -> Tuple[np.ndarray, List[Dict]]:
    """One synthetic image (H, W, 3) uint8 and its objects [{mask (H, W) bool, category_id}].
    ``kinds``: the shape categories drawn (1 rectangle, 2 ellipse, 3 triangle); ``flat``: plain
    colours instead of stripes and checkers (an easier task, for short tests).
    ``max_occlusion`` < 1: a shape that would leave an earlier object with more than this share
    of its drawn area hidden is re-drawn elsewhere (same random stream, at most ``PLACEMENT_TRIES`` times;
    then the least occluding draw is kept). ``min_contrast`` > 0: an object's colour is re-drawn
    (as often) until its RGB distance to the background's and to every object it covers is at
    least this. The defaults (1.0, 0) draw nothing again: the default data never changes."""
    rng = np.random.default_rng(seed)
    background = rng.uniform(60, 200, 3)
    image = _texture(rng, height, width, background, flat)
    objects: List[Dict] = []
    for _ in range(int(rng.integers(2, max_objects + 1))):
        kind = int(rng.integers(1, 4))
        if kind not in kinds:  # the same random stream as with every kind: the default data never changes
            kind = int(kinds[(kind - 1) % len(kinds)])
        mask = _shape_mask(rng, kind, height, width)
        if max_occlusion < 1.0 and objects:
            best, best_hidden = mask, _hidden_fraction(mask, objects)
            for _ in range(PLACEMENT_TRIES):
                if best_hidden <= max_occlusion:
                    break
                mask = _shape_mask(rng, kind, height, width)
                hidden = _hidden_fraction(mask, objects)
                if hidden < best_hidden:
                    best, best_hidden = mask, hidden
            mask = best
        if mask.sum() < 50:
            continue
        colour = rng.uniform(0, 255, 3)
        if min_contrast > 0:
            covered = [background] + [o["colour"] for o in objects if (o["mask"] & mask).any()]
            for _ in range(PLACEMENT_TRIES):
                if _contrast(colour, covered) >= min_contrast:
                    break
                colour = rng.uniform(0, 255, 3)
        image[mask] = _texture(rng, height, width, colour, flat)[mask]
        for obj in objects:  # occlusion: earlier objects lose what the new one covers
            obj["mask"] &= ~mask
        objects.append({"mask": mask, "category_id": kind, "colour": colour, "area": float(mask.sum())})
    objects = [{"mask": o["mask"], "category_id": o["category_id"]} for o in objects if o["mask"].sum() >= 30]
    return image.astype(np.uint8), objects


def _rle(mask: np.ndarray) -> Dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _bbox(rle: Dict) -> List[float]:
    return [float(v) for v in mask_utils.toBbox(rle)]


def sa1b_record(image_id: int, objects: List[Dict], height: int, width: int) -> Dict:
    anns = []
    for j, obj in enumerate(objects):
        rle = _rle(obj["mask"])
        ys, xs = np.nonzero(obj["mask"])
        anns.append({
            "id": image_id * 1000 + j,
            "segmentation": rle,
            "bbox": _bbox(rle),
            "area": int(obj["mask"].sum()),
            "predicted_iou": 1.0,
            "stability_score": 1.0,
            "crop_box": [0, 0, width, height],
            "point_coords": [[float(xs[len(xs) // 2]), float(ys[len(ys) // 2])]],
        })
    return {"image": {"image_id": image_id, "width": width, "height": height, "file_name": f"sa_{image_id}.jpg"},
            "annotations": anns}


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _sa1b_sample(image_id: int, height: int, width: int, kinds: Sequence[int], **render: Any) -> Tuple[bytes, bytes]:
    """(JPEG bytes, SA-1B JSON bytes) of one image; a function of its id (and options) alone."""
    image, objects = render_image(image_id, height, width, kinds=kinds, **render)
    return _jpeg(image), json.dumps(sa1b_record(image_id, objects, height, width)).encode()


def _rendered(image_ids: Sequence[int], height: int, width: int, kinds: Sequence[int],
              **render: Any) -> Iterator[Tuple[bytes, bytes]]:
    """The samples of ``image_ids`` in order, rendered on every core for large counts (each
    image depends on its id only, so the bytes are the same however they are split)."""
    job = partial(_sa1b_sample, height=height, width=width, kinds=tuple(kinds), **render)
    workers = min(os.cpu_count() or 1, 8)
    if len(image_ids) < 64 or workers < 2:
        yield from map(job, image_ids)
        return
    # fork where there is one: spawned workers would first re-import torch (seconds each)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        yield from pool.map(job, image_ids, chunksize=16)


def write_sa1b(root: Path, num_images: int, seed: int = 0, height: int = 240, width: int = 320,
               images_per_shard: int = 0, kinds: Sequence[int] = ALL_KINDS, **render: Any) -> List[Path]:
    """Write ``num_images`` SA-1B samples into ``root`` as files, or as tar shards of
    ``images_per_shard`` if > 0; ``render``: options of :func:`render_image` (max_objects, flat).
    Returns the written paths."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written, tar = [], None
    image_ids = [split_image_id(seed, i) for i in range(num_images)]
    for i, (sample_id, (jpg, js)) in enumerate(zip(image_ids, _rendered(image_ids, height, width, kinds, **render))):
        if images_per_shard <= 0:
            (root / f"sa_{sample_id}.jpg").write_bytes(jpg)
            (root / f"sa_{sample_id}.json").write_bytes(js)
            written.append(root / f"sa_{sample_id}.jpg")
            continue
        if i % images_per_shard == 0:
            if tar is not None:
                tar.close()
            written.append(root / f"sa_{i // images_per_shard:06d}.tar")
            tar = tarfile.open(written[-1], "w")
        for name, payload in ((f"sa_{sample_id}.jpg", jpg), (f"sa_{sample_id}.json", js)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    if tar is not None:
        tar.close()
    return written


def write_instances(root: Path, num_images: int, seed: int = 1, height: int = 240, width: int = 320,
                    kinds: Sequence[int] = ALL_KINDS, **render: Any) -> Dict[str, Path]:
    """A held-out split: ``images/*.jpg`` plus ``instances_coco.json`` and ``instances_lvis.json``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        sample_id = split_image_id(seed, i)
        image, objects = render_image(sample_id, height, width, kinds=kinds, **render)
        name = f"{sample_id:012d}.jpg"
        (root / "images" / name).write_bytes(_jpeg(image))
        images.append({"id": sample_id, "file_name": name, "height": height, "width": width,
                       "coco_url": f"http://images.cocodataset.org/val2017/{name}"})
        for obj in objects:
            rle = _rle(obj["mask"])
            anns.append({"id": len(anns) + 1, "image_id": sample_id, "category_id": obj["category_id"],
                         "segmentation": rle, "area": float(obj["mask"].sum()), "bbox": _bbox(rle), "iscrowd": 0})
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": c["id"], "name": c["name"], "supercategory": "shape"} for c in CATEGORIES]}
    lvis_images = [dict(im, neg_category_ids=[], not_exhaustive_category_ids=[]) for im in images]
    lvis = {"images": lvis_images, "annotations": [{k: v for k, v in a.items() if k != "iscrowd"} for a in anns],
            "categories": [dict(c, synset=f"{c['name']}.n.01", image_count=0, instance_count=0) for c in CATEGORIES]}
    paths = {"coco": root / "instances_coco.json", "lvis": root / "instances_lvis.json"}
    paths["coco"].write_text(json.dumps(coco))
    paths["lvis"].write_text(json.dumps(lvis))
    return paths
