"""Running SAM models for zero-shot evaluation: prompted mIoU and detections-as-prompts.

Models come from :func:`load_sam_model` (stock SAM, this toolkit's dense encoders, bLViT-SAM).
Per image the embedding is computed once and every prompt of the image is decoded in batches.
Results per image go to a JSON-lines cache as soon as they exist, so an interrupted run resumes
where it stopped; under ``torchrun`` each process takes a stride of the images, writes its own
cache, and rank 0 merges them.
"""
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from tqdm import tqdm

from blvit.flops import module_macs_on_meta
from blvit_deploy.images import read_image  # noqa: F401  (re-exported: eval.sam_eval.read_image)
from blvit.utils.io import atomic_write_text, read_checkpoint

from .annotations import AnnotationSet, mask_to_rle, xywh_to_xyxy
from .metrics import ResultsError, mask_iou
from .prompts import Clicker, box_problem, box_prompt, random_points, random_points_problem

logger = logging.getLogger(__name__)

STOCK = ("vit_b", "vit_l", "vit_h")
PROMPT_CHUNK = 64  # prompts decoded together; bounds memory on images with many objects


def load_sam_model(model: str, checkpoint: Optional[str] = None, keep_ratio: Optional[float] = None,
                   attn_backend: Optional[str] = None) -> Tuple[Sam, Dict[str, Any]]:
    """Build the model ``--model``/``--checkpoint`` name.

    ``model``: ``vit_b``/``vit_l``/``vit_h`` (segment-anything's encoder; checkpoint: an official
    SAM file), ``dense_vit_b``/``_l``/``_h`` (this toolkit's SDPA encoder; an official SAM file
    or a dense checkpoint of this toolkit), ``b+t``/``h+b`` (a bLViT-SAM checkpoint of this
    toolkit; an official SAM file only initialises the P-blocks, and says so). Without a
    checkpoint the model is randomly initialised, with a loud warning. ``attn_backend``: how this
    toolkit's encoders add the relative-position bias (``blvit.layers.ATTENTION_BACKENDS``).
    """
    from sam_adapter.build import build_sam_blvit, build_sam_from_checkpoint, build_sam_stock, sam_model_registry
    from sam_adapter.checkpoint import FORMAT
    from sam_adapter.config import VARIANTS

    if model not in sam_model_registry:
        raise ValueError(f"unknown --model {model!r}; choose one of {sorted(sam_model_registry)}")
    info = {"model": model, "checkpoint": str(checkpoint) if checkpoint else None}
    if checkpoint is None:
        warnings.warn(f"--model {model} without --checkpoint: RANDOMLY INITIALISED weights, the figures are meaningless",
                      UserWarning, stacklevel=2)
    own_format = checkpoint is not None and read_checkpoint(checkpoint).get("format") == FORMAT
    if attn_backend is not None and model in STOCK:
        raise ValueError(f"--attn-backend applies to this toolkit's encoders (dense_{model}, b+t, h+b), "
                         f"not to segment_anything's --model {model}")
    if model in STOCK:
        if own_format:
            raise ValueError(f"{checkpoint}: a checkpoint of this toolkit; stock SAM --model {model} takes an official "
                             f"SAM file (use --model dense_{model} or b+t / h+b)")
        sam = build_sam_stock(model, checkpoint)
    elif own_format:
        sam = build_sam_from_checkpoint(checkpoint, keep_ratio)
        stored = sam.image_encoder.config.reduction
        if not model.startswith("dense_") and stored != VARIANTS[model].get("reduction", ""):
            raise ValueError(f"{checkpoint}: holds a {stored or 'bLViT'} encoder ({sam.image_encoder.config.name!r}) "
                             f"but --model {model} asks for {VARIANTS[model].get('reduction') or 'bLViT'}")
        dense_wanted, dense_found = model.startswith("dense_"), sam.image_encoder.config.is_dense
        if dense_wanted != dense_found:
            raise ValueError(f"{checkpoint}: holds a {'dense' if dense_found else 'bLViT'} encoder "
                             f"({sam.image_encoder.config.name!r}) but --model {model} asks for a "
                             f"{'dense' if dense_wanted else 'bLViT'} one")
    elif model.startswith("dense_"):
        sam = sam_model_registry[model](checkpoint)
    else:
        reduction = VARIANTS[model].get("reduction")
        if checkpoint is not None and not reduction:
            warnings.warn(f"{checkpoint} is not a bLViT-SAM checkpoint: loading it as an official SAM file into the "
                          f"P-blocks; E-blocks and predictors stay UNTRAINED", UserWarning, stacklevel=2)
        # a token-reduction baseline has no parameters of its own: an official SAM file is all of it
        sam = build_sam_blvit(model, sam_checkpoint=checkpoint, keep_ratio=keep_ratio or (None if reduction else 0.25))
    encoder = sam.image_encoder
    info.update(encoder=type(encoder).__name__, img_size=int(encoder.img_size))
    if model not in STOCK:
        from blvit.layers import set_attention_backend

        set_attention_backend(encoder, attn_backend or "sdpa")
        info.update(attn_backend=attn_backend or "sdpa")
    if hasattr(encoder, "config"):
        # a dense layout routes nothing: its config's keep ratio means nothing
        cfg = encoder.config
        tome = cfg.reduction == "tome"  # ToMe's knob is merge_r: its keep ratio means nothing
        info.update(layout=cfg.name, keep_ratio=None if cfg.is_dense or tome else cfg.keep_ratio,
                    merge_r=cfg.merge_r if tome else None)
    return sam.eval(), info


