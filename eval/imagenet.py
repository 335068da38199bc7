"""``blvit-eval imagenet``: top-1 / top-5, FLOPs and images/s of several classifiers in one table."""
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from blvit.data.imagenet import ImageFolderDataset, build_transforms, collate_classification, scan_imagefolder
from blvit.flops import module_macs_on_meta


def parse_model_spec(spec: str):
    """``NAME`` or ``NAME:CHECKPOINT`` (the checkpoint may itself contain ':' only after the first)."""
    name, _, checkpoint = spec.partition(":")
    return name, (checkpoint or None)


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
                        workers: int, desc: str) -> Dict[str, Any]:
    """Top-1/top-5 (%) and throughput (images/s from the median batch time, first batch left out)."""
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_classification)
    correct1 = correct5 = seen = 0
    seconds: List[float] = []
    for batch in tqdm(loader, desc=desc):
        if "image" not in batch:
            continue
        images, target = batch["image"].to(device), batch["target"].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = model(images).float()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append((time.perf_counter() - start) / len(target))
        top5 = logits.topk(min(5, logits.shape[-1]), -1).indices
        correct1 += int((top5[:, 0] == target).sum())
        correct5 += int((top5 == target[:, None]).any(-1).sum())
        seen += len(target)
    if seen == 0:
        raise ValueError("no readable validation images")
    times = seconds[1:] if len(seconds) > 1 else seconds
    return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen, "images": seen,
            "images_per_s": float(1.0 / np.median(times))}


def run_imagenet(data: Path, split: str, specs: Sequence[str], dense_checkpoint: Optional[str], img_size: Optional[int],
                 batch_size: int, workers: int, max_images: Optional[int], kwargs: Dict[str, Any],
                 device: torch.device, amp: bool) -> List[Dict[str, Any]]:
    from blvit.train.classification import create_classifier

    train_root = Path(data) / "train"
    classes = scan_imagefolder(train_root)[1] if train_root.is_dir() else None
    samples, classes = scan_imagefolder(Path(data) / split, classes)
    if max_images:
        samples = samples[:: max(1, len(samples) // max_images)][:max_images]
    rows = []
    for spec in specs:
        name, checkpoint = parse_model_spec(spec)
        uses_dense = dense_checkpoint and not checkpoint and name.startswith(("blvit_", "evit_"))
        model = create_classifier(name, kwargs, dense_checkpoint if uses_dense else None, checkpoint)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = img_size or model_input_size(model)
        dataset = ImageFolderDataset(samples, classes, build_transforms(size, False, {}, cfg.get("mean"), cfg.get("std")))
        result = evaluate_classifier(model, dataset, device, amp, batch_size, workers, name)
        macs = module_macs_on_meta(model, (1, 3, size, size))
        rows.append({"model": name, "checkpoint": checkpoint or (dense_checkpoint if uses_dense else None),
                     **result, "gmacs": macs / 1e9, "input_size": size})
    return rows


def markdown_rows(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| model | top-1 | top-5 | GMACs | images/s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['gmacs']:.2f} | {r['images_per_s']:.1f} |")
    return "\n".join(lines)
