"""ImageNet in the standard ImageFolder layout with timm's DeiT transforms.

``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``; classes are the sorted folder names
of the training split (hidden folders are not classes), and the validation split must use the
same ones. Augmentation randomness is seeded per sample from (seed, epoch, index, rank), so it
does not depend on the number of workers and a resumed run sees the same augmented images as an
uninterrupted one.
"""
import random
from contextlib import contextmanager
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolderError(ValueError):
    """A dataset folder that is not ImageFolder-shaped, or an unusable image; names the path."""


def imagefolder_classes(root: Path) -> List[str]:
    """The sorted class folder names of an ImageFolder split (its images are not listed).
    Hidden folders (``.ipynb_checkpoints``, ``.cache``) are not classes; torchvision's
    ImageFolder would count them and shift every later label."""
    root = Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"{root}: no such folder (expected <root>/<split>/<class>/<image>)")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_imagefolder(root: Path, classes: Optional[List[str]] = None) -> Tuple[List[Tuple[str, int]], List[str]]:
    """[(path, class index)] and the class names of an ImageFolder split; with ``classes`` the
    indices are positions in that list (every folder of the split must be in it)."""
    root = Path(root)
    found = imagefolder_classes(root)
    if not found:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in IMG_EXTENSIONS][:3]
        hint = f"; it holds images directly ({loose}), they must be in one sub-folder per class" if loose else ""
        raise ImageFolderError(f"{root}: not an ImageFolder split: no class sub-folders{hint}")
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ImageFolderError(f"{root}: classes not in the training split: {unknown[:10]}")
    index = {c: i for i, c in enumerate(classes)}
    samples = [(str(p), index[c]) for c in found for p in sorted((root / c).iterdir())
               if p.suffix.lower() in IMG_EXTENSIONS]
    if not samples:
        raise ImageFolderError(f"{root}: class folders hold no images with extensions {IMG_EXTENSIONS}")
    return samples, classes