class PredictionCache:
    """One JSON-lines file per process: a signature line, then ``{"image_id", "records"}`` lines.

    A cache made with other settings (model, checkpoint, prompts, ...) is refused, not mixed in.
    """

    def __init__(self, path: Path, signature: Dict[str, Any], fresh: bool = False) -> None:
        self.path, self.signature = Path(path), json.loads(json.dumps(signature))
        self.done: Dict[int, List[Dict[str, Any]]] = {}
        if self.path.exists() and not fresh:
            lines = self.path.read_text().splitlines()
            found = json.loads(lines[0]).get("signature") if lines else None
            if found != self.signature:
                raise ValueError(f"{self.path}: cached predictions were made with {found}, this run is {self.signature}; "
                                 "pass --fresh to discard them or choose another --out")
            for line in lines[1:]:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by an interruption: redo that image
                    continue
                self.done[int(row["image_id"])] = row["records"]
            # rewrite without the cut line, so that new lines do not get appended to its tail
            atomic_write_text(self.path, "".join(json.dumps(x) + "\n" for x in [{"signature": self.signature}] + [
                {"image_id": k, "records": v} for k, v in self.done.items()]))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"signature": self.signature}) + "\n")

    def add(self, image_id: int, records: List[Dict[str, Any]]) -> None:
        self.done[image_id] = records
        with open(self.path, "a") as f:
            f.write(json.dumps({"image_id": image_id, "records": records}) + "\n")
            f.flush()


class Encoder:
    """A ``SamPredictor`` that times the image encoder and runs it under bf16 on GPU."""

    def __init__(self, sam: Sam, device: torch.device, amp: bool) -> None:
        self.predictor = SamPredictor(sam.to(device))
        self.device, self.amp, self.seconds = device, amp, []

    def set_image(self, image: np.ndarray) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            self.predictor.set_image(image)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds.append(time.perf_counter() - start)

    def decode(self, coords: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
               boxes: Optional[np.ndarray] = None, mask_input: Optional[torch.Tensor] = None,
               multimask: bool = False) -> Tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """Prompts for M objects -> masks (M, K, H, W) bool, predicted IoU (M, K), low-res logits.

        coords (M, P, 2) xy and labels (M, P) in image pixels; boxes (M, 4) xyxy in image pixels.
        """
        p = self.predictor
        size = p.original_size
        pt = lb = bx = None
        if coords is not None:
            pt = p.transform.apply_coords_torch(torch.as_tensor(coords, dtype=torch.float, device=self.device), size)
            lb = torch.as_tensor(labels, dtype=torch.int, device=self.device)
        if boxes is not None:
            bx = p.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float, device=self.device), size)
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            masks, iou, low = p.predict_torch(pt, lb, bx, mask_input, multimask_output=multimask)
        return masks.cpu().numpy(), iou.float().cpu().numpy(), low.float()

    def images_per_second(self) -> Optional[float]:
        """From the median encoder time (the first image, warm-up, left out when there are more)."""
        times = self.seconds[1:] if len(self.seconds) > 1 else self.seconds
        return float(1.0 / np.median(times)) if times else None


