"""Peak resident-memory increase of two quick-start training steps on a CPU, next to the memory
plan's prediction (run as a script by tests/test_memory_plan.py: a fresh process per batch size).

    python tests/measure_training_memory.py SA1B_DIR BATCH   -> one JSON line
"""
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)
from blvit.train.config import load_config
from sam_adapter.trainer import build_models, SamTrainingModule
from blvit.data.sa1b import SA1BDataset, find_samples
from sam_adapter.memory_plan import plan_memory
batch = int(sys.argv[2])
cfg = load_config(ROOT / "configs/sam/quickstart.yaml", [f"data.root={sys.argv[1]}", f"train.batch_size={batch}", "data.val_root=null"])
student, teacher = build_models(cfg)
module = SamTrainingModule(student, cfg["loss"]).train()
params = [p for p in module.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
ds = SA1BDataset(find_samples(sys.argv[1]), 256, cfg["data"]["max_masks"], 0.1, 0, False, cfg["data"]["box_fraction"])
items = [ds[i] for i in range(batch)]
b = {k: torch.stack([it[k] for it in items]) for k in items[0]}
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * page
gc.collect(); base = rss(); peak = [base]; stop = [False]
def sample():
    while not stop[0]:
        peak[0] = max(peak[0], rss()); time.sleep(0.0005)
th = threading.Thread(target=sample); th.start()
for _ in range(2):
    with torch.no_grad():
        te = teacher(b["image"])
    out = module(b, te)
    out["loss"].backward(); opt.step(); opt.zero_grad(set_to_none=True)
    del out, te
stop[0] = True; th.join()
plan = plan_memory(cfg, world=1, amp=False)
row = [r for r in plan["rows"] if r["strategy"] == "ddp" and not r["activation_checkpointing"]][0]
predicted = (row["grads_gib"] + row["optimizer_gib"] + batch * row["activations_per_sample_gib"]) * 1024**3
print(json.dumps({"batch": batch, "measured_bytes": peak[0] - base, "planned_bytes": predicted,
                  "planned_per_sample_bytes": row["activations_per_sample_gib"] * 1024**3}))
