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
from eval.recovery import merge_and_retrain

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
    result = merge_and_retrain(QUICK, common, BASE, MERGE, RETRAIN, val_set, tmp_path)
    unmerged, merged, retrained = result["unmerged"], result["merged"], result["retrained"]
    tokens, per_epoch = result["tokens"], result["retrain_val_top1"]

    print(f"\nVim {KWARGS} + R-MeeTo {MERGE}: tokens entering the blocks {tokens}")
    print(f"val top-1 on {len(val_set)} held-out images (chance 25 %): unmerged {unmerged:.1f} %, "
          f"merged without re-training {merged:.1f} %, merged + {RETRAIN[0].split('=')[1]} epochs of KD re-training "
          f"{retrained:.1f} % (re-training run's validation: {per_epoch}); {time.perf_counter() - start:.0f} s")
    assert tokens == [17, 12, 7, 7]
    assert per_epoch[0] == pytest.approx(merged)  # the trainer's step-0 validation saw the same drop
    # seeded and on one thread, so the figures are fixed: 77 / 63 / 75 % since the weight-decay groups
    # of timm (Vim's A_log, D, norms and position table undecayed; before: 15- and 20-point margins)
    assert unmerged >= 70.0
    assert merged <= unmerged - 10.0  # merging without re-training loses accuracy...
    assert retrained >= merged + 10.0  # ...re-training with KD wins it back
    assert retrained >= unmerged - 5.0