def _posterize_keeping_zero_bits(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, with Pillow < 13's answer for 0 bits (a black image): timm's
    "increasing" RandAugment asks for 0 bits at magnitude 10, which Pillow 13 refuses."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    from PIL import ImageOps

    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize_keeping_zero_bits


def build_transforms(img_size: int, training: bool, cfg: Dict[str, Any], mean=None, std=None, crop_pct: float = 0.875,
                     interpolation: str = "bicubic"):
    """timm's ``create_transform``: the DeiT recipe for training; for eval, a resize of the short
    side to ``img_size / crop_pct`` (``interpolation``) and a centre crop of ``img_size``. The
    default 0.875 is DeiT's released eval (facebookresearch/deit datasets.py:
    ``int((256 / 224) * input_size)``); timm models declare theirs in ``pretrained_cfg``."""
    from timm.data import create_transform
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean, std = mean or IMAGENET_DEFAULT_MEAN, std or IMAGENET_DEFAULT_STD
    if training:
        _patch_timm_posterize()
        return create_transform(img_size, is_training=True, auto_augment=cfg.get("auto_augment") or None,
                                color_jitter=cfg.get("color_jitter", 0.3), re_prob=cfg.get("reprob", 0.0),
                                re_mode="pixel", re_count=1, interpolation="bicubic", mean=mean, std=std)
    return create_transform(img_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct, mean=mean,
                            std=std)


class ImageFolderDataset(Dataset):
    """Items ``{"image": (3, S, S), "target": ()}``; a bad image gives ``None`` and a warning
    naming the file (or ``ImageFolderError`` with ``strict``)."""

    def __init__(self, samples: List[Tuple[str, int]], classes: List[str], transform, seed: int = 0,
                 strict: bool = False) -> None:
        self.samples, self.classes, self.transform = samples, classes, transform
        self.seed, self.strict, self.epoch, self.rank = seed, strict, 0, 0

    @classmethod
    def from_folder(cls, root: Path, transform, classes: Optional[List[str]] = None, seed: int = 0,
                    strict: bool = False) -> "ImageFolderDataset":
        samples, classes = scan_imagefolder(root, classes)
        return cls(samples, classes, transform, seed, strict)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> Optional[Dict[str, torch.Tensor]]:
        # index + k * len: the k-th copy of a sample on this rank (NumberedRepeats), augmented apart
        copy, index = divmod(index, len(self.samples))
        path, target = self.samples[index]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            if self.strict:
                raise ImageFolderError(f"{path}: unreadable image ({err})") from err
            warnings.warn(f"skipped: {path}: unreadable image ({err})")
            return None
        key = (self.seed, self.epoch, index, self.rank) + ((copy,) if copy else ())
        seed = int(np.random.SeedSequence(key).generate_state(1)[0])
        with seeded_global_rngs(seed):
            return {"image": self.transform(image), "target": torch.tensor(target)}


class NumberedRepeats:
    """A sampler whose indices may repeat on one rank (timm's ``RepeatAugSampler`` on 2 GPUs gives
    one rank two of a sample's three copies), with each repeat numbered: the k-th copy of index
    ``i`` is yielded as ``i + k * size``, which :class:`ImageFolderDataset` decodes into its own
    augmentation seed, so the two copies differ (they were bit-identical)."""

    def __init__(self, sampler: Any, size: int) -> None:
        self.sampler, self.size = sampler, size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        copies: Dict[int, int] = {}
        for index in self.sampler:
            k = copies.get(index, 0)
            copies[index] = k + 1
            yield index + k * self.size


@contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU generators seeded for one sample's transform (timm's
    RandAugment and random erasing draw from them), then restored: in the main process (validation,
    ``data.workers=0``) the training's own draws (mixup, drop path) must not restart from the same
    state after every sample (they did: each epoch replayed the same mixup draws)."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def take_evenly(items: List[Any], count: Optional[int]) -> List[Any]:
    """At most ``count`` items spread evenly over ``items`` (all of them when ``count`` is falsy):
    the quick-check subsets of evaluation (``--max-images``, ``data.val_count``)."""
    if not count or count >= len(items):
        return items
    # evenly spaced positions over the whole list (a stride would stop early when count > len / 2,
    # keeping only the first classes of a class-sorted list)
    return [items[i * len(items) // count] for i in range(count)]


def batch_inputs(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The model input of a collated batch: ``image`` (B, 3, H, W) or ``video`` (B, 3, T, H, W),
    (B, views, 3, T, H, W) for multi-view clips."""
    return batch["image"] if "image" in batch else batch["video"]


def collate_classification(batch: List[Optional[Dict[str, torch.Tensor]]]) -> Dict[str, torch.Tensor]:
    """Stack the usable samples; ``skipped`` counts those dropped."""
    kept = [b for b in batch if b is not None]
    out = {k: torch.stack([b[k] for b in kept]) for k in kept[0]} if kept else {}
    out["skipped"] = torch.tensor(len(batch) - len(kept))
    return out


def write_imagefolder(root: Path, num_classes: int = 4, train_per_class: int = 24, val_per_class: int = 8,
                      size: int = 64, seed: int = 0) -> Dict[str, Path]:
    """A small learnable ImageFolder dataset (``train/`` and ``val/``, JPEGs in wnid-named folders).

    Class c is a shape kind and a hue (``render_image``'s textures), placed and scaled at random
    on a random background, so a classifier must look at the object to tell the classes apart.
    """
    from .synthetic import _shape_mask, _texture

    root = Path(root)
    rng = np.random.default_rng(seed)
    hues = np.linspace(0, 1, num_classes, endpoint=False)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                background = _texture(rng, size, size, rng.uniform(60, 200, 3))
                side = int(rng.integers(size // 2, size - 4))
                mask = np.zeros((size, size), bool)
                shape = _shape_mask(rng, c % 3, side, side)
                y, x = rng.integers(0, size - side + 1, 2)
                mask[y:y + side, x:x + side] = shape
                colour = 255 * np.array(_hsv(hues[c] + rng.uniform(-0.03, 0.03), 0.8, 0.9))
                image = background.copy()
                image[mask] = _texture(rng, size, size, colour)[mask]
                Image.fromarray(image.astype(np.uint8)).save(folder / f"{split}_{c}_{i:05d}.JPEG", quality=90)
    return {"train": root / "train", "val": root / "val"}


def _hsv(h: float, s: float, v: float) -> Tuple[float, float, float]:
    import colorsys

    return colorsys.hsv_to_rgb(h % 1.0, s, v)
