"""Training bLViT-SAM: distillation from a dense SAM encoder plus SAM's mask loss.

One process, one GPU, or ``torchrun`` over GPUs and nodes (DDP, NCCL; gloo on CPU), optionally
with fairscale's sharded optimizer. Checkpoints are atomic; ``resume`` continues at the exact
batch of the epoch where the run stopped.
"""
import dataclasses
import json
import logging
import math
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from blvit.data.sa1b import SA1BDataset, collate_skipping, find_samples, select_subset
from blvit.utils.io import atomic_save, atomic_write_text, read_checkpoint
from sam_adapter.build import build_sam_blvit, build_sam_from_config
from sam_adapter.checkpoint import FORMAT, FORMAT_VERSION, load_checked, load_sam_checkpoint

from .losses import distillation_loss, sam_mask_loss

logger = logging.getLogger("blvit.train")


class SamTrainingModule(nn.Module):
    """Wraps a ``Sam`` so that one ``forward(batch)`` returns the losses (what DDP needs)."""

    def __init__(self, sam: nn.Module, loss_cfg: Dict[str, Any]) -> None:
        super().__init__()
        self.sam, self.loss_cfg = sam, loss_cfg

    def prompt_losses(self, embeddings: torch.Tensor, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        sam, cfg = self.sam, self.loss_cfg
        # Mean over each image's masks, then over images: the same objective whatever the
        # split of a global batch across processes.
        terms = {"mask": [], "iou": [], "mask_iou": []}
        image_pe = sam.prompt_encoder.get_dense_pe()
        for i in range(embeddings.shape[0]):
            count = batch["valid"][i].sum().clamp(min=1)
            for is_box in (True, False):
                pick = batch["valid"][i] & (batch["use_box"][i] == is_box)
                if not bool(pick.any()):
                    continue
                if is_box:
                    sparse, dense = sam.prompt_encoder(points=None, boxes=batch["boxes"][i][pick], masks=None)
                else:
                    pts = batch["points"][i][pick]
                    labels = torch.ones(pts.shape[:2], device=pts.device, dtype=torch.int)
                    sparse, dense = sam.prompt_encoder(points=(pts, labels), boxes=None, masks=None)
                logits, iou_pred = sam.mask_decoder(embeddings[i : i + 1], image_pe, sparse, dense, multimask_output=True)
                out = sam_mask_loss(logits, iou_pred, batch["masks"][i][pick], cfg["focal_weight"],
                                    cfg["dice_weight"], cfg["iou_weight"])
                for k in terms:
                    terms[k].append(out[k] * pick.sum() / count)
        return {k: torch.stack(v).sum() / embeddings.shape[0] for k, v in terms.items()}

    def forward(self, batch: Dict[str, torch.Tensor], teacher_embeddings: Optional[torch.Tensor] = None):
        cfg = self.loss_cfg
        embeddings = self.sam.image_encoder(batch["image"])
        total = embeddings.new_zeros(())
        out: Dict[str, torch.Tensor] = {}
        if teacher_embeddings is not None and cfg["distill_weight"] > 0:
            out["distill"] = distillation_loss(embeddings, teacher_embeddings, cfg["distill"])
            total = total + cfg["distill_weight"] * out["distill"]
        if cfg["mask_weight"] > 0:
            out.update(self.prompt_losses(embeddings, batch))
            total = total + cfg["mask_weight"] * (out["mask"] + out["iou"])
        out["loss"] = total
        return out


def _dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = torch_dist.get_rank() if world > 1 else 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return world, rank, device


def _lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np.random.get_state()[0], torch.from_numpy(np.random.get_state()[1].copy())] + list(np.random.get_state()[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy(), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_models(cfg: Dict[str, Any]):
    """The student Sam and (for distillation) the frozen dense teacher encoder."""
    m = cfg["model"]
    student = build_sam_blvit(m["variant"], checkpoint=m["checkpoint"], sam_checkpoint=m["sam_checkpoint"],
                              keep_ratio=m["keep_ratio"], **m["overrides"])
    teacher = None
    if cfg["task"] == "sam_distill":
        enc_cfg = student.image_encoder.config
        dense_cfg = dataclasses.replace(enc_cfg, name="dense", blvit_layers=(), predictor_layers=(),
                                        e_block_layers=(), e_embed_dim=0)
        teacher_sam = build_sam_from_config(dense_cfg)
        if cfg["teacher"]["checkpoint"]:
            load_sam_checkpoint(teacher_sam, cfg["teacher"]["checkpoint"])
        else:
            logger.warning("no teacher checkpoint configured: distilling from a RANDOMLY INITIALISED dense teacher "
                           "of the student's size (embed_dim %d, depth %d)", dense_cfg.embed_dim, dense_cfg.depth)
        teacher = teacher_sam.image_encoder.eval().requires_grad_(False)
    elif cfg["task"] != "sam_finetune":
        raise ValueError(f"unknown task {cfg['task']!r}; choose sam_distill or sam_finetune")
    student.prompt_encoder.requires_grad_(False)
    student.mask_decoder.requires_grad_(bool(cfg["loss"]["train_decoder"]))
    return student, teacher


def train(cfg: Dict[str, Any], resume: bool = False, strict: bool = False) -> Dict[str, Any]:
    """Run a training job described by a config from ``blvit.train.config.load_config``."""
    world, rank, device = _dist_info()
    t, d = cfg["train"], cfg["data"]
    out_dir = Path(cfg["output_dir"])
    ckpt_dir = out_dir / "checkpoints"
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])

    student, teacher = build_models(cfg)
    student.image_encoder.grad_checkpointing = bool(t["activation_checkpointing"])
    student.train()
    if teacher is not None:
        teacher.to(device)
    refs = select_subset(find_samples(Path(d["root"]), d["shards"], strict), d["fraction"], d["count"], cfg["seed"])
    dataset = SA1BDataset(refs, student.image_encoder.img_size, d["max_masks"], d["box_noise"], cfg["seed"], strict)
    module = SamTrainingModule(student, cfg["loss"]).to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    if t["optimizer"] == "oss":
        from fairscale.nn.data_parallel import ShardedDataParallel
        from fairscale.optim.oss import OSS

        optimizer = OSS(params, optim=torch.optim.AdamW, lr=t["lr"], weight_decay=t["weight_decay"])
        model = ShardedDataParallel(module, optimizer) if world > 1 else module
    elif t["optimizer"] == "adamw":
        optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
        model = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None) \
            if world > 1 else module
    else:
        raise ValueError(f"unknown optimizer {t['optimizer']!r}; choose adamw or oss")

    batches_per_epoch = len(dataset) // (t["batch_size"] * world)
    if batches_per_epoch == 0:
        raise ValueError(f"{d['root']}: {len(dataset)} samples, fewer than one global batch of {t['batch_size'] * world}")
    total_steps = t["max_steps"] or t["epochs"] * batches_per_epoch // t["accumulate"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(t["warmup_steps"], total_steps, t["min_lr_ratio"]))
    amp = t["amp"] if t["amp"] != "auto" else ("bf16" if device.type == "cuda" else "none")
    ema = None
    if t["ema_decay"]:
        ema = torch.optim.swa_utils.AveragedModel(student, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(t["ema_decay"]))

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_loss": float("inf")}
    if resume and (ckpt_dir / "latest.txt").exists():
        path = ckpt_dir / (ckpt_dir / "latest.txt").read_text().strip()
        saved = read_checkpoint(path)
        load_checked(student, saved["model"], path, "student model")
        train_state = saved["train_state"]
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        if ema is not None and "ema" in train_state:
            ema.load_state_dict(train_state["ema"])
        _set_rng_state(train_state["rng"])
        state = train_state["progress"]
        if rank == 0:
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, state["step"], state["epoch"], state["batch_in_epoch"])

    def save(tag: str, loss_value: float) -> None:
        if rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        if t["optimizer"] == "oss" and world > 1:
            optimizer.consolidate_state_dict(recipient_rank=0)
        if rank != 0:
            return
        train_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                       "progress": dict(state), "config": cfg}
        if ema is not None:
            train_state["ema"] = ema.state_dict()
        payload = {"format": FORMAT, "version": FORMAT_VERSION, "config": student.image_encoder.config.to_dict(),
                   "model": student.state_dict(), "train_state": train_state}
        name = f"{tag}.pth"
        atomic_save(payload, ckpt_dir / name)
        atomic_write_text(ckpt_dir / "latest.txt", name)
        if loss_value < state["best_loss"]:
            state["best_loss"] = loss_value
            atomic_save(payload, ckpt_dir / "best.pth")
        steps = sorted(ckpt_dir.glob("step_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
        for old in steps[: max(0, len(steps) - t["keep_last"])]:
            old.unlink()

    metrics_path = out_dir / "metrics.jsonl"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=total_steps, initial=state["step"], disable=rank != 0, desc="train")
    skipped_total, window = 0, []
    done = state["step"] >= total_steps
    while not done:
        epoch = state["epoch"]
        dataset.set_epoch(epoch)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"], drop_last=True)
        sampler.set_epoch(epoch)
        indices = list(sampler)[: batches_per_epoch * t["batch_size"]]
        indices = indices[state["batch_in_epoch"] * t["batch_size"]:]
        loader = DataLoader(Subset(dataset, indices), batch_size=t["batch_size"], shuffle=False,
                            num_workers=d["workers"], collate_fn=collate_skipping, drop_last=True)
        for batch in loader:
            skipped_total += int(batch.pop("skipped"))
            if "image" not in batch:
                state["batch_in_epoch"] += 1
                continue
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp == "bf16"):
                teacher_embed = teacher(batch["image"]) if teacher is not None else None
            with torch.autocast(device.type, torch.bfloat16, enabled=amp == "bf16"):
                losses = model(batch, teacher_embed)
            (losses["loss"] / t["accumulate"]).backward()
            state["batch_in_epoch"] += 1
            window.append({k: float(v.detach()) for k, v in losses.items()})
            if state["batch_in_epoch"] % t["accumulate"]:
                continue
            if t["grad_clip"]:
                if hasattr(optimizer, "clip_grad_norm"):
                    optimizer.clip_grad_norm(t["grad_clip"])
                else:
                    torch.nn.utils.clip_grad_norm_(params, t["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(student)
            state["step"] += 1
            record = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            if world > 1:  # log the global-batch mean, not rank 0's share
                values = torch.tensor(list(record.values()), dtype=torch.float64)
                torch_dist.all_reduce(values)
                record = dict(zip(record, (values / world).tolist()))
            record.update(step=state["step"], epoch=epoch, lr=scheduler.get_last_lr()[0], skipped=skipped_total)
            window = []
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if t["save_every"] and state["step"] % t["save_every"] == 0:
                save(f"step_{state['step']}", record["loss"])
            if state["step"] >= total_steps:
                done = True
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
        if done or not t["save_every"]:
            save(f"step_{state['step']}", _last_loss(metrics_path))
    bar.close()
    summary = {"steps": state["step"], "skipped": skipped_total, "checkpoint_dir": str(ckpt_dir),
               "final": _tail(metrics_path)}
    if rank == 0:
        plot_losses(metrics_path, out_dir / "loss_curve.png")
    return summary


def _read_metrics(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _tail(path: Path) -> Dict[str, Any]:
    rows = _read_metrics(path)
    return rows[-1] if rows else {}


def _last_loss(path: Path) -> float:
    return _tail(path).get("loss", float("inf"))


def plot_losses(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_metrics(metrics_path)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "distill", "mask", "iou"):
        if key in rows[0]:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
