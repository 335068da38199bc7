"""Learning: the quick-start distillation lowers its losses and makes a better box-prompted segmenter."""
import json
from pathlib import Path

import pytest

from blvit.data.synthetic import write_sa1b
from blvit.train.config import load_config
from sam_adapter.trainer import train

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "configs/sam/quickstart.yaml"


def _mean(rows, key, part):
    values = [r[key] for r in rows if key in r]
    n = max(1, len(values) // 5)
    return sum(values[:n] if part == "first" else values[-n:]) / n


@pytest.mark.heavy(seconds=75)
def test_quickstart_distillation_learns(tmp_path):
    write_sa1b(tmp_path / "train", 64, seed=0)
    write_sa1b(tmp_path / "val", 12, seed=2)  # held-out images: other seeds, other shapes
    cfg = load_config(QUICK, [f"data.root={tmp_path / 'train'}", f"data.val_root={tmp_path / 'val'}",
                              f"output_dir={tmp_path / 'run'}", "train.epochs=12", "data.max_masks=8",
                              # no teacher checkpoint here: the decoder is as untrained as the student, so it
                              # learns too (the quick start freezes its trained teacher's decoder)
                              "loss.train_decoder=true"])
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    val = [r["val_box_miou"] for r in rows if "val_box_miou" in r]
    untrained, trained = val[0], max(val[1:])
    print(f"box mIoU on held-out images: untrained {untrained:.3f}, trained {trained:.3f} (per epoch {val})")
    print(f"distill {_mean(rows, 'distill', 'first'):.4f} -> {_mean(rows, 'distill', 'last'):.4f}, "
          f"mask {_mean(rows, 'mask', 'first'):.4f} -> {_mean(rows, 'mask', 'last'):.4f}")
    assert _mean(rows, "distill", "last") < 0.5 * _mean(rows, "distill", "first")
    assert _mean(rows, "mask", "last") < 0.9 * _mean(rows, "mask", "first")
    assert trained > untrained + 0.1 and trained > 2 * untrained
    assert summary["validation"]["val_box_miou"] == val[-1]
    assert (tmp_path / "run/checkpoints/best.pth").exists() and (tmp_path / "run/loss_curve.png").exists()
