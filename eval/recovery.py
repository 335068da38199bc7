"""Merge, then re-train: what token merging costs a trained classifier and what re-training wins
back, all through the trainer (``blvit.train.classification.train``, i.e. ``tools/train.py``).

Used by ``tests/test_merging_learning.py`` (Vim on the generated ImageFolder) and
``tools/video_rmeeto_recovery.py`` (VideoMamba on the generated videos).
"""
import json
from pathlib import Path
from typing import Any, Dict, Sequence

import torch

from .imagenet import evaluate_classifier


def merge_and_retrain(config: Path, common: Sequence[str], base: Sequence[str], merge: Dict[str, Any],
                      retrain: Sequence[str], val_set, out: Path, batch_size: int = 50) -> Dict[str, Any]:
    """1. train ``config`` with ``common + base`` overrides (unmerged); 2. merge the best
    checkpoint's tokens with ``merge`` (``model.merge``'s format), no re-training; 3. re-train
    the merged model from that checkpoint with ``common + retrain`` overrides, the unmerged
    model as KD teacher (``retrain`` sets the loss). Top-1 (%) on ``val_set`` after each step,
    the merged model's token counts and the re-training run's per-epoch validation."""
    from blvit.train.classification import apply_merging, create_classifier, train
    from blvit.train.config import load_config

    def top1(model: torch.nn.Module) -> float:
        return evaluate_classifier(model.eval(), val_set, torch.device("cpu"), False, batch_size, 0, "val")["top1"]

    base_cfg = load_config(config, list(common) + [f"output_dir={out / 'base'}"] + list(base))
    name, kwargs = base_cfg["model"]["name"], base_cfg["model"]["kwargs"]
    train(base_cfg)
    best = out / "base/checkpoints/best.pth"
    dense = create_classifier(name, {}, checkpoint=str(best))
    if dense.token_merge is not None:
        raise RuntimeError(f"{best}: the base run already merges tokens")
    unmerged = top1(dense)

    merged_model = apply_merging(create_classifier(name, {}, checkpoint=str(best)), merge)
    merged = top1(merged_model)
    tokens = merged_model.token_merge.token_counts

    summary = train(load_config(config, list(common) + [
        f"output_dir={out / 'retrain'}", f"model.checkpoint={best}", f"model.merge={json.dumps(merge)}",
        f"teacher.name={name}", f"teacher.kwargs={json.dumps(kwargs)}", f"teacher.checkpoint={best}"] + list(retrain)))
    retrained_model = create_classifier(name, {}, checkpoint=summary["best_checkpoint"])
    if retrained_model.token_merge is None:
        raise RuntimeError(f"{summary['best_checkpoint']}: the re-trained checkpoint does not bring its merge back")
    retrained = top1(retrained_model)  # token_counts are those of the last forward
    if retrained_model.token_merge.token_counts != tokens:
        raise RuntimeError(f"{summary['best_checkpoint']}: the re-trained checkpoint does not bring back the merge {tokens}")
    rows = [json.loads(line) for line in (out / "retrain/metrics.jsonl").read_text().splitlines()]
    return {"model": name, "kwargs": kwargs, "merge": merge, "tokens": tokens, "unmerged": unmerged, "merged": merged,
            "retrained": retrained, "retrain_val_top1": [r["val_top1"] for r in rows if "val_top1" in r]}
