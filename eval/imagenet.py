"""``blvit-eval imagenet``: top-1 / top-5, FLOPs and images/s of several classifiers in one table."""
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from blvit.data.imagenet import (ImageFolderDataset, ImageFolderError, batch_inputs, build_transforms,
                                 collate_classification, imagefolder_classes, scan_imagefolder, take_evenly)
from blvit.flops import module_macs_on_meta

from .distributed import gather, sum_or_none


def parse_model_spec(spec: str):
    """``NAME`` or ``NAME:CHECKPOINT`` (the checkpoint may itself contain ':' only after the first)."""
    name, _, checkpoint = spec.partition(":")
    return name, (checkpoint or None)


def parse_classifier_spec(spec: str) -> Tuple[str, str, Dict[str, Any], Optional[str]]:
    """``NAME[@KEY=VALUE,...][:CHECKPOINT]`` -> (row label, timm name, its own create_model
    arguments, checkpoint). ``evit_base_patch16_224@keep_rate=0.5`` and
    ``efficientvit_m5@img_size=512:m5.pth`` put two settings of one model in one table; values
    are YAML scalars (numbers, booleans, lists)."""
    head, checkpoint = parse_model_spec(spec)
    name, _, settings = head.partition("@")
    kwargs: Dict[str, Any] = {}
    for item in filter(None, settings.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--model {spec!r}: expected NAME@KEY=VALUE[,KEY=VALUE...], got {item!r}")
        kwargs[key.strip()] = yaml.safe_load(value)
    return head, name, kwargs, checkpoint


# Model families for Figure 1 (top-1 against GFLOPs): the name's start decides.
FAMILIES = (
    ("bLViT", ("blvit_",)),
    ("token reduction (from DeiT)", ("evit_", "evovit_", "dynamicvit_", "ats_", "avit_", "adavit_")),
    ("efficient ViT", ("efficientvit_", "mobilevit", "levit_", "edgenext", "fastvit")),
    ("ViT / DeiT", ("deit", "vit_")),
)
# This toolkit's DeiT-shaped models, which --dense-checkpoint initialises.
DENSE_INITIALISED = ("blvit_", "evit_", "evovit_", "dynamicvit_")
# DeiT's released eval crop (resize to 256, centre crop 224), which DeiT's published numbers and
# those of the baselines built on DeiT's code use; timm's DeiT pretrained_cfg says 0.9.
DEIT_EVAL_CROP_PCT = 0.875
# timm's DeiT (not DeiT III, "deit3_": crop 1.0); this toolkit's DeiT-shaped models declare 0.875 themselves
DEIT_PROTOCOL = ("deit_",)


def model_family(name: str) -> str:
    for family, prefixes in FAMILIES:
        if name.startswith(prefixes):
            return family
    return "other"


def model_input_size(model: torch.nn.Module) -> int:
    """The square input size a timm-style classifier was built for."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "img_size"):
        return int(config.img_size)
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
    return int(size[-1] if isinstance(size, (tuple, list)) else size)


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, dataset, device: torch.device, amp: bool, batch_size: int,
                        workers: int, desc: str, world: int = 1) -> Dict[str, Any]:
    """Top-1/top-5 (%) and throughput (images or clip views per second from the median batch
    time, first batch left out) on images, clips, or several views per clip (their softmax
    probabilities averaged: :func:`blvit.train.classification.view_averaged_logits`).

    ``world`` > 1 (torchrun): ``dataset`` is this rank's share; the counts are summed over the
    ranks (every rank returns the whole set's figures) and images/s is the ranks' sum."""
    from blvit.train.classification import view_averaged_logits

    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_classification)
    correct1 = correct5 = seen = skipped = 0
    seconds: List[float] = []
    for batch in tqdm(loader, desc=desc):
        skipped += int(batch["skipped"])
        if "target" not in batch:
            continue
        inputs = batch_inputs(batch).to(device)
        target = batch["target"].to(device)
        views = inputs.shape[0] * (inputs.shape[1] if inputs.dim() == 6 else 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = view_averaged_logits(model, inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append((time.perf_counter() - start) / views)
        top5 = logits.topk(min(5, logits.shape[-1]), -1).indices
        correct1 += int((top5[:, 0] == target).sum())
        correct5 += int((top5 == target[:, None]).any(-1).sum())
        seen += len(target)
    times = seconds[1:] if len(seconds) > 1 else seconds
    speed = float(1.0 / np.median(times)) if times else None
    if world > 1:
        parts = gather((correct1, correct5, seen, skipped, speed), world)
        correct1, correct5, seen, skipped = (sum(part[i] for part in parts) for i in range(4))
        speed = sum_or_none([part[4] for part in parts])
    if seen == 0:
        raise ValueError("no readable validation sample")
    return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen, "images": seen, "skipped": skipped,
            "images_per_s": speed}


def eval_crop(model: torch.nn.Module, name: str, crop_pct: Optional[float] = None) -> Tuple[float, str]:
    """(crop_pct, interpolation) of a model's eval transform: ``crop_pct`` when given (one for all),
    else DeiT's 0.875 for DeiT and this toolkit's DeiT-shaped models (the protocol of DeiT's
    published numbers: facebookresearch/deit datasets.py, ``int((256 / 224) * input_size)``), else
    the model's own ``pretrained_cfg`` through timm's ``resolve_data_config`` (timm's DeiT 0.9,
    EfficientViT 0.875, EdgeNeXt 0.95, ...). The interpolation is always the model's."""
    from timm.data import resolve_data_config

    data_cfg = resolve_data_config({}, model=model)
    if crop_pct is None:
        crop_pct = DEIT_EVAL_CROP_PCT if name.startswith(DEIT_PROTOCOL) else data_cfg["crop_pct"]
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct {crop_pct} must be in (0, 1]")
    return float(crop_pct), data_cfg["interpolation"]


def label_space(trained: Optional[List[str]], train: Optional[List[str]], split: List[str],
                outputs: Optional[int]) -> List[str]:
    """The class list whose i-th entry is the model's output i: the checkpoint's own (this
    trainer's), else ``train/``'s folders where they hold every class of the split (a validation
    subset of ImageNet's classes is labelled by its place among all 1000), unless ``train/`` has
    more folders than the model has outputs while the split has exactly as many (a stray folder in
    train/, e.g. lost+found); else the split's own folders (DeiT's ``ImageFolder(root/val)``)."""
    if trained:
        return list(trained)
    if train is not None and set(split) <= set(train):
        stray = outputs is not None and len(train) != outputs and len(split) == outputs
        if not stray:
            return list(train)
    return list(split)


def split_targets(samples: Sequence[Tuple[str, int]], split_classes: Sequence[str], classes: Sequence[str],
                  split: Path) -> List[Tuple[str, int]]:
    """Samples labelled by position in ``split_classes`` relabelled by position in ``classes``
    (a checkpoint's classes); a folder of the split the checkpoint does not know is an error."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(split_classes) - set(index))
    if unknown:
        raise ImageFolderError(f"{split}: class folders the checkpoint was not trained on: {unknown[:10]}")
    return [(path, index[split_classes[t]]) for path, t in samples]


def run_imagenet(data: Path, split: str, specs: Sequence[str], dense_checkpoint: Optional[str], img_size: Optional[int],
                 batch_size: int, workers: int, max_images: Optional[int], kwargs: Dict[str, Any],
                 device: torch.device, amp: bool, world: int = 1, rank: int = 0,
                 crop_pct: Optional[float] = None) -> List[Dict[str, Any]]:
    """One row per model spec; under torchrun each rank evaluates every world-th image (the
    figures are the whole set's on every rank).

    Labels: a checkpoint of this trainer is scored against the class list it stores (output i is
    its i-th class folder); any other model against the evaluated split's own sorted class
    folders (DeiT's ``ImageFolder(root/val)``). ``img_size``: the input size every model is built
    for (unless its spec sets its own); a model whose input size is not fixed (CNNs) only gets
    images of that size. ``crop_pct``: see :func:`eval_crop`.
    """
    import timm

    from blvit.train.classification import load_classifier

    split_root = Path(data) / split
    samples, split_classes = scan_imagefolder(split_root)
    samples = take_evenly(samples, max_images)
    train_root = Path(data) / "train"
    train_classes = imagefolder_classes(train_root) if split != "train" and train_root.is_dir() else None
    rows = []
    for spec in specs:
        label, name, own_kwargs, checkpoint = parse_classifier_spec(spec)
        uses_dense = dense_checkpoint and not checkpoint and name.startswith(DENSE_INITIALISED)
        model_kwargs = dict(kwargs, **own_kwargs)
        fixed = getattr(timm.models.get_pretrained_cfg(name), "fixed_input_size", True)
        if img_size and "img_size" not in own_kwargs and fixed:
            model_kwargs["img_size"] = img_size  # built for it (the checkpoint filters resample pos_embed)
        model, trained_classes = load_classifier(name, model_kwargs, dense_checkpoint if uses_dense else None,
                                                 checkpoint)
        classes = label_space(trained_classes, train_classes, split_classes, getattr(model, "num_classes", None))
        if classes != split_classes:
            targets = split_targets(samples, split_classes, classes, split_root)
        else:
            targets = samples
        if train_classes is not None and train_classes != classes:
            # not an error: evaluating a model needs no training split; a sign of a stray folder there
            source = f"{checkpoint}'s" if trained_classes else f"{split_root}'s"
            extra, absent = sorted(set(train_classes) - set(classes)), sorted(set(classes) - set(train_classes))
            how = f"only in train/: {extra[:5]}, not in train/: {absent[:5]}" if extra or absent else "another order"
            warnings.warn(f"{train_root}: its {len(train_classes)} class folders differ from the {len(classes)} "
                          f"classes scored ({source}): {how}")
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = own_kwargs.get("img_size") or img_size or model_input_size(model)
        crop, interpolation = eval_crop(model, name, crop_pct)
        transform = build_transforms(size, False, {}, cfg.get("mean"), cfg.get("std"), crop, interpolation)
        dataset = ImageFolderDataset(targets[rank::world], classes, transform)
        result = evaluate_classifier(model, dataset, device, amp, batch_size, workers, label, world)
        macs = module_macs_on_meta(model, (1, 3, size, size))
        rows.append({"model": label, "arch": name, "family": model_family(name),
                     "checkpoint": checkpoint or (dense_checkpoint if uses_dense else None),
                     **result, "gmacs": macs / 1e9, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                     "input_size": size, "crop_pct": crop, "interpolation": interpolation})
    return rows


def markdown_rows(rows: Sequence[Dict[str, Any]]) -> str:
    """Table 1's layout. GFLOPs are counted as the papers count them (DeiT-B 17.6): multiply-
    accumulates of one image, measured with ``FlopCounterMode``."""
    lines = ["| model | family | input | top-1 | top-5 | GFLOPs | params (M) | images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('family', '')} | {r['input_size']} | {r['top1']:.2f} | {r['top5']:.2f} "
                     f"| {r['gmacs']:.2f} | {r.get('params_m', float('nan')):.1f} | {r['images_per_s']:.1f} |")
    return "\n".join(lines)


def short_label(name: str) -> str:
    """'evit_base_patch16_224@keep_rate=0.5' -> 'evit_base keep 0.5' (figure labels)."""
    name = name.replace("_patch16_224", "").replace("@keep_rate=", " keep ").replace("@keep_ratio=", " keep ")
    return name.replace("@img_size=", " @").replace("@", " ")


def write_figure(rows: Sequence[Dict[str, Any]], path: Path, title: str = "") -> Path:
    """Figure 1 of the bLViT paper for the models run: top-1 against GFLOPs, one marker style
    per family, each point labelled; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"bLViT": ("*", "tab:red", 260), "token reduction (from DeiT)": ("o", "tab:blue", 70),
              "efficient ViT": ("s", "tab:green", 70), "ViT / DeiT": ("D", "black", 60), "other": ("^", "tab:gray", 60)}
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    seen = set()
    span_x = max((r["gmacs"] for r in rows), default=1.0) or 1.0
    span_y = (max((r["top1"] for r in rows), default=1.0) - min((r["top1"] for r in rows), default=0.0)) or 1.0
    placed: List[Tuple[float, float]] = []
    for r in sorted(rows, key=lambda row: row["gmacs"]):
        family = r.get("family", "other")
        marker, colour, size = styles.get(family, styles["other"])
        ax.scatter(r["gmacs"], r["top1"], marker=marker, c=colour, s=size, zorder=3,
                   label=None if family in seen else family)
        seen.add(family)
        # labels of nearby points go to alternating heights so they do not print over each other
        near = sum(1 for x, y in placed if abs(x - r["gmacs"]) < 0.12 * span_x and abs(y - r["top1"]) < 0.08 * span_y)
        placed.append((r["gmacs"], r["top1"]))
        dy = 5 + 10 * (near // 2) if near % 2 == 0 else -12 - 10 * (near // 2)
        ax.annotate(short_label(r["model"]), (r["gmacs"], r["top1"]), textcoords="offset points", xytext=(6, dy),
                    fontsize=7)
    ax.set_xlabel("GFLOPs (multiply-accumulates per image)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "Top-1 against GFLOPs")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
