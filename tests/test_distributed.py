"""torchrun on CPU (gloo): DDP and fairscale's sharded optimizer follow the single-process run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blvit.data.synthetic import write_sa1b
from blvit.train.config import load_config
from sam_adapter.trainer import train

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs/sam/quickstart.yaml")
STEPS = 3


def _losses(out_dir: Path):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.heavy
@pytest.mark.parametrize("optimizer", ["adamw", "oss"])
def test_two_process_training_matches_one_process(tmp_path, optimizer):
    data = tmp_path / "data"
    write_sa1b(data, 8, seed=0)
    common = [f"data.root={data}", f"train.max_steps={STEPS}", "train.epochs=1", "data.workers=0", "train.grad_clip=1.0", "data.val_root=null"]
    single = train(load_config(QUICK, common + ["train.batch_size=4", f"output_dir={tmp_path / 'one'}"]))
    assert single["steps"] == STEPS
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tools/train.py"), "--config", QUICK, *common, "train.batch_size=2",
           f"train.optimizer={optimizer}", f"output_dir={tmp_path / 'two'}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == STEPS
    assert one[-1] < one[0]  # it does train
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a), (optimizer, one, two)
    # the checkpoint of the sharded run holds the whole (consolidated) optimiser state
    import torch

    latest = (tmp_path / "two/checkpoints/latest.txt").read_text().strip()
    state = torch.load(tmp_path / "two/checkpoints" / latest, weights_only=False)["train_state"]["optimizer"]
    assert len(state["state"]) > 0
