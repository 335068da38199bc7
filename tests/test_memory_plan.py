"""tools/train.py --plan: the per-GPU memory plan (sam_adapter/memory_plan.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blvit.data.synthetic import write_sa1b
from blvit.train.config import load_config
from sam_adapter.memory_plan import GIB, markdown, plan_memory

ROOT = Path(__file__).resolve().parents[1]


def test_plan_shards_what_each_strategy_shards():
    plan = plan_memory(load_config(ROOT / "configs/sam/hb_sa1b.yaml", []), world=8, gpu_gib=(40, 80))
    rows = {(r["strategy"], r["activation_checkpointing"]): r for r in plan["rows"]}
    ddp, oss, fsdp = rows[("ddp", False)], rows[("oss", False)], rows[("fsdp", False)]
    assert oss["optimizer_gib"] == pytest.approx(ddp["optimizer_gib"] / 8)
    assert fsdp["params_gib"] == pytest.approx(ddp["params_gib"] / 8)
    assert fsdp["grads_gib"] == pytest.approx(ddp["grads_gib"] / 8)
    # AdamW: two fp32 moments per trainable parameter
    assert ddp["optimizer_gib"] * GIB == pytest.approx(8 * plan["trainable_params"])
    assert rows[("ddp", True)]["activations_per_sample_gib"] < ddp["activations_per_sample_gib"]
    assert plan["teacher_params"] > 600e6  # the ViT-H teacher
    # ViT-H H+B without checkpointing does not fit a 40 GB card, with it (sharded) it does
    assert ddp["max_batch_per_gpu"]["40"] == 0 and rows[("fsdp", True)]["max_batch_per_gpu"]["40"] >= 1
    assert "| fsdp | yes |" in markdown(plan)


def test_plan_command_allocates_nothing_and_prints_the_table():
    result = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), "--config", str(ROOT / "configs/sam/bt_sa1b.yaml"),
                             "--plan", "--plan-gpus", "16", "--gpu-memory", "40", "80"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "b+t at 1024 px, 16 GPUs" in result.stdout and "| oss | yes |" in result.stdout


@pytest.mark.heavy
def test_plan_agrees_with_the_measured_peak_of_a_cpu_run(tmp_path):
    """Two quick-start training steps on a CPU (fresh process per batch size), peak RSS increase
    against the plan's gradients + AdamW state + batch x activations. The plan counts every tensor
    autograd saves on the meta device; the CPU run's fused attention keeps less and the allocator
    and one-off buffers add a little, so: the total at batch 4 within 40 %, and the measured growth
    per sample between 40 % and 120 % of the planned activations per sample."""
    write_sa1b(tmp_path, 8, seed=0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {}
    for batch in (2, 4):
        out = subprocess.run([sys.executable, str(ROOT / "tests/measure_training_memory.py"), str(tmp_path), str(batch)],
                             capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[batch] = json.loads(out.stdout.strip().splitlines()[-1])
    four = runs[4]
    print({b: (round(r["measured_bytes"] / 2**20, 1), round(r["planned_bytes"] / 2**20, 1)) for b, r in runs.items()})
    assert 0.6 < four["measured_bytes"] / four["planned_bytes"] < 1.4, four
    slope = (runs[4]["measured_bytes"] - runs[2]["measured_bytes"]) / 2
    assert 0.4 < slope / four["planned_per_sample_bytes"] < 1.2, (slope, four)


def test_plan_counts_the_upsampled_masks_of_finer_targets():
    """data.mask_size finer than the decoder's 64 x 64: the loss keeps its maps at the targets'
    resolution, so the plan's decoder activations grow with the extra pixels (256: 5x what 128 adds)."""
    from sam_adapter.memory_plan import _models_on_meta, activation_bytes

    plans = {}
    for size in ("null", "128", "input"):
        cfg = load_config(ROOT / "configs/sam/quickstart_teacher.yaml", [f"data.mask_size={size}"])
        plans[size] = activation_bytes(_models_on_meta(cfg)[0], cfg, amp=False)
    assert plans["input"]["encoder"] == plans["null"]["encoder"]
    extra = {size: plans[size]["decoder"] - plans["null"]["decoder"] for size in ("128", "input")}
    assert extra["128"] > 0
    assert extra["input"] / extra["128"] == pytest.approx((256**2 - 64**2) / (128**2 - 64**2), rel=0.1), extra