def efficiency(sam: Sam, encoder: Optional[Encoder], device: torch.device, amp: bool) -> Dict[str, Any]:
    """Measured encoder FLOPs (FlopCounterMode on meta) and images/s on this machine."""
    size = int(sam.image_encoder.img_size)
    out = {"encoder_gmacs": module_macs_on_meta(sam.image_encoder, (1, 3, size, size)) / 1e9,
           "images_per_s": encoder.images_per_second() if encoder else None,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
           "dtype": "bf16" if amp else "float32", "input_size": size}
    return out


def _objects(anns: AnnotationSet, image_id: int) -> List[Dict[str, Any]]:
    return [a for a in anns.anns_by_image.get(image_id, []) if not a.get("iscrowd", 0)]


def prompt_image(encoder: Encoder, anns: AnnotationSet, image_id: int, image: np.ndarray, prompt: str, clicks: int,
                 oracle: bool, keep_masks: bool = False, points: int = 1,
                 seed: int = 0) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Evaluate every (non-crowd) object of one image; the image must already be set.

    ``prompt``: "point" (RITM clicks, ``clicks`` rounds), "box" (the ground-truth box) or
    "random-points" (``points`` pixels drawn uniformly from the mask, seeded by (``seed``, image
    id, annotation id); one point: SAM's three masks, the best by predicted IoU, or by ground
    truth with ``oracle``; several: SAM's single mask).

    Returns one record per object ({"ann_id", "area", "iou": [per round]}, plus "points" for
    random points; a skipped object: {"ann_id", "skipped": why}) and, if ``keep_masks``, the
    prompts and masks for drawing.
    """
    info = anns.image(image_id)
    objects, gts, skipped = [], [], []
    for ann in _objects(anns, image_id):
        problem = box_problem(ann, info["width"], info["height"]) if prompt == "box" else None
        gt = anns.annotation_mask(ann) if problem is None else None
        if gt is not None and prompt == "random-points":
            problem = random_points_problem(gt, points)
        elif gt is not None and not gt.any():
            problem = "empty mask"
        if problem is None:
            objects.append(ann)
            gts.append(gt)
        else:
            skipped.append({"ann_id": ann.get("id"), "skipped": problem, "iou": []})
    if skipped:
        warnings.warn(f"{anns.source}: image {image_id}: {len(skipped)} annotations skipped: "
                      + "; ".join(f"annotation {s['ann_id']}: {s['skipped']}" for s in skipped[:5])
                      + (f"; ... ({len(skipped) - 5} more)" if len(skipped) > 5 else ""))
    records = [{"ann_id": a["id"], "area": float(a.get("area", g.sum())), "iou": []} for a, g in zip(objects, gts)]
    drawn: Dict[str, Any] = {"gt": gts, "pred": [None] * len(gts), "points": [None] * len(gts), "boxes": None}
    for start in range(0, len(objects), PROMPT_CHUNK):
        part = range(start, min(start + PROMPT_CHUNK, len(objects)))
        if prompt == "box":
            boxes = np.stack([box_prompt(objects[i]) for i in part])
            masks, _, _ = encoder.decode(boxes=boxes, multimask=False)
            for j, i in enumerate(part):
                records[i]["iou"].append(mask_iou(masks[j, 0], gts[i]))
                drawn["pred"][i] = masks[j, 0]
            drawn["boxes"] = boxes if drawn["boxes"] is None else np.concatenate([drawn["boxes"], boxes])
            continue
        if prompt == "random-points":
            coords = np.stack([random_points(gts[i], points, (seed, image_id, objects[i]["id"])) for i in part])
            labels = np.ones(coords.shape[:2], np.int32)
            masks, iou_pred, _ = encoder.decode(coords.astype(np.float32), labels, multimask=points == 1)
            for j, i in enumerate(part):
                scores = [mask_iou(m, gts[i]) for m in masks[j]] if oracle else iou_pred[j]
                pred = masks[j, int(np.argmax(scores))]
                records[i]["iou"].append(mask_iou(pred, gts[i]))
                records[i]["points"] = coords[j].tolist()
                drawn["pred"][i] = pred
                drawn["points"][i] = [(int(x), int(y), 1) for x, y in coords[j]]
            continue
        clickers = [Clicker(gts[i]) for i in part]  # RITM's: history kept, no pixel clicked twice
        points = [[clicker.next_click()] for clicker in clickers]
        low = None
        for round_ in range(clicks):
            coords = np.array([[c[:2] for c in pts] for pts in points], np.float32)
            labels = np.array([[c[2] for c in pts] for pts in points], np.int32)
            # one click is ambiguous: three masks, pick one; later clicks refine the previous logits
            multimask = round_ == 0
            masks, iou_pred, low_all = encoder.decode(coords, labels, mask_input=low, multimask=multimask)
            chosen = np.zeros(len(part), int)
            for j, i in enumerate(part):
                if masks.shape[1] > 1:
                    scores = [mask_iou(m, gts[i]) for m in masks[j]] if oracle else iou_pred[j]
                    chosen[j] = int(np.argmax(scores))
                pred = masks[j, chosen[j]]
                records[i]["iou"].append(mask_iou(pred, gts[i]))
                drawn["pred"][i] = pred
                if round_ + 1 < clicks:
                    points[j].append(clickers[j].next_click(pred))
            low = low_all[torch.arange(len(part)), torch.as_tensor(chosen)].unsqueeze(1)
        for j, i in enumerate(part):
            drawn["points"][i] = points[j]
    # skipped annotations are recorded (with no IoU) so the report can count them after a resume
    return records + skipped, (drawn if keep_masks else {})


def instance_image(encoder: Encoder, detections: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One mask per detected box (COCO results format in and out); the image must be set."""
    results = []
    for start in range(0, len(detections), PROMPT_CHUNK):
        part = detections[start : start + PROMPT_CHUNK]
        boxes = np.stack([xywh_to_xyxy(d["bbox"]) for d in part])
        masks, _, _ = encoder.decode(boxes=boxes, multimask=False)
        for d, m in zip(part, masks[:, 0]):
            results.append({"image_id": d["image_id"], "category_id": d["category_id"], "score": float(d["score"]),
                            "bbox": [float(v) for v in d["bbox"]], "segmentation": mask_to_rle(m)})
    return results


def check_detections(anns: AnnotationSet, detections: Any, source: str) -> Dict[int, List[Dict[str, Any]]]:
    """Validate a COCO results-format detection list; group it by image id."""
    if not isinstance(detections, list):
        raise ResultsError(f"{source}: expected a JSON list of detections, got {type(detections).__name__}")
    by_image: Dict[int, List[Dict[str, Any]]] = {}
    for i, d in enumerate(detections):
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if not isinstance(d, dict) or k not in d]
        if missing:
            raise ResultsError(f"{source}: detection {i} lacks {missing}")
        by_image.setdefault(int(d["image_id"]), []).append(d)
    unknown = sorted(set(by_image) - set(anns.images))
    if unknown:
        raise ResultsError(f"{source}: {len(unknown)} image ids not in {anns.source}, e.g. {unknown[:10]}")
    bad_cat = sorted({int(d["category_id"]) for d in detections} - set(anns.categories))
    if bad_cat:
        raise ResultsError(f"{source}: category ids not in {anns.source}: {bad_cat[:10]}")
    return by_image


