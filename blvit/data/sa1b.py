"""SA-1B: the extracted folder layout and the released tar shards, with SAM's preprocessing.

Samples are addressed by index (map-style), so ``DistributedSampler`` shards them and a resumed
run continues at the exact sample. Tar shards are indexed once by scanning their headers and
then read member by member at their byte offsets: nothing is unpacked to disk.
"""
import io
import json
import logging
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from segment_anything.utils.transforms import ResizeLongestSide

logger = logging.getLogger(__name__)

PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)


class SampleError(ValueError):
    """A sample that cannot be used; the message names its file."""


@dataclass(frozen=True)
class SampleRef:
    """Where one image and its annotation live: plain files, or members of a tar shard."""

    name: str
    image: Tuple[str, int, int]  # (path, offset, size); size -1 = whole file
    annotation: Tuple[str, int, int]


def _folder_refs(root: Path) -> List[SampleRef]:
    refs = []
    for jpg in sorted(root.glob("sa_*.jpg")):
        js = jpg.with_suffix(".json")
        if js.exists():
            refs.append(SampleRef(str(jpg), (str(jpg), 0, -1), (str(js), 0, -1)))
        else:
            logger.warning("%s: no matching .json, skipped", jpg)
    return refs


def _shard_refs(shard: Path, strict: bool) -> List[SampleRef]:
    members: Dict[str, Tuple[int, int]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                if m.isfile():
                    members[m.name] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as err:
        message = f"{shard}: unreadable tar shard ({err}); {len(members)} members indexed before the damage"
        if strict:
            raise SampleError(message) from err
        warnings.warn(message)
    size = shard.stat().st_size
    refs = []
    for name, (offset, length) in sorted(members.items()):
        if not name.endswith(".jpg"):
            continue
        js = name[:-4] + ".json"
        if js not in members:
            continue
        if offset + length > size or members[js][0] + members[js][1] > size:
            message = f"{shard}: member {name} is truncated"
            if strict:
                raise SampleError(message)
            warnings.warn(message)
            continue
        refs.append(SampleRef(f"{shard}:{name}", (str(shard), offset, length), (str(shard), *members[js])))
    return refs


def find_samples(root: Path, shards: Optional[Sequence[str]] = None, strict: bool = False) -> List[SampleRef]:
    """All samples under ``root``: ``sa_*.jpg``/``.json`` pairs and ``sa_*.tar`` shards
    (only the named ``shards`` if given)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: SA-1B data folder not found")
    tar_paths = sorted(root.glob("*.tar"))
    if isinstance(shards, (str, Path)):  # one shard named on its own (data.shards=sa_000001.tar)
        shards = [shards]
    if shards:
        wanted = {Path(s).name for s in shards}
        missing = wanted - {p.name for p in tar_paths}
        if missing:
            raise FileNotFoundError(f"{root}: shards not found: {sorted(missing)}")
        tar_paths = [p for p in tar_paths if p.name in wanted]
    refs = [] if shards else _folder_refs(root)
    for shard in tar_paths:
        refs.extend(_shard_refs(shard, strict))
    if not refs:
        raise FileNotFoundError(f"{root}: no SA-1B samples (sa_*.jpg + sa_*.json, or *.tar shards)")
    return refs


def select_subset(refs: List[SampleRef], fraction: Optional[float] = None, count: Optional[int] = None,
                  seed: int = 0) -> List[SampleRef]:
    """A deterministic subset: the same seed gives the same samples on every machine."""
    if fraction is None and count is None:
        return refs
    n = len(refs) if count is None else min(count, len(refs))
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"data.fraction must be in (0, 1], got {fraction}")
        n = min(n, max(1, round(fraction * len(refs))))
    order = np.random.default_rng(seed).permutation(len(refs))[:n]
    return [refs[i] for i in sorted(order)]


def _read(where: Tuple[str, int, int]) -> bytes:
    path, offset, size = where
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read() if size < 0 else f.read(size)
    if size >= 0 and len(data) != size:
        raise SampleError(f"{path}: expected {size} bytes at offset {offset}, read {len(data)} (truncated)")
    return data


# EXIF orientation tag; the orientations that show the stored pixels turned by 90 degrees
EXIF_ORIENTATION, EXIF_TRANSPOSED = 0x0112, (5, 6, 7, 8)

# SAM's box noise: std 10 % of the side, "to a maximum of 20 pixels" of its 1024-px input.
NOISE_CAP_PX, SAM_INPUT_SIZE = 20.0, 1024


class SA1BDataset(torch.utils.data.Dataset):
    """SA-1B samples prepared for SAM training.

    Each item: ``image`` (3, S, S) normalised and padded; ``boxes`` (M, 4) xyxy with noise and
    ``points`` (M, 1, 2) one positive point inside each mask, both in the input frame exactly as
    ``SamPredictor`` maps an image's pixel coordinates (``ResizeLongestSide``);
    ``masks`` (M, R, R) targets at resolution R = ``mask_size``: the mask decoder's (SAM: 4 x
    the encoder's grid, S/4 for 16-pixel patches) or finer, up to S (the training then upsamples
    the logits to R, ``data.mask_size``): each cell 1 where at least half of its input
    pixels are the object (``mask_targets="binary"``; bool), or that share itself (``"area"``;
    float32, bool where R = S and every share is 0 or 1); ``valid`` (M,)
    which of the ``max_masks`` slots hold a mask; ``use_box`` (M,) box or point prompt; ``input_hw``
    (2,) the resized image's size inside the padded input; ``index``
    the sample's position in ``refs`` (for the teacher-embedding cache). Randomness comes from
    (seed, epoch, index), so it does not depend on worker or rank.
    """

    def __init__(self, refs: List[SampleRef], img_size: int = 1024, max_masks: int = 16, box_noise: float = 0.1,
                 seed: int = 0, strict: bool = False, box_fraction: float = 0.5, mask_size: Optional[int] = None,
                 mask_targets: str = "binary") -> None:
        if mask_targets not in ("binary", "area"):
            raise ValueError(f"mask_targets {mask_targets!r}: choose binary or area")
        self.mask_targets = mask_targets
        self.refs, self.img_size, self.max_masks, self.box_fraction = refs, img_size, max_masks, box_fraction
        self.mask_size = img_size // 4 if mask_size is None else mask_size
        if img_size % self.mask_size:
            raise ValueError(f"mask_size {self.mask_size} does not divide img_size {img_size}")
        self.box_noise, self.seed, self.strict, self.epoch = box_noise, seed, strict, 0
        self.transform = ResizeLongestSide(img_size)

    def __len__(self) -> int:
        return len(self.refs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, ref: SampleRef) -> Tuple[np.ndarray, List[np.ndarray]]:
        """Decode image and masks; raises ``SampleError`` naming the file on any defect."""
        try:
            opened = Image.open(io.BytesIO(_read(ref.image)))
            orientation = opened.getexif().get(EXIF_ORIENTATION, 1)
            image = np.asarray(opened.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise SampleError(f"{ref.name}: corrupt or unreadable image ({err})") from err
        except Image.DecompressionBombError as err:  # a few hundred kB that decode to gigabytes
            raise SampleError(f"{ref.name}: image refused, too many pixels ({err})") from err
        try:
            record = json.loads(_read(ref.annotation))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SampleError(f"{ref.name}: annotation is not valid JSON ({err})") from err
        if not isinstance(record, dict) or "annotations" not in record:
            raise SampleError(f"{ref.name}: annotation JSON has no 'annotations' list")
        h, w = image.shape[:2]
        masks = []
        if not isinstance(record["annotations"], list):
            raise SampleError(f"{ref.name}: 'annotations' is not a list")
        for position, ann in enumerate(record["annotations"]):
            if not isinstance(ann, dict):
                raise SampleError(f"{ref.name}: annotation {position} is not an object ({ann!r:.40})")
            seg = ann.get("segmentation")
            if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
                raise SampleError(f"{ref.name}: annotation {ann.get('id')} has no COCO RLE segmentation")
            if list(seg["size"]) != [h, w]:
                hint = ""
                if orientation in EXIF_TRANSPOSED and list(seg["size"]) == [w, h]:
                    hint = (f" (the file's EXIF orientation {orientation} turns it by 90 degrees when displayed: the "
                            "masks were drawn on the turned image; write the pixels turned and drop the tag)")
                raise SampleError(f"{ref.name}: RLE of annotation {ann.get('id')} is {seg['size']} but the image is "
                                  f"{[h, w]}{hint}")
            if isinstance(seg["counts"], list):  # uncompressed RLE (COCO's iscrowd form): compress it
                try:
                    seg = mask_utils.frPyObjects(seg, h, w)
                except Exception as err:
                    raise SampleError(f"{ref.name}: annotation {ann.get('id')} has a corrupt uncompressed RLE "
                                      f"({err})") from err
            try:
                masks.append(mask_utils.decode(seg).astype(bool))
            except Exception as err:
                raise SampleError(f"{ref.name}: annotation {ann.get('id')} has a corrupt RLE ({err})") from err
        masks = [m for m in masks if m.any()]
        if not masks:
            raise SampleError(f"{ref.name}: image has no masks")
        return image, masks

    def __getitem__(self, index: int) -> Optional[Dict[str, torch.Tensor]]:
        ref = self.refs[index]
        try:
            image, masks = self.load(ref)
        except SampleError as err:
            if self.strict:
                raise
            warnings.warn(f"skipped: {err}")
            return None
        rng = np.random.default_rng((self.seed, self.epoch, index))
        item = self.prepare(image, masks, rng)
        item["index"] = torch.tensor(index)
        return item

    def prepare(self, image: np.ndarray, masks: List[np.ndarray], rng: np.random.Generator) -> Dict[str, torch.Tensor]:
        s, m = self.img_size, self.max_masks
        chosen = rng.permutation(len(masks))[:m]
        original = image.shape[:2]
        resized = self.transform.apply_image(image)
        rh, rw = resized.shape[:2]
        pixels = np.zeros((s, s, 3), np.float32)
        pixels[:rh, :rw] = (resized.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
        low = self.mask_size
        stride = s // low
        # 0/1 targets travel as bool (a quarter of float32's bytes: 16 masks of a 1024-px input at
        # data.mask_size=input are 16 MB, not 64) and become float in the loss; area shares stay float
        binary = self.mask_targets == "binary" or stride == 1
        targets = np.zeros((m, low, low), bool if binary else np.float32)
        boxes = np.zeros((m, 4), np.float32)
        points = np.zeros((m, 1, 2), np.float32)
        valid = np.zeros(m, bool)
        use_box = rng.random(m) < self.box_fraction  # SAM trains on a box or a point, with equal odds
        for slot, j in enumerate(chosen):
            mask = masks[j]
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1  # = COCO's x, y, x + w, y + h
            # prompts in the frame SamPredictor gives the prompt encoder: image pixel (x, y) indices
            # mapped by ResizeLongestSide (the prompt encoder adds the half-pixel itself)
            box = self.transform.apply_boxes(np.array([[x0, y0, x1, y1]], np.float64), original)[0]
            # box noise as in SAM's training, in its input frame: a standard deviation of a fraction
            # of the side, at most 20 px of a 1024-px input (scaled with the input size)
            side = np.array([box[2] - box[0], box[3] - box[1]] * 2)
            noise = np.minimum(self.box_noise * side, NOISE_CAP_PX * s / SAM_INPUT_SIZE) * rng.standard_normal(4)
            boxes[slot] = (box + noise).clip(0, [rw, rh] * 2)
            k = rng.integers(len(xs))
            points[slot, 0] = self.transform.apply_coords(np.array([[xs[k], ys[k]]], np.float32), original)[0]
            targets[slot] = mask_target(mask, (rh, rw), s, low, binary)
            valid[slot] = True
        return {
            "image": torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),
            "boxes": torch.from_numpy(boxes),
            "points": torch.from_numpy(points),
            "masks": torch.from_numpy(targets),
            "valid": torch.from_numpy(valid),
            "use_box": torch.from_numpy(use_box),
            # (h, w) of the resized image inside the padded input: clicks never land on the padding
            "input_hw": torch.tensor([rh, rw]),
        }


def mask_target(mask: np.ndarray, resized_hw: Tuple[int, int], input_size: int, low: int, binary: bool) -> np.ndarray:
    """One object's training target on the (low, low) grid of the padded input.

    Each cell's share of object pixels is the area share (the mask box-filtered to the resized
    image, to 1/255, then averaged over the cell), so thin and small objects keep their share
    instead of vanishing in a nearest-neighbour resize. ``binary``: cells at least half covered;
    an object that covers no cell by half (a pole, a wire, a few pixels) keeps its most-covered
    cells (those at half its highest share or more), so that its prompt never points at an empty target.

    Args:
        mask: (H, W) bool at the image's resolution; resized_hw: (rh, rw) of the resized image.
    Returns:
        (low, low) bool (``binary``) or float32 shares in [0, 1].
    """
    rh, rw = resized_hw
    stride = input_size // low
    full = np.zeros((input_size, input_size), np.float32)
    # an 8-bit box filter: shares to 1/255, at about the cost of the old nearest resize (a float
    # image takes twice as long, which a loader decoding 16-64 full-size SA-1B masks per image feels)
    resized = Image.fromarray(mask.astype(np.uint8) * np.uint8(255)).resize((rw, rh), Image.BOX)
    full[:rh, :rw] = np.asarray(resized, np.float32) * (1.0 / 255.0)
    share = full.reshape(low, stride, low, stride).mean(axis=(1, 3)).clip(0.0, 1.0)
    if not binary:
        return share
    target = share >= 0.5
    if not target.any() and share.max() > 0:
        target = share >= 0.5 * share.max()
    return target


def collate_skipping(batch: List[Optional[Dict[str, torch.Tensor]]]) -> Dict[str, torch.Tensor]:
    """Stack the usable samples; ``skipped`` counts those dropped (``None``)."""
    kept = [b for b in batch if b is not None]
    out = {k: torch.stack([b[k] for b in kept]) for k in kept[0]} if kept else {}
    out["skipped"] = torch.tensor(len(batch) - len(kept))
    return out
