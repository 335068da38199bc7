"""Learning: R-MeeTo merging costs a trained Vision Mamba accuracy; re-training with KD wins it back.

A small Vim is trained on the generated 4-class ImageFolder (unmerged) and evaluated; the same
weights are merged aggressively with R-MeeTo (no re-training) and evaluated again; then the merged
model is re-trained for a few epochs with knowledge distillation from the unmerged one through
``blvit.train.classification.train`` (``model.checkpoint`` and ``teacher.checkpoint`` = the
unmerged run's ``best.pth``) and evaluated a third time. Fixed seeds, one thread, no loader
workers: the figures are the same from run to run on a machine.
"""
import json
import time
from pathlib import Path

import pytest
import torch

import blvit  # noqa: F401  (registers the Vim models with timm)
from blvit.data.imagenet import ImageFolderDataset, build_transforms, write_imagefolder
from blvit.train.classification import apply_merging, create_classifier, train
from blvit.train.config import load_config
from eval.imagenet import evaluate_classifier

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "configs/imagenet/quickstart.yaml"

NAME = "vim_tiny_patch16_224"
# 64 x 64 images in 16 x 16 patches: 16 patch tokens + the middle class token, 4 bidirectional
# blocks of width 64. The sequential "reference" scan is used because at 17 tokens it trains
# faster on a CPU than the chunked "torch" scan (both are checked against each other in
# test_mamba.py); the learning does not depend on the backend.
KWARGS = {"img_size": 64, "patch_size": 16, "depth": 4, "embed_dim": 64, "d_state": 8, "num_classes": 4,
          "scan_backend": "reference"}
# Aggressive merging: 16 patch tokens -> 11 at the input of block 1 -> 6 at the input of block 2
# (17 -> 12 -> 7 tokens with the class token; r = 5 is the most allowed at block 2).
MERGE = {"method": "rmeeto", "r": 5, "layers": [1, 2], "order": "restore"}
BASE = ["train.epochs=10", "train.lr=3e-3"]
RETRAIN = ["train.epochs=4", "train.lr=2e-3", "loss.distill=kd", "loss.distill_weight=0.5"]


def _top1(model, dataset) -> float:
    return evaluate_classifier(model.eval(), dataset, torch.device("cpu"), False, 50, 0, "val")["top1"]


@pytest.mark.heavy(seconds=165)
def test_rmeeto_accuracy_drop_and_kd_recovery(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible figures, and no oversubscription of a small shared CPU
    try:
        _drop_and_recovery(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _drop_and_recovery(tmp_path: Path) -> None:
    start = time.perf_counter()
    data = tmp_path / "data"
    write_imagefolder(data, num_classes=4, train_per_class=200, val_per_class=25, size=64, seed=0)
    val_set = ImageFolderDataset.from_folder(data / "val", build_transforms(KWARGS["img_size"], False, {}))
    common = [f"data.root={data}", f"model.name={NAME}", f"model.kwargs={json.dumps(KWARGS)}", "seed=0"]

    # 1. the unmerged model
    base_dir = tmp_path / "base"
    train(load_config(QUICK, common + [f"output_dir={base_dir}"] + BASE))
    best = base_dir / "checkpoints/best.pth"
    dense = create_classifier(NAME, {}, checkpoint=str(best))
    assert dense.token_merge is None
    unmerged = _top1(dense, val_set)
    trained = time.perf_counter()

    # 2. the same weights merged, no re-training
    merged_model = apply_merging(create_classifier(NAME, {}, checkpoint=str(best)), MERGE)
    merged = _top1(merged_model, val_set)
    tokens = merged_model.token_merge.token_counts

    # 3. the merged model re-trained with KD from the unmerged one
    re_dir = tmp_path / "retrain"
    summary = train(load_config(QUICK, common + [
        f"output_dir={re_dir}", f"model.checkpoint={best}", f"model.merge={json.dumps(MERGE)}",
        f"teacher.name={NAME}", f"teacher.kwargs={json.dumps(KWARGS)}", f"teacher.checkpoint={best}"] + RETRAIN))
    retrained_model = create_classifier(NAME, {}, checkpoint=summary["best_checkpoint"])
    assert retrained_model.token_merge is not None  # the checkpoint brings its merging back
    retrained = _top1(retrained_model, val_set)
    assert retrained_model.token_merge.token_counts == tokens
    rows = [json.loads(line) for line in (re_dir / "metrics.jsonl").read_text().splitlines()]
    per_epoch = [r["val_top1"] for r in rows if "val_top1" in r]

    print(f"\nVim {KWARGS} + R-MeeTo {MERGE}: tokens entering the blocks {tokens}")
    print(f"val top-1 on {len(val_set)} held-out images (chance 25 %): unmerged {unmerged:.1f} %, "
          f"merged without re-training {merged:.1f} %, merged + {RETRAIN[0].split('=')[1]} epochs of KD re-training "
          f"{retrained:.1f} % (re-training run's validation: {per_epoch}); "
          f"{trained - start:.0f} s base training, {time.perf_counter() - trained:.0f} s merging + re-training")
    assert tokens == [17, 12, 7, 7]
    assert per_epoch[0] == pytest.approx(merged)  # the trainer's step-0 validation saw the same drop
    assert unmerged >= 70.0
    assert merged <= unmerged - 15.0  # merging without re-training loses accuracy...
    assert retrained >= merged + 20.0  # ...re-training with KD wins it back
    assert retrained >= unmerged - 5.0