def run_images(image_ids: Sequence[int], anns: AnnotationSet, images_dir: Path, encoder: Encoder, cache: PredictionCache,
               work: Callable[[int, np.ndarray], List[Dict[str, Any]]], desc: str, show: bool = True,
               strict: bool = False) -> Dict[int, str]:
    """Set each image not yet cached, run ``work`` on it and cache its records.

    An image file that cannot be read (corrupt, or refused as a decompression bomb) is skipped
    with a warning naming it, and is not cached, so a rerun after fixing it picks it up; with
    ``strict`` it stops the run. A missing file or one whose size contradicts the annotations
    always stops it (the wrong folder or the wrong annotation file). Returns {image_id: why} of
    the skipped images.
    """
    todo = [i for i in image_ids if i not in cache.done]
    skipped: Dict[int, str] = {}
    for image_id in tqdm(todo, desc=desc, disable=not show):
        try:
            image = read_image(anns.image_path(image_id, images_dir))
        except ValueError as err:
            if strict:
                raise
            warnings.warn(f"image {image_id} skipped: {err}")
            skipped[image_id] = str(err)
            continue
        info = anns.image(image_id)
        if image.shape[:2] != (info["height"], info["width"]):
            raise ValueError(f"{anns.image_path(image_id, images_dir)}: image is {image.shape[1]}x{image.shape[0]} but "
                             f"{anns.source} says {info['width']}x{info['height']}")
        encoder.set_image(image)
        cache.add(image_id, work(image_id, image))
    return skipped


def merge_caches(paths: Iterable[Path]) -> Dict[int, List[Dict[str, Any]]]:
    merged: Dict[int, List[Dict[str, Any]]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines()[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            merged[int(row["image_id"])] = row["records"]
    return merged
